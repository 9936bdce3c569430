"""Importers from benchmark tools' files into canonical operating points.

What each file must hold is stated by its pydantic schema in :mod:`sdbayes.schemas`; this
module says what the fields mean.

vLLM: ``vllm bench serve`` result JSON (:func:`read_vllm_bench`) and the
spec-decode counters of its Prometheus /metrics (:func:`read_spec_decode_metrics`).

GuideLLM: a benchmark's ``metrics`` hold ``request_latency`` [s],
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
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from sdbayes import schemas
from sdbayes.schemas import GuideLLMMetrics, GuideLLMRun, GuideLLMStrategy, VllmResult
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


class ImportNote(UserWarning):
    """Something a user should know about an imported value (one derived rather than read);
    ``sdbayes import`` prints it as a note."""


def _read_json(path: str | Path):
    """(path, parsed document): JSON, or YAML (GuideLLM writes its reports as either), or a
    TraceError naming the file."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder, give a file" if path.is_dir() else "no such file"
        raise TraceError([f"{path}: {what}"])
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise TraceError([f"{path}: not a text file ({err})"]) from None
    try:
        return path, json.loads(text)
    except json.JSONDecodeError as err:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict | list):
            return path, data
        raise TraceError([f"{path}: neither JSON ({err}) nor a YAML report"]) from None


def read_benchmark(path: str | Path, *, hardware: str, verifier: str, drafter: str = "",
                   method: str = "", k: int | None = None, acceptance: float | None = None,
                   metrics_before: str | Path | None = None,
                   metrics_after: str | Path | None = None) -> pd.DataFrame:
    """A GuideLLM report, a ``vllm bench serve`` result or a ``vllm bench sweep``
    summary, told apart by content (JSON or YAML, whatever the extension).

    An object without ``benchmarks`` is a vLLM result (:func:`read_vllm_bench`), a list of
    them a ``vllm bench sweep`` ``summary.json`` (a row per run); anything else is read as
    GuideLLM (:func:`read_guidellm`). Arguments as those two take them.
    """
    path, data = _read_json(path)
    vllm = dict(hardware=hardware, verifier=verifier, drafter=drafter, method=method, k=k,
                acceptance=acceptance, metrics_before=metrics_before,
                metrics_after=metrics_after)
    if isinstance(data, dict) and "benchmarks" not in data:
        return _vllm_point(path, data, **vllm)
    if _is_vllm_summary(data):
        return pd.concat([_vllm_point(path, run, **vllm, where=f"{path}: run {i + 1}")
                          for i, run in enumerate(data)], ignore_index=True)
    return _guidellm_points(path, data, hardware=hardware, verifier=verifier, drafter=drafter,
                            method=method, k=k, acceptance=acceptance)


def _is_vllm_summary(data) -> bool:
    """A list of vLLM results, as ``vllm bench sweep`` writes to ``summary.json``."""
    return (isinstance(data, list) and bool(data)
            and all(isinstance(run, dict) and "completed" in run and "request_latency" not in run
                    for run in data))


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
        where = f"{path}: benchmark {i + 1}"
        if not isinstance(benchmark, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        found = []
        try:
            run = GuideLLMRun.model_validate(benchmark)
        except ValidationError as error:
            found += schemas.problems(error, where)
        try:
            metrics = GuideLLMMetrics.model_validate(benchmark.get("metrics", benchmark))
        except ValidationError as error:
            found += schemas.problems(error, where)
        if not found:
            try:
                row = _point(metrics, run.strategy or _by_position(i), _window(run.duration))
            except _Malformed as problem:
                found.append(f"{where}: {problem}")
        if found:
            problems += found
            continue
        rows.append(dict(hardware=hardware, verifier=verifier, drafter=drafter, method=method,
                         k=k, acceptance=acceptance, benchmark=i + 1, **row))
    if problems:
        raise TraceError(problems)
    return validate(pd.DataFrame(rows), source=str(path))


class _Malformed(ValueError):
    """A field a file lacks where its other fields need it, or a value out of its range;
    the message names it ("missing field 'a.b'")."""


def _by_position(index: int) -> GuideLLMStrategy:
    """The strategy of a benchmark that does not name its own (the source study's bare
    lists of metrics): a sweep runs synchronous, throughput, then constant rates."""
    return GuideLLMStrategy(type_=("synchronous", "throughput")[index] if index < 2
                            else "constant")


def _window(duration: float | None) -> float | None:
    """The benchmark's measured window [s] where the report states a usable one."""
    return duration if duration is not None and math.isfinite(duration) and duration > 0 \
        else None


def _point(metrics: GuideLLMMetrics, strategy: GuideLLMStrategy,
           duration: float | None = None) -> dict:
    kind = strategy.type_
    latency = metrics.request_latency.successful
    count = latency.count
    if count < 1:
        raise _Malformed("field 'request_latency.successful.count': no request completed")
    errored = metrics.request_latency.errored.count
    incomplete = metrics.request_latency.incomplete.count
    # GuideLLM 0.5 changed ``requests_per_second`` to a mean over time windows (0.120 req/s
    # for 4 requests in 24.9 s): the report's window is the measure where it has one.
    if duration is not None:
        rate = count / duration
    elif metrics.requests_per_second is not None:
        rate = metrics.requests_per_second.successful.mean
    else:
        raise _Malformed("missing field 'requests_per_second.successful.mean' (or the "
                         "benchmark's 'duration')")
    ttft = metrics.time_to_first_token_ms.successful
    tpot = metrics.inter_token_latency_ms.successful
    row = dict(
        e2e_mean_s=latency.mean,
        e2e_se_s=latency.std_dev / math.sqrt(count),
        ttft_mean_s=ttft.mean / 1e3,
        tpot_mean_s=tpot.mean / 1e3,
        ttft_se_s=ttft.std_dev / 1e3 / math.sqrt(count),
        tpot_se_s=tpot.std_dev / 1e3 / math.sqrt(count),
        prompt_len=metrics.prompt_token_count.successful.mean,
        output_len=metrics.output_token_count.successful.mean,
        n_requests=count,
        throughput_rps=rate,
        errored_requests=errored,
        incomplete_requests=incomplete,
        steady=kind != "throughput",
        # GuideLLM's rate is the successful count over the benchmark's window.
        duration_s=duration if duration is not None else count / rate if rate > 0 else math.nan,
        e2e_p50_s=latency.median,
        e2e_p90_s=latency.percentiles.p90,
        e2e_p99_s=latency.percentiles.p99,
    )
    if metrics.output_token_count.successful.std_dev is not None:
        row["output_len_sd"] = metrics.output_token_count.successful.std_dev
    for name, summary in (("ttft", ttft), ("tpot", tpot)):
        tail = summary.percentiles
        for q, value in ((50, summary.median), (90, tail and tail.p90), (99, tail and tail.p99)):
            if value is not None:
                row[f"{name}_p{q}_s"] = value / 1e3
    if kind == "synchronous":
        row["concurrency"] = 1
    elif kind == "concurrent":
        if strategy.streams is None:
            raise _Malformed("missing field 'strategy.streams' of a concurrent benchmark")
        row["concurrency"] = strategy.streams
    elif kind == "throughput":
        # A closed loop at GuideLLM's cap: the concurrency it held, all requests counted.
        if metrics.request_concurrency is None:
            raise _Malformed("missing field 'request_concurrency.total.mean' of a throughput "
                             "benchmark")
        held = metrics.request_concurrency.total.mean
        if not math.isfinite(held):
            raise _Malformed(f"field 'request_concurrency.total.mean': {held} requests")
        row["concurrency"] = max(1, round(held))
    elif strategy.rate is not None and strategy.rate > 0:
        row["request_rate"] = strategy.rate  # the arrival rate GuideLLM kept
    else:
        # The load is the arrival rate. The successful rate leaves out the requests still
        # in flight when the run stops (about rate * latency of them), so it understates
        # the load most where latency is long: 8% at the top of the study's sweeps.
        row["request_rate"] = rate * (count + errored + incomplete) / count
    if "request_rate" in row:  # GuideLLM's constant rate spaces arrivals evenly
        row["arrival_cv2"] = 0.0 if kind == "constant" else 1.0
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
        raise TraceError([f"{source}: no counter {', '.join(missing)}: was speculative "
                          "decoding on? (a run without it is --k 0)"])
    per_position = tuple(positions[i] for i in sorted(positions) if i >= 0)
    return SpecDecodeCounts(accepted_per_position=per_position, **totals)


def _from_length(k: int, length: float, where: str) -> float:
    """alpha of a mean acceptance length read from a file, or a TraceError saying where
    it is impossible at k."""
    try:
        return acceptance_from_length(k, length)
    except ValueError as error:
        raise TraceError([f"{where}: {error}"]) from None


def _same_k(k: int | None, stated: float | None, where: str) -> int | None:
    """The draft length a file states (``stated``, tokens per draft) checked against the
    one given: the one known, or a TraceError where they differ."""
    if stated is None or not math.isfinite(stated):
        return k
    if abs(stated - round(stated)) > 1e-6:
        # Drafts of varying length (n-gram lookup proposes up to k): only an upper bound.
        if k is None or stated > k:
            raise TraceError([f"{where}: {stated:.3g} on average, " + (
                "give k (--k)" if k is None else f"more than the k = {k} given")])
        return k
    if k is not None and k != round(stated):
        raise TraceError([f"{where}: {round(stated)}, not the k = {k} given: was it "
                          "measured at another k?"])
    return round(stated)


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
    _same_k(k, (after.draft_tokens - before.draft_tokens) / drafts,
            f"{source}: the scrapes' draft tokens per draft")
    return _from_length(k, 1.0 + (after.accepted_tokens - before.accepted_tokens) / drafts,
                        source)


def read_vllm_bench(
    path: str | Path,
    *,
    hardware: str,
    verifier: str,
    k: int | None = None,
    drafter: str = "",
    method: str = "",
    acceptance: float | None = None,
    metrics_before: str | Path | None = None,
    metrics_after: str | Path | None = None,
) -> pd.DataFrame:
    """Read a ``vllm bench serve`` (or ``benchmark_serving.py``) result JSON into one
    operating point.

    End-to-end latency comes from vLLM's ``*_e2el_ms`` statistics (``--percentile-metrics
    ttft,tpot,itl,e2el``), else from each request's ``ttft + sum(itls)`` in the
    ``--save-detailed`` arrays, else as ``mean TTFT + mean TPOT * (output - 1)`` with an
    :class:`ImportNote` (exact when all outputs have one length). ``request_rate`` ``"inf"``
    sends everything at once: with ``max_concurrency`` set that is a closed loop of that
    many requests, else a burst that is not a steady state (``steady=False``). Failed
    requests (``failed``, else the non-empty ``errors``, else ``num_prompts - completed``)
    are counted in ``errored_requests``. With ``--save-detailed`` arrays, their lengths
    must agree and the number of empty ``errors`` must equal ``completed``.

    ``k`` may be left out where the result states it (its ``spec_decode_*`` fields, newer
    vLLM); given, it must agree, and so must the draft tokens per draft of /metrics
    scrapes. Acceptance comes from ``acceptance``, else from two /metrics scrapes around
    the run (files ``metrics_before``, ``metrics_after``), else from the JSON's own
    ``spec_decode_acceptance_length``; 0 for ``k = 0``.

    Raises:
      TraceError: naming the file and field for a malformed or incomplete result.
    """
    path, data = _read_json(path)
    return _vllm_point(path, data, hardware=hardware, verifier=verifier, drafter=drafter,
                       method=method, k=k, acceptance=acceptance,
                       metrics_before=metrics_before, metrics_after=metrics_after)


def _vllm_point(path: Path, data, *, hardware, verifier, drafter, method, k, acceptance,
                metrics_before, metrics_after, where: str | None = None) -> pd.DataFrame:
    where = where or str(path)
    if not isinstance(data, dict):
        raise TraceError([f"{where}: expected a vllm bench serve result (a JSON object)"])
    try:
        result = VllmResult.model_validate(data)
    except ValidationError as error:
        raise TraceError(schemas.problems(error, where)) from None
    k = _same_k(k, _tokens_per_draft(result), f"{where}: its spec_decode fields' draft "
                "tokens per draft")
    if k is None:
        raise TraceError([f"{where}: a vllm bench serve result without spec_decode fields "
                          "does not record k; give --k (k= in Python)"])
    try:
        row = _vllm_row(result, where)
    except _Malformed as problem:
        raise TraceError([f"{where}: {problem}"]) from None
    row.update(hardware=hardware, verifier=verifier, drafter=drafter, method=method, k=k,
               acceptance=_acceptance(result, k, acceptance, metrics_before, metrics_after,
                                      where))
    return validate(pd.DataFrame([row]), source=where)


def _tokens_per_draft(result: VllmResult) -> float | None:
    """Draft tokens per draft from a result's ``spec_decode_*`` fields (newer vLLM), the
    draft length it ran; None without them."""
    if result.spec_decode_num_drafts and result.spec_decode_draft_tokens is not None:
        return result.spec_decode_draft_tokens / result.spec_decode_num_drafts
    per_position = result.spec_decode_per_position_acceptance_rates
    return float(len(per_position)) if per_position else None


def _vllm_row(result: VllmResult, where: str) -> dict:
    """The operating point of a vLLM result's fields, less its configuration."""
    completed = result.completed
    output_len = result.total_output_tokens / completed
    row = dict(
        prompt_len=result.total_input_tokens / completed,
        output_len=output_len,
        n_requests=completed, errored_requests=_failed(result),
        throughput_rps=result.request_throughput,
        **_end_to_end(result, output_len, where),
    )
    for name in ("ttft", "tpot"):
        # Those of vLLM's --metric-percentiles that the trace schema keeps.
        for column, field in (("mean", "mean"), ("p50", "median"), ("p90", "p90"),
                              ("p99", "p99")):
            value = getattr(result, f"{field}_{name}_ms")
            if value is not None:
                row[f"{name}_{column}_s"] = value / 1e3
    lengths = result.per_request(result.output_lens or [])
    if lengths:
        row["output_len_sd"] = float(np.std(lengths))
    if result.duration is not None and result.duration > 0:
        row["duration_s"] = result.duration
    if result.run_number is not None:
        row["run"] = result.run_number
    rate = result.request_rate  # vLLM writes "inf" (or Infinity) for a burst
    if math.isfinite(rate):
        # Gamma-distributed gaps of shape `burstiness` (1: Poisson): CV^2 = 1 / burstiness.
        burstiness = 1.0 if result.burstiness is None else result.burstiness
        if not burstiness > 0:
            raise _Malformed(f"field 'burstiness': must be > 0, got {burstiness!r}")
        row.update(request_rate=rate, steady=True, arrival_cv2=1.0 / burstiness)
    elif result.max_concurrency:
        row.update(concurrency=result.max_concurrency, steady=True)
    else:
        row.update(request_rate=row["throughput_rps"], steady=False)
    return row


def _failed(result: VllmResult) -> int:
    """Failed requests: ``failed``, else the non-empty ``errors`` of ``--save-detailed``,
    else ``num_prompts - completed`` (``benchmark_serving.py`` before ``failed`` existed)."""
    if result.failed is not None:
        return result.failed
    if result.errors is not None:
        return len(result.errors) - result.completed_requests
    if result.num_prompts is not None and result.num_prompts >= result.completed:
        return result.num_prompts - result.completed
    raise _Malformed("missing field 'failed' (and no 'errors' or 'num_prompts' to count it "
                     "from)")


def _end_to_end(result: VllmResult, output_len: float, where: str) -> dict:
    """End-to-end latency columns: vLLM's ``*_e2el_ms`` summary (``--percentile-metrics
    ...,e2el``); else each completed request's ``ttft + sum(itls)`` from ``--save-detailed``
    arrays; else ``mean TTFT + mean TPOT * (output - 1)``, exact when every request has the
    same output length (vLLM's random dataset), with a note."""
    completed = result.completed
    if result.mean_e2el_ms is not None:
        row = dict(e2e_mean_s=result.mean_e2el_ms / 1e3)
        if result.std_e2el_ms is not None:
            row["e2e_se_s"] = result.std_e2el_ms / 1e3 / math.sqrt(completed)
        for q in ("50", "90", "99"):
            value = getattr(result, f"p{q}_e2el_ms")
            if value is not None:
                row[f"e2e_p{q}_s"] = value / 1e3
        return row
    if result.ttfts is not None and result.itls is not None:
        latency = np.array([ttft + sum(itl) for ttft, itl in zip(
            result.per_request(result.ttfts), result.per_request(result.itls), strict=True)])
        p50, p90, p99 = np.percentile(latency, [50, 90, 99])
        return dict(e2e_mean_s=latency.mean(), e2e_se_s=latency.std(ddof=1) / math.sqrt(
            completed) if completed > 1 else 0.0, e2e_p50_s=p50, e2e_p90_s=p90, e2e_p99_s=p99)
    if result.mean_ttft_ms is not None and result.mean_tpot_ms is not None:
        warnings.warn(f"{where}: no end-to-end latency in the file (vllm bench serve "
                      "--percentile-metrics without e2el): its mean is TTFT + TPOT * (output "
                      "- 1), exact when every request had the same output length",
                      ImportNote, stacklevel=4)
        return dict(e2e_mean_s=(result.mean_ttft_ms + result.mean_tpot_ms
                                * max(output_len - 1.0, 0.0)) / 1e3)
    raise _Malformed("missing field 'mean_e2el_ms' (run vllm bench serve with "
                     "--percentile-metrics ttft,tpot,itl,e2el, or --save-detailed)")


def _acceptance(data: VllmResult, k, given, before, after, path) -> float:
    if k == 0:
        return 0.0
    if given is not None:
        return float(given)
    if (before is None) != (after is None):
        raise TraceError([f"{path}: give both metrics_before and metrics_after scrapes"])
    if before is not None:
        scrapes = [read_spec_decode_metrics(Path(p).read_text(), str(p)) for p in (before, after)]
        return acceptance_between(*scrapes, k, source=f"{before} -> {after}")
    if data.spec_decode_acceptance_length is not None:
        return _from_length(k, data.spec_decode_acceptance_length,
                            f"{path}: field 'spec_decode_acceptance_length'")
    raise TraceError([f"{path}: no acceptance rate: give acceptance=, or /metrics scrapes "
                      "from before and after the run"])
