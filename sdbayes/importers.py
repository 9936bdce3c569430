"""Importers from benchmark tools' files into canonical operating points.

GuideLLM (VLLM.md): a benchmark's ``metrics`` hold ``request_latency`` [s],
``time_to_first_token_ms``, ``inter_token_latency_ms`` (GuideLLM's ITL is vLLM's TPOT,
``(latency - TTFT) / (n - 1)``), ``requests_per_second``, ``prompt_token_count`` and
``output_token_count``, each split into ``successful / errored / incomplete / total`` with
``mean, std_dev, count, percentiles``. Only successful requests are used; errored and
incomplete ones are counted in the ``errored_requests`` and ``incomplete_requests`` columns,
never dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from sdbayes.traces import TraceError, validate

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
    then a throughput benchmark (everything in flight: saturated, kept with
    ``steady=False``), then constant-rate points (open loop at the achieved rate). Where a
    benchmark names its strategy (``args.strategy.type_`` in full reports) that name is used
    instead of the position.

    Args:
      path: the JSON file.
      hardware, verifier, drafter, method: configuration the file does not record.
      k, acceptance: draft length and forced acceptance; by default read from a file name
        with ``alpha-<a>_draft-<k>`` in it.

    Returns:
      A validated operating-point table, one row per benchmark, in file order, with
      ``errored_requests`` and ``incomplete_requests`` columns and a ``benchmark`` index.

    Raises:
      TraceError: the file is missing, not JSON, or lacks a field; the message names the
        file, the benchmark and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise TraceError([f"{path}: no such file"])
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TraceError([f"{path}: not valid JSON ({err})"]) from None
    benchmarks = data.get("benchmarks") if isinstance(data, dict) else data
    if not isinstance(benchmarks, list) or not benchmarks:
        raise TraceError([f"{path}: expected a GuideLLM report with 'benchmarks' or a list of "
                          "benchmark metrics"])
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
        except _Missing as missing:
            problems.append(f"{where}: missing field '{missing.args[0]}'")
            continue
        rows.append(dict(hardware=hardware, verifier=verifier, drafter=drafter, method=method,
                         k=k, acceptance=acceptance, benchmark=i + 1, **row))
    if problems:
        raise TraceError(problems)
    return validate(pd.DataFrame(rows), source=str(path))


class _Missing(KeyError):
    pass


def _get(obj, *keys):
    for key in keys:
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            raise _Missing(".".join(keys))
        obj = obj[key]
    return obj


def _strategy(benchmark: dict, index: int) -> str:
    try:
        return str(_get(benchmark, "args", "strategy", "type_"))
    except _Missing:
        return ("synchronous", "throughput")[index] if index < 2 else "constant"


def _point(metrics: dict, strategy: str) -> dict:
    def latency(*keys):
        return float(_get(metrics, "request_latency", "successful", *keys))

    count = int(latency("count"))
    if count < 1:
        raise _Missing("request_latency.successful.count (> 0)")
    rate = float(_get(metrics, "requests_per_second", "successful", "mean"))
    row = dict(
        e2e_mean_s=latency("mean"),
        e2e_se_s=latency("std_dev") / math.sqrt(count),
        e2e_p50_s=latency("median"),
        e2e_p90_s=latency("percentiles", "p90"),
        e2e_p99_s=latency("percentiles", "p99"),
        ttft_mean_s=float(_get(metrics, "time_to_first_token_ms", "successful", "mean")) / 1e3,
        tpot_mean_s=float(_get(metrics, "inter_token_latency_ms", "successful", "mean")) / 1e3,
        prompt_len=float(_get(metrics, "prompt_token_count", "successful", "mean")),
        output_len=float(_get(metrics, "output_token_count", "successful", "mean")),
        n_requests=count,
        throughput_rps=rate,
        errored_requests=int(_get(metrics, "request_latency", "errored", "count")),
        incomplete_requests=int(_get(metrics, "request_latency", "incomplete", "count")),
        steady=strategy != "throughput",
    )
    for name in ("ttft", "tpot"):
        source = "time_to_first_token_ms" if name == "ttft" else "inter_token_latency_ms"
        row[f"{name}_se_s"] = float(_get(metrics, source, "successful", "std_dev")) / 1e3 / \
            math.sqrt(count)
    if strategy == "synchronous":
        row["concurrency"] = 1
    else:
        row["request_rate"] = rate
    return row
