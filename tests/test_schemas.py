"""The file schemas: what they accept, and problems that name the field and the value."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdbayes.schemas import GuideLLMMetrics, GuideLLMRun, VllmResult, problems

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "real-files"
GUIDELLM = REAL / "guidellm-bench_sanity_concurrent4_benchmarks.json"
VLLM = REAL / "er0080_bench_serve_v0.25.1.json"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason="no ../shared/fixtures/real-files")


def failures(model, data) -> list[str]:
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    return problems(info.value, "f.json")


def test_a_real_guidellm_benchmark_reads_field_by_field():
    benchmark = json.loads(GUIDELLM.read_text())["benchmarks"][0]
    run, metrics = GuideLLMRun.model_validate(benchmark), GuideLLMMetrics.model_validate(
        benchmark["metrics"])
    assert (run.strategy.type_, run.strategy.streams) == ("concurrent", 4)
    assert run.duration == benchmark["duration"]
    latency = benchmark["metrics"]["request_latency"]["successful"]
    assert metrics.request_latency.successful.count == latency["count"]
    assert metrics.request_latency.successful.percentiles.p99 == latency["percentiles"]["p99"]


def test_a_real_vllm_result_reads_and_its_extra_fields_are_ignored():
    data = json.loads(VLLM.read_text())
    result = VllmResult.model_validate({**data, "a_field_of_a_later_vllm": [1, 2]})
    assert result.completed == data["completed"]
    assert result.request_rate == float(data["request_rate"])  # "inf" or a number


def test_null_is_missing_and_strings_of_numbers_are_numbers():
    data = json.loads(VLLM.read_text())
    assert failures(VllmResult, {**data, "completed": None}) == [
        "f.json: missing field 'completed'"]
    assert VllmResult.model_validate({**data, "request_rate": "Infinity"}).request_rate \
        == float("inf")
    assert VllmResult.model_validate({**data, "mean_ttft_ms": None}).mean_ttft_ms is None


@pytest.mark.parametrize("change, message", [
    ({"completed": 2.5}, "field 'completed': not a count: 2.5"),
    ({"completed": -1}, "field 'completed': not a count: -1"),
    ({"ttfts": "abc"}, "field 'ttfts': should be a valid list, got 'abc'"),
    ({"errors": [3]}, "field 'errors[0]': should be a valid string, got 3"),
    ({"itls": [[0.1, True]]}, "field 'itls[0][1]': should be a valid number, got True"),
    ({"input_lens": [1, 2], "output_lens": [1]}, "per-request arrays of different lengths "
                                                  "{'input_lens': 2, 'output_lens': 1}"),
])
def test_each_problem_names_the_field_and_what_it_got(change, message):
    data = json.loads(VLLM.read_text())
    assert failures(VllmResult, {**data, **change}) == [f"f.json: {message}"]


def test_a_schema_class_name_never_reaches_the_user():
    benchmark = json.loads(GUIDELLM.read_text())["benchmarks"][0]
    metrics = benchmark["metrics"]
    metrics["request_latency"]["successful"]["percentiles"] = [1, 2]
    benchmark["config"]["strategy"]["type_"] = "sweep"
    assert failures(GuideLLMMetrics, metrics) == [
        "f.json: field 'request_latency.successful.percentiles': should be a valid "
        "dictionary, got [1, 2]"]
    assert failures(GuideLLMRun, benchmark) == [
        "f.json: field 'config.strategy.type_': should be 'synchronous', 'concurrent', "
        "'throughput', 'constant' or 'poisson', got 'sweep'"]
