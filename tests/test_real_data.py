"""Calibration on the source study's real vLLM sweeps (read in place from ../shared/data):
the "filling" form against the paper's. ``bench/real_data.py`` measures the out-of-sample
accuracy; this checks what a fit on all the points must show."""

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import sdbayes as sb

USES_NUMPYRO = True
STUDY = Path(__file__).resolve().parents[2] / "shared" / "data" / "speculators-qwen3-8b"
FILES = sorted(STUDY.glob("*.json"))
CONFIG = dict(hardware="GPU-80GB", verifier="Qwen3-8B", drafter="eagle3-qwen3-8b",
              method="eagle3")
BIAS = {"paper": 0.04, "filling": 0.05}
"""Largest bias by load rank each form's short fit may show in sample. The filling form's is
at the top rank, at capacity, and moves with the sampler's random path: 3.1-4.1% over
seeds 0-3, with the sampler's shapes padded or not (a 4% limit failed one seed in each)."""
pytestmark = pytest.mark.skipif(not FILES, reason=f"no study files in {STUDY}")


@pytest.fixture(scope="module")
def fits():
    points = pd.concat([sb.read_guidellm(path, **CONFIG) for path in FILES], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)  # short chains
        return points, {variant: sb.fit(points, variant=variant, metrics=("e2e",),
                                         num_warmup=200, num_samples=200, num_chains=2,
                                         seed=0, progress=False)
                        for variant in ("paper", "filling")}


def test_loo_does_not_prefer_the_paper_form(fits):
    """The filling form's rising marginal cost is what these sweeps show (without a
    discrepancy in load, an elpd difference of 245, se 16); with one, the paper's form
    follows the bend too, and the two are closer. Measured: filling ahead by 9.4 (se 8.1)."""
    _, posteriors = fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pareto-k: see sb.compare
        ranking = sb.compare(posteriors)
    assert set(ranking.index) == {"paper", "filling"}
    if ranking.index[0] == "paper":
        assert ranking.loc["filling", "elpd_diff"] < 2 * ranking.loc["filling", "dse"]


def test_both_forms_fit_every_load_as_fitted(fits):
    """In sample, by load rank within each curve, predicted as the points were fitted (a
    90 s run each, the top one at capacity): the bias stays within BIAS at every rank for
    both forms and the 90% predictive intervals cover 80-100% of the points. Measured: bias
    0.5% at most for the paper's form (with its discrepancy in load), 3.1-4.1% for the
    filling form (at the top rank, at capacity); coverage 93-95% for both."""
    points, posteriors = fits
    steady = points[points["steady"]].reset_index(drop=True)
    rank = steady.groupby(["acceptance", "k"])["request_rate"].rank(method="first").fillna(0)
    for variant, posterior in posteriors.items():
        pred = posterior.predict(steady)
        error = pred["e2e_median_s"] / steady["e2e_mean_s"] - 1
        inside = ((pred["e2e_pi_lower_s"] <= steady["e2e_mean_s"])
                  & (steady["e2e_mean_s"] <= pred["e2e_pi_upper_s"]))
        assert np.abs(error.groupby(rank).mean()).max() < BIAS[variant], variant
        assert 0.8 <= inside.mean() <= 1.0, variant


SMALLEST = STUDY.parent / "speculators-qwen3-0.6b"


@pytest.mark.skipif(not list(SMALLEST.glob("*.json")), reason=f"no study files in {SMALLEST}")
def test_the_recommended_path_converges_on_real_sweeps():
    """`sdbayes import` then `sdbayes fit` as a user runs them: every metric the sweeps
    hold, the throughput runs left out (steady false), where capacity is pinned only by the
    open loops and the discrepancy in load could stand in for C2 (before the discrepancies
    were projected off the coefficients, fitting e2e alone: R-hat 1.35, ESS 5). Short
    chains, so the thresholds are those of 1,000 draws: R-hat at most 1.05, ESS at least
    100. (With 2 x 300 draws the lowest ESS ranged 93-229 over seeds 0-3: a change of the
    likelihood's rounding alone moved seed 0 across 100.)"""
    points = pd.concat([sb.read_guidellm(path, **dict(CONFIG, verifier="Qwen3-0.6B",
                                                      drafter="eagle3-qwen3-0.6b"))
                        for path in sorted(SMALLEST.glob("*.json"))], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sb.Posterior.FitWarning)  # short chains
        posterior = sb.fit(points, variant="paper", num_warmup=300, num_samples=500,
                           num_chains=2, seed=0, progress=False)
    d = posterior.diagnostics
    assert d.divergences == 0
    assert d.max_rhat <= 1.05
    assert min(d.min_ess_bulk, d.min_ess_tail) >= 100
