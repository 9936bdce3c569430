"""Draft-length tuning: risk measures, gradient tuning against exhaustive search, baselines."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sdbayes as sb
from sdbayes.tuning import (
    batch_size_schedule,
    goodput_k,
    optimal_k,
    risk_measure,
    risk_objective,
    sensitivities,
    speculative_config,
)

from .test_planning import TRUE, as_posterior, draws

K_GRID = np.arange(17.0)


def exhaustive(coef, risk, level, variant="paper", **point):
    """Risk objective at every whole k = 0..16, shape [..., 17], and its argmin."""
    values = np.stack([np.asarray(risk_objective(coef, np.full(np.shape(point["rate"]), k),
                                                 risk=risk, level=level, variant=variant,
                                                 **point)) for k in K_GRID], axis=-1)
    return values, values.argmin(axis=-1)


@pytest.mark.parametrize("risk", ["mean", "quantile", "cvar"])
def test_risk_measures_match_numpy(risk):
    values = np.random.default_rng(1).lognormal(size=(5, 101))
    level = 0.9
    ordered = np.sort(values, axis=-1)
    expected = {"mean": values.mean(axis=-1),
                "quantile": ordered[:, int(np.ceil(level * 101)) - 1],  # 91st of 101
                "cvar": ordered[:, -int(np.ceil(0.1 * 101)):].mean(axis=-1)}[risk]
    np.testing.assert_allclose(risk_measure(jnp.asarray(values), risk, level), expected,
                               rtol=1e-12)
    # The derivative is that of the selected draws: scaling one draw's value by (1 + t)
    # moves the quantile only if that draw is the quantile.
    top = np.argmax(values, axis=-1)
    grad = jax.grad(lambda v: risk_measure(v, risk, level).sum())(jnp.asarray(values))
    expected_top = {"mean": 1 / 101, "quantile": 0.0, "cvar": 1 / 11}[risk]
    np.testing.assert_allclose(np.asarray(grad)[np.arange(5), top], expected_top)


@pytest.mark.parametrize("risk", ["mean", "quantile", "cvar"])
def test_gradient_tuned_k_equals_exhaustive_search(risk):
    # 15 rates x 14 acceptances = 210 points, from idle to past saturation of short drafts.
    rates, alphas = np.meshgrid(np.linspace(0.0, 14.0, 15), np.linspace(0.3, 0.98, 14))
    point = dict(rate=rates.ravel(), alpha=alphas.ravel(), output_len=128.0)
    coef = draws(n=300)
    choice = optimal_k(coef, risk=risk, level=0.9, **point)
    values, best = exhaustive(coef, risk, 0.9, **point)
    feasible = np.isfinite(values.min(axis=-1))
    assert 100 < feasible.sum() < len(feasible)  # the grid reaches saturation
    np.testing.assert_array_equal(np.asarray(choice.feasible), feasible)
    np.testing.assert_array_equal(np.asarray(choice.k)[feasible], best[feasible])
    np.testing.assert_allclose(np.asarray(choice.objective)[feasible],
                               values.min(axis=-1)[feasible], rtol=1e-12)


@pytest.mark.parametrize("metric", ["ttft", "tpot"])
def test_tuning_other_metrics_and_the_stepped_variant(metric):
    rates, alphas = np.meshgrid(np.linspace(0.0, 10.0, 6), np.linspace(0.4, 0.95, 6))
    point = dict(rate=rates.ravel(), alpha=alphas.ravel(), output_len=128.0, metric=metric)
    coef = draws(n=100)
    choice = optimal_k(coef, risk="mean", variant="stepped", **point)
    values, best = exhaustive(coef, "mean", 0.9, variant="stepped", **point)
    feasible = np.isfinite(values.min(axis=-1))
    np.testing.assert_array_equal(np.asarray(choice.k)[feasible], best[feasible])


def test_schedule_by_vmap_inside_user_code_equals_broadcasting():
    coef = draws(n=200)
    rates = jnp.linspace(0.5, 12.0, 24)

    @jax.jit
    def schedule(coef, rates):  # a researcher's own jitted code
        one = lambda r: optimal_k(coef, rate=r, alpha=0.8, output_len=128.0).k  # noqa: E731
        return jax.vmap(one)(rates)

    broadcast = optimal_k(coef, rate=rates, alpha=0.8, output_len=128.0).k
    np.testing.assert_array_equal(schedule(coef, rates), broadcast)
    # More load favours shorter drafts: each extra draft token costs every other request.
    assert np.all(np.diff(np.asarray(broadcast)) <= 0) and broadcast[0] > broadcast[-1]


def test_tune_k_takes_a_posterior_and_a_closed_loop():
    coef = draws(n=200)
    posterior = as_posterior(coef)
    choice = sb.tune_k(posterior, concurrency=np.array([1, 8, 64]), alpha=0.8, output_len=128,
                       risk="quantile", level=0.95)
    values = np.stack([np.quantile(np.asarray(sb.latency(
        coef, k=k, alpha=0.8, output_len=128.0, concurrency=np.array([1.0, 8.0, 64.0])[:, None])),
        0.95, axis=-1, method="inverted_cdf") for k in K_GRID], axis=-1)
    np.testing.assert_array_equal(choice.k, values.argmin(axis=-1))
    assert isinstance(choice.k, np.ndarray) and choice.feasible.all()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(rate=1.0, risk="max"), ValueError, "risk must be one of"),
    (dict(rate=1.0, risk="quantile", level=1.5), ValueError, "level must lie in"),
    (dict(rate=1.0, k_max=0), ValueError, "k_max must be"),
    (dict(), TypeError, "give exactly one of"),
    (dict(rate=-1.0), ValueError, "rate must be finite and >= 0"),
    (dict(concurrency=0), ValueError, "concurrency must be finite and >= 1"),
])
def test_bad_arguments_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        sb.tune_k(TRUE, alpha=0.7, output_len=128, **kwargs)


def test_goodput_rule_is_the_argmax_and_shortens_drafts_with_the_batch():
    alpha, batch = np.array([[0.6], [0.9]]), np.array([1.0, 16.0, 128.0])
    chosen = np.asarray(goodput_k(TRUE, alpha=alpha, batch_size=batch))
    table = np.stack([np.asarray(sb.goodput(TRUE, k=k, alpha=alpha, batch_size=batch))
                      for k in K_GRID], axis=-1)
    np.testing.assert_array_equal(chosen, table.argmax(axis=-1))
    assert np.all(np.diff(chosen, axis=1) <= 0) and np.all(chosen[1] >= chosen[0])


def test_sensitivities_match_finite_differences():
    point = dict(output_len=128.0, rate=np.array([0.0, 5.0, 10.0]))
    k, alpha = np.array([2.0, 4.0, 6.0]), np.array([0.6, 0.75, 0.9])
    s = sensitivities(TRUE, k=k, alpha=alpha, variant="stepped", **point)
    np.testing.assert_allclose(s.value, sb.latency(TRUE, k=k, alpha=alpha, variant="stepped",
                                                   **point))
    h = 1e-6
    for name, step in (("d_k", dict(k=h)), ("d_alpha", dict(alpha=h))):
        up = sb.latency(TRUE, k=k + step.get("k", 0), alpha=alpha + step.get("alpha", 0),
                        variant="stepped", **point)
        down = sb.latency(TRUE, k=k - step.get("k", 0), alpha=alpha - step.get("alpha", 0),
                          variant="stepped", **point)
        np.testing.assert_allclose(getattr(s, name), (up - down) / (2 * h), rtol=1e-6)
    assert np.all(s.d_alpha < 0)  # better acceptance, lower latency


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(1, 512), st.integers(0, 8), min_size=1, max_size=12))
def test_batch_size_schedule_covers_every_size_once(tuned):
    """vLLM's ranges: every batch size from 1 to the largest tuned one in exactly one range,
    each tuned size under its own k, neighbouring ranges of different k."""
    sizes = list(tuned)
    ranges = batch_size_schedule(sizes, [tuned[b] for b in sizes])
    assert ranges[0][0] == 1 and ranges[-1][1] == max(sizes)
    assert all(a[1] + 1 == b[0] and a[2] != b[2] for a, b in itertools.pairwise(ranges))
    k_of = {b: k for first, last, k in ranges for b in range(first, last + 1)}
    assert all(k_of[b] == k for b, k in tuned.items())


def test_speculative_config_is_vllms():
    ranges = batch_size_schedule([1, 16, 64], [4, 2, 0])
    assert ranges == [[1, 15, 4], [16, 63, 2], [64, 64, 0]]
    config = speculative_config(ranges, "eagle3", "org/drafter")
    assert config == {"method": "eagle3", "model": "org/drafter", "num_speculative_tokens": 4,
                      "num_speculative_tokens_per_batch_size": ranges}
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        batch_size_schedule([0, 4], [1, 1])
