"""A peer: `sdbayes fit` against a PyMC twin of the paper's six-coefficient fit, as a user
runs each (a new process), cold and warm.

    python bench/peers.py [--size=8b] [--other=1.7b] [--chains=2] [--warmup=1000]
                          [--samples=1000]

Both fit the lower-load split of the source study's sweeps for one size (bench/real_data.py,
split (a)), paper form, end-to-end latency, ``chains`` chains on the machine's cores.

- sdbayes: ``sdbayes fit points.csv --variant paper`` in a new process, three times: with
  an empty compilation cache ("first ever"); with the cache an earlier fit of another
  size's split, less every 32nd row, left ("cold": a new data set of a similar size, the
  issue's case); and
  again on the same data ("warm").
- PyMC: the paper's mean latency (``C1 / (1 - rate C2)`` open, ``C1 + (N - 1) C2`` closed)
  with the same log-normal prior on the six coefficients (sdbayes's ``data_prior`` of the
  same points) and a log-normal error, ``log e2e ~ Normal(log L, sqrt(sigma^2 +
  (se / e2e)^2))``, sampled by PyMC's NUTS, in a new process: with an empty PyTensor
  compile folder ("cold") and again ("warm").
- NumPyro: the same twin in NumPyro, sdbayes's engine, chains in parallel as ``sdbayes fit``
  runs them, its sampling timed on a second run of the compiled sampler: how the engine
  compares with PyMC's on one model, apart from what sdbayes's richer model costs.

The twin is simpler than sdbayes's model (no configuration discrepancy, no queueing error,
no finite-run correction), so its gradients are cheaper: the comparison favours PyMC. For
each run it prints the process's whole wall time and the smallest bulk ESS, and the ESS per
second (the twins' also per second of their own sampling time, which excludes compilation),
and the leapfrog steps per draw where known.
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


def train_split(size: str, path: Path, drop_every: int = 0) -> int:
    """Write the lower-load split of one size's sweeps to ``path``, less every
    ``drop_every``-th row if given; its row count."""
    sys.path.insert(0, str(HERE))
    from real_data import load_study, studies

    points = load_study(studies()[size])
    train = points[points["low_load"]].drop(columns=["curve", "low_load", "rate_rank",
                                                     "capacity_run"])
    if drop_every:
        train = train[(train.reset_index().index + 1) % drop_every != 0]
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

    posterior = sb.load_posterior(out)
    return dict(wall=wall, ess=posterior.diagnostics.min_ess_bulk,
                steps=float(posterior.idata.sample_stats["n_steps"].mean()))


def twin_run(engine: str, points: Path, chains, warmup, samples,
             env: dict | None = None) -> dict | None:
    """A twin (``engine`` "pymc" or "numpyro") in a new process, with ``env`` added to its
    environment; None where PyMC is not installed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, f"--{engine}-twin", str(points),
                           str(chains), str(warmup), str(samples)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if done.returncode == 2:
        return None
    if done.returncode != 0:
        raise SystemExit(f"the {engine} twin failed:\n{done.stderr[-2000:]}")
    return dict(wall=wall, **json.loads(done.stdout.strip().splitlines()[-1]))


def twin_data(points: Path) -> dict:
    """What both twins fit: per point the paper's cycles, rate, others in flight, measured
    mean and its standard error, and the prior's loc and scale."""
    import numpy as np
    import pandas as pd

    data = pd.read_csv(points)
    prior = json.loads(Path(str(points) + ".prior.json").read_text())
    k, alpha = data["k"].to_numpy(float), data["acceptance"].to_numpy(float)
    # Tokens a cycle emits, E(k, alpha) = 1 + alpha + ... + alpha^k: data, not parameters.
    tokens = np.sum(alpha[:, None] ** np.arange(16)[None, :]
                    * (np.arange(16)[None, :] <= k[:, None]), axis=1)
    return dict(k=k, cycles=data["output_len"].to_numpy(float) / tokens,
                rate=data["request_rate"].fillna(0.0).to_numpy(float),
                others=(data["concurrency"].fillna(1.0) - 1.0).to_numpy(float),
                e2e=data["e2e_mean_s"].to_numpy(float),
                se=data["e2e_se_s"].fillna(0.0).to_numpy(float),
                loc=np.array(prior["loc"]), scale=np.array(prior["scale"]))


def pymc_twin(points: Path, chains: int, warmup: int, samples: int) -> None:
    """The PyMC twin (run in its own process by :func:`twin_run`); prints a JSON line."""
    try:
        import pymc as pm
    except ImportError:
        raise SystemExit(2) from None
    import arviz as az
    import numpy as np

    d = twin_data(points)
    with pm.Model():
        log_c = pm.Normal("log_c", mu=d["loc"], sigma=d["scale"], shape=6)
        c = pm.math.exp(log_c)
        c1 = c[0] + d["cycles"] * (c[1] + d["k"] * c[2])
        c2 = c[3] + d["cycles"] * (c[4] + d["k"] * c[5])
        stretch = pm.math.maximum(1.0 - d["rate"] * c2, 1e-6)  # past saturation: very long
        latency = pm.math.switch(d["rate"] > 0, c1 / stretch, c1 + d["others"] * c2)
        sigma = pm.HalfNormal("sigma", 0.1)
        pm.Normal("obs", mu=pm.math.log(latency),
                  sigma=pm.math.sqrt(sigma**2 + (d["se"] / d["e2e"]) ** 2),
                  observed=np.log(d["e2e"]))
        idata = pm.sample(draws=samples, tune=warmup, chains=chains, cores=chains,
                          random_seed=0, progressbar=False, compute_convergence_checks=False)
    ess = az.ess(idata, var_names=["log_c", "sigma"])
    print(json.dumps(dict(ess=float(min(ess["log_c"].min(), ess["sigma"]).values),
                          sampling=float(idata.posterior.attrs["sampling_time"]))))


def numpyro_twin(points: Path, chains: int, warmup: int, samples: int) -> None:
    """The same twin in NumPyro, sdbayes's engine, its chains in parallel on the CPU's cores
    as ``sdbayes fit`` runs them (run in its own process by :func:`twin_run`): what the
    engine does with the twin's model, apart from sdbayes's richer one. Prints a JSON line
    with the smallest bulk ESS, the sampling time (a second run, its sampler read from a
    compilation cache the first filled: NumPyro builds its parallel sampler anew on each
    run, and without the cache the second run compiled it again, 2.3 s) and the leapfrog
    steps per draw."""
    import tempfile

    import numpyro

    numpyro.set_host_device_count(chains)
    import arviz as az
    import jax

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS, init_to_median

    d = twin_data(points)

    def model():
        log_c = numpyro.sample("log_c", dist.Normal(d["loc"], d["scale"]).to_event(1))
        c = jnp.exp(log_c)
        c1 = c[0] + d["cycles"] * (c[1] + d["k"] * c[2])
        c2 = c[3] + d["cycles"] * (c[4] + d["k"] * c[5])
        stretch = jnp.maximum(1.0 - d["rate"] * c2, 1e-6)
        latency = jnp.where(d["rate"] > 0, c1 / stretch, c1 + d["others"] * c2)
        sigma = numpyro.sample("sigma", dist.HalfNormal(0.1))
        numpyro.sample("obs", dist.Normal(jnp.log(latency),
                                          jnp.sqrt(sigma**2 + (d["se"] / d["e2e"]) ** 2)),
                       obs=jnp.log(d["e2e"]))

    # Started at the prior's median, as PyMC starts at its mean (NumPyro's default start,
    # uniform in [-2, 2] on the log scale, lies past saturation, where the chains stick).
    mcmc = MCMC(NUTS(model, init_strategy=init_to_median), num_warmup=warmup,
                num_samples=samples, num_chains=chains, chain_method="parallel",
                progress_bar=False)
    mcmc.run(jax.random.key(0), extra_fields=("num_steps",))
    start = time.perf_counter()
    mcmc.run(jax.random.key(0), extra_fields=("num_steps",))
    sampling = time.perf_counter() - start
    ess = az.ess(az.from_numpyro(mcmc))
    print(json.dumps(dict(ess=float(min(ess["log_c"].min(), ess["sigma"]).values),
                          sampling=sampling,
                          steps=float(mcmc.get_extra_fields()["num_steps"].mean()))))


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
        n, n_other = train_split(size, points), train_split(other, others, drop_every=32)
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
            run = twin_run("pymc", points, *fit,
                           env={"PYTENSOR_FLAGS": f"compiledir={folder / 'pytensor'}"})
            if run is None:
                print("PyMC is not installed (pip install 'sdbayes[peers]'): no PyMC rows")
                break
            rows.append((f"PyMC twin, {label} (compile folder "
                         f"{'empty' if label == 'cold' else 'kept'})", run))
        rows.append(("NumPyro twin (sdbayes's engine, the twin's model)",
                     twin_run("numpyro", points, *fit)))
    table = pd.DataFrame([dict(run=label, wall_s=r["wall"], min_ess_bulk=r["ess"],
                               ess_per_s=r["ess"] / r["wall"],
                               ess_per_sampling_s=r["ess"] / r["sampling"]
                               if "sampling" in r else float("nan"),
                               steps_per_draw=r.get("steps", float("nan")))
                          for label, r in rows])
    print(table.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    peers = table[table["run"].str.startswith("PyMC")]
    if len(peers):
        engine = table[table["run"].str.startswith("NumPyro")].iloc[0]
        print(f"\nthe twin's model, NumPyro's sampling against PyMC's: "
              f"{engine['ess_per_sampling_s'] / peers.iloc[-1]['ess_per_sampling_s']:.2f}x "
              "ESS per second")
        cold = table.iloc[1]
        print(f"cold sdbayes fit / PyMC's whole cold run: "
              f"{cold['wall_s'] / peers.iloc[0]['wall_s']:.2f}x the wall")
        print(f"warm ESS/s, sdbayes's whole run against PyMC's sampling alone: "
              f"{table.iloc[2]['ess_per_s'] / peers.iloc[-1]['ess_per_sampling_s']:.2f}x; "
              f"whole runs: {table.iloc[2]['ess_per_s'] / peers.iloc[-1]['ess_per_s']:.2f}x")


if __name__ == "__main__":
    twins = {"--pymc-twin": pymc_twin, "--numpyro-twin": numpyro_twin}
    if sys.argv[1:2] and sys.argv[1] in twins:
        twin = twins[sys.argv[1]]
        twin(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
    else:
        main()
