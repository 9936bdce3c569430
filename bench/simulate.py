"""Simulator speed: requests simulated per second, at several loads.

    python bench/simulate.py [n_requests]

Prints one row per load (fraction of the analytic saturation rate) with wall time and
requests per second, for the documented example configuration (k = 4, alpha = 0.7).
"""

import sys
import time

import sdbayes as sb
from sdbayes.examples import EXAMPLE_COEFFICIENTS, EXAMPLE_POINT


def main(n_requests: int = 100_000) -> None:
    point = dict(EXAMPLE_POINT)
    saturation = float(sb.saturation_rate(EXAMPLE_COEFFICIENTS, **point))
    print(f"{n_requests} requests, k={point['k']}, alpha={point['alpha']}, "
          f"saturation {saturation:.2f} req/s")
    print(f"{'load':>6} {'rate':>8} {'wall [s]':>9} {'req/s':>10}")
    for load in (0.01, 0.3, 0.6, 0.9):
        start = time.perf_counter()
        sb.simulate(EXAMPLE_COEFFICIENTS, rate=load * saturation, n_requests=n_requests,
                    seed=0, **point)
        wall = time.perf_counter() - start
        print(f"{load:>6.0%} {load * saturation:>8.2f} {wall:>9.2f} {n_requests / wall:>10,.0f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
