"""The canonical trace schema: reading, validating, writing and aggregating traces.

Two grains (docs/model.md section 2): **operating points**, one row per measured configuration
(``e2e_mean_s`` and friends), and **per-request** rows (``arrival_s``, ``ttft_s``,
``e2e_s``), which :func:`aggregate` turns into operating points with standard errors.
Every problem in a table is reported at once, each naming the file, row and column, in a
:class:`TraceError`. Columns the schema does not know are kept as they are.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd

from sdbayes.files import replacing
from sdbayes.points import Points  # noqa: F401  (what to_points returns; its old home)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Column:
    """One column of the schema: its kind, whether it must be present, its valid range."""

    name: str
    kind: str  # "str", "int", "float" or "bool"
    required: bool = False
    low: float = -math.inf  # smallest valid value
    low_open: bool = False  # the bound itself is invalid
    high: float = math.inf
    doc: str = ""


def _positive(name, kind="float", required=False, doc=""):
    return Column(name, kind, required, low=0.0, low_open=True, doc=doc)


def _nonnegative(name, kind="float", required=False, doc=""):
    return Column(name, kind, required, low=0.0, doc=doc)


_CONFIG = (
    Column("hardware", "str", True, doc="GPU and its count, e.g. 'H100x1'"),
    Column("verifier", "str", True, doc="the served (target) model"),
    Column("drafter", "str", doc="draft model or head; empty for k = 0 and model-free methods"),
    Column("method", "str", doc="SD method (eagle3, draft_model, ngram, ...); 'none' for k = 0"),
    Column("k", "int", True, low=0, doc="draft length, 0 = no SD"),
    _positive("request_rate", doc="open-loop arrival rate [req/s]; or give concurrency"),
    Column("concurrency", "int", low=1, doc="requests kept in flight (closed loop)"),
    Column("acceptance", "float", low=0.0, high=1.0, doc="per-token acceptance probability"),
)

PERCENTILES = (50, 90, 99)
"""The percentiles over requests the schema keeps, of e2e, TTFT and TPOT
(``e2e_p99_s``...)."""

OPERATING_POINT_COLUMNS: tuple[Column, ...] = _CONFIG + (
    _positive("prompt_len", required=True, doc="mean prompt length [tokens]"),
    _positive("output_len", required=True, doc="mean output length [tokens]"),
    _nonnegative("output_len_sd", doc="standard deviation of the requests' output lengths "
                 "[tokens]; 0 (the default) when all emit output_len"),
    _positive("e2e_mean_s", required=True, doc="mean end-to-end latency [s]"),
    _nonnegative("e2e_se_s", doc="standard error of e2e_mean_s [s]"),
    _positive("ttft_mean_s", doc="mean time to first token [s]"),
    _nonnegative("ttft_se_s"),
    _nonnegative("tpot_mean_s", doc="mean time per output token after the first [s]"),
    _nonnegative("tpot_se_s"),
    *(_positive(f"{m}_p{q}_s", doc=f"{q}th percentile of {m} over requests [s]")
      for m in ("e2e", "ttft") for q in PERCENTILES),
    *(_nonnegative(f"tpot_p{q}_s", doc=f"{q}th percentile of per-request TPOT [s]")
      for q in PERCENTILES),
    _nonnegative("throughput_rps", doc="completed requests per second"),
    Column("n_requests", "int", low=1, doc="requests behind the means"),
    Column("steady", "bool", doc="false for saturated points, kept but not fitted"),
    _positive("duration_s", doc="length of the run [s]: its means are over the requests "
              "it completed (predictions of open-loop points follow, sdbayes.fluid)"),
    _nonnegative("arrival_cv2", doc="squared coefficient of variation of an open loop's "
                 "inter-arrival times: 1 Poisson (the default), 0 evenly spaced, "
                 "1 / burstiness for vllm bench serve's gamma arrivals"),
    _nonnegative("run", "int", doc="which repeat of its operating point a row measured "
                 "(vllm bench sweep's run_number); repeats must differ in it"),
)

PER_REQUEST_COLUMNS: tuple[Column, ...] = _CONFIG + (
    _nonnegative("arrival_s", required=True, doc="arrival time since the run's start [s]"),
    _positive("prompt_len", "int", required=True, doc="[tokens]"),
    _positive("output_len", "int", required=True, doc="[tokens]"),
    _positive("ttft_s", required=True, doc="time to first token [s]"),
    _positive("e2e_s", required=True, doc="end-to-end latency [s]"),
    _nonnegative("draft_tokens", "int", doc="draft tokens proposed for this request"),
    _nonnegative("accepted_tokens", "int", doc="of which accepted"),
)

MOST = {"k": 256, "concurrency": 1e7, "request_rate": 1e6, "throughput_rps": 1e6,
        "prompt_len": 1e8, "output_len": 1e8, "arrival_s": 1e9}
"""Upper bounds past which a value is no measurement (a latency of 1e308 s was once
fitted); every other column in seconds is at most :data:`LONGEST_S`. The CLI bounds its
flags by the same numbers."""
LONGEST_S = 1e6  # [s], 11.6 days


def _bounded(columns: tuple[Column, ...]) -> tuple[Column, ...]:
    return tuple(replace(c, high=MOST.get(c.name, LONGEST_S if c.name.endswith("_s")
                                          else c.high)) for c in columns)


OPERATING_POINT_COLUMNS = _bounded(OPERATING_POINT_COLUMNS)
PER_REQUEST_COLUMNS = _bounded(PER_REQUEST_COLUMNS)

# The columns that identify an operating point; rows agreeing on all of them are one point
# (one measurement of it: with them and on ``run``).
POINT_KEY = ("hardware", "verifier", "drafter", "method", "k", "request_rate", "concurrency",
             "acceptance", "prompt_len", "output_len")

_NA_TEXT = {"nan", "na", "n/a", "null", "none", "<na>"}
_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}
_SHOWN_PROBLEMS = 20
_SHOWN_VALUES = 3  # unreadable values quoted one by one, the rest by row


class TraceError(ValueError):
    """Traces that do not follow the schema. ``problems`` lists every one found.

    Each problem is a string ``"<file>: row <i>, column '<name>': <what is wrong>"``; rows
    count data rows from 1 (in a CSV file, row i is on line i + 1).
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = self.problems[:_SHOWN_PROBLEMS]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)


def grain(df: pd.DataFrame, source: str = "<table>") -> str:
    """``"per_request"`` or ``"operating_point"``, from the columns a table has."""
    if "e2e_s" in df.columns:
        return "per_request"
    if "e2e_mean_s" in df.columns:
        return "operating_point"
    raise TraceError([f"{source}: has neither column 'e2e_mean_s' (operating points) nor "
                      "'e2e_s' (per-request rows): not a trace table"])


def read_traces(path: str | Path) -> pd.DataFrame:
    """Read and validate a trace table from CSV or Parquet.

    Args:
      path: a ``.csv``, ``.parquet`` or ``.pq`` file of operating points or per-request rows.

    Returns:
      The validated table (see :func:`validate`).

    Raises:
      TraceError: the file is missing, unreadable or empty, or breaks the schema; the
        message names the file, row and column of every problem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise TraceError([f"{path}: no such file"])
    try:
        if suffix == ".csv":
            df = _read_csv(path)
        elif suffix in (".parquet", ".pq"):
            _need_pyarrow(path)
            df = pd.read_parquet(path)
        else:
            raise TraceError([f"{path}: unknown file type '{suffix}' (use .csv or .parquet)"])
    except pd.errors.EmptyDataError:
        raise TraceError([f"{path}: empty file"]) from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError) as err:
        if isinstance(err, TraceError):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError([f"{path}: cannot read as {suffix[1:]}: {first_line}"]) from None
    return validate(df, source=str(path))


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV file as text, so that "007" or "1e3" in a name column stay as written; a
    repeated header name or a last row cut short is a :class:`TraceError`."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    header = pd.read_csv(path, dtype=str, header=None, nrows=1, keep_default_na=False,
                         skipinitialspace=True).iloc[0].str.strip()
    repeated = header[header.duplicated()].unique().tolist()  # pandas renames them 'k.1'
    if repeated:
        raise TraceError([f"{path}: column '{c}' appears more than once" for c in repeated])
    with open(path, "rb") as file:
        file.seek(max(0, file.seek(0, 2) - 65536))
        last_line = file.read().splitlines(keepends=True)[-1]
    fields = next(csv.reader([last_line.decode("utf-8", "replace")]), [])
    if len(df) and not last_line.endswith((b"\n", b"\r")) and len(fields) < len(header):
        raise TraceError([f"{path}: {row_list([len(df) - 1])}: fewer fields than the header "
                          "and no end of line: the file was cut short"])
    return df


def read_points(paths: str | Path | list) -> pd.DataFrame:
    """Operating points from trace files (:func:`read_traces`): per-request rows are
    aggregated file by file (:func:`aggregate`), so that no more than one file's rows are
    held at a time, and the points of all files validated as one table.

    Args:
      paths: one file or several (CSV or Parquet, either grain).

    Raises:
      TraceError: as :func:`read_traces` and :func:`validate`, naming the file.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    tables = []
    for path in paths:
        table = read_traces(path)
        tables.append(_aggregate(table, str(path)) if grain(table, str(path)) == "per_request"
                      else table)
    return validate(pd.concat(tables, ignore_index=True), source=", ".join(map(str, paths)))


def write_traces(df: pd.DataFrame, path: str | Path) -> None:
    """Validate ``df`` and write it as CSV or Parquet (chosen by the file's suffix); an
    existing file is replaced only once the new one is complete (:mod:`sdbayes.files`)."""
    path = Path(path)
    df = validate(df, source=str(path))
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise TraceError([f"{path}: unknown file type '{suffix}' (use .csv or .parquet)"])
    if suffix != ".csv":
        _need_pyarrow(path)
    with replacing(path) as temporary:
        if suffix == ".csv":
            df.to_csv(temporary, index=False)
        else:
            df.to_parquet(temporary, index=False)


def _need_pyarrow(path: Path) -> None:
    """Parquet is read and written by pyarrow, an extra (170 MB): a TraceError naming the
    file where it is not installed."""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise TraceError([f"{path}: Parquet needs pyarrow: pip install 'sdbayes[parquet]', or "
                          "use .csv"]) from None


def validate(df: pd.DataFrame, source: str = "<table>") -> pd.DataFrame:
    """Check a trace table against the schema and return it with canonical types.

    Text columns become strings, whole-number columns ``Int64``, measurements ``float64``,
    ``steady`` boolean (default true). Missing ``method`` is ``"none"`` and missing
    ``acceptance`` 0 where ``k = 0``, where neither means anything; missing ``drafter`` is
    empty. Unknown columns are kept unchanged. The index is reset.

    Args:
      df: operating points or per-request rows (see :func:`grain`).
      source: the name to use for the table in problem reports, usually its file.

    Returns:
      A new, validated ``DataFrame``; the input is not modified.

    Raises:
      TraceError: listing every problem found.
    """
    if len(df.columns) == 0:
        raise TraceError([f"{source}: empty table: no columns"])
    kind = grain(df, source)
    if len(df) == 0:
        raise TraceError([f"{source}: no rows"])
    columns = OPERATING_POINT_COLUMNS if kind == "operating_point" else PER_REQUEST_COLUMNS
    df = df.reset_index(drop=True).copy()
    problems: list[str] = []

    def report(rows, column, message):  # one problem, however many rows share it
        if rows:
            problems.append(f"{source}: {row_list(rows)}, column '{column}': {message}")

    duplicated = df.columns[df.columns.duplicated()].unique().tolist()
    if duplicated:
        raise TraceError([f"{source}: column '{c}' appears more than once" for c in duplicated])
    for col in columns:
        if col.required and col.name not in df.columns:
            problems.append(f"{source}: missing required column '{col.name}'")
    if problems:
        raise TraceError(problems)

    for col in columns:
        if col.name in df.columns:
            df[col.name] = _coerce(df[col.name], col, report)
    _fill_defaults(df, kind)
    _check_rows(df, kind, report)
    if kind == "operating_point" and not problems:
        _check_conflicts(df, source, problems)
    if problems:
        raise TraceError(problems)
    return df


def row_list(rows: list[int], shown: int = 6) -> str:
    """Rows by their 0-based index as a reader counts them (from 1, after the header),
    consecutive ones as a range: ``"row 3"``, ``"rows 1-4, 9 and 12 more"``."""
    numbers = sorted(int(r) + 1 for r in rows)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:shown])
    hidden = sum(b - a + 1 for a, b in runs[shown:])
    more = f" and {hidden} more" if hidden else ""
    return f"{'row' if len(numbers) == 1 else 'rows'} {text}{more}"


_NUMBERS = "biuf"  # dtype kinds that hold numbers already: no text to read


def _is_missing(values: pd.Series) -> np.ndarray:
    if values.dtype.kind in _NUMBERS:
        return values.isna().to_numpy(bool)
    text = values.astype("string").str.strip()
    return (values.isna() | text.isna() | (text == "")).to_numpy(bool)


_BY_VALUE_ROWS = 10_000


def _coerce(values: pd.Series, col: Column, report) -> pd.Series:
    """The column ``values`` in ``col``'s type, every problem passed to ``report(rows,
    column, message)``. A long column of text is read once per distinct value (a
    per-request table repeats its hardware or k in every row), its problems reported at
    the rows that hold the value."""
    if values.dtype.kind in _NUMBERS or len(values) < _BY_VALUE_ROWS:
        return _coerce_values(values, col, report)
    codes, distinct = pd.factorize(values, use_na_sentinel=False)
    found = []
    coerced = _coerce_values(pd.Series(distinct), col, lambda *problem: found.append(problem))
    for rows, column, message in found:
        report(np.flatnonzero(np.isin(codes, rows)).tolist(), column, message)
    return pd.Series(coerced.array.take(codes), index=values.index)


def _coerce_values(values: pd.Series, col: Column, report) -> pd.Series:
    missing = _is_missing(values)
    if col.kind != "str" and values.dtype.kind not in _NUMBERS:
        # how CSV writers spell an empty number
        missing |= values.astype("string").str.strip().str.lower().isin(_NA_TEXT).fillna(False)
    rows = lambda mask: np.flatnonzero(mask).tolist()  # noqa: E731
    if col.required:
        report(rows(missing), col.name, "missing value")
    if col.kind == "str":
        return values.where(~missing, "").astype("string").str.strip().astype(str)
    if col.kind == "bool":
        text = values.astype("string").str.strip().str.lower()
        truthy, falsy = text.isin(_TRUE).fillna(False), text.isin(_FALSE).fillna(False)
        bad = ~missing & ~(truthy | falsy).to_numpy(bool)
        report(rows(bad), col.name, "not true or false")
        return pd.Series(np.where(missing, True, truthy.to_numpy(bool)), index=values.index)

    if values.dtype == bool or str(values.dtype) == "boolean":
        numbers = pd.Series(np.nan, index=values.index)
        report(rows(~missing), col.name, "a true/false value where a number belongs")
    else:
        numbers = pd.to_numeric(values.where(~missing), errors="coerce").astype("float64")
    unparsed = ~missing & numbers.isna().to_numpy(bool)
    shown = rows(unparsed)[:_SHOWN_VALUES]
    for row in shown:
        report([row], col.name, f"not a number: {values.iloc[row]!r}")
    report(rows(unparsed)[len(shown):], col.name, "not a number")
    num = numbers.to_numpy(float)
    ok = ~missing & ~unparsed
    report(rows(ok & np.isinf(num)), col.name, "infinite")
    finite = ok & np.isfinite(num)
    low_bad = finite & ((num <= col.low) if col.low_open else (num < col.low))
    high_bad = finite & (num > col.high)
    if col.low_open and col.low == 0:
        report(rows(low_bad), col.name, "must be positive")
    elif col.low == 0:
        report(rows(low_bad), col.name, "must not be negative")
    else:
        report(rows(low_bad), col.name, f"below {col.low:g}")
    report(rows(high_bad), col.name, f"above {col.high:g}")
    if col.kind == "int":
        fractional = finite & (np.floor(num) != num)
        report(rows(fractional), col.name, "not a whole number")
        huge = finite & (np.abs(num) > 2.0**53)  # past exact float integers and int64
        report(rows(huge), col.name, "too large")
        return numbers.where(finite & ~fractional & ~huge).round().astype("Int64")
    return numbers


def _fill_defaults(df: pd.DataFrame, kind: str) -> None:
    for name in ("drafter", "method"):
        if name not in df.columns:
            df[name] = ""
    k_zero = (df["k"] == 0).fillna(False).to_numpy(bool)
    df.loc[k_zero & (df["method"] == ""), "method"] = "none"
    if kind == "operating_point":
        if "acceptance" not in df.columns:
            df["acceptance"] = np.nan
        df.loc[k_zero & df["acceptance"].isna().to_numpy(bool), "acceptance"] = 0.0
        if "steady" not in df.columns:
            df["steady"] = True
    for name in ("request_rate", "acceptance"):
        if name not in df.columns:
            df[name] = np.nan
    if "concurrency" not in df.columns:
        df["concurrency"] = pd.array([pd.NA] * len(df), dtype="Int64")


def _check_rows(df: pd.DataFrame, kind: str, report) -> None:
    rate = df["request_rate"].notna().to_numpy(bool)
    closed = df["concurrency"].notna().to_numpy(bool)
    report(np.flatnonzero(rate & closed).tolist(), "concurrency",
           "give request_rate or concurrency, not both")
    report(np.flatnonzero(~rate & ~closed).tolist(), "request_rate",
           "missing: give request_rate (req/s) or concurrency")
    sd = (df["k"] > 0).fillna(False).to_numpy(bool)
    report(np.flatnonzero(sd & (df["method"] == "").to_numpy(bool)).tolist(), "method",
           "missing: name the SD method where k > 0")
    if kind == "operating_point":
        report(np.flatnonzero(sd & df["acceptance"].isna().to_numpy(bool)).tolist(),
               "acceptance", "missing where k > 0")
        for low, high in ((f"{m}_p{a}_s", f"{m}_p{b}_s") for m in ("e2e", "ttft", "tpot")
                          for a, b in pairwise(PERCENTILES)):
            if low in df.columns and high in df.columns:
                bad = (df[low] > df[high]).fillna(False).to_numpy(bool)
                report(np.flatnonzero(bad).tolist(), high, f"smaller than {low}")
    else:
        bad = (df["ttft_s"] > df["e2e_s"]).fillna(False).to_numpy(bool)
        report(np.flatnonzero(bad).tolist(), "ttft_s", "larger than e2e_s")
        if "draft_tokens" in df.columns and "accepted_tokens" in df.columns:
            bad = (df["accepted_tokens"] > df["draft_tokens"]).fillna(False).to_numpy(bool)
            report(np.flatnonzero(bad).tolist(), "accepted_tokens", "more than draft_tokens")


def _check_conflicts(df: pd.DataFrame, source: str, problems: list[str]) -> None:
    key = list(POINT_KEY) + (["run"] if "run" in df.columns else [])
    measured = [c.name for c in OPERATING_POINT_COLUMNS
                if c.name in df.columns and c.name not in key]
    keys = df[key].astype("string").fillna("<NA>")
    for _, rows in keys.groupby(key, sort=False).groups.items():
        if len(rows) < 2:
            continue
        values = df.loc[rows, measured].astype("string").fillna("<NA>")
        if len(values.drop_duplicates()) > 1:
            problems.append(f"{source}: {row_list(list(rows))}: the same operating point with "
                            "different measurements")


def aggregate(per_request: pd.DataFrame, source: str = "<table>") -> pd.DataFrame:
    """Aggregate validated per-request rows into operating points with standard errors.

    Rows are grouped by their configuration columns (hardware, verifier, drafter, method,
    k, request_rate or concurrency, acceptance). Means, standard errors (by batch means
    over the requests in arrival order, :func:`_standard_error`) and percentiles are taken
    over the requests of each group; an open loop's ``arrival_cv2`` from its gaps between
    arrivals. TPOT is per request ``(e2e - ttft) / (output_len -
    1)`` over requests with more than one token. Where ``acceptance`` is missing but
    ``draft_tokens`` and ``accepted_tokens`` are given, it is the alpha whose E(k, alpha)
    equals the measured mean acceptance length ``1 + k * accepted / drafted``.
    ``throughput_rps`` is completions over the span from first arrival to last completion.

    Args:
      per_request: per-request rows (validated here if not already).
      source: the table's name for problem reports.

    Returns:
      A validated operating-point table, one row per configuration.
    """
    return _aggregate(validate(per_request, source=source), source)


def _aggregate(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """:func:`aggregate` of a table :func:`validate` returned."""
    if grain(df, source) != "per_request":
        raise TraceError([f"{source}: aggregate() takes per-request rows (with 'e2e_s')"])
    config = ["hardware", "verifier", "drafter", "method", "k", "request_rate", "concurrency",
              "acceptance"]
    extra = [c for c in df.columns if c not in {col.name for col in PER_REQUEST_COLUMNS}]
    rows = []
    for key, group in df.groupby(config, dropna=False, sort=False):
        row = dict(zip(config, key, strict=True))
        group = group.sort_values("arrival_s", kind="stable")  # batch means need the order
        e2e = group["e2e_s"].to_numpy(float)
        ttft = group["ttft_s"].to_numpy(float)
        out = group["output_len"].to_numpy(float)
        n = len(group)
        row.update(
            prompt_len=group["prompt_len"].mean(),
            output_len=out.mean(),
            output_len_sd=out.std(),
            n_requests=n,
            e2e_mean_s=e2e.mean(),
            e2e_se_s=_standard_error(e2e),
            ttft_mean_s=ttft.mean(),
            ttft_se_s=_standard_error(ttft),
            **_percentiles("e2e", e2e), **_percentiles("ttft", ttft),
            throughput_rps=_throughput(group["arrival_s"].to_numpy(float), e2e),
            steady=True,
        )
        several = out > 1
        if several.any():
            per_token = (e2e[several] - ttft[several]) / (out[several] - 1)
            row.update(tpot_mean_s=per_token.mean(), tpot_se_s=_standard_error(per_token),
                       **_percentiles("tpot", per_token))
        gaps = np.diff(group["arrival_s"].to_numpy(float))
        if pd.notna(row["request_rate"]) and gaps.size >= 2 and gaps.mean() > 0:
            row["arrival_cv2"] = gaps.var() / gaps.mean() ** 2
        if pd.isna(row["acceptance"]):
            row["acceptance"] = _acceptance_from_tokens(group, int(row["k"]))
        # Columns outside the schema survive when they are constant within the point.
        for name in extra:
            if group[name].nunique(dropna=False) == 1:
                row[name] = group[name].iloc[0]
        rows.append(row)
    return validate(pd.DataFrame(rows), source=f"aggregate({source})")


def _percentiles(metric: str, values: np.ndarray) -> dict[str, float]:
    return {f"{metric}_p{q}_s": float(v)
            for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True)}


_BATCHES = 20


def _standard_error(x: np.ndarray) -> float:
    """Standard error of the mean of per-request values in arrival order, by batch means.

    Requests that share a queue are correlated: a burst slows all those in it. Near
    saturation the mean of a run then varies from run to run many times more than
    ``sd / sqrt(n)`` says (simulated at 80% of saturation, 4,000 requests: 7.6% against
    0.47%). The means of 20 consecutive batches are close to independent, and their spread
    gives the standard error (the method of batch means); it is never taken below the
    independent requests' ``sd / sqrt(n)``, nor with fewer than 10 requests a batch.
    """
    n = len(x)
    if n < 2:
        return math.nan
    independent = float(np.std(x, ddof=1) / math.sqrt(n))
    if n < 10 * _BATCHES:
        return independent
    means = np.array([batch.mean() for batch in np.array_split(x, _BATCHES)])
    return max(independent, float(np.std(means, ddof=1) / math.sqrt(_BATCHES)))


def _throughput(arrival: np.ndarray, e2e: np.ndarray) -> float:
    span = float(np.max(arrival + e2e) - np.min(arrival))
    return len(arrival) / span if span > 0 else math.nan


def _acceptance_from_tokens(group: pd.DataFrame, k: int) -> float:
    """The per-token alpha of the group's accepted / drafted tokens (NaN if unknown)."""
    if k == 0:
        return 0.0
    if not {"draft_tokens", "accepted_tokens"} <= set(group.columns):
        return math.nan
    drafted = float(group["draft_tokens"].sum())
    if pd.isna(drafted) or drafted == 0:
        return math.nan
    return acceptance_from_rate(k, float(group["accepted_tokens"].sum()) / drafted)


def acceptance_from_length(k: int, length: float) -> float:
    """The per-token acceptance alpha whose E(k, alpha) is the mean acceptance length.

    ``length`` counts the bonus token (1 + accepted / drafts), so it lies in [1, k + 1].

    Raises:
      ValueError: a length outside [1, k + 1], which no alpha gives at this k (often a
        length measured at another k).
    """
    if not (k >= 1 and 1.0 - 1e-9 <= length <= k + 1 + 1e-9):
        raise ValueError(f"mean acceptance length {length:g} is impossible at k = {k}: it "
                         f"lies between 1 and k + 1 = {k + 1}; was it measured at another k?")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # E is increasing in alpha; 60 halvings reach float64 resolution
        mid = 0.5 * (lo + hi)
        if sum(mid**j for j in range(k + 1)) < length:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def acceptance_from_rate(k: int, rate: float) -> float:
    """The per-token acceptance alpha whose drafted tokens are accepted at ``rate``.

    vLLM reports a *draft acceptance rate*: accepted / drafted tokens, at the draft length
    ``k`` it ran. That is ``(E(k, alpha) - 1) / k``, lower than alpha for k > 1 (alpha = 0.8
    at k = 4: a rate of 0.59), so it is converted here rather than taken for alpha.

    Args:
      k: the draft length the rate was measured at, >= 1.
      rate: accepted / drafted, a fraction in [0, 1].

    Raises:
      ValueError: ``rate`` outside [0, 1].
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"acceptance rate {rate:g} must lie in [0, 1] (accepted / drafted)")
    return acceptance_from_length(k, 1.0 + k * rate)


def group_labels(points: pd.DataFrame) -> list[str]:
    """The group (hardware x model pair) of each operating point, as a label per row.

    SD rows group by hardware, verifier, drafter and method. Rows without SD (k = 0) share
    the six coefficients of the SD rows on the same hardware and verifier, so they join
    that group when there is exactly one; otherwise they form a group of their own.
    """
    def label(row):
        drafter = row.drafter or "-"
        return f"{row.hardware} | {row.verifier} | {drafter} ({row.method})"

    labels = [label(row) for row in points.itertuples()]
    sd_groups: dict[tuple[str, str], set[str]] = {}
    for row, text in zip(points.itertuples(), labels, strict=True):
        if row.k > 0:
            sd_groups.setdefault((row.hardware, row.verifier), set()).add(text)
    for i, row in enumerate(points.itertuples()):
        candidates = sd_groups.get((row.hardware, row.verifier), set())
        if row.k == 0 and len(candidates) == 1:
            labels[i] = next(iter(candidates))
    return labels


def config_keys(points: pd.DataFrame, group: np.ndarray) -> list[tuple]:
    """Each row's configuration, one curve of a sweep: ``(group, k, acceptance, prompt bin,
    output bin)``, lengths within 5% in the same bin.

    Args:
      points: a validated operating-point table.
      group: each row's group index, shape [n rows].
    """
    def column(name):
        return points[name].astype("Float64").to_numpy(float, na_value=np.nan)

    bins = [np.round(np.log(column(n)) / np.log(1.05)) for n in ("prompt_len", "output_len")]
    return [(int(g), float(k), float(a), float(p), float(o)) for g, k, a, p, o in
            zip(group, column("k"), column("acceptance"), *bins, strict=True)]


def to_points(points: pd.DataFrame, groups: list[str] | None = None,
              configs: list[tuple] | None = None, *, validated: bool = False):
    """Turn a validated operating-point table into arrays for the latency model.

    Args:
      points: operating points (validated here unless ``validated``).
      groups: the group labels the indices refer to; by default the table's own, in order
        of first appearance. A row whose group is not among them gets index -1.
      configs: the configuration keys (:func:`config_keys`) the indices refer to; by
        default the table's own, in order of first appearance. A row whose configuration
        is not among them gets index -1.
      validated: ``points`` is what :func:`validate` returned, unchanged since: a fit
        validates its table once and passes it on.

    Returns:
      ``(arrays, groups)``: :class:`Points` of arrays of shape [n],
      and the list of group labels.
    """
    df = points if validated else validate(points)
    if grain(df) != "operating_point":
        raise TraceError(["expected operating points; aggregate per-request rows first"])
    labels = group_labels(df)
    if groups is None:
        groups = list(dict.fromkeys(labels))
    index = {g: i for i, g in enumerate(groups)}

    def column(name, fill=np.nan):
        if name not in df.columns:
            return np.full(len(df), fill)
        return df[name].astype("Float64").to_numpy(float, na_value=fill)

    closed = df["concurrency"].notna().to_numpy(bool)
    group = np.array([index.get(label, -1) for label in labels], dtype=np.int32)
    keys = config_keys(df, group)
    if configs is None:
        configs = list(dict.fromkeys(keys))
    known = {key: i for i, key in enumerate(configs)}
    config = np.array([known.get(key, -1) for key in keys], dtype=np.int32)
    arrays = Points(
        group=group,
        config=config,
        k=column("k"),
        alpha=column("acceptance"),
        output_len=column("output_len"),
        rate=np.where(closed, 0.0, column("request_rate", 0.0)),
        concurrency=np.where(closed, column("concurrency", 1.0), 1.0),
        closed=closed,
        e2e=column("e2e_mean_s"),
        e2e_se=column("e2e_se_s", 0.0),
        ttft=column("ttft_mean_s"),
        ttft_se=column("ttft_se_s", 0.0),
        tpot=column("tpot_mean_s"),
        tpot_se=column("tpot_se_s", 0.0),
        duration=column("duration_s", np.inf),
    )
    return arrays, groups
