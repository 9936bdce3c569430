"""A peer: `sdbayes fit` against a PyMC twin of the paper's six-coefficient fit, as a user
runs each (a new process), cold and warm.

    python bench/peers.py [--size=8b] [--other=1.7b] [--chains=2] [--warmup=1000]
                          [--samples=1000]

Both fit the lower-load split of the source study's sweeps for one size (bench/real_data.py,
split (a)), paper form, end-to-end latency, ``chains`` chains on the machine's cores.

- sdbayes: ``sdbayes fit points.csv --variant paper`` in a new process, three times: with
  an empty compilation cache ("first ever"); with the cache an earlier fit of another
  size's split left ("cold": a new data set of a similar size, the issue's case); and
  again on the same data ("warm").
- PyMC: the paper's mean latency (``C1 / (1 - rate C2)`` open, ``C1 + (N - 1) C2`` closed)
  with the same log-normal prior on the six coefficients (sdbayes's ``data_prior`` of the
  same points) and a log-normal error, ``log e2e ~ Normal(log L, sqrt(sigma^2 +
  (se / e2e)^2))``, sampled by PyMC's NUTS, in a new process: with an empty PyTensor
  compile folder ("cold") and again ("warm").

The twin is simpler than sdbayes's model (no configuration discrepancy, no queueing error,
no finite-run correction), so its gradients are cheaper: the comparison favours PyMC. For
each run it prints the process's whole wall time and the smallest bulk ESS, and the ESS per
second (PyMC's also per second of its own sampling time, which excludes compilation).
PyMC is a bench-only extra (``pip install 'sdbayes[peers]'``); without it the PyMC rows are
skipped.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COEFFICIENTS = ("c1p", "c1v", "c1d", "c2p", "c2v", "c2d")


def option(name: str, default):
    for arg in sys.argv[1:]:
        if arg.startswith(f"--{name}="):
            return type(default)(arg.split("=", 1)[1])
    return default


def train_split(size: str, path: Path) -> int:
    """Write the lower-load split of one size's sweeps to ``path``; its row count."""
    sys.path.insert(0, str(HERE))
    from real_data import load_study, studies

    points = load_study(studies()[size])
    train = points[points["low_load"]].drop(columns=["curve", "low_load", "rate_rank",
                                                     "capacity_run"])
    train.to_csv(path, index=False)
    return len(train)


def sdbayes_run(points: Path, cache: Path, out: Path, chains, warmup, samples) -> dict:
    """One ``sdbayes fit`` in a new process: its wall and the smallest bulk ESS."""
    command = [str(Path(sys.executable).with_name("sdbayes")), "fit", str(points), "--out",
               str(out), "--variant", "paper", "--chains", str(chains), "--warmup",
               str(warmup), "--samples", str(samples)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True,
                          env={**os.environ, "SDBAYES_CACHE_DIR": str(cache)})
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):  # 3: fitted, with a warning about the fit
        raise SystemExit(f"sdbayes fit failed:\n{done.stderr[-2000:]}")
    import sdbayes as sb

    return dict(wall=wall, ess=sb.load_posterior(out).diagnostics.min_ess_bulk)


def pymc_run(points: Path, compiledir: Path, chains, warmup, samples) -> dict | None:
    """The PyMC twin in a new process; None where PyMC is not installed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--twin", str(points), str(chains),
                           str(warmup), str(samples)], capture_output=True, text=True,
                          env={**os.environ, "PYTENSOR_FLAGS": f"compiledir={compiledir}"})
    wall = time.perf_counter() - start
    if done.returncode == 2:
        return None
    if done.returncode != 0:
        raise SystemExit(f"the PyMC twin failed:\n{done.stderr[-2000:]}")
    return dict(wall=wall, **json.loads(done.stdout.strip().splitlines()[-1]))


def twin(points: Path, chains: int, warmup: int, samples: int) -> None:
    """The PyMC twin (run in its own process by :func:`pymc_run`); prints a JSON line."""
    try:
        import pymc as pm
    except ImportError:
        raise SystemExit(2) from None
    import arviz as az
    import numpy as np
    import pandas as pd

    data = pd.read_csv(points)
    prior = json.loads(Path(str(points) + ".prior.json").read_text())
    k, alpha = data["k"].to_numpy(float), data["acceptance"].to_numpy(float)
    # Tokens a cycle emits, E(k, alpha) = 1 + alpha + ... + alpha^k: data, not parameters.
    tokens = np.sum(alpha[:, None] ** np.arange(16)[None, :]
                    * (np.arange(16)[None, :] <= k[:, None]), axis=1)
    cycles = data["output_len"].to_numpy(float) / tokens
    rate = data["request_rate"].fillna(0.0).to_numpy(float)
    others = (data["concurrency"].fillna(1.0) - 1.0).to_numpy(float)
    e2e, se = data["e2e_mean_s"].to_numpy(float), data["e2e_se_s"].fillna(0.0).to_numpy(float)
    with pm.Model():
        log_c = pm.Normal("log_c", mu=np.array(prior["loc"]), sigma=np.array(prior["scale"]),
                          shape=6)
        c = pm.math.exp(log_c)
        c1 = c[0] + cycles * (c[1] + k * c[2])
        c2 = c[3] + cycles * (c[4] + k * c[5])
        stretch = pm.math.maximum(1.0 - rate * c2, 1e-6)  # past saturation: very long
        latency = pm.math.switch(rate > 0, c1 / stretch, c1 + others * c2)
        sigma = pm.HalfNormal("sigma", 0.1)
        pm.Normal("obs", mu=pm.math.log(latency),
                  sigma=pm.math.sqrt(sigma**2 + (se / e2e) ** 2), observed=np.log(e2e))
        idata = pm.sample(draws=samples, tune=warmup, chains=chains, cores=chains,
                          random_seed=0, progressbar=False, compute_convergence_checks=False)
    ess = az.ess(idata, var_names=["log_c", "sigma"])
    print(json.dumps(dict(ess=float(min(ess["log_c"].min(), ess["sigma"]).values),
                          sampling=float(idata.posterior.attrs["sampling_time"]))))


def main() -> None:
    size, other = option("size", "8b"), option("other", "1.7b")
    chains, warmup = option("chains", 2), option("warmup", 1000)
    samples = option("samples", 1000)
    import pandas as pd

    import sdbayes as sb
    from sdbayes.likelihood import data_prior
    from sdbayes.traces import to_points

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        points, others = folder / f"{size}.csv", folder / f"{other}.csv"
        n, n_other = train_split(size, points), train_split(other, others)
        prior = data_prior(to_points(sb.read_traces(points))[0])
        Path(str(points) + ".prior.json").write_text(json.dumps(
            dict(loc=list(map(float, prior.loc)), scale=list(map(float, prior.scale)))))
        print(f"{size}, lower-load split: {n} points ({other}'s: {n_other}); "
              f"{chains} chains x ({warmup} + {samples}); {os.cpu_count()} CPU cores")
        fit = (chains, warmup, samples)
        rows = [("sdbayes, first ever (empty cache)",
                 sdbayes_run(points, folder / "empty", folder / "a.nc", *fit))]
        sdbayes_run(others, folder / "cache", folder / "b.nc", *fit)  # fills the cache
        rows += [("sdbayes, cold (cache of another size)",
                  sdbayes_run(points, folder / "cache", folder / "c.nc", *fit)),
                 ("sdbayes, warm (same data again)",
                  sdbayes_run(points, folder / "cache", folder / "d.nc", *fit))]
        for label in ("cold", "warm"):
            run = pymc_run(points, folder / "pytensor", *fit)
            if run is None:
                print("PyMC is not installed (pip install 'sdbayes[peers]'): no PyMC rows")
                break
            rows.append((f"PyMC twin, {label} (compile folder "
                         f"{'empty' if label == 'cold' else 'kept'})", run))
    table = pd.DataFrame([dict(run=label, wall_s=r["wall"], min_ess_bulk=r["ess"],
                               ess_per_s=r["ess"] / r["wall"],
                               ess_per_sampling_s=r["ess"] / r["sampling"]
                               if "sampling" in r else float("nan"))
                          for label, r in rows])
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    peers = table[table["run"].str.startswith("PyMC")]
    if len(peers):
        cold = table.iloc[1]
        print(f"\ncold sdbayes fit / PyMC's whole cold run: "
              f"{cold['wall_s'] / peers.iloc[0]['wall_s']:.2f}x the wall")
        print(f"warm ESS/s, sdbayes's whole run against PyMC's sampling alone: "
              f"{table.iloc[2]['ess_per_s'] / peers.iloc[-1]['ess_per_sampling_s']:.2f}x; "
              f"whole runs: {table.iloc[2]['ess_per_s'] / peers.iloc[-1]['ess_per_s']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--twin"]:
        twin(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
    else:
        main()
