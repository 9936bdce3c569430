"""Fit speed: NUTS on 1,000 simulated operating points (4 chains, 1000 warm-up + 1000 draws).

    python bench/fit.py [n_points] [variant]

Operating points come from the simulator with the example coefficients: n_points / 10
curves, one without SD and the others a random k in 1..8 and alpha in 0.5..0.95, at 10
loads from 5% to 60% of saturation, 200 requests a point after 50 of warm-up.

The CPU is split into one JAX device per core (at least 4, see ``sb.use_cpu_cores``), as
the ``sdbayes`` command does, so the 4 chains run in parallel. Every fit traces and compiles
afresh, and compilation alone takes seconds that vary from run to run, so the benchmark
keeps a persistent JAX compilation cache (in a temporary folder): each fit runs twice, the
first compiling, the second reading the compiled program back. The timed 1000 + 1000 fit
reports its wall time then, and minus that of a 10 + 10 fit (tracing and ArviZ conversion,
almost no sampling) its sampling time; the largest R-hat, the smallest bulk and tail ESS,
ESS per second of sampling, and the mean leapfrog steps per draw. The baseline is the same
fit with its chains in lockstep on one device (``chain_method="vectorized"``, the default
without ``use_cpu_cores``). The calibration issue's target is under 5 s after compilation
on 2 CPU cores.
"""

import os
import shutil
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import pandas as pd

import sdbayes as sb
from sdbayes.examples import EXAMPLE_COEFFICIENTS as COEF


def traces(n_points: int) -> pd.DataFrame:
    """Sweeps as a profiler takes them: curves of 10 loads, each a random (k, alpha)."""
    rng = np.random.default_rng(0)
    rows = []
    for curve in range(n_points // 10):
        # k = 0 once: more k = 0 curves would repeat its operating points exactly
        k = 0 if curve == 0 else int(rng.integers(1, 9))
        alpha = 0.0 if k == 0 else float(rng.uniform(0.5, 0.95))
        point = dict(k=k, alpha=alpha, output_len=128)
        saturation = float(sb.saturation_rate(COEF, **point))
        for i, load in enumerate(np.linspace(0.05, 0.6, 10)):
            trace = sb.simulate(COEF, rate=load * saturation, n_requests=250,
                                seed=curve * 10 + i, prompt_len=512, **point)
            rows.append(sb.aggregate(trace.iloc[50:]))
    return pd.concat(rows, ignore_index=True)


def timed_fit(points: pd.DataFrame, draws: int, **settings) -> tuple[float, sb.Posterior]:
    start = time.perf_counter()
    posterior = sb.fit(points, num_warmup=draws, num_samples=draws, seed=1, num_chains=4,
                       progress=False, **settings)
    return time.perf_counter() - start, posterior


def cached_fit(points: pd.DataFrame, draws: int, **settings) -> tuple[float, float, sb.Posterior]:
    """The same fit twice: the wall time of the first (compiling), of the second (its
    program read from the compilation cache), and the second's posterior."""
    compiling, _ = timed_fit(points, draws, **settings)
    return compiling, *timed_fit(points, draws, **settings)


def main(n_points: int = 1000, variant: str = "stepped") -> None:
    devices = sb.use_cpu_cores()
    cache = tempfile.mkdtemp(prefix="sdbayes-bench-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    points = traces(n_points)
    print(f"{n_points} operating points, variant {variant}, 4 chains x (1000 + 1000), "
          f"{os.cpu_count()} cores as {devices} JAX devices")
    sampling = {}
    try:
        for chain_method in ("parallel", "vectorized"):
            settings = dict(variant=variant, chain_method=chain_method)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, short, _ = cached_fit(points, 10, **settings)
                compiling, wall, posterior = cached_fit(points, 1000, **settings)
            sampling[chain_method] = wall - short
            d = posterior.diagnostics
            steps = float(posterior.idata.sample_stats["n_steps"].mean())
            print(f"{chain_method}: wall {wall:.1f} s once compiled ({compiling:.1f} s with "
                  f"compilation): {short:.1f} s tracing and ArviZ conversion (a 10 + 10 "
                  f"fit) and {wall - short:.1f} s sampling")
            print(f"  max R-hat {d.max_rhat:.3f}; min ESS bulk {d.min_ess_bulk:.0f}, tail "
                  f"{d.min_ess_tail:.0f}; {d.min_ess_bulk / (wall - short):.0f} bulk ESS per "
                  f"second of sampling; {steps:.1f} leapfrog steps per draw; "
                  f"{d.divergences} divergences")
            for problem in d.problems:
                print(f"  warning: {problem}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"sampling, vectorized / parallel: "
          f"{sampling['vectorized'] / sampling['parallel']:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000,
         sys.argv[2] if len(sys.argv) > 2 else "stepped")
