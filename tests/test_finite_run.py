"""The fluid model of a finite open-loop run (sdbayes.fluid) against exact results and
the steady model it must approach."""

from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

import sdbayes as sb
from sdbayes.fluid import finite_run

jax.config.update("jax_enable_x64", True)

# Costs of the order the source study's Qwen3-8B sweeps fit (saturating near 13 req/s).
COEF = sb.Coefficients(0.0876, 0.0143, 0.0014, 0.032, 9.9e-5, 3.6e-5, fill=2.38,
                       fill_half=10.6)
POINT = dict(k=4.0, alpha=0.7, output_len=128.0)


@pytest.mark.parametrize("variant", ["paper", "filling"])
def test_a_long_run_reaches_the_steady_mean(variant):
    capacity = float(sb.saturation_rate(COEF, **POINT, variant=variant))
    rate = 0.8 * capacity
    steady = float(sb.latency(COEF, **POINT, rate=rate, variant=variant))
    # 1.5 hours: the ramp from empty (a few relaxation times of a few seconds) weighs
    # under 0.1%, and 512 steps of 10 s resolve a latency of about 2 s within 0.5%.
    run = finite_run(COEF, **POINT, rate=rate, duration=5400.0, variant=variant, steps=512)
    assert float(run.latency) == pytest.approx(steady, rel=0.005)
    # Little's Law; the time average also counts the ramp, some tens of seconds of a
    # backlog still building under "filling" (measured: 0.6% less)
    assert float(run.in_flight) == pytest.approx(rate * steady, rel=0.01)
    assert float(run.ttft) == pytest.approx(
        float(sb.ttft(COEF, **POINT, rate=rate, variant=variant)), rel=0.005)


def test_without_load_dependence_every_request_takes_c1():
    # c2 = 0: L = C1 whatever is in flight, so the run is exact: each completed request
    # took C1, and N ramps up to rate * C1 over the first C1 seconds.
    coef = COEF._replace(c2p=0.0, c2v=0.0, c2d=0.0)
    alone = float(sb.latency(coef, **POINT, concurrency=1))
    rate, duration = 20.0, 60.0
    run = finite_run(coef, **POINT, rate=rate, duration=duration, steps=256)
    assert float(run.latency) == pytest.approx(alone, rel=1e-3)
    # Time average of min(rate * t, rate * C1) on the grid's left ends.
    assert float(run.in_flight) == pytest.approx(rate * alone * (1 - alone / (2 * duration)),
                                                 rel=0.01)


def test_near_and_past_capacity_a_run_reports_less_than_the_steady_mean():
    capacity = float(sb.saturation_rate(COEF, **POINT))
    rates = capacity * np.array([0.5, 0.9, 0.97, 1.0, 1.2])
    steady = np.asarray(sb.latency(COEF, **POINT, rate=rates))
    run = np.asarray(finite_run(COEF, **POINT, rate=rates, duration=90.0).latency)
    assert np.isfinite(run).all() and np.isinf(steady[-2:]).all()
    assert (run < steady).all() and (np.diff(run) > 0).all()
    assert run[0] == pytest.approx(steady[0], rel=0.01)  # far below capacity: the same
    # Past capacity the backlog grows for the whole run: a longer run reports more.
    longer = float(finite_run(COEF, **POINT, rate=rates[-1], duration=180.0).latency)
    assert longer > 1.2 * run[-1]


def test_broadcasts_and_says_when_nothing_completes():
    run = finite_run(COEF, **POINT, rate=np.array([[1.0], [5.0]]),
                     duration=np.array([0.5, 30.0, 90.0]))
    assert run.latency.shape == run.ttft.shape == run.in_flight.shape == (2, 3)
    # A request alone takes about 1.3 s: none of a 0.5 s run completes.
    assert np.isinf(run.latency[:, 0]).all() and np.isfinite(run.latency[:, 1:]).all()
    assert np.isinf(run.tpot[:, 0]).all()


def test_predict_follows_the_run_length():
    posterior = sb.load_posterior(
        Path(__file__).resolve().parents[1] / "calibration" / "example_posterior.nc")
    capacity = float(np.median(posterior.predict(pd.DataFrame(
        dict(k=[3], acceptance=[0.7], output_len=[128.0], request_rate=[1.0])))
        ["saturation_rate_pred"]))
    grid = pd.DataFrame(dict(k=3, acceptance=0.7, output_len=128.0,
                             request_rate=capacity * np.array([0.3, 0.95, 1.3])))
    steady = posterior.predict(grid)
    run = posterior.predict(grid.assign(duration_s=90.0))
    assert np.isinf(steady["e2e_median_s"].iloc[-1])
    assert steady["saturated"].tolist() == [False, False, True]
    # A run of finite length has a finite mean: never saturated, never +inf.
    for metric in ("e2e", "ttft", "tpot"):
        assert np.isfinite(run[[f"{metric}_{c}_s" for c in
                                ("pred", "median", "lower", "upper", "pi_lower", "pi_upper")]]
                           ).all().all()
    assert (run["p_saturated"] == 0).all() and not run["saturated"].any()
    # Far below capacity a 90 s run reports the steady mean, within its ramp (2%).
    assert run["e2e_median_s"].iloc[0] == pytest.approx(steady["e2e_median_s"].iloc[0],
                                                        rel=0.02)
    # The predictive interval widens with the queue: relative width grows with the load.
    width = np.log(run["e2e_pi_upper_s"] / run["e2e_pi_lower_s"]).to_numpy()
    assert width[1] > 1.5 * width[0]
