"""Importers from benchmark tools' files into canonical operating points.

vLLM (VLLM.md): ``vllm bench serve`` result JSON (:func:`read_vllm_bench`) and the
spec-decode counters of its Prometheus /metrics (:func:`read_spec_decode_metrics`).


GuideLLM (VLLM.md): a benchmark's ``metrics`` hold ``request_latency`` [s],
``time_to_first_token_ms``, ``inter_token_latency_ms`` (GuideLLM's ITL is vLLM's TPOT,
``(latency - TTFT) / (n - 1)``), ``requests_per_second``, ``prompt_token_count`` and
``output_token_count``, each split into ``successful / errored / incomplete / total`` with
``mean, std_dev, count, percentiles``. Latencies are those of successful requests; errored
and incomplete ones are counted in the ``errored_requests`` and ``incomplete_requests``
columns, never dropped silently, and count in the arrival rate.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from prometheus_client.parser import text_string_to_metric_families

from sdbayes.traces import TraceError, acceptance_from_length, validate

# The source study's file names, e.g.
# output_Qwen3-8B_FS_alpha-0.70_draft-4_prompt-512_output-128_concurrency-128_reduced.json
_STUDY_NAME = re.compile(r"alpha-(?P<alpha>[0-9.]+)_draft-(?P<k>\d+)")


def read_guidellm(
    path: str | Path,
    *,
    hardware: str,
    verifier: str,
    drafter: str = "",
    method: str = "",
    k: int | None = None,
    acceptance: float | None = None,
) -> pd.DataFrame:
    """Read a GuideLLM sweep into operating points.

    The file is a full GuideLLM report (``{"benchmarks": [{"metrics": ...}, ...]}``) or a
    bare list of benchmark ``metrics`` objects, as in the source study's files. A sweep runs
    a synchronous benchmark first (one request at a time: a closed loop of concurrency 1),
    then a throughput benchmark, then constant-rate points (open loop). Their
    ``request_rate`` is the arrival rate, requests started per second whatever became of
    them; ``throughput_rps`` is GuideLLM's rate of successful ones
    (``requests_per_second.successful.mean``). Where a benchmark names its strategy
    (``args.strategy.type_`` in full reports) that name is used instead of the position.

    The throughput benchmark keeps as many requests in flight as GuideLLM allows: it is
    saturated, outside the open loop's stable region, and kept with ``steady=False``, so
    fits leave it out. It is also a closed loop, recorded at the ``concurrency`` it held
    (``request_concurrency.total.mean``, rounded), and a closed loop has a steady state at
    any concurrency: ``points.assign(steady=True)`` fits it as one, which pins the
    server's capacity (``bench/real_data.py`` does). ``duration_s`` is each benchmark's
    window, the successful count over their rate.

    Args:
      path: the JSON file.
      hardware, verifier, drafter, method: configuration the file does not record.
      k, acceptance: draft length and forced acceptance; by default read from a file name
        with ``alpha-<a>_draft-<k>`` in it. With ``k=0`` (no SD) the acceptance is 0.

    Returns:
      A validated operating-point table, one row per benchmark, in file order, with
      ``errored_requests`` and ``incomplete_requests`` columns and a ``benchmark`` index.

    Raises:
      TraceError: the file is missing, not JSON, or lacks a field; the message names the
        file, the benchmark and the field.
    """
    path, data = _read_json(path)
    return _guidellm_points(path, data, hardware=hardware, verifier=verifier, drafter=drafter,
                            method=method, k=k, acceptance=acceptance)


def _read_json(path: str | Path):
    """(path, parsed JSON), or a TraceError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TraceError([f"{path}: no such file"])
    try:
        return path, json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError([f"{path}: not valid JSON ({err})"]) from None


def read_benchmark(path: str | Path, *, hardware: str, verifier: str, drafter: str = "",
                   method: str = "", k: int | None = None, acceptance: float | None = None,
                   metrics_before: str | Path | None = None,
                   metrics_after: str | Path | None = None) -> pd.DataFrame:
    """A GuideLLM sweep or a ``vllm bench serve`` result, told apart by content.

    A JSON object without ``benchmarks`` is a vLLM result (:func:`read_vllm_bench`, which
    needs ``k``); anything else is read as GuideLLM (:func:`read_guidellm`). Arguments as
    those two take them.
    """
    path, data = _read_json(path)
    if isinstance(data, dict) and "benchmarks" not in data:
        if k is None:
            raise TraceError([f"{path}: a vllm bench serve result does not record k; "
                              "give --k (k= in Python)"])
        return _vllm_point(path, data, hardware=hardware, verifier=verifier, drafter=drafter,
                           method=method, k=k, acceptance=acceptance,
                           metrics_before=metrics_before, metrics_after=metrics_after)
    return _guidellm_points(path, data, hardware=hardware, verifier=verifier, drafter=drafter,
                            method=method, k=k, acceptance=acceptance)


def _guidellm_points(path: Path, data, *, hardware, verifier, drafter, method, k, acceptance):
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else data
    if not isinstance(benchmarks, list) or not benchmarks:
        raise TraceError([f"{path}: expected a GuideLLM report with 'benchmarks' or a list of "
                          "benchmark metrics"])
    if k == 0 and acceptance is None:
        acceptance = 0.0  # nothing is drafted, so nothing to accept
    if k is None or acceptance is None:
        match = _STUDY_NAME.search(path.name)
        if match is None:
            raise TraceError([f"{path}: give k= and acceptance= (the file name does not "
                              "carry alpha-<a>_draft-<k>)"])
        k = int(match["k"]) if k is None else k
        acceptance = float(match["alpha"]) if acceptance is None else acceptance

    rows, problems = [], []
    for i, benchmark in enumerate(benchmarks):
        metrics = benchmark.get("metrics", benchmark) if isinstance(benchmark, dict) else None
        where = f"{path}: benchmark {i + 1}"
        if not isinstance(metrics, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        try:
            row = _point(metrics, _strategy(benchmark, i))
        except _Malformed as problem:
            problems.append(f"{where}: {problem}")
            continue
        rows.append(dict(hardware=hardware, verifier=verifier, drafter=drafter, method=method,
                         k=k, acceptance=acceptance, benchmark=i + 1, **row))
    if problems:
        raise TraceError(problems)
    return validate(pd.DataFrame(rows), source=str(path))


class _Malformed(ValueError):
    """A field missing or not a number; the message names it ("missing field 'a.b'")."""


def _get(obj, *keys):
    for key in keys:
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            raise _Malformed(f"missing field '{'.'.join(keys)}'")
        obj = obj[key]
    return obj


def _count(obj, *keys) -> int:
    """A field that counts something: a whole number, at least 0."""
    value = _number(obj, *keys)
    if not (math.isfinite(value) and value >= 0 and value == int(value)):
        raise _Malformed(f"field '{'.'.join(keys)}': not a count: {_get(obj, *keys)!r}")
    return int(value)


def _number(obj, *keys) -> float:
    """A numeric field (a number, or a string of one such as JSON's "inf"), as a float."""
    value = _get(obj, *keys)
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        return float(value)
    except (ValueError, OverflowError):
        raise _Malformed(f"field '{'.'.join(keys)}': not a number: {value!r}") from None


def _strategy(benchmark: dict, index: int) -> str:
    try:
        return str(_get(benchmark, "args", "strategy", "type_"))
    except _Malformed:
        return ("synchronous", "throughput")[index] if index < 2 else "constant"


def _point(metrics: dict, strategy: str) -> dict:
    def latency(*keys):
        return _number(metrics, "request_latency", "successful", *keys)

    count = _count(metrics, "request_latency", "successful", "count")
    if count < 1:
        raise _Malformed("field 'request_latency.successful.count': no request completed")
    rate = _number(metrics, "requests_per_second", "successful", "mean")
    errored = _count(metrics, "request_latency", "errored", "count")
    incomplete = _count(metrics, "request_latency", "incomplete", "count")
    row = dict(
        e2e_mean_s=latency("mean"),
        e2e_se_s=latency("std_dev") / math.sqrt(count),
        e2e_p50_s=latency("median"),
        e2e_p90_s=latency("percentiles", "p90"),
        e2e_p99_s=latency("percentiles", "p99"),
        ttft_mean_s=_number(metrics, "time_to_first_token_ms", "successful", "mean") / 1e3,
        tpot_mean_s=_number(metrics, "inter_token_latency_ms", "successful", "mean") / 1e3,
        prompt_len=_number(metrics, "prompt_token_count", "successful", "mean"),
        output_len=_number(metrics, "output_token_count", "successful", "mean"),
        n_requests=count,
        throughput_rps=rate,
        errored_requests=errored,
        incomplete_requests=incomplete,
        steady=strategy != "throughput",
        # GuideLLM's rate is the successful count over the benchmark's window.
        duration_s=count / rate if rate > 0 else math.nan,
    )
    for name in ("ttft", "tpot"):
        source = "time_to_first_token_ms" if name == "ttft" else "inter_token_latency_ms"
        row[f"{name}_se_s"] = _number(metrics, source, "successful", "std_dev") / 1e3 / \
            math.sqrt(count)
    if strategy == "synchronous":
        row["concurrency"] = 1
    elif strategy == "throughput":
        # A closed loop at GuideLLM's cap: the concurrency it held, all requests counted.
        held = _number(metrics, "request_concurrency", "total", "mean")
        row["concurrency"] = max(1, round(held))
    else:
        # The load is the arrival rate. The successful rate leaves out the requests still
        # in flight when the run stops (about rate * latency of them), so it understates
        # the load most where latency is long: 8% at the top of the study's sweeps.
        row["request_rate"] = rate * (count + errored + incomplete) / count
    return row


# --- vLLM ------------------------------------------------------------------------------

class SpecDecodeCounts(NamedTuple):
    """vLLM's speculative-decoding counters from one /metrics scrape (summed over engines)."""

    drafts: float
    draft_tokens: float
    accepted_tokens: float
    accepted_per_position: tuple[float, ...]  # positions 0, 1, ... (unconditional counts)


_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_spec_decode_metrics(text: str, source: str = "/metrics") -> SpecDecodeCounts:
    """Parse vLLM's Prometheus text exposition for the spec-decode counters.

    Counters carry a ``_total`` suffix; samples of several engines are summed.

    Raises:
      TraceError: when the text is not Prometheus exposition or lacks the counters (a
        server without ``--speculative-config`` exports none).
    """
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as err:
        raise TraceError([f"{source}: not Prometheus text ({err})"]) from None
    totals: dict[str, float] = {}
    positions: dict[int, float] = {}
    for family in families:
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in _COUNTERS:
                totals[_COUNTERS[name]] = totals.get(_COUNTERS[name], 0.0) + sample.value
            elif name == _PER_POSITION:
                i = int(sample.labels.get("position", -1))
                positions[i] = positions.get(i, 0.0) + sample.value
    missing = [f"{name}_total" for name, field in _COUNTERS.items() if field not in totals]
    if missing:
        raise TraceError([f"{source}: no counter {m} (is speculative decoding on?)"
                          for m in missing])
    per_position = tuple(positions[i] for i in sorted(positions) if i >= 0)
    return SpecDecodeCounts(accepted_per_position=per_position, **totals)


def _from_length(k: int, length: float, where: str) -> float:
    """alpha of a mean acceptance length read from a file, or a TraceError saying where
    it is impossible at k."""
    try:
        return acceptance_from_length(k, length)
    except ValueError as error:
        raise TraceError([f"{where}: {error}"]) from None


def acceptance_between(before: SpecDecodeCounts, after: SpecDecodeCounts, k: int,
                       source: str = "/metrics") -> float:
    """Per-token acceptance alpha over a load point, from scrapes before and after it.

    The mean acceptance length ``1 + accepted / drafts`` is matched to ``E(k, alpha)``.

    Raises:
      TraceError: when a counter went down (the server restarted between the scrapes) or
        no drafts were made.
    """
    fields = ("drafts", "draft_tokens", "accepted_tokens")
    fell = [f for f in fields if getattr(after, f) < getattr(before, f)]
    if fell:
        raise TraceError([f"{source}: counter(s) {fell} went down between the scrapes: the "
                          "server restarted during the point; rerun it"])
    drafts = after.drafts - before.drafts
    if drafts <= 0:
        raise TraceError([f"{source}: no drafts between the scrapes"])
    return _from_length(k, 1.0 + (after.accepted_tokens - before.accepted_tokens) / drafts,
                        source)


def read_vllm_bench(
    path: str | Path,
    *,
    hardware: str,
    verifier: str,
    k: int,
    drafter: str = "",
    method: str = "",
    acceptance: float | None = None,
    metrics_before: str | Path | None = None,
    metrics_after: str | Path | None = None,
) -> pd.DataFrame:
    """Read a ``vllm bench serve`` result JSON into one operating point.

    The JSON must hold end-to-end statistics (``mean_e2el_ms``: run with
    ``--percentile-metrics ttft,tpot,itl,e2el``). ``request_rate`` ``"inf"`` sends everything
    at once: with ``max_concurrency`` set that is a closed loop of that many requests, else a
    burst that is not a steady state (``steady=False``). Failed requests are counted in
    ``errored_requests``. With ``--save-detailed`` arrays, their lengths must agree and the
    number of empty ``errors`` must equal ``completed``.

    Acceptance comes from ``acceptance``, else from two /metrics scrapes around the run
    (files ``metrics_before``, ``metrics_after``), else from the JSON's own
    ``spec_decode_acceptance_length`` (newer vLLM); 0 for ``k = 0``.

    Raises:
      TraceError: naming the file and field for a malformed or incomplete result.
    """
    path, data = _read_json(path)
    return _vllm_point(path, data, hardware=hardware, verifier=verifier, drafter=drafter,
                       method=method, k=k, acceptance=acceptance,
                       metrics_before=metrics_before, metrics_after=metrics_after)


def _vllm_point(path: Path, data, *, hardware, verifier, drafter, method, k, acceptance,
                metrics_before, metrics_after) -> pd.DataFrame:
    if not isinstance(data, dict):
        raise TraceError([f"{path}: expected a vllm bench serve result (a JSON object)"])
    required = ("completed", "failed", "request_rate", "request_throughput",
                "total_input_tokens", "total_output_tokens", "mean_e2el_ms", "std_e2el_ms")
    missing = [f"{path}: missing field '{name}'" + (
        " (run vllm bench serve with --percentile-metrics ttft,tpot,itl,e2el)"
        if "e2el" in name else "") for name in required if name not in data]
    if missing:
        raise TraceError(missing)
    try:
        row = _vllm_row(data)
        problems = _check_detailed(data, row["n_requests"], path)
        if problems:
            raise TraceError(problems)
        row.update(hardware=hardware, verifier=verifier, drafter=drafter, method=method, k=k,
                   acceptance=_acceptance(data, k, acceptance, metrics_before, metrics_after,
                                          path))
    except _Malformed as problem:
        raise TraceError([f"{path}: {problem}"]) from None
    return validate(pd.DataFrame([row]), source=str(path))


def _vllm_row(data: dict) -> dict:
    """The operating point of a vLLM result's fields, less its configuration."""
    completed = _count(data, "completed")
    if completed < 1:
        raise _Malformed("field 'completed': no request completed")
    rate = _number(data, "request_rate")  # vLLM writes "inf" (or Infinity) for a burst
    row = dict(
        e2e_mean_s=_number(data, "mean_e2el_ms") / 1e3,
        e2e_se_s=_number(data, "std_e2el_ms") / 1e3 / math.sqrt(completed),
        prompt_len=_number(data, "total_input_tokens") / completed,
        output_len=_number(data, "total_output_tokens") / completed,
        n_requests=completed, errored_requests=_count(data, "failed"),
        throughput_rps=_number(data, "request_throughput"),
    )
    for name, key in (("ttft", "ttft"), ("tpot", "tpot")):
        if f"mean_{key}_ms" in data:
            row[f"{name}_mean_s"] = _number(data, f"mean_{key}_ms") / 1e3
    duration = _number(data, "duration") if data.get("duration") is not None else 0.0
    if duration > 0:
        row["duration_s"] = duration
    for q in ("50", "90", "99"):
        if f"p{q}_e2el_ms" in data:
            row[f"e2e_p{q}_s"] = _number(data, f"p{q}_e2el_ms") / 1e3
    if math.isfinite(rate):
        row.update(request_rate=rate, steady=True)
    elif data.get("max_concurrency"):
        row.update(concurrency=_count(data, "max_concurrency"), steady=True)
    else:
        row.update(request_rate=row["throughput_rps"], steady=False)
    return row


def _check_detailed(data: dict, completed: int, path: Path) -> list[str]:
    arrays = [name for name in ("input_lens", "output_lens", "ttfts", "itls", "errors")
              if name in data]
    if not arrays:
        return []
    lengths = {name: len(data[name]) for name in arrays}
    if len(set(lengths.values())) > 1:
        return [f"{path}: per-request arrays of different lengths {lengths}"]
    if "errors" in data:
        ok = sum(1 for e in data["errors"] if not e)
        if ok != completed:
            return [f"{path}: field 'errors': {ok} requests without an error, but "
                    f"'completed' is {completed}"]
    return []


def _acceptance(data, k, given, before, after, path) -> float:
    if k == 0:
        return 0.0
    if given is not None:
        return float(given)
    if (before is None) != (after is None):
        raise TraceError([f"{path}: give both metrics_before and metrics_after scrapes"])
    if before is not None:
        scrapes = [read_spec_decode_metrics(Path(p).read_text(), str(p)) for p in (before, after)]
        return acceptance_between(*scrapes, k, source=f"{before} -> {after}")
    if "spec_decode_acceptance_length" in data:
        return _from_length(k, _number(data, "spec_decode_acceptance_length"),
                            f"{path}: field 'spec_decode_acceptance_length'")
    raise TraceError([f"{path}: no acceptance rate: give acceptance=, or /metrics scrapes "
                      "from before and after the run"])
