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


def test_loo_prefers_the_filling_form(fits):
    """Measured: elpd difference 245 (se 16) with 200 draws; 5 se is a wide margin."""
    _, posteriors = fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pareto-k: see sb.compare
        ranking = sb.compare(posteriors)
    assert ranking.index[0] == "filling"
    assert ranking.loc["paper", "elpd_diff"] > 5 * ranking.loc["paper", "dse"]


def test_filling_fits_every_load_where_the_paper_form_bends_away(fits):
    """In sample, by load rank within each curve, the paper's form is biased (measured: +4%
    at the middle rates, -8% and -20% at the two highest); the filling form's bias stays
    within 4% at every rank (measured: 3.5% at most) and its 90% predictive intervals cover
    80-100% of the points (measured: 92%)."""
    points, posteriors = fits
    steady = points[points["steady"]].reset_index(drop=True)
    rank = steady.groupby(["acceptance", "k"])["request_rate"].rank(method="first").fillna(0)
    bias = {}
    for variant, posterior in posteriors.items():
        # Steady predictions, as fitted (a run's length would make them finite runs').
        pred = posterior.predict(steady.drop(columns="duration_s"))
        error = pred["e2e_median_s"] / steady["e2e_mean_s"] - 1
        bias[variant] = error.groupby(rank).mean()
        if variant == "filling":
            inside = ((pred["e2e_pi_lower_s"] <= steady["e2e_mean_s"])
                      & (steady["e2e_mean_s"] <= pred["e2e_pi_upper_s"]))
            assert 0.8 <= inside.mean() <= 1.0
    assert np.abs(bias["filling"]).max() < 0.04
    assert np.abs(bias["paper"]).max() > 0.06
