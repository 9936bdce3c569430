"""The "filling" form: the marginal cost of a decode step rises as the batch fills the GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdbayes as sb
from sdbayes.model import batch_load

# Roughly what the source study's low-load points give (Qwen3-8B, EAGLE drafter).
COEF = sb.Coefficients(c1p=0.09, c1v=0.014, c1d=0.0013, c2p=0.025, c2v=0.00017,
                       c2d=0.000055, fill=0.6, fill_half=6.0)
POINT = dict(k=4, alpha=0.7, output_len=128)
FILLING = dict(variant="filling")


def saturation(coef=COEF, **point):
    return float(sb.saturation_rate(coef, **{**POINT, **point}, **FILLING))


def test_batch_load_rises_from_one_to_one_plus_fill_per_request():
    others = jnp.array([0.0, 1e-3, 6.0, 1e4])
    load = np.asarray(batch_load(others, 0.6, 6.0))
    slope = np.asarray(jax.vmap(jax.grad(lambda b: batch_load(b, 0.6, 6.0)))(others))
    assert load[0] == 0.0
    np.testing.assert_allclose(slope, [1.0, 1.0, 1.3, 1.6], rtol=1e-3)  # half-way at 6
    np.testing.assert_allclose(batch_load(others, 0.0, 6.0), others)  # fill 0: B itself


def test_without_fill_it_is_the_papers_form():
    flat = COEF._replace(fill=0.0)
    rate = jnp.linspace(0.0, 0.95, 5) * float(sb.saturation_rate(flat, **POINT))
    for fn in (sb.latency, sb.ttft, sb.tpot):
        np.testing.assert_allclose(fn(flat, rate=rate, **POINT, **FILLING),
                                   fn(flat, rate=rate, **POINT), rtol=1e-9)
        np.testing.assert_allclose(fn(flat, concurrency=jnp.array([1.0, 30.0]), **POINT,
                                      **FILLING),
                                   fn(flat, concurrency=jnp.array([1.0, 30.0]), **POINT),
                                   rtol=1e-12)


def test_the_latency_solves_its_equation_and_saturates_at_the_full_batch():
    d = sb.demands(COEF, **POINT)
    c1, c2p = float(d.independent.total), float(d.dependent.prefill)
    d2 = float(d.dependent.drafting + d.dependent.verification)
    assert saturation() == pytest.approx(1.0 / (c2p + 1.6 * d2), rel=1e-12)
    rate = np.array([0.0, 0.05, 0.3, 0.7, 0.95, 0.999]) * saturation()
    latency = np.asarray(sb.latency(COEF, rate=rate, **POINT, **FILLING))
    others = rate * latency
    residual = latency - c1 - others * c2p - np.asarray(batch_load(others, 0.6, 6.0)) * d2
    np.testing.assert_allclose(residual, 0.0, atol=1e-9 * latency.max())
    assert np.all(np.diff(latency) > 0)
    assert np.isinf(sb.latency(COEF, rate=1.001 * saturation(), **POINT, **FILLING))
    # A filling GPU makes the load dearer than the paper's form with the same coefficients.
    assert np.all(latency[1:] > np.asarray(sb.latency(COEF, rate=rate[1:], **POINT)))
    closed = sb.latency(COEF, concurrency=31.0, **POINT, **FILLING)
    assert float(closed) == pytest.approx(c1 + 30 * c2p + float(batch_load(30.0, 0.6, 6.0)) * d2)


@pytest.mark.parametrize("name", ["c1v", "c2p", "c2v", "fill", "fill_half"])
def test_gradients_match_central_differences(name):
    for load in (0.05, 0.5, 0.95):
        rate = load * saturation()

        def f(value, rate=rate):
            return sb.latency(COEF._replace(**{name: value}), rate=rate, **POINT, **FILLING)

        x = getattr(COEF, name)
        h = 1e-6 * x
        np.testing.assert_allclose(jax.grad(f)(x), (f(x + h) - f(x - h)) / (2 * h), rtol=1e-4)
    half = 0.5 * saturation()

    def at_k(k):
        return sb.latency(COEF, rate=half, k=k, alpha=0.7, output_len=128, **FILLING)

    fd = (at_k(4.0 + 1e-6) - at_k(4.0 - 1e-6)) / 2e-6
    assert float(jax.grad(at_k)(4.0)) == pytest.approx(float(fd), rel=1e-4)


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("load", [0.3, 0.6])
def test_simulator_agrees_with_the_filling_form(k, load):
    """The simulator charges a step with n decoding ``G(n - 1)`` others. The filling form
    is within 6% of it up to 60% of saturation (measured: 1-4%), where the paper's form
    with the same coefficients is 5-20% low."""
    point = dict(POINT, k=k)
    rate = load * saturation(k=k)
    trace = sb.simulate(COEF, rate=rate, n_requests=4000, seed=3, prompt_len=512, **point,
                        **FILLING)
    simulated = trace["e2e_s"].iloc[400:].mean()
    assert float(sb.latency(COEF, rate=rate, **point, **FILLING)) == pytest.approx(
        simulated, rel=0.06)
    assert float(sb.latency(COEF, rate=rate, **point)) < 0.96 * simulated


def test_planning_inverts_the_filling_latency():
    slo = 2.0 * float(sb.latency(COEF, rate=0.0, **POINT))
    cap = sb.max_rate(COEF, slo=slo, variant="filling", **POINT)
    assert float(sb.latency(COEF, rate=float(cap.rate), **POINT, **FILLING)) == pytest.approx(
        slo, rel=1e-6)
    assert float(cap.rate) < float(sb.max_rate(COEF, slo=slo, **POINT).rate)


def test_the_filling_form_takes_no_moe_verifier():
    with pytest.raises(ValueError, match="filling"):
        sb.latency(COEF, rate=1.0, **POINT, variant="filling", experts=128, top_m=8)


def test_the_prior_is_extended_with_the_fill_terms():
    prior = sb.likelihood.Prior(np.log(np.full(6, 0.01)), np.ones(6)).for_variant("filling")
    median = prior.median("filling")
    assert median.fill == pytest.approx(0.5) and median.fill_half == pytest.approx(8.0)
    assert sb.likelihood.coefficient_names("filling")[-2:] == ("fill", "fill_half")


def test_simulator_and_goodput_take_the_form_not_the_coefficients_alone():
    """The filling form is asked for by name: fill > 0 under another form is refused, and
    goodput charges the filling batch load where the form says so."""
    point = dict(POINT, k=4)
    with pytest.raises(ValueError, match="belongs to the filling form"):
        sb.simulate(COEF, concurrency=4, n_requests=10, prompt_len=512, **point)
    batch = 16.0
    dense = float(sb.goodput(COEF, k=4, alpha=0.7, batch_size=batch))
    filling = float(sb.goodput(COEF, k=4, alpha=0.7, batch_size=batch, **FILLING))
    others = float(batch_load(batch - 1.0, COEF.fill, COEF.fill_half))
    c = COEF
    cycle = (c.c1v + 4 * c.c1d) + others * (c.c2v + 4 * c.c2d)
    assert filling == pytest.approx(batch * float(sb.tokens_per_step(4, 0.7)) / cycle, rel=1e-9)
    assert filling < dense
