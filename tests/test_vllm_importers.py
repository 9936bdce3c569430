"""vLLM importers: `vllm bench serve` result JSON and the spec-decode counters of /metrics.

No real result file or scrape is available in ../shared/fixtures yet (its README says so), so
these tests write small files that follow ../shared/VLLM.md field by field: a flat result
JSON with `mean_<metric>_ms` keys, `request_rate` a number or "inf", `--save-detailed`
arrays in seconds; Prometheus counters with a `_total` suffix.
"""

import json
import re

import numpy as np
import pytest

import sdbayes as sb
from sdbayes.importers import (
    acceptance_between,
    read_spec_decode_metrics,
    read_vllm_bench,
)

CONFIG = dict(hardware="H100", verifier="Qwen3-8B", drafter="eagle3-qwen3-8b", method="eagle3")


def result(n=50, rate=4.0, seed=0, **extra):
    """A result JSON as `vllm bench serve --save-result --save-detailed` writes it."""
    rng = np.random.default_rng(seed)
    ttfts = rng.uniform(0.05, 0.15, n)
    itls = [list(rng.uniform(0.01, 0.03, 40)) for _ in range(n)]
    e2el = ttfts + np.array([sum(x) for x in itls])
    out = {
        "date": "20261124-120000", "backend": "vllm", "model_id": "Qwen/Qwen3-8B",
        "num_prompts": n, "request_rate": rate, "burstiness": 1.0, "max_concurrency": None,
        "duration": 20.0, "completed": n, "failed": 0, "total_input_tokens": 512 * n,
        "total_output_tokens": 128 * n, "request_throughput": n / 20.0,
        "mean_ttft_ms": 1e3 * ttfts.mean(), "mean_tpot_ms": 1e3 * ((e2el - ttfts) / 127).mean(),
        "mean_e2el_ms": 1e3 * e2el.mean(), "std_e2el_ms": 1e3 * e2el.std(),
        "median_e2el_ms": 1e3 * np.median(e2el), "p50_e2el_ms": 1e3 * np.percentile(e2el, 50),
        "p90_e2el_ms": 1e3 * np.percentile(e2el, 90), "p99_e2el_ms": 1e3 * np.percentile(e2el, 99),
        "input_lens": [512] * n, "output_lens": [128] * n, "ttfts": list(ttfts), "itls": itls,
        "generated_texts": ["..."] * n, "errors": [""] * n,
    }
    out.update(extra)
    return out


def write(tmp_path, data, name="result.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def scrape(drafts, accepted, per_position=(), engines=1):
    """Prometheus text as vLLM's /metrics serves it (counts split over engines)."""
    lines = ["# HELP vllm:spec_decode_num_drafts Number of spec decoding drafts.",
             "# TYPE vllm:spec_decode_num_drafts counter"]
    for e in range(engines):
        labels = f'engine="{e}",model_name="Qwen/Qwen3-8B"'
        lines += [f"vllm:spec_decode_num_drafts_total{{{labels}}} {drafts / engines}",
                  f"vllm:spec_decode_num_draft_tokens_total{{{labels}}} {4 * drafts / engines}",
                  f"vllm:spec_decode_num_accepted_tokens_total{{{labels}}} {accepted / engines}"]
        lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{labels},position="{i}"}}'
                  f" {v / engines}" for i, v in enumerate(per_position)]
    return "\n".join(lines) + "\n"


def test_numbers_match_the_files_own_aggregates(tmp_path):
    data = result()
    point = read_vllm_bench(write(tmp_path, data), k=4, acceptance=0.7, **CONFIG).iloc[0]
    assert point["e2e_mean_s"] * 1e3 == pytest.approx(data["mean_e2el_ms"], abs=1e-9)
    assert point["ttft_mean_s"] * 1e3 == pytest.approx(data["mean_ttft_ms"], abs=1e-9)
    assert point["tpot_mean_s"] * 1e3 == pytest.approx(data["mean_tpot_ms"], abs=1e-9)
    assert point["e2e_p99_s"] * 1e3 == pytest.approx(data["p99_e2el_ms"], abs=1e-9)
    assert (point["request_rate"], point["n_requests"], point["prompt_len"]) == (4.0, 50, 512)
    # The per-request arrays agree with the aggregate: e2e = ttft + sum(itls).
    e2e = np.array(data["ttfts"]) + np.array([sum(x) for x in data["itls"]])
    assert 1e3 * e2e.mean() == pytest.approx(data["mean_e2el_ms"])
    assert bool(point["steady"])


def test_infinite_rate_is_a_burst_or_a_closed_loop(tmp_path):
    burst = read_vllm_bench(write(tmp_path, result(rate="inf")), k=0, **CONFIG).iloc[0]
    assert not burst["steady"] and burst["request_rate"] == pytest.approx(2.5)
    closed = read_vllm_bench(write(tmp_path, result(rate="inf", max_concurrency=16)), k=0,
                             **CONFIG).iloc[0]
    assert closed["concurrency"] == 16 and bool(closed["steady"])


def test_latency_without_e2el_statistics_comes_from_the_arrays(tmp_path):
    """`benchmark_serving.py` before e2el existed: each request's TTFT plus its gaps."""
    data = result(n=50)
    point = read_vllm_bench(write(tmp_path, {k: v for k, v in data.items() if "e2el" not in k}),
                            k=4, acceptance=0.7, **CONFIG).iloc[0]
    assert point["e2e_mean_s"] * 1e3 == pytest.approx(data["mean_e2el_ms"], rel=1e-12)
    assert point["e2e_p99_s"] * 1e3 == pytest.approx(data["p99_e2el_ms"], rel=1e-12)


def test_failed_requests_are_counted_not_dropped(tmp_path):
    data = result(n=50)
    data.update(completed=48, failed=2, errors=[""] * 48 + ["timeout", "reset"])
    point = read_vllm_bench(write(tmp_path, data), k=4, acceptance=0.7, **CONFIG).iloc[0]
    assert (point["n_requests"], point["errored_requests"]) == (48, 2)


@pytest.mark.parametrize("change, message", [
    (lambda d: json.dumps(d)[:200], "neither JSON"),
    (lambda d: {k: v for k, v in d.items() if k not in ("mean_e2el_ms", "ttfts", "mean_tpot_ms")},
     "missing field 'mean_e2el_ms' (run vllm bench serve with --percentile-metrics"),
    (lambda d: {**d, "ttfts": d["ttfts"][:-1]}, "per-request arrays of different lengths"),
    (lambda d: {**d, "errors": ["boom"] + d["errors"][1:]}, "field 'errors': 49 requests"),
    (lambda d: {**d, "completed": 0}, "no request completed"),
    (lambda d: [d], "expected a vllm bench serve result"),
    (lambda d: {**d, "request_rate": "fast"}, "field 'request_rate': not a number: 'fast'"),
    (lambda d: {**d, "mean_e2el_ms": "abc"}, "field 'mean_e2el_ms': not a number: 'abc'"),
    (lambda d: {**d, "completed": True}, "field 'completed': not a number: True"),
    (lambda d: {**d, "mean_ttft_ms": [1.0]}, "field 'mean_ttft_ms': not a number: [1.0]"),
    (lambda d: {**d, "output_lens": [1e308] + d["output_lens"][1:]},
     "field 'output_lens[0]': 1e+308 is not a token count"),
    (lambda d: {**d, "output_lens": d["output_lens"][:3] + ["x"] + d["output_lens"][4:]},
     "field 'output_lens[3]': 'x' is not a token count"),
])
def test_malformed_results_are_named(tmp_path, change, message):
    path = write(tmp_path, change(result()))
    with pytest.raises(sb.TraceError, match=re.escape(message)) as info:
        read_vllm_bench(path, k=4, acceptance=0.7, **CONFIG)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("alpha", [0.3, 0.7, 0.95])
def test_acceptance_from_scrapes_before_and_after(tmp_path, alpha):
    k, drafts = 4, 10_000
    length = float(sb.tokens_per_step(k, alpha))
    per_position = [drafts * alpha ** (i + 1) for i in range(k)]  # unconditional: alpha^i
    before = scrape(500, 300)
    after = scrape(500 + drafts, 300 + drafts * (length - 1),
                   per_position=per_position, engines=2)
    counts = read_spec_decode_metrics(after)
    assert counts.drafts == 500 + drafts
    np.testing.assert_allclose(counts.accepted_per_position, per_position)
    assert acceptance_between(read_spec_decode_metrics(before), counts, k) == pytest.approx(
        alpha, abs=1e-9)
    # The same through the result importer.
    files = [write(tmp_path, s, name) for s, name in ((before, "before.txt"), (after, "after.txt"))]
    point = read_vllm_bench(write(tmp_path, result()), k=k, metrics_before=files[0],
                            metrics_after=files[1], **CONFIG).iloc[0]
    assert point["acceptance"] == pytest.approx(alpha, abs=1e-9)


def test_acceptance_from_the_results_own_field_or_a_clear_error(tmp_path):
    length = float(sb.tokens_per_step(4, 0.8))
    point = read_vllm_bench(write(tmp_path, result(spec_decode_acceptance_length=length)), k=4,
                            **CONFIG).iloc[0]
    assert point["acceptance"] == pytest.approx(0.8, abs=1e-9)
    with pytest.raises(sb.TraceError, match="no acceptance rate: give acceptance="):
        read_vllm_bench(write(tmp_path, result()), k=4, **CONFIG)
    # A length measured at k = 4 read as k = 3: no alpha gives it (once read as alpha = 1).
    with pytest.raises(sb.TraceError, match=re.escape(
            "field 'spec_decode_acceptance_length': mean acceptance length 4.36 is "
            "impossible at k = 3")):
        read_vllm_bench(write(tmp_path, result(spec_decode_acceptance_length=4.36)), k=3,
                        **CONFIG)


def test_scraped_counters_of_another_k_are_refused():
    """A scrape of k = 4 (3.4 tokens accepted a draft) given as k = 2."""
    before, after = scrape(0, 0), scrape(1000, 3400)
    with pytest.raises(sb.TraceError, match="draft tokens per draft: 4, not the k = 2 given"):
        acceptance_between(read_spec_decode_metrics(before), read_spec_decode_metrics(after), 2)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.8, 0.99])
def test_vllms_acceptance_rate_converts_to_alpha(k, alpha):
    """accepted / drafted = (E(k, alpha) - 1) / k, inverted."""
    rate = (float(sb.tokens_per_step(k, alpha)) - 1.0) / k
    assert sb.traces.acceptance_from_rate(k, rate) == pytest.approx(alpha, abs=1e-9)


def test_scrape_problems_are_named():
    with pytest.raises(sb.TraceError, match="went down between the scrapes"):
        acceptance_between(read_spec_decode_metrics(scrape(900, 500)),
                           read_spec_decode_metrics(scrape(100, 50)), 4)
    with pytest.raises(sb.TraceError, match="no counter vllm:spec_decode_num_drafts_total"):
        read_spec_decode_metrics("vllm:num_requests_running{engine=\"0\"} 3.0\n")
    with pytest.raises(sb.TraceError, match="not Prometheus text"):
        read_spec_decode_metrics("this is { not prometheus\n")
