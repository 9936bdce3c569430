"""Recovery of known coefficients from simulator traces, over several seeds.

A small simulation-based calibration check: 8 configurations (k 0..8, alpha 0.6..0.95) x 4
loads up to 55% of saturation, 300 requests per point, fitted with the "stepped" variant,
which matches the simulator's mean latency within ~1.5% at these loads
(bench/analytic_vs_simulated.py). End-to-end latency only: the TTFT approximation is 3-8%
low at load and, fitted jointly, pulls c2p away from its truth.
"""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

import sdbayes as sb

USES_NUMPYRO = True  # conftest: NumPyro needs implicit rank promotion
TRUE = sb.Coefficients(c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)
CONFIGS = [(0, 0.0), (2, 0.6), (2, 0.9), (4, 0.7), (4, 0.95), (6, 0.8), (8, 0.6), (8, 0.9)]
LOADS = (0.1, 0.25, 0.4, 0.55)
SEEDS = range(6)


def simulated_points(coef, configs, loads, seed, hardware, requests=300):
    """Aggregated simulator runs; the first tenth of each run (at least 50) is warm-up."""
    warmup = max(50, requests // 10)
    frames = []
    for i, (k, alpha) in enumerate(configs):
        saturation = float(sb.saturation_rate(coef, k=k, alpha=alpha, output_len=128,
                                              variant="stepped"))
        for j, load in enumerate(loads):
            trace = sb.simulate(coef, k=k, alpha=alpha, prompt_len=512, output_len=128,
                                rate=load * saturation, n_requests=requests + warmup,
                                seed=seed * 1000 + i * 10 + j, hardware=hardware,
                                verifier="Qwen3-8B", drafter="eagle", method="eagle3")
            frames.append(sb.aggregate(trace.iloc[warmup:]))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.slow
def test_true_coefficients_inside_90_percent_intervals_at_the_nominal_rate():
    inside = []
    for seed in SEEDS:
        with warnings.catch_warnings():
            # small runs may report a low ESS; coverage is what this test judges
            warnings.simplefilter("ignore", sb.Posterior.FitWarning)
            points = simulated_points(TRUE, CONFIGS, LOADS, seed, "A")
            posterior = sb.fit(points, variant="stepped", metrics=("e2e",), num_warmup=500,
                               num_samples=500, num_chains=2, seed=seed, progress=False)
        summary = posterior.summary(ci=0.9)
        truth = np.array([getattr(TRUE, name) for name in summary["coefficient"]])
        inside.extend((summary["lower"] <= truth) & (truth <= summary["upper"]))
    n, hits = len(inside), int(np.sum(inside))
    # Central 98% binomial band of 90% coverage over n = 36 intervals: [28, 36].
    low, high = binom.ppf(0.01, n, 0.9), binom.ppf(0.99, n, 0.9)
    assert low <= hits <= high, f"{hits}/{n} true coefficients inside their 90% intervals"


@pytest.mark.slow
def test_a_group_with_three_points_borrows_from_the_others():
    # Three GPUs whose coefficients differ from TRUE by ~15% each (log-normal); two are
    # measured richly, the third at three configurations and one load.
    rng = np.random.default_rng(0)
    truth = {g: sb.Coefficients(*(c * np.exp(0.15 * rng.normal()) for c in TRUE[:6]))
             for g in ("A", "B", "C")}
    rich = [simulated_points(truth[g], CONFIGS, LOADS, seed, g) for seed, g in enumerate("AB")]
    few = simulated_points(truth["C"], [(0, 0.0), (4, 0.7), (8, 0.9)], (0.3,), 7, "C")
    settings = dict(variant="stepped", metrics=("e2e",), num_warmup=500, num_samples=500,
                    num_chains=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)  # alone, it is flagged
        alone = sb.fit(few, **settings).summary(ci=0.9)
        joint = sb.fit(pd.concat([*rich, few], ignore_index=True), **settings).summary(ci=0.9)
    joint = joint[joint["group"].str.startswith("C ")].reset_index(drop=True)
    assert list(joint["coefficient"]) == list(alone["coefficient"])
    expected = np.array([getattr(truth["C"], name) for name in joint["coefficient"]])
    log_width = lambda s: np.log(s["upper"] / s["lower"]).to_numpy()  # noqa: E731
    assert np.all(log_width(joint) < log_width(alone))
    assert np.all((joint["lower"] <= expected) & (expected <= joint["upper"]))


@pytest.mark.slow
def test_extrapolation_in_load():
    # Fit up to 55% of saturation (1,000 requests a point), predict 70% and 85%, where the
    # simulator's means come from 30,000 requests: shorter runs are themselves noisy by
    # several percent this close to saturation.
    fit_points = simulated_points(TRUE, CONFIGS, LOADS, 0, "A", requests=1_000)
    held_out = simulated_points(TRUE, CONFIGS, (0.7, 0.85), 100, "A", requests=30_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)
        posterior = sb.fit(fit_points, variant="stepped", metrics=("e2e",), num_warmup=500,
                           num_samples=500, num_chains=2, progress=False)
    predicted = posterior.predict(held_out, ci=0.9)
    measured = held_out["e2e_mean_s"]
    # The mean-value form is low near saturation against the simulator. Measured over fit
    # seeds 0-2: 11.3-11.9%, all low (8.9-9.1% while the discrepancy in load's amplitude
    # was sampled, with a funnel: integrating it out cost this form 2.5 points here).
    assert (predicted["e2e_median_s"] / measured - 1).abs().mean() <= 0.13
    # 16 points at 90%: fewer than 12 inside has probability under 2% if calibrated
    # (all 16 inside, 19%, is no requirement). Measured: 15 at each of those seeds.
    inside = ((predicted["e2e_pi_lower_s"] <= measured)
              & (measured <= predicted["e2e_pi_upper_s"]))
    assert inside.sum() >= 12


@pytest.mark.slow
def test_a_profiling_sweep_fits_without_divergences():
    """A sweep as a profiler takes it (40 curves of random k and alpha, 10 loads to 60% of
    saturation, as bench/fit.py's): the paper's form fits it without a divergent
    transition. With the discrepancy in load's amplitude sampled (a HalfNormal) its
    non-centred weights made a funnel here: 4 divergent transitions at this seed, 109 in
    4 x 2,000 draws of bench/fit.py's 1,000 points."""
    rng = np.random.default_rng(0)
    configs = [(0, 0.0)] + [(int(rng.integers(1, 9)), float(rng.uniform(0.5, 0.95)))
                            for _ in range(39)]
    points = simulated_points(TRUE, configs, tuple(np.linspace(0.05, 0.6, 10)), 0, "A",
                              requests=150)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)  # short chains: low ESS
        posterior = sb.fit(points, variant="paper", num_warmup=500, num_samples=500,
                           num_chains=2, seed=0, progress=False)
    assert posterior.diagnostics.divergences == 0, posterior.diagnostics.verdict
