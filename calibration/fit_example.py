"""Reproduce calibration/example_posterior.nc: the posterior of the bundled example traces.

    python calibration/fit_example.py

The same fit as `sdbayes demo` (and `sdbayes fit sdbayes/data/example_points.csv --variant
stepped --metric e2e --chains 2 --warmup 500 --samples 500 --seed 0`), saved with its
diagnostics and provenance.
"""

from pathlib import Path

import sdbayes as sb
from sdbayes.examples import EXAMPLE_TRACES

SETTINGS = dict(variant="stepped", metrics=("e2e",), num_warmup=500, num_samples=500,
                num_chains=2, seed=0)
OUT = Path(__file__).resolve().parent / "example_posterior.nc"


def main() -> None:
    sb.use_cpu_cores()  # as the sdbayes command does: the chains run in parallel
    posterior = sb.fit(sb.read_traces(EXAMPLE_TRACES), progress=False, **SETTINGS)
    posterior.save(OUT)
    print(posterior.summary().to_string(index=False))
    print(f"written to {OUT}")


if __name__ == "__main__":
    main()
