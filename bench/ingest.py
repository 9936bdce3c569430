"""Per-request traces at scale: 10 million rows in several Parquet files read, validated,
aggregated and fitted on one machine.

    python bench/ingest.py [n_rows] [n_files] [--exact]

Writes ``n_rows`` (default 10,000,000) per-request rows in ``n_files`` (default 8) Parquet
files to a temporary folder: 92 open-loop operating points (k 0..16, acceptance 0.6 and
0.8, four rates from 20% to 80% of saturation), each point's requests in one file, their
latencies gamma-distributed about means drawn from the observation model at the
example posterior's medians: its coefficients, each configuration's discrepancy and each
point's relative error. Then, in a fresh process that splits the CPU into devices as the
``sdbayes`` command does (``sb.use_cpu_cores``), ``sb.read_points`` over the files (read,
validate and aggregate, one file at a time) and ``sb.fit`` of the points (NUTS, 2 chains x
500 + 500, the paper's form): each wall, and the peak resident memory of that process.
Needs pyarrow (the ``parquet`` extra).

``--exact`` draws the requests about the model's means themselves, as no server measures
them: every error scale of the fit then shrinks to 0 and NUTS runs to its full tree depth.
"""

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import sdbayes as sb
from sdbayes import observation

EXAMPLE_POSTERIOR = Path(__file__).resolve().parents[1] / "calibration" / "example_posterior.nc"
CONFIG = dict(hardware="H100x1", verifier="Qwen3-8B", prompt_len=512, output_len=128)


def operating_points(rng: np.random.Generator, exact: bool = False) -> pd.DataFrame:
    """The 92 configurations x rates, with their mean TTFT and latency [s]: each
    configuration's coefficients scaled by its discrepancy and each point's means by its
    relative error, both drawn at the example posterior's medians (none with ``exact``)."""
    posterior = sb.load_posterior(EXAMPLE_POSTERIOR)
    median = {name: np.median(posterior.idata.posterior[name].values, axis=(0, 1))
              for name in ("discrepancy", "sigma_e2e")}
    coef = sb.Coefficients(*(float(np.median(f)) for f in posterior.coefficients()))
    scale = 0.0 if exact else 1.0
    rows = []
    for k in (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 14, 16):
        for alpha in (0.6, 0.8) if k else (0.0,):
            point = dict(k=k, alpha=alpha, output_len=128.0)
            configured = observation.configured(coef, scale * rng.standard_normal(2),
                                                median["discrepancy"])
            top = float(sb.saturation_rate(configured, **point))
            for share in (0.2, 0.4, 0.6, 0.8):
                rate = share * top
                error = np.exp(scale * median["sigma_e2e"] * rng.standard_normal())
                rows.append(dict(k=k, acceptance=point["alpha"], request_rate=rate,
                                 ttft=error * float(sb.ttft(configured, rate=rate, **point)),
                                 e2e=error * float(sb.latency(configured, rate=rate, **point))))
    return pd.DataFrame(rows)


def write(folder: Path, n_rows: int, n_files: int, exact: bool = False) -> list[Path]:
    rng = np.random.default_rng(0)
    points = operating_points(rng, exact)
    per_point = n_rows // len(points)
    paths = []
    for f, rows in enumerate(np.array_split(np.arange(len(points)), n_files)):
        frames = []
        for p in points.iloc[rows].itertuples():
            ttft = rng.gamma(16.0, p.ttft / 16.0, per_point)
            frames.append(pd.DataFrame({
                **CONFIG, "k": p.k, "acceptance": p.acceptance, "request_rate": p.request_rate,
                "drafter": "eagle3" if p.k else "", "method": "eagle3" if p.k else "none",
                "arrival_s": np.cumsum(rng.exponential(1 / p.request_rate, per_point)),
                "ttft_s": ttft, "e2e_s": ttft + rng.gamma(16.0, (p.e2e - p.ttft) / 16.0,
                                                          per_point)}))
        paths.append(folder / f"requests-{f}.parquet")
        pd.concat(frames, ignore_index=True).to_parquet(paths[-1], index=False)
    return paths


def measure(paths: list[str]) -> None:
    sb.use_cpu_cores()
    start = time.perf_counter()
    points = sb.read_points(paths)
    ingest = time.perf_counter() - start
    start = time.perf_counter()
    posterior = sb.fit(points, variant="paper", num_warmup=500, num_samples=500, num_chains=2,
                       seed=0, progress=False)
    fit = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    rows = int(points["n_requests"].sum())
    print(f"{rows:,} rows in {len(paths)} files -> {len(points)} points: read, validate and "
          f"aggregate {ingest:.1f} s; fit {fit:.1f} s ({posterior.diagnostics.verdict}); "
          f"together {ingest + fit:.1f} s; peak memory {peak:.2f} GiB")


def main(n_rows: int = 10_000_000, n_files: int = 8, exact: bool = False) -> None:
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        paths = write(Path(folder), n_rows, n_files, exact)
        size = sum(p.stat().st_size for p in paths) / 2**20
        print(f"wrote {n_rows:,} rows in {n_files} files ({size:.0f} MiB) in "
              f"{time.perf_counter() - start:.0f} s")
        subprocess.run([sys.executable, __file__, "--measure", *map(str, paths)], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2:])
    else:
        sizes = [int(float(a)) for a in sys.argv[1:] if a != "--exact"]
        main(*sizes, exact="--exact" in sys.argv)
