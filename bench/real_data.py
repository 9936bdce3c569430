"""Accuracy on the source study's real vLLM sweeps (Qwen3 0.6B, 1.7B, 8B; EAGLE drafters;
48 (alpha, k) curves each).

    python bench/real_data.py [--quick] [--size=0.6b ...] [--variant=filling ...]
                              [--without-throughput] [--all-metrics]

Reads every ../shared/data/speculators-qwen3-* folder in place (``--size`` picks some) and
prints, per size, one table: mean absolute percentage error (MAPE) of the predicted mean
end-to-end latency, the coverage of the 90% predictive intervals and the number of
predictions that are not finite, two ways:

(a) extrapolation in load: fit on the closed loops (the synchronous point and the
    throughput run, 128 in flight) and the lower 60% (by count) of each (alpha, k) curve's
    constant-rate points, predict the rest;
(b) unseen configurations: 4 folds of whole (alpha, k) curves; fit on three, predict the
    constant-rate and synchronous points of the fourth.

The throughput run is fitted as the closed loop it is (GuideLLM's importer keeps it with
``steady=False``): it pins each curve's capacity, and every GuideLLM sweep has one.
``--without-throughput`` leaves it out, for comparison. sdbayes fits the mean end-to-end
latency alone, as ``sb.fit`` does by default; ``--all-metrics`` fits every metric the
points measure (TTFT and TPOT too), the default before session 22. Every constant-rate point carries
its run's length, so sdbayes fits and predicts what a 90 s run reports (the observation
model of ``sdbayes.observation``): the top constant-rate point of each sweep is offered at
the throughput run's rate, at capacity.

Methods: sdbayes with each model variant ("paper", "stepped", "filling"; NUTS, one
coefficient set pooled over alpha and k, as in the paper, and a discrepancy per curve),
"auto" (of those fits, the one ``sb.choose_variant`` keeps by PSIS-LOO, as
``sb.fit(..., variant="auto")`` does), and a plain least-squares fit of the paper's
six-coefficient form to log latency (the paper's method; its 90% interval is the fit's
residual spread, +-1.645 sd in log space; steady means, +inf past saturation). sdbayes's
point prediction is the posterior median of the mean. ``--quick`` uses fewer draws.

The p99 over requests of e2e (main table) and of TTFT and TPOT (a second table):
sdbayes's ``{metric}_p99_pred_s`` and its 90% predictive interval (the tail model of
``sdbayes.tails``, its interval widened by the error the fit measured on its training
points' percentiles), beside a baseline: the method's predicted mean times the training
points' average (geometric) p99/mean, with an interval from that ratio's spread.

A reference row, "floor", is no method: for each load rank (the synchronous points, then
each rank of the constant-rate points) a cubic surface in (alpha, log k), 10 coefficients,
is fitted by least squares to that rank's own 48 measured means and scored on them. At
light load it fits to about 1.5%, the spread of reruns; near capacity it cannot do better
than 2-5%: neighbouring k and alpha differ there by more than any smooth surface follows,
so no model smooth in alpha and k can predict these points much closer than the floor.
"""

import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
import pandas as pd
from scipy.optimize import least_squares

import sdbayes as sb

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
Z90 = 1.645
TAILS = ("e2e", "ttft", "tpot")  # metrics whose p99 is scored


def studies() -> dict[str, Path]:
    """Size -> folder of every study in ../shared/data, smallest model first."""
    folders = sorted(DATA.glob("speculators-qwen3-*"),
                     key=lambda f: float(f.name.rsplit("-", 1)[1].rstrip("b")))
    return {f.name.rsplit("-", 1)[1]: f for f in folders}


def load_study(folder: Path, throughput: bool = True) -> pd.DataFrame:
    """Operating points of all sweeps of one study, with a curve id and rank in load; the
    throughput runs fitted as closed loops, or dropped."""
    size = folder.name.rsplit("-", 1)[1].upper()
    config = dict(hardware="GPU-80GB", verifier=f"Qwen3-{size}",
                  drafter=f"eagle3-qwen3-{size.lower()}", method="eagle3")
    frames = [sb.read_guidellm(path, **config) for path in sorted(folder.glob("*.json"))]
    points = pd.concat(frames, ignore_index=True)
    points["capacity_run"] = ~points["steady"]
    points = points[points["steady"] | throughput].assign(steady=True).reset_index(drop=True)
    points["curve"] = points.groupby(["acceptance", "k"]).ngroup()
    rate_rank = points.groupby("curve")["request_rate"].rank(method="first")
    rates = points.groupby("curve")["request_rate"].transform("count")
    points["low_load"] = points["concurrency"].notna() | (rate_rank <= np.ceil(0.6 * rates))
    points["rate_rank"] = rate_rank
    return points


def splits(points: pd.DataFrame):
    """(name, train mask, test mask) pairs; throughput runs are never test points."""
    testable = ~points["capacity_run"]
    yield "(a) load", points["low_load"], ~points["low_load"] & testable
    fold = points["curve"] % 4
    for f in range(4):
        yield "(b) curves", fold != f, (fold == f) & testable


def floor(points: pd.DataFrame) -> pd.Series:
    """In-sample fit of log mean latency per load rank, a cubic surface in (alpha, log k):
    its fitted means of the open loops and the synchronous points [s] (module docstring)."""
    fitted = pd.Series(np.nan, index=points.index)
    runs = points[~points["capacity_run"]]
    for _, rank in runs.groupby(runs["rate_rank"].fillna(0)):
        a, log_k = rank["acceptance"].to_numpy(), np.log(rank["k"].to_numpy(float))
        surface = np.stack([a**i * log_k**j for i in range(4) for j in range(4 - i)], axis=1)
        log_latency = np.log(rank["e2e_mean_s"].to_numpy())
        beta, *_ = np.linalg.lstsq(surface, log_latency, rcond=None)
        fitted[rank.index] = np.exp(surface @ beta)
    return fitted


def point_fit(train: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Least squares on log latency of the paper's form; interval from the residual spread."""

    def predict(log_coef, frame):
        coef = sb.Coefficients(*np.exp(log_coef))
        closed = frame["concurrency"].notna().to_numpy()
        point = dict(k=frame["k"].to_numpy(float), alpha=frame["acceptance"].to_numpy(float),
                     output_len=frame["output_len"].to_numpy(float))
        open_ = np.asarray(sb.latency(coef, rate=frame["request_rate"].fillna(0).to_numpy(),
                                      **point))
        closed_ = np.asarray(sb.latency(coef, concurrency=frame["concurrency"].fillna(1)
                                        .to_numpy(float), **point))
        return np.where(closed, closed_, open_)

    def residual(log_coef):
        pred = predict(log_coef, train)
        # Past saturation: a large, finite residual keeps the solver moving back.
        return np.where(np.isfinite(pred), np.log(np.where(np.isfinite(pred), pred, 1.0)), 10.0) \
            - np.log(train["e2e_mean_s"].to_numpy())

    start = np.log([0.07, 0.014, 0.0014, 0.035, 0.0004, 0.00012])
    # Float64: least squares differentiates numerically, and float32 steps stall it far
    # from the optimum (58% error on a fold where float64 reaches 7%).
    with jax.enable_x64(True):
        fit = least_squares(residual, start)
        spread = np.std(fit.fun, ddof=6)
        pred = predict(fit.x, test)
    return pd.DataFrame({"pred": pred, "lower": pred * np.exp(-Z90 * spread),
                         "upper": pred * np.exp(Z90 * spread)}, index=test.index)


CONVERGENCE: dict[str, list] = {}  # variant -> each fit's (R-hat, ESS, divergences, steps)


def bayes_fits(train, test, variants, quick, metrics=("e2e",)):
    """sdbayes's predictions of the test points by each variant and by "auto", and the
    variant "auto" kept; each fit's convergence is noted in CONVERGENCE."""
    draws = 300 if quick else 1000
    fits = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)
        for variant in variants:
            fits[variant] = sb.fit(train, variant=variant, metrics=metrics, num_warmup=draws,
                                   num_samples=draws, num_chains=2, seed=0, progress=False)
    for variant, posterior in fits.items():
        d = posterior.diagnostics
        steps = float(posterior.idata.sample_stats["n_steps"].mean())
        CONVERGENCE.setdefault(variant, []).append(
            (d.max_rhat, min(d.min_ess_bulk, d.min_ess_tail), d.divergences, steps))
    chosen = sb.choose_variant(dict(fits)).variant.form if len(fits) > 1 else variants[0]
    predictions = {}
    for variant, posterior in fits.items():
        out = posterior.predict(test)
        columns = {"pred": "e2e_median_s", "lower": "e2e_pi_lower_s",
                   "upper": "e2e_pi_upper_s"}
        for m in TAILS:
            columns.update({f"{m}_mean": f"{m}_median_s", f"{m}_p99": f"{m}_p99_pred_s",
                            f"{m}_p99_lower": f"{m}_p99_pi_lower_s",
                            f"{m}_p99_upper": f"{m}_p99_pi_upper_s"})
        predictions[variant] = pd.DataFrame({name: out[column].to_numpy()
                                             for name, column in columns.items()},
                                            index=test.index)
    predictions["auto"] = predictions[chosen]
    return predictions, chosen


def with_baseline(train: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """The p99 baseline of each metric: the method's predicted mean of it (of e2e where it
    predicts no other) times the training points' average p99/mean ratio (geometric), its
    90% interval from that ratio's spread."""
    predicted = predicted.copy()
    for m in TAILS:
        log_ratio = np.log(train[f"{m}_p99_s"] / train[f"{m}_mean_s"]).dropna()
        mean = predicted.get(f"{m}_mean", predicted["pred"] if m == "e2e" else None)
        if mean is None or log_ratio.size < 2:
            continue
        base = mean * np.exp(log_ratio.mean())
        half = Z90 * log_ratio.std(ddof=1)
        predicted[f"{m}_base99"] = base
        predicted[f"{m}_base99_lower"] = base * np.exp(-half)
        predicted[f"{m}_base99_upper"] = base * np.exp(half)
    return predicted


def _errors(predicted, lower, upper, measured):
    """MAPE, coverage of the 90% interval and count of not-finite predictions."""
    finite = np.isfinite(predicted)
    mape = np.mean(np.abs(predicted[finite] / measured[finite] - 1))
    covered = (np.mean((lower <= measured) & (measured <= upper)) if lower.notna().all()
               else np.nan)
    return mape, covered, int((~finite).sum())


def score(points: pd.DataFrame, name: str, label: str, method: str, part: pd.DataFrame):
    mean = _errors(part["pred"], part["lower"], part["upper"],
                   points.loc[part.index, "e2e_mean_s"])
    row = {"split": label, "method": method,
           "MAPE": mean[0], "90% PI coverage": mean[1], "not finite": mean[2]}
    for m in TAILS:
        measured = points.loc[part.index, f"{m}_p99_s"]
        tail, base = ((_errors(part[c], part[f"{c}_lower"], part[f"{c}_upper"], measured)
                       if c in part else (np.nan, np.nan, 0))
                      for c in (f"{m}_p99", f"{m}_base99"))
        prefix = "" if m == "e2e" else f"{m} "
        row.update({f"{prefix}p99 MAPE": tail[0], f"{prefix}p99 coverage": tail[1],
                    f"{prefix}baseline p99 MAPE": base[0],
                    f"{prefix}baseline coverage": base[1]})
    return {**row, "points": len(part), "block": name}


def run_size(size: str, folder: Path, variants, quick: bool, throughput: bool,
             metrics) -> None:
    points = load_study(folder, throughput)
    print(f"\n== Qwen3-{size.upper()}: {len(points)} operating points "
          f"({points['capacity_run'].sum()} throughput runs as closed loops), "
          f"{points['curve'].nunique()} curves from {folder}")
    reference = floor(points)
    predictions: dict[str, dict[str, list]] = {}
    chosen: dict[str, list[str]] = {}
    start = time.perf_counter()
    for name, train, test in splits(points):
        runs = {"point fit (paper form)": point_fit(points[train], points[test]),
                "floor": pd.DataFrame({"pred": reference[points.index[test]], "lower": np.nan,
                                       "upper": np.nan})}
        bayes, kept = bayes_fits(points[train], points[test], variants, quick, metrics)
        chosen.setdefault(name, []).append(kept)
        runs.update({f"sdbayes {v}": p for v, p in bayes.items()})
        runs = {method: with_baseline(points[train], p) if method != "floor" else p
                for method, p in runs.items()}
        for method, predicted in runs.items():
            predictions.setdefault(method, {}).setdefault(name, []).append(predicted)
    print(f"  {time.perf_counter() - start:.0f} s; auto kept: "
          + "; ".join(f"{n} {', '.join(v)}" for n, v in chosen.items()))
    rows = []
    for method, by_split in predictions.items():
        for name, parts in by_split.items():
            got = pd.concat(parts)
            rows.append(score(points, name, name, method, got))
            if name.startswith("(a)"):  # by rank in load: the top one is at capacity
                for r, part in got.groupby(points.loc[got.index, "rate_rank"]):
                    rows.append(score(points, name, f"    rank {r:.0f} of 8", method, part))
    table = pd.DataFrame(rows)  # each split's rows, then its rows by rank, each by method
    table = table.assign(sub=table["split"] != table["block"]).sort_values(
        ["block", "sub", "split", "method"]).drop(columns=["block", "sub"])
    others = [c for c in table if c.startswith(("ttft ", "tpot "))]
    print(table.drop(columns=others).to_string(index=False, float_format=lambda x: f"{x:.1%}",
                                               na_rep="-"))
    print("  p99 of TTFT and TPOT (per request), sdbayes only:")
    tails_table = table[table["method"].str.startswith("sdbayes")
                        & ~table["split"].str.startswith(" ")]
    print(tails_table[["split", "method", *others]].to_string(
        index=False, float_format=lambda x: f"{x:.1%}", na_rep="-"))
    print("  convergence over the 5 fits of each variant (2 chains): worst R-hat, lowest "
          "ESS, divergent transitions in all, mean leapfrog steps a draw")
    for variant, fits in CONVERGENCE.items():
        rhat, ess, divergences, steps = zip(*fits, strict=True)
        print(f"    {variant:8s} R-hat {max(rhat):.3f}  ESS {min(ess):.0f}  "
              f"divergences {sum(divergences)}  steps {np.mean(steps):.0f}")
    CONVERGENCE.clear()


def main() -> None:
    quick = "--quick" in sys.argv
    throughput = "--without-throughput" not in sys.argv
    metrics = ("e2e", "ttft", "tpot") if "--all-metrics" in sys.argv else ("e2e",)
    variants = [a.split("=")[1] for a in sys.argv if a.startswith("--variant=")]
    sizes = [a.split("=")[1] for a in sys.argv if a.startswith("--size=")]
    found = studies()
    if not found:
        sys.exit(f"no studies in {DATA}")
    chosen = [size for size in found if not sizes or size in sizes]
    if len(chosen) > 1:
        # One process per size: XLA keeps every compiled program mapped, and a size's 30
        # fits come near Linux's 65,530 memory maps (vm.max_map_count); two sizes in one
        # process end in "LLVM ERROR: Unable to allocate section memory".
        others = [a for a in sys.argv[1:] if not a.startswith("--size=")]
        for size in chosen:
            subprocess.run([sys.executable, __file__, f"--size={size}", *others], check=True)
        return
    for size in chosen:
        run_size(size, found[size], variants or list(sb.model.VARIANTS), quick, throughput,
                 metrics)


if __name__ == "__main__":
    sb.use_cpu_cores()
    main()
