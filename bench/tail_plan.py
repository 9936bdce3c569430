"""Is capacity planned on a p99 SLO honest? Planned against measured rates on real sweeps.

    python bench/tail_plan.py [--quick] [--size=8b ...] [--variant=paper] [--csv=plans.csv]

For each study in ../shared/data (Qwen3 0.6B, 1.7B, 8B; 48 (alpha, k) curves of GuideLLM
constant-rate points each), 4 folds of whole curves as in bench/real_data.py (b): fit on
three folds, and for each curve of the fourth and two SLOs on the p99 of e2e (the geometric
mean of the curve's measured p99 at its 3rd and 4th, and at its 5th and 6th, constant-rate
points) compare

- the **measured crossing**: the rate where the curve's measured p99 first exceeds the
  SLO, interpolated linearly between its constant-rate points;
- **sdbayes**: ``max_rate(posterior, slo, quantile=0.99, confidence=0.95,
  arrival_cv2=0)`` (GuideLLM spaces a constant rate's arrivals evenly);
- a **baseline**: ``max_rate`` on the mean with the SLO divided by the training points'
  average (geometric) p99/mean ratio, also at 95% confidence.

Prints, per size and method, the share of (curve, SLO) pairs planned above the measured
crossing (a plan that would break its SLO) and the median and 90th percentile of
|planned / crossing - 1|; ``--csv`` writes every pair. Beside the share, the band an honest
plan at 95% confidence would land in: 5% of pairs above in expectation, and a count of n
pairs scattered binomially about it (a curve's two SLOs miss together more often than
independent pairs do, so the band is if anything narrow). About 3 minutes a size (--quick).
"""

import sys
import time
import warnings

import numpy as np
import pandas as pd
from scipy.stats import binom

import sdbayes as sb

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from real_data import load_study, studies  # noqa: E402

RANKS = ((3, 4), (5, 6))  # constant-rate points whose p99 the SLOs lie between


def crossing(curve: pd.DataFrame, slo: float) -> float:
    """The rate [req/s] where the measured p99 first exceeds ``slo``, interpolated."""
    rates, p99 = curve["request_rate"].to_numpy(), curve["e2e_p99_s"].to_numpy()
    above = np.flatnonzero(p99 > slo)
    if above.size == 0 or above[0] == 0:
        return np.nan
    i = above[0]
    return float(np.interp(slo, [p99[i - 1], p99[i]], [rates[i - 1], rates[i]]))


def run_size(size, folder, variant, quick) -> pd.DataFrame:
    points = load_study(folder)
    fold = points["curve"] % 4
    draws = 300 if quick else 1000
    rows = []
    for f in range(4):
        train = points[fold != f]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sb.Posterior.FitWarning)
            post = sb.fit(train, variant=variant, metrics=("e2e",), num_warmup=draws,
                          num_samples=draws, num_chains=2, seed=0, progress=False)
        ratio = float(np.exp(np.log(train["e2e_p99_s"] / train["e2e_mean_s"]).mean()))
        for _, curve in points[(fold == f) & points["request_rate"].notna()
                               & ~points["capacity_run"]].groupby("curve"):
            curve = curve.sort_values("request_rate")
            k, alpha = int(curve["k"].iloc[0]), float(curve["acceptance"].iloc[0])
            for low, high in RANKS:
                slo = float(np.sqrt(curve["e2e_p99_s"].iloc[low - 1]
                                    * curve["e2e_p99_s"].iloc[high - 1]))
                measured = crossing(curve, slo)
                point = dict(slo=slo, k=k, alpha=alpha, output_len=128.0, confidence=0.95)
                tail = float(sb.max_rate(post, quantile=0.99, arrival_cv2=0.0, **point).rate)
                base = float(sb.max_rate(post, **{**point, "slo": slo / ratio}).rate)
                rows.append(dict(size=size, curve=(alpha, k), ranks=f"{low}-{high}",
                                 measured=measured, sdbayes=tail, baseline=base))
    return pd.DataFrame(rows)


def main() -> None:
    quick = "--quick" in sys.argv
    sizes = [a.split("=")[1] for a in sys.argv if a.startswith("--size=")]
    variant = next((a.split("=")[1] for a in sys.argv if a.startswith("--variant=")), "paper")
    csv = next((a.split("=")[1] for a in sys.argv if a.startswith("--csv=")), None)
    tables = []
    print(f"variant {variant}, {'2 x (300 + 300)' if quick else '2 x (1000 + 1000)'} draws; "
          "planned at 95% confidence against the measured crossing of the p99 SLO")
    for size, folder in studies().items():
        if sizes and size not in sizes:
            continue
        start = time.perf_counter()
        table = run_size(size, folder, variant, quick).dropna(subset=["measured"])
        tables.append(table)
        n = len(table)
        band = binom.ppf([0.025, 0.975], n, 0.05) / n
        print(f"\n== Qwen3-{size.upper()}: {n} (curve, SLO) pairs, "
              f"{time.perf_counter() - start:.0f} s; an honest 95% plan is above the "
              f"crossing in 5% of them, {band[0]:.1%} to {band[1]:.1%} of {n} (95% band)")
        for method in ("sdbayes", "baseline"):
            error = table[method] / table["measured"] - 1
            print(f"  {method:9s} above the crossing {np.mean(error > 0):6.1%}   "
                  f"|error| median {np.median(abs(error)):6.1%}, "
                  f"90th percentile {np.percentile(abs(error), 90):6.1%}   "
                  f"(mean error {error.mean():+.1%})")
    if csv:
        pd.concat(tables).to_csv(csv, index=False)


if __name__ == "__main__":
    sb.use_cpu_cores()
    main()
