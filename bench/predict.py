"""Prediction speed: ``Posterior.predict`` over many draws and grid points, with and without
the percentiles of the tail model.

    python bench/predict.py [n_draws] [n_points]

Resamples the example posterior's draws to ``n_draws`` (default 4,000) and predicts a grid of
``n_points`` (default 1,000) open-loop operating points (k 0..8, acceptance 0.5..0.9, rates
up to 8 req/s), best of 3 after a first call that compiles. Prints both walls and their
ratio, and the peak resident memory of the process.
"""

import resource
import sys
import time
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd

import sdbayes as sb

EXAMPLE_POSTERIOR = Path(__file__).resolve().parents[1] / "calibration" / "example_posterior.nc"


def resampled(posterior: sb.Posterior, n_draws: int) -> sb.Posterior:
    """The posterior with its draws resampled (with replacement) to one chain of n_draws."""
    stacked = posterior.idata.posterior.stack(sample=("chain", "draw"))
    pick = np.random.default_rng(0).integers(0, stacked.sizes["sample"], n_draws)
    draws = {name: np.moveaxis(stacked[name].values[..., pick], -1, 0)[None]
             for name in posterior.idata.posterior.data_vars}
    idata = az.from_dict(posterior=draws, attrs=dict(posterior.idata.attrs))
    return sb.Posterior(idata, posterior.diagnostics)


def best_of(f, repeats=3):
    f()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main(n_draws: int = 4_000, n_points: int = 1_000) -> None:
    posterior = resampled(sb.load_posterior(EXAMPLE_POSTERIOR), n_draws)
    rng = np.random.default_rng(1)
    k = rng.integers(0, 9, n_points)
    grid = pd.DataFrame({"k": k, "acceptance": np.where(k > 0, rng.uniform(0.5, 0.9, n_points),
                                                          0.0),
                         "output_len": 128.0, "request_rate": rng.uniform(0.5, 8.0, n_points)})
    walls = {flag: best_of(lambda flag=flag: posterior.predict(grid, percentiles=flag))
             for flag in (False, True)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(f"{n_draws:,} draws x {n_points:,} points: means only {walls[False]:.2f} s, "
          f"with p50/p90/p99 of e2e, TTFT, TPOT {walls[True]:.2f} s "
          f"({walls[True] / walls[False]:.1f}x); peak memory {peak:.1f} GiB")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
