"""Fitting a fleet: many (hardware x model pair) groups in one partially pooled posterior.

    python bench/fleet_fit.py [--groups=50] [--configs=10] [--loads=10] [--method=nuts]
                              [--draws=500]

Each group's six coefficients are the example ones times a log-normal factor (sd 0.15 in
log space, as GPUs and model pairs differ); each group is measured at ``configs`` (k,
alpha) configurations x ``loads`` loads up to 55% of saturation, 200 simulated requests a
point (the simulator; "stepped" form, e2e only, as tests/test_recovery.py). Fits all groups
at once (2 chains x (draws + draws) for NUTS; SVI with ``--method=svi``) and prints the wall
times (simulation, fit) and the coverage of the true coefficients by their 90% credible
intervals over all groups, with the central 98% binomial band for the count.
"""

import sys
import time
import warnings

import numpy as np
import pandas as pd
from scipy.stats import binom

import sdbayes as sb
from sdbayes.__main__ import EXAMPLE_COEFFICIENTS

KS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12)
ALPHAS = (0.0, 0.6, 0.9, 0.7, 0.95, 0.8, 0.6, 0.9, 0.75, 0.85)


def option(name: str, default):
    for arg in sys.argv[1:]:
        if arg.startswith(f"--{name}="):
            return type(default)(arg.split("=", 1)[1])
    return default


def group_points(coef, n_configs, n_loads, seed, hardware) -> pd.DataFrame:
    frames = []
    for i, (k, alpha) in enumerate(zip(KS[:n_configs], ALPHAS[:n_configs], strict=True)):
        saturation = float(sb.saturation_rate(coef, k=k, alpha=alpha, output_len=128,
                                              variant="stepped"))
        for j, load in enumerate(np.linspace(0.05, 0.55, n_loads)):
            trace = sb.simulate(coef, k=k, alpha=alpha, prompt_len=512, output_len=128,
                                rate=load * saturation, n_requests=250,
                                seed=seed * 10_000 + i * 100 + j, hardware=hardware,
                                verifier="Qwen3-8B", drafter="eagle", method="eagle3")
            frames.append(trace.iloc[50:])
    return sb.aggregate(pd.concat(frames, ignore_index=True))


def main() -> None:
    n_groups, n_configs = option("groups", 50), option("configs", 10)
    n_loads, method, draws = option("loads", 10), option("method", "nuts"), option("draws", 500)
    rng = np.random.default_rng(0)
    truth = {f"GPU{g:03d}": sb.Coefficients(*(c * np.exp(0.15 * rng.normal())
                                              for c in EXAMPLE_COEFFICIENTS[:6]))
             for g in range(n_groups)}
    start = time.perf_counter()
    points = pd.concat([group_points(coef, n_configs, n_loads, g, name)
                        for g, (name, coef) in enumerate(truth.items())], ignore_index=True)
    simulated = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)
        posterior = sb.fit(points, method=method, variant="stepped", metrics=("e2e",),
                           num_warmup=draws, num_samples=draws, num_chains=2, seed=0,
                           progress=False)
    fitted = time.perf_counter() - start
    summary = posterior.summary(ci=0.9)
    hardware = summary["group"].str.split(" ").str[0]
    expected = np.array([getattr(truth[h], c) for h, c in
                         zip(hardware, summary["coefficient"], strict=True)])
    inside = (summary["lower"] <= expected) & (expected <= summary["upper"])
    n, hits = len(inside), int(inside.sum())
    low, high = binom.ppf(0.01, n, 0.9), binom.ppf(0.99, n, 0.9)
    print(f"{n_groups} groups x {len(points) // n_groups} points ({len(points)} in all), "
          f"{method}{f' 2 x ({draws} + {draws})' if method == 'nuts' else ''}")
    print(f"simulate + aggregate {simulated:.0f} s; fit {fitted:.0f} s; "
          f"{posterior.diagnostics.verdict}")
    print(f"true coefficients inside their 90% intervals: {hits}/{n} ({hits / n:.1%}); "
          f"central 98% binomial band [{low:.0f}, {high:.0f}]")
    per_coefficient = inside.groupby(summary["coefficient"]).mean()
    print("  by coefficient: " + ", ".join(f"{c} {v:.0%}" for c, v in per_coefficient.items()))


if __name__ == "__main__":
    sb.use_cpu_cores()
    main()
