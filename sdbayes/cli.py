"""The ``sdbayes`` command line: fit, predict, plan, tune, simulate, import, profile, report,
demo.

Milliseconds at this edge (``--slo-ms``, table columns ``*_ms``), seconds inside. Bad
arguments and bad files end with one line on stderr naming the problem and exit code 2.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
import typer
import typer.core
from rich.console import Console
from rich.table import Table

from sdbayes.cache import set_cache_environment
from sdbayes.files import check_folder, check_writable, replacing
from sdbayes.traces import LONGEST_S, MOST, acceptance_from_length, acceptance_from_rate

EXIT_BAD_INPUT = 2
EXIT_UNTRUSTED = 3  # --strict, and the posterior's diagnostics find problems

console = Console()
errors = Console(stderr=True, soft_wrap=True)  # one line, however long


# click's UsageError: typer >= 0.20 vendors click, older typer re-exports it.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class _OneLineErrors(typer.core.TyperGroup):
    """A bad flag or option value ends, like bad input, with one line on stderr and exit
    code 2, not click's usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True,
             **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERROR as error:
            where = f"{error.ctx.command_path}: " if error.ctx is not None else ""
            errors.print(f"error: {where}{error.format_message()} (see --help)", markup=False,
                         highlight=False)
            code = EXIT_BAD_INPUT
        except typer.Abort:
            errors.print("aborted", markup=False, highlight=False)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code or 0)


# Plain help text: rich markup would take "[ms]" and "[req/s]" for tags and drop them.
app = typer.Typer(help="Bayesian latency model of speculative decoding in LLM serving.",
                  cls=_OneLineErrors, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _one_line(error: Exception) -> str:
    problems = getattr(error, "problems", None)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        return problems[0] + more
    return " ".join(str(error).split()) or type(error).__name__


# The library's argument names that differ from the flags carrying them.
_FLAG_OF = {"slo": "--slo-ms", "acceptance": "--alpha"}


def _bad_input_exits_2(command):
    """Turn the errors a user's input can cause into one line and exit code 2, naming a
    flag where the library named its own argument ("level must ..." -> "--level must")."""
    flags = {**_FLAG_OF, **{name: "--" + name.replace("_", "-")
                            for name in inspect.signature(command).parameters}}
    if "rates" in flags:
        flags["rate"] = "--rates"

    def flagged(message: str) -> str:
        return re.sub(r"^(\w+) must\b", lambda m: f"{flags.get(m[1], m[1])} must", message)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, TypeError, OSError, KeyError) as error:
            errors.print(f"error: {flagged(_one_line(error))}", markup=False, highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None

    return wrapper


def _existing(path: Path) -> Path:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, give a file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def _each_once(paths: list[Path]) -> list[Path]:
    """Existing files, none given twice (its rows would count twice)."""
    seen: dict[Path, Path] = {}
    for path in paths:
        key = _existing(path).resolve()
        if key in seen:
            raise ValueError(f"{path}: given twice (as {seen[key]}); its rows would count twice")
        seen[key] = path
    return paths


def _read_posterior(path: Path, strict: bool):
    """The posterior in ``path``; under ``strict`` one that is not trustworthy ends the
    command with its verdict and :data:`EXIT_UNTRUSTED`, before any work. Its verdict
    is otherwise the command's last line (:func:`_verdict`)."""
    from sdbayes.posterior import FitWarning, load_posterior

    _existing(path)
    try:
        posterior = load_posterior(path)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not an sdbayes posterior file ({_one_line(error)})") from None
    warnings.simplefilter("ignore", FitWarning)  # the verdict says it, once
    if strict and not _trusted(posterior):
        _verdict(posterior, path)
        raise typer.Exit(EXIT_UNTRUSTED)
    return posterior


# Bounds of the planning flags, the trace schema's: past them a value is a typo (1e308
# once reached NumPyro).
_LONGEST_MS, _MOST_RPS, _MOST_TOKENS = 1e3 * LONGEST_S, MOST["request_rate"], MOST["output_len"]
Alpha = Annotated[float | None, typer.Option(
    help="Per-token acceptance probability alpha. vLLM reports an acceptance rate instead: "
         "give that as --acceptance-rate, or its mean acceptance length.", min=0, max=1)]
AcceptanceRate = Annotated[str | None, typer.Option(
    help="vLLM's draft acceptance rate, accepted / drafted tokens, as a fraction (0.62) or in "
         "percent (62%), measured at --measured-k; converted to alpha.")]
MeanAcceptanceLength = Annotated[float | None, typer.Option(
    help="vLLM's mean acceptance length, 1 + accepted tokens per draft, measured at "
         "--measured-k; converted to alpha.", min=1, max=MOST["k"] + 1)]
MeasuredK = Annotated[int | None, typer.Option(
    help="The draft length vLLM ran when it measured --acceptance-rate or "
         "--mean-acceptance-length; by default the one k given.", min=1, max=MOST["k"])]
OutputLen = Annotated[float, typer.Option(help="Output tokens per request.", min=1,
                                          max=_MOST_TOKENS)]


def _alpha(alpha: float | None, acceptance_rate: str | None,
           mean_acceptance_length: float | None, measured_k: int | None,
           ks: np.ndarray | None = None) -> float:
    """alpha from whichever of the three acceptance flags was given (exactly one), the
    other two measured at ``measured_k`` or else the one nonzero k in ``ks``."""
    given = [flag for flag, value in (("--alpha", alpha), ("--acceptance-rate", acceptance_rate),
                                      ("--mean-acceptance-length", mean_acceptance_length))
             if value is not None]
    if len(given) != 1:
        raise ValueError("give one of --alpha, --acceptance-rate or --mean-acceptance-length"
                         + (f", not {' and '.join(given)}" if given else ""))
    if alpha is not None:
        return alpha
    drafted = [] if ks is None else sorted({int(k) for k in ks if k > 0})
    if measured_k is None and len(drafted) != 1:
        raise ValueError(f"{given[0]} depends on the draft length vLLM ran: give --measured-k")
    k = measured_k or drafted[0]
    if mean_acceptance_length is not None:
        alpha = acceptance_from_length(k, mean_acceptance_length)
        source = f"a mean acceptance length of {mean_acceptance_length:g}"
    else:
        text = acceptance_rate.strip()
        try:
            rate = float(text.removesuffix("%"))
        except ValueError:
            raise ValueError(f"--acceptance-rate {acceptance_rate!r}: not a number") from None
        # vLLM prints the rate in percent ("Draft acceptance rate: 62.3%"), its JSON a
        # fraction.
        rate = rate / 100 if text.endswith("%") or rate > 1 else rate
        alpha = acceptance_from_rate(k, rate)
        source = f"an acceptance rate of {rate:.1%}"
    console.print(f"alpha = {alpha:.3f}: per-token acceptance from {source} at k = {k}")
    return alpha


Strict = Annotated[bool, typer.Option(
    "--strict", help=f"Exit with code {EXIT_UNTRUSTED} if the fit is not trustworthy "
                     "(divergences, R-hat, ESS; see the verdict on stderr).")]


def _trusted(posterior) -> bool:
    return posterior.diagnostics is not None and posterior.diagnostics.trustworthy


def _verdict(posterior, source: Path | str) -> None:
    """The fit's verdict (:attr:`sdbayes.posterior.Diagnostics.verdict`), one line on
    stderr."""
    diagnostics = posterior.diagnostics
    verdict = diagnostics.verdict if diagnostics is not None else "without stored diagnostics"
    errors.print(f"{'' if _trusted(posterior) else 'warning: '}{source}: fit {verdict}",
                 markup=False, highlight=False)


def _floats(text: str, name: str, *, whole: bool = False, low: float = 0.0,
            high: float = np.inf) -> np.ndarray:
    """A flag's comma-separated numbers, at least one, finite, within ``[low, high]``."""
    kind = "whole numbers" if whole else "numbers"
    try:
        values = np.array([float(x) for x in text.split(",") if x.strip()])
    except ValueError:
        raise ValueError(f"--{name}: expected comma-separated {kind}, got {text!r}") from None
    if (not values.size or not np.isfinite(values).all() or (values < low).any()
            or (values > high).any() or (whole and (values != np.round(values)).any())):
        within = f"from {low:g} to {high:g}" if np.isfinite(high) else f"of at least {low:g}"
        raise ValueError(f"--{name}: expected comma-separated {kind} {within}, got {text!r}")
    return values


Output = Annotated[Path | None, typer.Option(
    "--output", help="Also write the table to this file: CSV, or JSON (a list of rows) for a "
                     ".json name.")]

Quantile = Annotated[float | None, typer.Option(
    help="Target this quantile over requests, in (0, 1) (0.99: the p99), not the mean.")]
OutputLenSD = Annotated[float, typer.Option(
    "--output-len-sd", min=0, max=1e8,
    help="Standard deviation of the output lengths [tokens], for --quantile; 0: all equal.")]
ArrivalCV2 = Annotated[float, typer.Option(
    "--arrival-cv2", min=0, max=1e6,
    help="Squared CV of the gaps between arrivals, for --quantile: 1 Poisson (vllm bench "
         "serve), 0 evenly spaced (GuideLLM's constant rate), 1/burstiness.")]


def _write_table(frame: pd.DataFrame, path: Path | None) -> None:
    """``frame`` written to ``path`` (CSV, or JSON records for ``.json``), replaced only
    once complete; nothing without a path."""
    if path is None:
        return
    with replacing(path) as temporary:
        if path.suffix.lower() == ".json":
            frame.to_json(temporary, orient="records", indent=1)
        else:
            frame.to_csv(temporary, index=False)
    console.print(f"Table written to {path}")


def _table(title: str, frame: pd.DataFrame) -> Table:
    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="right")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{x:.4g}" if isinstance(x, float) else str(x) for x in row))
    return table


@app.command()
@_bad_input_exits_2
def fit(
    traces: Annotated[list[Path], typer.Argument(help="CSV or Parquet trace files.")],
    out: Annotated[Path, typer.Option(help="Posterior file to write (netCDF).")] = Path(
        "posterior.nc"),
    method: Annotated[str, typer.Option(help="nuts or svi.")] = "nuts",
    variant: Annotated[str, typer.Option(
        help="Model variant: paper, stepped, filling, or auto (fit each, keep the one "
             "PSIS-LOO prefers; about three times as long).")] = "auto",
    experts: Annotated[int | None, typer.Option(
        help="MoE verifier: number of experts M (fits c1e, c2e too).")] = None,
    top_m: Annotated[int | None, typer.Option(
        help="MoE verifier: experts routed per token m.")] = None,
    metric: Annotated[list[str] | None, typer.Option(
        help="Metric to fit (e2e, ttft, tpot); repeat for several. Default: e2e alone "
             "(TTFT and TPOT are predicted from it; fitted, they leave out closed loops "
             "of more than one request).")
    ] = None,
    chains: Annotated[int, typer.Option(min=1)] = 4,
    warmup: Annotated[int, typer.Option(min=0)] = 1000,
    samples: Annotated[int, typer.Option(min=1)] = 1000,
    seed: int = 0,
    strict: Strict = False,
) -> None:
    """Fit posteriors over the cost coefficients to traces; print them with diagnostics.

    The posterior is written even when the fit is not trustworthy (its diagnostics go
    with it, and every command that reads it repeats the verdict).

    Example: sdbayes fit points.csv --out posterior.nc --variant stepped
    (an MoE verifier such as Qwen3-30B-A3B: --experts 128 --top-m 8)
    """
    _each_once(traces)
    check_writable(out)  # before the fit, not after minutes of sampling
    posterior = _fit_and_show([str(p) for p in traces], method=method, variant=variant,
                              experts=experts, top_m=top_m,
                              metrics=tuple(metric) if metric else None, num_warmup=warmup,
                              num_samples=samples, num_chains=chains, seed=seed)
    posterior.save(out)
    console.print(f"Posterior written to {out}")
    _verdict(posterior, out)
    if strict and not _trusted(posterior):
        raise typer.Exit(EXIT_UNTRUSTED)


def _fit_and_show(traces, **settings):
    """Fit with a progress display (where stderr is a terminal), then print the
    coefficients and the variant kept."""
    from sdbayes.inference import fit as run_fit
    from sdbayes.posterior import FitWarning, in_milliseconds

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # the verdict says it all, in one line
        posterior = run_fit(traces, progress=sys.stderr.isatty(), **settings)
    summary = in_milliseconds(posterior.summary())
    several = summary["group"].nunique() > 1
    sampled = ["r_hat", "ess_bulk"] if posterior.diagnostics.method == "nuts" else []
    shown = summary[(["group"] if several else [])
                    + ["coefficient", "mean", "lower", "upper", "unit", *sampled]]
    console.print(_table("Posterior over the cost coefficients (90% intervals): "
                         + ", ".join(posterior.groups), shown))
    if posterior.variant_choice is not None:
        reason, loo = posterior.variant_choice
        console.print(_table("Model variants by PSIS-LOO (higher elpd_loo is better)",
                             loo.reset_index()))
        console.print(f"Variant kept: {reason}")
    return posterior


@app.command()
@_bad_input_exits_2
def predict(
    posterior: Annotated[Path, typer.Argument(help="Posterior file from `sdbayes fit`.")],
    grid: Annotated[Path, typer.Argument(help="CSV of operating points: k, acceptance, "
                                         "output_len, request_rate or concurrency.")],
    out: Annotated[Path | None, typer.Option(help="CSV to write all columns to.")] = None,
    ci: float = 0.9,
    seed: int = 0,
    strict: Strict = False,
) -> None:
    """Predict latency, TTFT, TPOT and speedup with intervals for a grid of operating points.

    Example: sdbayes predict posterior.nc grid.csv --out predictions.csv
    """
    if out is not None:
        check_writable(out)
    post = _read_posterior(posterior, strict)
    points = pd.read_csv(_existing(grid))
    result = post.predict(points, ci=ci, seed=seed)
    names = {"k": "k", "acceptance": "alpha", "request_rate": "rate_rps",
             "concurrency": "concurrency", "e2e_median_s": "e2e_ms", "e2e_lower_s": "lo_ms",
             "e2e_upper_s": "hi_ms", "ttft_median_s": "ttft_ms", "tpot_median_s": "tpot_ms"}
    shown = result[[c for c in names if c in result]].rename(columns=names)
    shown[[c for c in shown if c.endswith("_ms")]] *= 1e3
    shown["speedup"] = result["speedup_pred"]
    shown["saturated"] = result["saturated"]
    console.print(_table(f"Predicted means ({ci:.0%} credible intervals)", shown))
    if result["saturated"].any():
        console.print(f"{int(result['saturated'].sum())} row(s) past saturation: no steady "
                      "state, their means are +inf (give duration_s for a run's finite mean)")
    if out is not None:
        with replacing(out) as temporary:
            result.to_csv(temporary, index=False)
        console.print(f"Predictions written to {out}")
    _verdict(post, posterior)


@app.command()
@_bad_input_exits_2
def plan(
    posterior: Annotated[Path, typer.Argument(help="Posterior file from `sdbayes fit`.")],
    slo_ms: Annotated[float, typer.Option(help="The SLO on the metric [ms].", min=1e-3,
                                          max=_LONGEST_MS)],
    output_len: OutputLen,
    alpha: Alpha = None,
    acceptance_rate: AcceptanceRate = None,
    mean_acceptance_length: MeanAcceptanceLength = None,
    measured_k: MeasuredK = None,
    k: Annotated[str, typer.Option(help="Draft length(s), comma-separated.")] = "0,1,2,3,4,6,8",
    metric: str = "e2e",
    quantile: Quantile = None,
    arrival_cv2: ArrivalCV2 = 1.0,
    output_len_sd: OutputLenSD = 0.0,
    confidence: float = 0.95,
    traffic: Annotated[float | None, typer.Option(help="Target traffic [req/s].", min=0,
                                                  max=_MOST_RPS)] = None,
    group: Annotated[str, typer.Option(
        help="The fitted group to plan for: its index, its label, a part of its label that "
             "names one group (its hardware, say), or 'all' for each group in turn.")] = "0",
    output: Output = None,
    strict: Strict = False,
) -> None:
    """Highest request rate one replica holds with P(metric <= SLO) >= confidence.

    The metric is the mean over requests, or with --quantile a percentile (the p99 with
    0.99). A posterior of a fleet (several groups) plans one group, or each with --group all.

    Example: sdbayes plan posterior.nc --slo-ms 2000 --alpha 0.7 --output-len 128 --traffic 50
    """
    if output is not None:
        check_writable(output, "--output")
    ks = _floats(k, "k", whole=True)
    alpha = _alpha(alpha, acceptance_rate, mean_acceptance_length, measured_k, ks)
    post = _read_posterior(posterior, strict)
    groups = _groups(post, group, several=True)
    plans = []
    for g in groups:
        if len(post.groups) > 1:
            console.print(f"[bold]{post.groups[g]}[/bold]")
        try:
            shown = _show_plan(post, slo_ms=slo_ms, alpha=alpha, output_len=output_len,
                               ks=ks, metric=metric, confidence=confidence, traffic=traffic,
                               group=g, tail=dict(quantile=quantile, arrival_cv2=arrival_cv2,
                                                  output_len_sd=output_len_sd))
        except InfeasibleSLO as problem:
            if len(groups) == 1:
                raise
            console.print(f"[yellow]{problem}[/yellow]")  # the other groups still plan
            continue
        plans.append(shown.assign(group=post.groups[g]) if len(post.groups) > 1 else shown)
    if not plans:
        raise InfeasibleSLO(f"SLO of {slo_ms:g} ms is infeasible for every group")
    plan = pd.concat(plans, ignore_index=True)
    _write_table(plan.assign(alpha=alpha, output_len=output_len,
                             metric=_metric_label(metric, quantile), slo_ms=slo_ms,
                             confidence=confidence), output)
    _verdict(post, posterior)


class InfeasibleSLO(ValueError):
    """No rate meets the SLO with the confidence asked, not even zero load."""


def _groups(posterior, given: str, several: bool = False) -> list[int]:
    """The fitted groups ``--group`` names (index, label, a part of one label, or ``all``
    where ``several``), as indices; a ``ValueError`` lists the groups otherwise."""
    labels = posterior.groups
    if several and given == "all":
        return list(range(len(labels)))
    if given.isdigit() and int(given) < len(labels):
        return [int(given)]
    matches = [i for i, label in enumerate(labels) if given == label] or [
        i for i, label in enumerate(labels) if given.lower() in label.lower()]
    if len(matches) == 1:
        return matches
    listed = "; ".join(f"{i}: {label}" for i, label in enumerate(labels))
    what = "matches several groups" if matches else "names no group"
    raise ValueError(f"--group {given!r} {what}; the posterior has {len(labels)} group(s) "
                     f"({listed}){'; or give all' if several else ''}")


def _metric_label(metric: str, quantile: float | None) -> str:
    """"e2e", or "p99 e2e" for a quantile over requests."""
    return metric if quantile is None else f"p{100 * quantile:g} {metric}"


def _show_plan(posterior, *, slo_ms, alpha, output_len, ks, metric="e2e", confidence=0.95,
               traffic=None, group=0, tail=None) -> pd.DataFrame:
    """Prints the capacity of each k; returns it as a table (``replicas`` empty where the
    SLO cannot be met). ``tail``: :func:`sdbayes.max_rate`'s quantile, arrival_cv2 and
    output_len_sd."""
    from sdbayes.planning import max_rate, replicas_needed

    tail = tail or {}
    capacity = max_rate(posterior, slo=slo_ms / 1e3, metric=metric, confidence=confidence,
                        k=ks, alpha=alpha, output_len=output_len, group=group, **tail)
    metric = _metric_label(metric, tail.get("quantile"))
    if not capacity.feasible.any():
        raise InfeasibleSLO(f"SLO of {slo_ms:g} ms on {metric} is infeasible at any rate: at zero "
                         f"load it is {1e3 * capacity.zero_load.min():.0f} ms at best "
                         f"({confidence:.0%} confidence)")
    shown = pd.DataFrame({"k": ks.astype(int), "max_rate_rps": capacity.rate,
                          "zero_load_ms": 1e3 * capacity.zero_load})
    best = int(np.argmax(capacity.rate))
    if traffic is not None:
        shown["replicas"] = [int(replicas_needed(traffic, r)) if ok else "-"
                             for r, ok in zip(capacity.rate, capacity.feasible, strict=True)]
    console.print(_table(f"{metric} <= {slo_ms:g} ms with {confidence:.0%} confidence",
                         shown))
    console.print(f"Best: k = {int(ks[best])}, {capacity.rate[best]:.2f} req/s per replica")
    if traffic is not None:
        shown["replicas"] = pd.array([r if ok else None for r, ok in zip(
            shown["replicas"], capacity.feasible, strict=True)], dtype="Int64")
    return shown.assign(feasible=capacity.feasible)


@app.command()
@_bad_input_exits_2
def tune(
    posterior: Annotated[Path, typer.Argument(help="Posterior file from `sdbayes fit`.")],
    output_len: OutputLen,
    rates: Annotated[str | None, typer.Option(
        help="Request rates [req/s], comma-separated: the schedule k*(rate).")] = None,
    batch_sizes: Annotated[str | None, typer.Option(
        help="Batch sizes (requests in flight), comma-separated: the schedule k*(batch size), "
             "with the --speculative-config that vLLM (0.24 and later) deploys it by.")] = None,
    alpha: Alpha = None,
    acceptance_rate: AcceptanceRate = None,
    mean_acceptance_length: MeanAcceptanceLength = None,
    measured_k: MeasuredK = None,
    risk: Annotated[str, typer.Option(help="mean, quantile or cvar over draws.")] = "mean",
    level: float = 0.95,
    metric: str = "e2e",
    quantile: Quantile = None,
    arrival_cv2: ArrivalCV2 = 1.0,
    output_len_sd: OutputLenSD = 0.0,
    k_max: int = 16,
    group: Annotated[str, typer.Option(
        help="The fitted group to tune for: its index, its label or a part of its label "
             "that names one group (its hardware, say).")] = "0",
    output: Output = None,
    strict: Strict = False,
) -> None:
    """The best draft length for each request rate or batch size, under posterior risk.

    The metric is the mean over requests, or with --quantile a percentile (the p99 with
    0.99); --risk is over the posterior's draws of it.

    Example: sdbayes tune posterior.nc --rates 1,2,4,8 --alpha 0.7 --output-len 128 --risk cvar
    """
    if (rates is None) == (batch_sizes is None):
        raise ValueError("give one of --rates or --batch-sizes")
    if output is not None:
        check_writable(output, "--output")
    alpha = _alpha(alpha, acceptance_rate, mean_acceptance_length, measured_k)
    post = _read_posterior(posterior, strict)
    [group] = _groups(post, group)
    load = (dict(rates=_floats(rates, "rates", high=_MOST_RPS)) if batch_sizes is None else
            dict(batch_sizes=_floats(batch_sizes, "batch-sizes", whole=True, low=1,
                                          high=MOST["concurrency"])))
    schedule = _show_schedule(post, **load, alpha=alpha, output_len=output_len, risk=risk,
                              level=level, metric=metric, k_max=k_max, group=group,
                              tail=dict(quantile=quantile, arrival_cv2=arrival_cv2,
                                        output_len_sd=output_len_sd))
    _write_table(schedule.assign(alpha=alpha, output_len=output_len), output)
    if batch_sizes is not None:
        _show_speculative_config(post, schedule, group)
    _verdict(post, posterior)


def _show_speculative_config(posterior, schedule: pd.DataFrame, group: int) -> None:
    """Prints vLLM's --speculative-config for a schedule k*(batch size)."""
    import json

    from sdbayes.tuning import batch_size_schedule, speculative_config

    ranges = batch_size_schedule(schedule["batch_size"], schedule["k"])
    if all(k == 0 for _, _, k in ranges):
        console.print("Speculative decoding does not pay at any of these batch sizes: serve "
                      "without --speculative-config.")
        return
    columns = posterior.group_columns[group]
    config = speculative_config(ranges, columns.get("method") or "<method>",
                                columns.get("drafter") or "<drafter>")
    console.print("vLLM (0.24 or later) deploys this schedule with (the drafter as the "
                  "traces named it):", markup=False)
    console.print(f"--speculative-config '{json.dumps(config)}'", markup=False,
                  highlight=False, soft_wrap=True)


def _show_schedule(posterior, *, alpha, output_len, rates=None, batch_sizes=None,
                   risk="mean", level=0.95, metric="e2e", k_max=16,
                   group=0, tail=None) -> pd.DataFrame:
    """Prints the best k of each request rate (or batch size, a closed loop of that many
    in flight); returns the table. ``tail``: :func:`sdbayes.tune_k`'s quantile,
    arrival_cv2 and output_len_sd."""
    from sdbayes.tuning import tune_k

    tail = tail or {}
    by_rate = batch_sizes is None
    load = dict(rate=rates) if by_rate else dict(concurrency=batch_sizes)
    choice = tune_k(posterior, **load, alpha=alpha, output_len=output_len, risk=risk,
                    level=level, metric=metric, k_max=k_max, group=group, **tail)
    metric = _metric_label(metric, tail.get("quantile"))
    column, values = ("rate_rps", rates) if by_rate else ("batch_size", batch_sizes.astype(int))
    shown = pd.DataFrame({column: values, "k": choice.k,
                          f"{risk}_{metric.replace(' ', '_')}_ms": 1e3 * choice.objective,
                          "stable": choice.feasible})
    console.print(_table(f"Schedule k*({'rate' if by_rate else 'batch size'}), "
                         f"{risk} of {metric}", shown))
    return shown


@app.command()
@_bad_input_exits_2
def simulate(
    out: Annotated[Path, typer.Option(help="Per-request trace to write (CSV or Parquet).")],
    k: Annotated[int, typer.Option(help="Draft length.", min=0, max=MOST["k"])],
    alpha: Alpha = None,
    acceptance_rate: AcceptanceRate = None,
    mean_acceptance_length: MeanAcceptanceLength = None,
    measured_k: MeasuredK = None,
    rate: Annotated[float | None, typer.Option(help="Poisson arrival rate [req/s].", min=0,
                                               max=_MOST_RPS)] = None,
    concurrency: Annotated[int | None, typer.Option(help="Closed-loop requests.", min=1,
                                                    max=100_000)] = None,
    requests: Annotated[int, typer.Option(min=1, max=10_000_000)] = 1000,
    prompt_len: Annotated[int, typer.Option(min=1, max=10_000_000)] = 512,
    output_len: Annotated[int, typer.Option(min=1, max=10_000_000)] = 128,
    coefficients_ms: Annotated[str | None, typer.Option(
        help="c1p,c1v,c1d,c2p,c2v,c2d in ms; default: the example coefficients.")] = None,
    variant: Annotated[str, typer.Option(
        help="Step costs to charge: paper or stepped (the others in flight themselves; the "
             "simulator always runs whole steps), or filling (a marginal cost rising as "
             "the batch fills, --fill and --fill-half).")] = "stepped",
    fill: Annotated[float, typer.Option(
        help="Filling form: rise of the marginal decode cost, empty to full batch.",
        min=0, max=1e3)] = 0.0,
    fill_half: Annotated[float, typer.Option(
        help="Filling form: others in flight at half that rise [requests].",
        min=1e-9, max=1e6)] = 1.0,
    aggregate: Annotated[bool, typer.Option(help="Write one operating point instead.")] = False,
    seed: int = 0,
) -> None:
    """Simulate one serving replica and write its trace.

    Example: sdbayes simulate --out trace.csv --k 4 --alpha 0.7 --rate 5 --requests 2000
    """
    from sdbayes.examples import EXAMPLE_COEFFICIENTS
    from sdbayes.model import Coefficients, as_variant, saturation_rate
    from sdbayes.simulator import simulate as run
    from sdbayes.traces import aggregate as to_points
    from sdbayes.traces import write_traces

    check_writable(out)
    acceptance = (alpha, acceptance_rate, mean_acceptance_length)
    alpha = 0.0 if k == 0 and acceptance == (None,) * 3 else _alpha(
        *acceptance, measured_k, np.array([k]))
    coef = EXAMPLE_COEFFICIENTS
    if coefficients_ms is not None:
        values = _floats(coefficients_ms, "coefficients-ms")
        if len(values) != 6:
            raise ValueError(f"--coefficients-ms: expected 6 numbers, got {len(values)}")
        coef = Coefficients(*(values / 1e3))
    variant = as_variant(variant)
    if variant.form != "filling" and (fill, fill_half) != (0.0, 1.0):
        raise ValueError(f"--fill and --fill-half are the filling form's; give --variant "
                         f"filling, not {variant}")
    coef = coef._replace(fill=fill, fill_half=fill_half)
    trace = run(coef, k=k, alpha=alpha, rate=rate, concurrency=concurrency,
                n_requests=requests, prompt_len=prompt_len, output_len=output_len,
                variant=variant, seed=seed)
    table = to_points(trace) if aggregate else trace
    if aggregate and rate is not None:
        # The simulator steps whole SD cycles: the stepped form's capacity is its own
        # (the filling form's where it charges filling costs).
        capacity = float(saturation_rate(
            coef, k=k, alpha=alpha, output_len=output_len,
            variant=variant if variant.form == "filling" else "stepped"))
        if rate >= capacity:
            table["steady"] = False
            errors.print(f"note: --rate {rate:g} is past this replica's capacity "
                         f"({capacity:.3g} req/s): the point is written with steady=false, "
                         "kept but not fitted", markup=False, highlight=False)
    write_traces(table, out)
    console.print(f"{len(trace)} requests simulated; written to {out}")


@app.command("import")
@_bad_input_exits_2
def import_(
    files: Annotated[list[Path], typer.Argument(
        help="GuideLLM sweeps or `vllm bench serve` result JSON files (told apart by content).")],
    out: Annotated[Path, typer.Option(help="Operating points to write (CSV or Parquet).")],
    hardware: Annotated[str, typer.Option(help="GPU the sweep ran on.")],
    verifier: Annotated[str, typer.Option(help="Served (target) model.")],
    drafter: str = "",
    method: str = "",
    k: Annotated[int | None, typer.Option(
        help="Draft length (GuideLLM: if not in the file name; vLLM results: if the file has "
             "no spec_decode fields; given, it must agree with them).", min=0,
        max=MOST["k"])] = None,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", "--acceptance",
        help="Per-token acceptance alpha of every run, instead of the files' (vLLM reports an "
             "acceptance rate: give --acceptance-rate).", min=0, max=1)] = None,
    acceptance_rate: AcceptanceRate = None,
    mean_acceptance_length: MeanAcceptanceLength = None,
    metrics_before: Annotated[Path | None, typer.Option(
        help="vLLM /metrics scrape taken before the run (acceptance from the counters).")] = None,
    metrics_after: Annotated[Path | None, typer.Option(
        help="vLLM /metrics scrape taken after the run.")] = None,
) -> None:
    """Import GuideLLM sweeps or `vllm bench serve` results as canonical operating points.

    Reads GuideLLM reports (JSON or YAML, every schema since 0.2), `vllm bench serve` and
    `benchmark_serving.py` results, and `vllm bench sweep` run and summary files; a
    value derived rather than read is said in a note.

    Example: sdbayes import result.json --out points.csv --hardware H100 --verifier Qwen3-8B
    --k 4 --metrics-before before.txt --metrics-after after.txt
    """
    from sdbayes.importers import ImportNote, read_benchmark
    from sdbayes.traces import write_traces

    check_writable(out)
    if (acceptance_rate, mean_acceptance_length) != (None, None) and not k:
        raise ValueError("--acceptance-rate and --mean-acceptance-length need --k, the draft "
                         "length they were measured at")
    if (alpha, acceptance_rate, mean_acceptance_length) != (None, None, None):
        alpha = _alpha(alpha, acceptance_rate, mean_acceptance_length, k)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always", ImportNote)
        frames = [read_benchmark(path, hardware=hardware, verifier=verifier,
                                 drafter=drafter, method=method, k=k, acceptance=alpha,
                                 metrics_before=metrics_before, metrics_after=metrics_after)
                  for path in _each_once(files)]
    for note in notes:
        if issubclass(note.category, ImportNote):
            errors.print(f"note: {note.message}", markup=False, highlight=False)
        else:
            warnings.warn_explicit(note.message, note.category, note.filename, note.lineno)
    points = pd.concat(frames, ignore_index=True)
    if not method and (points["k"] > 0).any():
        raise ValueError("--method: these runs use speculative decoding (k > 0) and the files "
                         "do not name the method; give it, e.g. --method eagle3")
    write_traces(points, out)
    console.print(f"{len(points)} operating points from {len(files)} file(s) written to {out}")


@app.command()
@_bad_input_exits_2
def profile(
    configs: Annotated[list[Path], typer.Argument(
        help="Sweep config(s) (TOML); see profiling/. Several need --executor ray.")],
    out: Annotated[str, typer.Option(
        help="Output folder; rerun with it to resume. With --executor ray also a URI of "
             "object storage (s3://bucket/prefix).")] = "sweep",
    dry_run: Annotated[bool, typer.Option(help="Print the server commands and points, "
                                          "run nothing.")] = False,
    executor: Annotated[str, typer.Option(
        help="local: one server at a time on this host; ray: each (config, k) a Ray task "
             "on the cluster's GPUs (pip install 'sdbayes[cluster]').")] = "local",
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address (ray://head:10001, auto); default: start a local one.")
    ] = None,
    retries: Annotated[int, typer.Option(min=0, max=100,
                                         help="Ray: reruns of a failed (config, k).")] = 2,
) -> None:
    """Profile vLLM servers: for each k start `vllm serve`, run every load, write traces.

    Writes raw/ (per point), logs/ (server output), requests.csv and points.csv under --out
    (with --executor ray, per config and k under --out/<config name>/k<k>/, and every
    point gathered in --out). A rerun skips finished points and retries failed ones; exit
    code 1 if any failed.
    Example: sdbayes profile profiling/example-sweep.toml --out sweep-h100
    Example: sdbayes profile h100.toml a100.toml --executor ray --address auto --out fleet
    """
    import shlex
    from itertools import groupby

    from sdbayes.sweep import read_sweep_config, run_sweep, vllm_bench_command

    if executor not in ("local", "ray"):
        raise ValueError(f"--executor must be local or ray, got {executor!r}")
    sweeps = {path.stem: read_sweep_config(path) for path in configs}
    if dry_run:
        for name, sweep in sweeps.items():
            for k, points in groupby(sweep.points, key=lambda p: p.k):
                console.print(f"{name}: " + shlex.join(sweep.server_command(k)), markup=False,
                              highlight=False, soft_wrap=True)
                for point in points:
                    console.print(f"  {point.name}: {point.n_prompts} requests")
                    if sweep.client == "vllm":
                        command = vllm_bench_command(
                            sweep, point, Path(out) / "vllm" / f"{point.name}.json")
                        console.print("    " + shlex.join(command), markup=False,
                                      highlight=False, soft_wrap=True)
        return
    if executor == "ray":
        _profile_on_ray(configs, sweeps, out, address, retries)
        return
    if "://" in out:
        raise ValueError(f"--out {out}: a URI takes --executor ray; the local executor "
                         "writes to a folder")
    out = Path(out)
    if len(configs) != 1:
        raise ValueError(f"{len(configs)} sweep configs: the local executor takes one; "
                         "give --executor ray to profile several")
    sweep = sweeps[configs[0].stem]
    report = run_sweep(sweep, out)
    if not report.points.empty:
        shown = report.points[["point", "acceptance", "n_requests", "errored_requests"]].copy()
        for name in ("e2e", "ttft", "tpot"):
            shown[f"{name}_ms"] = 1e3 * report.points[f"{name}_mean_s"]
        console.print(_table(f"Operating points in {out / 'points.csv'}", shown))
    console.print(f"{len(report.ran)} points run, {len(report.skipped)} already finished")
    _exit_on_failures(report.failed, "points failed")


def _profile_on_ray(configs, sweeps, out: str, address, retries: int) -> None:
    """`profile --executor ray`: every (config, k) a Ray task; the gathered points."""
    from sdbayes.fleet import check_names, run_fleet
    from sdbayes.results import Results

    check_names([path.stem for path in configs])
    try:
        report = run_fleet(sweeps, out, address=address, retries=retries)
    except ImportError as missing:
        raise ValueError(f"--executor ray needs {missing.name or 'Ray'}: pip install "
                         "'sdbayes[cluster]'") from None
    console.print(f"{len(report.done)} configurations run, {len(report.skipped)} already "
                  f"finished, {len(report.points)} points in "
                  f"{Results(out).where('points.csv')}")
    _exit_on_failures(report.failed, "configurations failed after their retries")


def _exit_on_failures(failed: dict[str, str], what: str) -> None:
    """One line on stderr per failure and how to retry; exit code 1 if any."""
    for name, why in failed.items():
        errors.print(f"failed: {name}: {why}", markup=False, highlight=False)
    if failed:
        errors.print(f"{len(failed)} {what}; rerun the same command to retry them",
                     markup=False, highlight=False)
        raise typer.Exit(1)


@app.command()
@_bad_input_exits_2
def report(
    posterior: Annotated[Path, typer.Argument(help="Posterior file from `sdbayes fit`.")],
    traces: Annotated[list[Path], typer.Argument(help="The trace files it was fitted to.")],
    out: Annotated[Path, typer.Option(help="Folder for the plots and report.md.")] = Path(
        "sdbayes-report"),
    strict: Strict = False,
) -> None:
    """Write a folder of plots and a Markdown summary for a posterior and its traces.

    Example: sdbayes report posterior.nc points.csv --out report/
    """
    from sdbayes.report import write_report
    from sdbayes.traces import read_points

    check_folder(out)
    post = _read_posterior(posterior, strict)
    written = write_report(post, read_points(_each_once(traces)), out)
    console.print(f"Report written to {written}")
    _verdict(post, posterior)


@app.command()
@_bad_input_exits_2
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the report.")] = Path("sdbayes-demo"),
    draws: Annotated[int, typer.Option(help="Warm-up steps and draws per chain.")] = 500,
    seed: int = 0,
) -> None:
    """Fit the bundled example traces, plan capacity, tune k and write a report, with the
    posterior (posterior.nc) and the points (points.csv) beside it.

    The example traces are simulated from coefficients close to a fit of real vLLM sweeps
    of Qwen3-8B with an EAGLE drafter (calibration/make_example.py). Example: sdbayes demo
    """
    from sdbayes.examples import EXAMPLE_TRACES
    from sdbayes.report import write_report
    from sdbayes.traces import read_points, write_traces

    check_folder(out)
    points = read_points([EXAMPLE_TRACES])
    console.print(f"[bold]sdbayes demo[/]: {len(points)} operating points from "
                  f"{EXAMPLE_TRACES.name} (simulated; see calibration/make_example.py)")
    posterior = _fit_and_show(points, variant="stepped", metrics=("e2e",), num_warmup=draws,
                              num_samples=draws, num_chains=2, seed=seed)
    warnings.simplefilter("ignore", type(posterior).FitWarning)  # the verdict says it
    _show_plan(posterior, slo_ms=1500.0, alpha=0.8, output_len=128.0,
               ks=np.array([0.0, 1, 2, 3, 4, 6, 8]), traffic=50.0)
    _show_schedule(posterior, rates=np.array([1.0, 4, 8, 12]), alpha=0.8, output_len=128.0,
                   risk="quantile")
    written = write_report(posterior, points, out)
    posterior.save(out / "posterior.nc")
    write_traces(points, out / "points.csv")
    console.print(f"Report written to {written}; the posterior and its points to "
                  f"{out / 'posterior.nc'} and {out / 'points.csv'}, for the next commands, "
                  f"e.g. sdbayes predict {out / 'posterior.nc'} grid.csv")
    _verdict(posterior, out / "posterior.nc")


def main() -> None:
    _split_cpu()
    set_cache_environment()
    app()


def _split_cpu() -> None:
    """What :func:`sdbayes.use_cpu_cores` does, without importing JAX: every command, --help
    included, would otherwise pay 2-4 s for it. XLA reads the flag when JAX starts."""
    import os
    import re

    if "jax" in sys.modules:
        return
    devices = max(4, os.cpu_count() or 1)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                   os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join(
        [f"--xla_force_host_platform_device_count={devices}", *flags])
