"""Honest predictions on data the fit has not seen: predictive intervals that cover fresh
runs of the simulator in a binomial band, at light load and near capacity, and
``variant="auto"`` choosing the form the data came from."""

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

import sdbayes as sb

USES_NUMPYRO = True  # conftest: NumPyro needs implicit rank promotion
TRUE = sb.Coefficients(c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)
CONFIGS = [(0, 0.0), (2, 0.6), (2, 0.8), (4, 0.6), (4, 0.8), (6, 0.7), (6, 0.9)]
UNSEEN = [(1, 0.7), (3, 0.6), (3, 0.9), (5, 0.7), (5, 0.85), (8, 0.8), (2, 0.7)]
SMALL = dict(num_warmup=300, num_samples=300, num_chains=2, progress=False)


def simulated(load: float, seed: int, configs=CONFIGS, n_requests: int = 4000) -> pd.DataFrame:
    """Operating points of simulated runs of each configuration at ``load`` of its
    saturation rate (Poisson arrivals, requests from an empty server)."""
    frames = []
    for i, (k, alpha) in enumerate(configs):
        point = dict(k=k, alpha=alpha, output_len=128)
        rate = load * float(sb.saturation_rate(TRUE, **point, variant="stepped"))
        trace = sb.simulate(TRUE, rate=rate, n_requests=n_requests, seed=seed * 100 + i,
                            prompt_len=512, **point)
        frames.append(sb.aggregate(trace))
    return pd.concat(frames, ignore_index=True)


def inside(posterior, points: pd.DataFrame) -> np.ndarray:
    out = posterior.predict(points)
    measured = points["e2e_mean_s"].to_numpy()
    return ((out["e2e_pi_lower_s"].to_numpy() <= measured)
            & (measured <= out["e2e_pi_upper_s"].to_numpy()))


def band(n: int, level: float = 0.9, mass: float = 0.99) -> tuple[float, float]:
    """The fractions of n calibrated intervals of ``level`` that cover, with probability
    ``mass`` (equal tails)."""
    return (binom.ppf((1 - mass) / 2, n, level) / n, binom.ppf((1 + mass) / 2, n, level) / n)


@pytest.mark.slow
def test_predictive_intervals_cover_fresh_runs_at_light_load_and_near_capacity():
    """Fit on one run of each of 7 configurations at 10-90% of saturation; the 90%
    predictive intervals of a measured mean must cover fresh runs (new seeds) of 7 other
    configurations at 25% and at 80% of saturation as often as a binomial band of their
    count allows. Near capacity a run's mean varies from run to run far beyond the
    independent requests' standard error (7.6% against 0.5% at 80%), which the batch-means
    standard error of the runs and the fit's own spread must account for. Measured:
    coverage 1.00 at 25% and 0.91 at 80% (band 0.74-1.00 for 35 runs). Reruns of the
    configurations fitted are not this honest near capacity (0.63 measured): one run a
    load cannot tell a configuration's discrepancy from that run's noise."""
    train = pd.concat([simulated(load, seed=0) for load in np.linspace(0.1, 0.9, 9)],
                      ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)  # short chains
        posterior = sb.fit(train, variant="stepped", metrics=("e2e",), seed=0, **SMALL)
    for load in (0.25, 0.8):
        # One table per rerun: a table may not hold one point twice.
        covered = np.concatenate([inside(posterior, simulated(load, seed=s, configs=UNSEEN))
                                  for s in range(1, 6)])
        low, high = band(len(covered))
        assert low <= covered.mean() <= high, (load, covered.mean(), (low, high))


def analytic(variant: str, coef: sb.Coefficients, seed: int, noise: float = 0.01):
    """Operating points drawn from a form's own means with log-normal noise: open loops at
    10-85% of saturation and closed loops of 1 to 64 in flight."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, alpha in CONFIGS:
        point = dict(k=k, alpha=alpha, output_len=128)
        capacity = float(sb.saturation_rate(coef, **point, variant=variant))
        loads = [dict(request_rate=x * capacity) for x in (0.1, 0.3, 0.5, 0.7, 0.85)]
        loads += [dict(concurrency=n) for n in (1, 16, 64)]
        for load in loads:
            mean = float(sb.latency(coef, **point, variant=variant,
                                    rate=load.get("request_rate"),
                                    concurrency=load.get("concurrency")))
            rows.append(dict(hardware="H100", verifier="v", drafter="d", method="eagle3",
                             k=k, acceptance=alpha, prompt_len=512, output_len=128,
                             e2e_mean_s=mean * np.exp(noise * rng.normal()), **load))
    return pd.DataFrame(rows)


@pytest.mark.slow
@pytest.mark.parametrize("variant, coef", [
    ("paper", TRUE), ("stepped", TRUE), ("filling", TRUE._replace(fill=1.5, fill_half=8.0))])
def test_auto_picks_the_form_the_data_came_from(variant, coef):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)
        posterior = sb.fit(analytic(variant, coef, seed=1), variant="auto", seed=0, **SMALL)
    reason, table = posterior.variant_choice
    assert posterior.variant == variant, (reason, table)
    assert set(table.index) == set(sb.model.VARIANTS) and reason.startswith(variant)
