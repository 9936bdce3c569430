"""Every real vLLM and GuideLLM output file in ../shared/fixtures/real-files (read in place,
sources in its README) imports with the values the file holds, or fails in one line that
says why. A file added there without a case here fails `test_every_file_has_a_case`."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

import sdbayes as sb
from sdbayes.importers import (
    ImportNote,
    acceptance_between,
    read_benchmark,
    read_spec_decode_metrics,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-files"
CONFIG = dict(hardware="H100", verifier="v", method="eagle3")
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"no real files in {REAL}")


def raw(name: str):
    text = (REAL / name).read_text()
    return yaml.safe_load(text) if name.endswith(".yaml") else json.loads(text)


def one_row(frame):
    assert len(frame) == 1
    return frame.iloc[0]


def guidellm_stripped(name):
    """GuideLLM before 0.3 (strategy in `args`), one synchronous benchmark; JSON or YAML."""
    row = one_row(read_benchmark(REAL / name, **CONFIG, k=3, acceptance=0.7))
    benchmark = raw(name)["benchmarks"][0]
    latency = benchmark["metrics"]["request_latency"]["successful"]
    assert row["concurrency"] == 1 and row["steady"] and math.isnan(row["request_rate"])
    assert row["e2e_mean_s"] == latency["mean"] and row["n_requests"] == latency["count"]
    assert row["e2e_p99_s"] == latency["percentiles"]["p99"]
    assert row["duration_s"] == benchmark["duration"]
    assert row["incomplete_requests"] == benchmark["metrics"]["request_latency"][
        "incomplete"]["count"]
    return row


def guidellm_concurrent():
    """GuideLLM 0.5: the strategy is in `config`; 4 streams are a closed loop of 4, and the
    window is the benchmark's `duration` (its `requests_per_second` is a windowed mean)."""
    name = "guidellm-bench_sanity_concurrent4_benchmarks.json"
    row = one_row(read_benchmark(REAL / name, **CONFIG, k=0))
    benchmark = raw(name)["benchmarks"][0]
    assert row["concurrency"] == benchmark["config"]["strategy"]["streams"] == 4
    assert row["steady"] and row["k"] == 0 and row["acceptance"] == 0.0
    assert row["duration_s"] == benchmark["duration"]
    count = benchmark["metrics"]["request_latency"]["successful"]["count"]
    assert row["throughput_rps"] == pytest.approx(count / benchmark["duration"])
    assert row["e2e_mean_s"] == benchmark["metrics"]["request_latency"]["successful"]["mean"]
    lengths = benchmark["metrics"]["output_token_count"]["successful"]
    assert row["output_len_sd"] == lengths["std_dev"]
    for name, source in (("ttft", "time_to_first_token_ms"), ("tpot", "inter_token_latency_ms")):
        stats = benchmark["metrics"][source]["successful"]
        assert row[f"{name}_p50_s"] == pytest.approx(stats["median"] / 1e3)
        assert row[f"{name}_p99_s"] == pytest.approx(stats["percentiles"]["p99"] / 1e3)


def serving_detailed():
    """`benchmark_serving.py` with --save-detailed, no `failed` and no e2el statistics: the
    latency of each request is its TTFT plus its inter-token gaps."""
    name = "llm-k8s_llama70b_tp8_qps04.json"
    row = one_row(read_benchmark(REAL / name, **CONFIG, k=0))
    data = raw(name)
    pairs = zip(data["ttfts"], data["itls"], strict=True)
    latency = np.array([ttft + sum(gaps) for ttft, gaps in pairs])
    assert row["e2e_mean_s"] == pytest.approx(latency.mean(), rel=1e-12)
    assert row["e2e_p90_s"] == pytest.approx(np.percentile(latency, 90), rel=1e-12)
    assert row["request_rate"] == data["request_rate"] and row["steady"]
    assert row["arrival_cv2"] == 1 / data["burstiness"]  # gamma gaps of that shape
    assert row["output_len_sd"] == pytest.approx(np.std(data["output_lens"]))
    assert row["n_requests"] == data["completed"] and row["errored_requests"] == 0
    assert row["prompt_len"] == data["total_input_tokens"] / data["completed"]
    assert row["ttft_mean_s"] == pytest.approx(data["mean_ttft_ms"] / 1e3)


def bench_serve():
    """`vllm bench serve` 0.25.1 with the default percentile metrics (no e2el), closed loop
    of max_concurrency 2: e2e is derived, with a note."""
    name = "er0080_bench_serve_v0.25.1.json"
    with pytest.warns(ImportNote, match="no end-to-end latency"):
        row = one_row(read_benchmark(REAL / name, **CONFIG, k=0))
    data = raw(name)
    output_len = data["total_output_tokens"] / data["completed"]
    assert row["e2e_mean_s"] == pytest.approx(
        (data["mean_ttft_ms"] + data["mean_tpot_ms"] * (output_len - 1)) / 1e3)
    assert row["concurrency"] == data["max_concurrency"] and row["steady"]
    assert math.isnan(row.get("e2e_se_s", math.nan))  # unknown, not made up
    assert row["ttft_p50_s"] == data["median_ttft_ms"] / 1e3
    assert row["tpot_p99_s"] == data["p99_tpot_ms"] / 1e3
    assert math.isnan(row.get("tpot_p90_s", math.nan))  # not among its --metric-percentiles


def bench_serve_speculative():
    """`vllm bench serve` with spec_decode fields: k and acceptance are read from them, and
    a k that contradicts them is refused."""
    name = "er0080_bench_serve_speculative_v0.25.1.json"
    with pytest.warns(ImportNote):
        row = one_row(read_benchmark(REAL / name, **CONFIG))
    data = raw(name)
    assert row["k"] == len(data["spec_decode_per_position_acceptance_rates"]) == 3
    rate = data["spec_decode_acceptance_rate"] / 100  # vLLM writes it in percent
    assert row["acceptance"] == pytest.approx(sb.traces.acceptance_from_rate(3, rate))
    with pytest.raises(sb.TraceError, match="3, not the k = 4 given"):
        read_benchmark(REAL / name, **CONFIG, k=4)


def bench_serve_all_failed():
    with pytest.raises(sb.TraceError, match=r"no request completed \(8 failed\)") as error:
        read_benchmark(REAL / "er0080_bench_serve_all_failed_v0.25.1.json", **CONFIG, k=0)
    assert len(error.value.problems) == 1


def sweep_run():
    name = "er0080_vllm_bench_sweep_v0.25.1_run0.json"
    row = one_row(read_benchmark(REAL / name, **CONFIG, k=0))
    data = raw(name)
    assert row["e2e_mean_s"] == data["mean_e2el_ms"] / 1e3
    assert row["e2e_se_s"] == pytest.approx(data["std_e2el_ms"] / 1e3 / math.sqrt(8))
    assert row["run"] == 0 and row["concurrency"] == 2


def sweep_summary():
    """`vllm bench sweep`'s summary.json: a row per run; repeats of one point differ in
    `run` and are both kept."""
    name = "er0080_vllm_bench_sweep_v0.25.1_summary.json"
    frame = read_benchmark(REAL / name, **CONFIG, k=0)
    runs = raw(name)
    assert list(frame["run"]) == [run["run_number"] for run in runs] == [0, 1]
    assert list(frame["e2e_mean_s"]) == [run["mean_e2el_ms"] / 1e3 for run in runs]
    with pytest.raises(sb.TraceError, match="run 1: .*give --k"):
        read_benchmark(REAL / name, **CONFIG)


def metrics_without_sd():
    name = "er0080_metrics_vllm_0.25.1_loaded_noSD.txt"
    with pytest.raises(sb.TraceError, match="was speculative decoding on") as error:
        read_spec_decode_metrics((REAL / name).read_text(), name)
    assert len(error.value.problems) == 1


def metrics_draft_model():
    """Excerpts of two scrapes around a run of a draft model at k = 3."""
    before, after = (read_spec_decode_metrics(
        (REAL / f"apertus70b_draft-n3_code_c8_metrics_{when}.EXCERPT.prom").read_text())
        for when in ("before", "after"))
    assert (after.drafts, after.draft_tokens, after.accepted_tokens) == (7830, 23490, 18367)
    assert after.accepted_per_position == (6937, 6003, 5427)
    alpha = acceptance_between(before, after, 3)
    length = 1 + (18367 - 11877) / (7830 - 5077)
    assert float(sb.tokens_per_step(3, alpha)) == pytest.approx(length)
    with pytest.raises(sb.TraceError, match="3, not the k = 4 given"):
        acceptance_between(before, after, 4)


CASES = {
    "guidellm-tests_benchmarks_stripped_a1fe883a.json": lambda: guidellm_stripped(
        "guidellm-tests_benchmarks_stripped_a1fe883a.json"),
    "guidellm-tests_benchmarks_stripped_a1fe883a.yaml": lambda: guidellm_stripped(
        "guidellm-tests_benchmarks_stripped_a1fe883a.yaml"),
    "guidellm-bench_sanity_concurrent4_benchmarks.json": guidellm_concurrent,
    "llm-k8s_llama70b_tp8_qps04.json": serving_detailed,
    "er0080_bench_serve_v0.25.1.json": bench_serve,
    "er0080_bench_serve_speculative_v0.25.1.json": bench_serve_speculative,
    "er0080_bench_serve_all_failed_v0.25.1.json": bench_serve_all_failed,
    "er0080_vllm_bench_sweep_v0.25.1_run0.json": sweep_run,
    "er0080_vllm_bench_sweep_v0.25.1_summary.json": sweep_summary,
    "er0080_metrics_vllm_0.25.1_loaded_noSD.txt": metrics_without_sd,
    "apertus70b_draft-n3_code_c8_metrics_before.EXCERPT.prom": metrics_draft_model,
    "apertus70b_draft-n3_code_c8_metrics_after.EXCERPT.prom": metrics_draft_model,
}


def test_every_file_has_a_case():
    files = {p.name for p in REAL.iterdir() if p.is_file() and p.name != "README.md"}
    assert files == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_file(name):
    CASES[name]()


def test_yaml_report_reads_as_its_json_twin():
    twins = [read_benchmark(REAL / f"guidellm-tests_benchmarks_stripped_a1fe883a.{ext}",
                            **CONFIG, k=3, acceptance=0.7) for ext in ("json", "yaml")]
    assert twins[0].equals(twins[1])
