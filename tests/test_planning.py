"""Capacity planning: the rate per draw, the risk-aware rate, replicas, break-even acceptance."""

import json
import subprocess
import sys

import arviz as az
import jax
import numpy as np
import pytest

import sdbayes as sb
from sdbayes.planning import increasing_root, rate_at_slo

TRUE = sb.Coefficients(c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)
POINT = dict(k=4.0, alpha=0.7, output_len=128.0)


def draws(n=400, spread=0.05, seed=0):
    """Posterior-like draws: each coefficient log-normal about TRUE."""
    rng = np.random.default_rng(seed)
    return sb.Coefficients(*(c * np.exp(spread * rng.standard_normal(n)) for c in TRUE[:6]))


def as_posterior(coef, variant="paper"):
    """A one-group Posterior holding these draws (one chain)."""
    posterior = {name: np.asarray(getattr(coef, name))[None, :, None] for name in coef._fields[:6]}
    attrs = {"sdbayes_groups": json.dumps(["H100 | Qwen3-8B | eagle (eagle3)"]),
             "sdbayes_group_columns": json.dumps([{"hardware": "H100", "verifier": "Qwen3-8B",
                                                   "drafter": "eagle", "method": "eagle3"}]),
             "sdbayes_variant": variant, "sdbayes_metrics": json.dumps(["e2e"])}
    return sb.Posterior(az.from_dict(posterior=posterior, attrs=attrs))


def test_closed_form_equals_the_root_solve_and_meets_the_slo():
    slo = np.array([1.2, 2.0, 5.0])
    closed = rate_at_slo(TRUE, slo=slo, **POINT)
    saturation = sb.saturation_rate(TRUE, **POINT)
    root = increasing_root(lambda r: sb.latency(TRUE, rate=r, **POINT) - slo,
                           np.zeros(3), np.full(3, float(saturation)))
    np.testing.assert_allclose(root, closed, rtol=1e-9)
    np.testing.assert_allclose(sb.latency(TRUE, rate=closed, **POINT), slo, rtol=1e-9)


@pytest.mark.parametrize("metric, function", [("e2e", sb.latency), ("ttft", sb.ttft),
                                              ("tpot", sb.tpot)])
@pytest.mark.parametrize("variant", ["paper", "stepped"])
def test_every_metric_meets_its_slo_at_the_returned_rate(metric, function, variant):
    alone = float(function(TRUE, rate=0.0, variant=variant, **POINT))
    slo = np.array([1.1, 2.0, 10.0]) * alone
    rate = rate_at_slo(TRUE, slo=slo, metric=metric, variant=variant, **POINT)
    assert np.all(rate > 0)
    np.testing.assert_allclose(function(TRUE, rate=rate, variant=variant, **POINT), slo,
                               rtol=1e-7)


def test_rate_gradient_by_implicit_differentiation_matches_finite_differences():
    def rate(c1v, slo):
        coef = TRUE._replace(c1v=c1v)
        return rate_at_slo(coef, slo=slo, metric="ttft", variant="stepped", **POINT)

    args = (0.014, 0.2)
    grads = jax.grad(rate, argnums=(0, 1))(*args)
    for i, grad in enumerate(grads):
        h = 1e-6 * args[i]
        up = list(args)
        down = list(args)
        up[i] += h
        down[i] -= h
        numeric = (rate(*up) - rate(*down)) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5)


def test_planned_rate_meets_the_slo_with_the_stated_confidence_over_the_draws():
    coef = draws()
    slo, confidence = 2.0, 0.95
    k = np.arange(1.0, 9.0)
    capacity = sb.max_rate(as_posterior(coef), slo=slo, confidence=confidence, k=k,
                           alpha=0.7, output_len=128)
    assert capacity.rate.shape == k.shape and np.all(capacity.feasible)
    for i, kk in enumerate(k):
        point = dict(k=kk, alpha=0.7, output_len=128.0)
        met = np.mean(np.asarray(sb.latency(coef, rate=capacity.rate[i], **point)) <= slo)
        assert met >= confidence
        # The highest such rate: a hair above it, too few draws meet the SLO.
        above = np.mean(np.asarray(sb.latency(coef, rate=capacity.rate[i] * (1 + 1e-9),
                                              **point)) <= slo)
        assert above < confidence


def test_replicas_carry_the_traffic_at_the_planned_rate():
    capacity = sb.max_rate(draws(), slo=2.0, **POINT)
    traffic = np.array([0.0, 1.0, 10 * float(capacity.rate), 100.0])
    replicas = capacity.replicas(traffic)
    assert replicas[0] == 0 and replicas[2] == 10
    assert np.all(traffic / np.maximum(replicas, 1) <= capacity.rate)
    fewer = replicas[1:] - 1  # one replica fewer would be overloaded
    assert np.all(traffic[1:] / np.maximum(fewer, 1e-9) > capacity.rate)


def test_an_slo_below_the_zero_load_latency_is_infeasible_at_any_rate():
    alone = float(sb.latency(TRUE, rate=0.0, **POINT))
    capacity = sb.max_rate(TRUE, slo=0.9 * alone, **POINT)
    assert capacity.rate == 0 and not capacity.feasible
    np.testing.assert_allclose(capacity.zero_load, alone)
    with pytest.raises(sb.InfeasibleSLO, match="infeasible at any rate"):
        capacity.replicas(10.0)


def test_a_posterior_takes_its_variant_as_a_record_or_a_name():
    """``variant=sb.Variant("paper")`` and ``"paper"`` are the same form; another is refused."""
    post = as_posterior(draws(50))
    assert isinstance(post.variant, sb.Variant) and post.variant == "paper"
    assert post.variant != "stepped" and post.variant != sb.Variant("paper", 8, 2)
    by_name = sb.max_rate(post, slo=2.0, variant="paper", **POINT).rate
    assert sb.max_rate(post, slo=2.0, variant=sb.Variant("paper"), **POINT).rate == by_name
    with pytest.raises(ValueError, match="fitted with variant paper, not stepped"):
        sb.max_rate(post, slo=2.0, variant="stepped", **POINT)


def test_planning_and_tuning_import_no_fitting_machinery():
    """They need something with draws (``planning.Fitted``), not the Posterior's module."""
    code = ("import sys, sdbayes.planning, sdbayes.tuning; "
            "loaded = [m for m in ('arviz', 'pandas', 'sdbayes.posterior') if m in sys.modules]; "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(slo=0.0), "slo must be > 0"),
    (dict(slo=1.0, confidence=1.0), "confidence must lie in"),
    (dict(slo=1.0, metric="p99"), "metric must be one of"),
    (dict(slo=1.0, alpha=1.5), "alpha must be finite and in"),
    (dict(slo=1.0, k=-1.0), "k must be finite and >= 0"),
    (dict(slo=1.0, output_len=0.0), "output_len must be finite and > 0"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sb.max_rate(TRUE, **{**POINT, **kwargs})


def test_break_even_acceptance_is_where_sd_stops_paying():
    k = np.array([1.0, 4.0, 8.0])
    rate = np.array([[0.0], [5.0], [10.0]])
    alpha = np.asarray(sb.planning.break_even_acceptance(TRUE, k=k, output_len=128.0,
                                                         rate=rate))
    assert np.all((alpha > 0) & (alpha < 1))
    np.testing.assert_allclose(sb.speedup(TRUE, k=k, alpha=alpha, output_len=128.0, rate=rate),
                               1.0, rtol=1e-6)
    assert np.all(sb.speedup(TRUE, k=k, alpha=alpha - 0.01, output_len=128.0, rate=rate) < 1)
    # Longer drafts need higher acceptance to pay, at any load.
    assert np.all(np.diff(alpha, axis=1) > 0)
    # A drafter as slow as the verifier never pays.
    slow = TRUE._replace(c1d=TRUE.c1v, c2d=TRUE.c2v)
    assert np.isinf(sb.planning.break_even_acceptance(slow, k=4.0, output_len=128.0, rate=0.0))


@pytest.mark.slow
def test_planned_rate_holds_in_the_simulator_for_a_known_truth():
    # The stepped variant tracks the simulator's mean latency within ~1.5% up to 70% of
    # saturation (bench/analytic_vs_simulated.py). Plan with the truth, then measure.
    slo = 1.6 * float(sb.latency(TRUE, rate=0.0, variant="stepped", **POINT))
    capacity = sb.max_rate(TRUE, slo=slo, variant="stepped", **POINT)
    trace = sb.simulate(TRUE, rate=float(capacity.rate), prompt_len=512, n_requests=20_000,
                        seed=3, k=4, alpha=0.7, output_len=128)
    measured = trace["e2e_s"].iloc[2000:].mean()
    # 18,000 requests: the mean's standard error is ~0.5% at this load.
    assert abs(measured / slo - 1) < 0.03, (measured, slo)


def test_a_plan_is_where_a_prediction_of_a_new_configuration_meets_the_slo():
    """From a posterior with discrepancies, the rate planned at 95% confidence is where the
    one-sided 95% bound of ``predict`` for that (unmeasured) configuration meets the SLO:
    the plan weighs what a prediction of the curve draws. Tolerance 2%: two sets of 1,000
    draws of a 95th percentile (seeds 0-2 gave 0.1-0.8%). Planning on the coefficients
    alone breaks the SLO there."""
    import pandas as pd

    from tests.test_cli import EXAMPLE_POSTERIOR

    post = sb.load_posterior(EXAMPLE_POSTERIOR)
    slo, k = 2.0, np.array([1.0, 3.0, 5.0])
    point = dict(k=k, alpha=0.73, output_len=150.0)
    planned = sb.max_rate(post, slo=slo, confidence=0.95, **point).rate
    coefficients_only = np.quantile(np.asarray(rate_at_slo(
        post.coefficients(), slo=slo, k=k[:, None], alpha=0.73, output_len=150.0,
        variant=post.variant)), 0.05, axis=-1)
    for rate, within in ((planned, True), (coefficients_only, False)):
        grid = pd.DataFrame(dict(k=k, acceptance=0.73, output_len=150.0, request_rate=rate))
        upper = post.predict(grid, ci=0.9, seed=1, percentiles=False)["e2e_upper_s"]
        assert np.all(abs(upper / slo - 1) < 0.02) == within, (rate, upper)
    assert np.all(coefficients_only > planned)
