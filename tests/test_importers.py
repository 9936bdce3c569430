"""Importers, checked on the source study's real GuideLLM files (read in place from
../shared/data, never copied) and on malformed variants of them."""

import json
import math
from pathlib import Path

import pytest

import sdbayes as sb
from sdbayes.importers import read_guidellm

STUDY = Path(__file__).resolve().parents[2] / "shared" / "data" / "speculators-qwen3-8b"
FILES = sorted(STUDY.glob("*.json"))
CONFIG = dict(hardware="GPU-80GB", verifier="Qwen3-8B", drafter="eagle3-qwen3-8b",
              method="eagle3")
pytestmark = pytest.mark.skipif(not FILES, reason=f"no study files in {STUDY}")


def test_study_has_48_sweeps():
    assert len(FILES) == 48


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name.split("_FS_")[1][:18])
def test_each_file_against_its_own_numbers(path):
    raw = json.loads(path.read_text())
    points = read_guidellm(path, **CONFIG)
    assert len(points) == len(raw) == 10
    alpha = float(path.name.split("alpha-")[1].split("_")[0])
    k = int(path.name.split("draft-")[1].split("_")[0])
    assert (points["k"] == k).all() and (points["acceptance"] == alpha).all()
    # synchronous first (closed loop of one), throughput second (saturated, not steady: a
    # closed loop at GuideLLM's cap of 128), then open-loop points
    assert points.loc[0, "concurrency"] == 1 and abs(points.loc[1, "concurrency"] - 128) <= 2
    assert points["concurrency"].iloc[2:].isna().all()
    assert list(points["steady"]) == [True, False] + [True] * 8
    for row, metrics in zip(points.itertuples(), raw, strict=True):
        latency = metrics["request_latency"]["successful"]
        assert row.e2e_mean_s == latency["mean"] and row.n_requests == latency["count"]
        assert row.e2e_se_s == pytest.approx(latency["std_dev"] / math.sqrt(latency["count"]))
        assert row.e2e_p99_s == latency["percentiles"]["p99"]
        assert row.ttft_mean_s == pytest.approx(
            metrics["time_to_first_token_ms"]["successful"]["mean"] / 1e3)
        # GuideLLM's ITL is vLLM's TPOT: (latency - TTFT) / (n - 1)
        assert row.tpot_mean_s == pytest.approx(
            metrics["inter_token_latency_ms"]["successful"]["mean"] / 1e3)
        assert row.throughput_rps == metrics["requests_per_second"]["successful"]["mean"]
        assert row.incomplete_requests == metrics["request_latency"]["incomplete"]["count"]
        # The study ran each benchmark for --max-seconds 90; GuideLLM's window ends at the
        # last success, up to one synchronous request (1.4 s) earlier.
        assert 88.0 <= row.duration_s <= 90.0
        assert row.duration_s * row.throughput_rps == pytest.approx(row.n_requests)
        if row.Index >= 2:
            # Arrivals per second: GuideLLM's own rate of all requests, within its rounding
            # of the window (measured: 1.2% at most).
            assert row.request_rate == pytest.approx(
                metrics["requests_per_second"]["total"]["mean"], rel=0.02)
            assert row.request_rate >= row.throughput_rps
    held = raw[1]["request_concurrency"]["total"]["mean"]
    assert abs(points.loc[1, "concurrency"] - held) <= 0.5
    assert points["request_rate"].iloc[2:].is_monotonic_increasing


@pytest.fixture
def study_copy(tmp_path):
    """A writable copy, for malformed variants (in tmp, not in the project)."""
    source = next(p for p in FILES if "alpha-0.70_draft-4_" in p.name)
    return json.loads(source.read_text()), tmp_path / source.name


def test_truncated_json(study_copy):
    raw, path = study_copy
    path.write_text(json.dumps(raw)[:5000])
    with pytest.raises(sb.TraceError, match="neither JSON"):
        read_guidellm(path, **CONFIG)


def test_missing_field_is_named(study_copy):
    raw, path = study_copy
    del raw[2]["request_latency"]
    del raw[4]["inter_token_latency_ms"]["successful"]
    path.write_text(json.dumps(raw))
    with pytest.raises(sb.TraceError) as info:
        read_guidellm(path, **CONFIG)
    assert info.value.problems == [
        f"{path}: benchmark 3: missing field 'request_latency'",
        f"{path}: benchmark 5: missing field 'inter_token_latency_ms.successful'",
    ]


def test_field_that_is_no_number_is_named(study_copy):
    raw, path = study_copy
    raw[1]["request_latency"]["successful"]["mean"] = "abc"
    raw[6]["requests_per_second"]["successful"]["mean"] = {"value": 3}
    path.write_text(json.dumps(raw))
    with pytest.raises(sb.TraceError) as info:
        read_guidellm(path, **CONFIG)
    assert info.value.problems == [
        f"{path}: benchmark 2: field 'request_latency.successful.mean': not a number: 'abc'",
        f"{path}: benchmark 7: field 'requests_per_second.successful.mean': not a number: "
        "{'value': 3}",
    ]


def test_config_from_arguments_when_the_name_lacks_it(study_copy, tmp_path):
    raw, _ = study_copy
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"benchmarks": [{"metrics": m} for m in raw]}))
    with pytest.raises(sb.TraceError, match="give k= and acceptance="):
        read_guidellm(path, **CONFIG)
    points = read_guidellm(path, k=4, acceptance=0.7, **CONFIG)
    assert len(points) == 10 and (points["k"] == 4).all()
    # A run without SD needs no acceptance.
    baseline = read_guidellm(path, k=0, **CONFIG)
    assert (baseline["k"] == 0).all() and (baseline["acceptance"] == 0.0).all()


@pytest.mark.parametrize("content", ["[]", "{}", "3", '{"benchmarks": [5]}'])
def test_not_a_sweep(tmp_path, content):
    path = tmp_path / "x_alpha-0.5_draft-2.json"
    path.write_text(content)
    with pytest.raises(sb.TraceError, match=str(path)):
        read_guidellm(path, **CONFIG)
