"""Fitting a fleet: many (hardware x model pair) groups in one partially pooled posterior.

    python bench/fleet_fit.py [--groups=50] [--configs=10] [--loads=10] [--method=nuts]
                              [--draws=500] [--steps=5000] [--truth=simulator]

Each group's six coefficients are the example ones times a log-normal factor (sd 0.15 in
log space, as GPUs and model pairs differ); each group is measured at ``configs`` (k,
alpha) configurations x ``loads`` loads up to 55% of saturation, 200 simulated requests a
point (the simulator; "stepped" form, e2e only, as tests/test_recovery.py). Fits all groups
at once (2 chains x (draws + draws) for NUTS; SVI with ``--method=svi``) and prints the wall
times (simulation, fit) and the coverage of the true coefficients by their 90% credible
intervals over all groups, with the central 98% binomial band for the count.

``--truth=model`` replaces each point's mean latency by a draw from the fitted model
itself at the true coefficients (relative error 1%, queueing error 2%, no discrepancy), so
that no approximation of the stepped form's counts; ``--truth=simulator`` (default) keeps the
simulator's means. The binomial band takes the intervals as independent; the second band
keeps their correlation within a group (:func:`correlated_band`).
"""

import sys
import time
import warnings

import jax
import numpy as np
import pandas as pd
from numpyro import handlers
from scipy.stats import binom

import sdbayes as sb
from sdbayes import likelihood, observation
from sdbayes.examples import EXAMPLE_COEFFICIENTS
from sdbayes.traces import to_points

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


def model_truth(points: pd.DataFrame, truth: dict, seed: int) -> pd.DataFrame:
    """``points`` with each mean e2e latency drawn from the model at the true coefficients."""
    arrays, groups = to_points(points)
    names = likelihood.COEFFICIENTS
    log_c = np.log([[getattr(truth[g.split(" ")[0]], n) for n in names] for g in groups])
    rows = sb.Coefficients(**{n: np.exp(log_c[arrays.group, i]) for i, n in enumerate(names)})
    prior = likelihood.data_prior(arrays)
    fixed = ({"log_c_std": (log_c[0] - prior.loc) / prior.scale} if len(groups) == 1 else
             {"mu": np.zeros(len(names)), "tau": np.ones(len(names)), "z": log_c})
    model = handlers.substitute(handlers.seed(likelihood.model, 0),
                                data=dict(fixed, sigma_e2e=0.01, tau_q=0.02))
    sites = handlers.trace(model).get_trace(
        points=arrays, prior=prior, n_groups=len(groups),
        metrics=("e2e",), variant="stepped", discrepancy_scale=0.0, load_error_scale=0.0,
        loads=observation.effective_loads(rows, arrays, "stepped"))
    log_e2e = sites["obs_e2e"]["fn"].sample(jax.random.key(seed))  # [n]
    return points.assign(e2e_mean_s=np.exp(np.asarray(log_e2e)))


def correlated_band(posterior: sb.Posterior, summary: pd.DataFrame) -> tuple[float, float]:
    """Central 98% range of the count of intervals holding the truth, were the truth a draw
    from the posterior itself.

    The binomial band takes the intervals as independent; a group's six are not (their
    coefficients' posterior correlations reach 0.9), so its intervals miss together and
    the count spreads wider. Each posterior draw, taken as the truth, gives a count with
    the intervals' own dependence.
    """
    names = posterior.coefficient_names
    draws = np.stack([np.asarray(getattr(posterior.coefficients(g), name))
                      for g in range(len(posterior.groups)) for name in names],
                     axis=-1)  # [D, G * C], summary's order
    lower, upper = summary["lower"].to_numpy(), summary["upper"].to_numpy()
    counts = ((lower <= draws) & (draws <= upper)).sum(axis=1)
    return tuple(np.quantile(counts, [0.01, 0.99]))


def main() -> None:
    n_groups, n_configs = option("groups", 50), option("configs", 10)
    n_loads, method, draws = option("loads", 10), option("method", "nuts"), option("draws", 500)
    source, steps = option("truth", "simulator"), option("steps", 5000)
    rng = np.random.default_rng(0)
    truth = {f"GPU{g:03d}": sb.Coefficients(*(c * np.exp(0.15 * rng.normal())
                                              for c in EXAMPLE_COEFFICIENTS[:6]))
             for g in range(n_groups)}
    start = time.perf_counter()
    points = pd.concat([group_points(coef, n_configs, n_loads, g, name)
                        for g, (name, coef) in enumerate(truth.items())], ignore_index=True)
    if source == "model":
        points = model_truth(points, truth, seed=0)
    simulated = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)
        posterior = sb.fit(points, method=method, variant="stepped", metrics=("e2e",),
                           num_warmup=draws, num_samples=draws, num_chains=2, seed=0,
                           svi_steps=steps, progress=False)
    fitted = time.perf_counter() - start
    summary = posterior.summary(ci=0.9)
    hardware = summary["group"].str.split(" ").str[0]
    expected = np.array([getattr(truth[h], c) for h, c in
                         zip(hardware, summary["coefficient"], strict=True)])
    inside = (summary["lower"] <= expected) & (expected <= summary["upper"])
    n, hits = len(inside), int(inside.sum())
    low, high = binom.ppf(0.01, n, 0.9), binom.ppf(0.99, n, 0.9)
    joint_low, joint_high = correlated_band(posterior, summary)
    print(f"{n_groups} groups x {len(points) // n_groups} points ({len(points)} in all), "
          f"{method}{f' 2 x ({draws} + {draws})' if method == 'nuts' else f' {steps} steps'}, "
          f"means from the {source}")
    print(f"simulate + aggregate {simulated:.0f} s; fit {fitted:.0f} s; "
          f"{posterior.diagnostics.verdict}")
    print(f"true coefficients inside their 90% intervals: {hits}/{n} ({hits / n:.1%}); "
          f"central 98% binomial band [{low:.0f}, {high:.0f}]; as correlated as the "
          f"posterior's intervals [{joint_low:.0f}, {joint_high:.0f}]")
    per_coefficient = inside.groupby(summary["coefficient"]).mean()
    print("  by coefficient: " + ", ".join(f"{c} {v:.0%}" for c, v in per_coefficient.items()))


if __name__ == "__main__":
    sb.use_cpu_cores()
    main()
