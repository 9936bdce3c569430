"""The MoE verifier: expert coverage, the fixed-point latency, and its uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdbayes as sb
from sdbayes.model import expert_coverage

MOE = dict(experts=128, top_m=8)  # Qwen3-30B-A3B / Qwen3-235B-A22B routing
COEF = sb.Coefficients(c1p=0.05, c1v=0.006, c1d=0.001, c2p=0.02, c2v=0.0003, c2d=0.0001,
                       c1e=0.012, c2e=0.0002)
POINT = dict(k=4, alpha=0.7, output_len=128)
LOADS = np.array([0.0, 0.05, 0.3, 0.7, 0.95])  # of the saturation rate 1 / C2(full coverage)


def rates(coef=COEF, **point):
    point = {**POINT, **point}
    return LOADS * float(sb.saturation_rate(coef, **point, **MOE))


def test_expert_coverage_counts_the_experts_a_pass_loads():
    tokens = jnp.array([0.0, 1.0, 5.0, 50.0, 1000.0])
    phi = np.asarray(expert_coverage(tokens, 128, 8))
    np.testing.assert_allclose(phi[:3], [0.0, 8 / 128, 1 - (120 / 128) ** 5], rtol=1e-12)
    assert np.all(np.diff(phi) > 0) and phi[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.all(np.asarray(expert_coverage(tokens[1:], 8, 8)) == 1.0)  # every expert


@pytest.mark.parametrize("variant", ["paper", "stepped"])  # "filling" takes no MoE
def test_without_expert_terms_the_fixed_point_is_the_closed_form(variant):
    dense = COEF._replace(c1e=0.0, c2e=0.0)
    for fn in (sb.latency, sb.ttft, sb.tpot):
        solved = fn(dense, rate=rates(dense), variant=variant, **POINT, **MOE)
        closed = fn(dense, rate=rates(dense), variant=variant, **POINT)
        np.testing.assert_allclose(solved, closed, rtol=1e-6)
        np.testing.assert_allclose(fn(dense, concurrency=jnp.array([1.0, 8.0]), **POINT, **MOE),
                                   fn(dense, concurrency=jnp.array([1.0, 8.0]), **POINT),
                                   rtol=1e-6)


def test_the_latency_solves_its_fixed_point():
    lam = rates()
    latency = np.asarray(sb.latency(COEF, rate=lam, **POINT, **MOE))
    phi = expert_coverage((POINT["k"] + 1) * (1 + lam * latency), **MOE)
    d = sb.demands(COEF, coverage=phi, **POINT)
    np.testing.assert_allclose(
        latency, d.independent.total / (1 - lam * d.dependent.total), rtol=1e-10)
    # Expert loading grows with load: more than at zero load, less than at full coverage.
    full = np.asarray(sb.latency(COEF, rate=lam, **POINT))
    assert np.all(latency <= full * (1 + 1e-12)) and latency[0] < 0.8 * full[0]
    # A closed loop of N requests puts (k + 1) * N tokens in a pass: no fixed point needed.
    n = jnp.array([1.0, 16.0])
    d = sb.demands(COEF, coverage=expert_coverage((POINT["k"] + 1) * n, **MOE), **POINT)
    np.testing.assert_allclose(sb.latency(COEF, concurrency=n, **POINT, **MOE),
                               d.independent.total + (n - 1) * d.dependent.total, rtol=1e-12)


def test_demands_of_an_moe_verifier_are_at_the_loads_coverage():
    lam = rates()[1:4]
    latency = sb.latency(COEF, rate=lam, **POINT, **MOE)
    phi = expert_coverage((POINT["k"] + 1) * (1 + lam * latency), **MOE)
    at_load = sb.demands(COEF, rate=lam, **POINT, **MOE)
    np.testing.assert_allclose(at_load.dependent.total,
                               sb.demands(COEF, coverage=phi, **POINT).dependent.total,
                               rtol=1e-10)
    alone = sb.demands(COEF, **POINT, **MOE)  # no load: k + 1 tokens a pass
    np.testing.assert_allclose(alone.independent.total,
                               sb.latency(COEF, rate=0.0, **POINT, **MOE), rtol=1e-12)
    full = sb.demands(COEF, **POINT)  # dense call: expert terms at full coverage
    assert float(full.independent.total) > float(alone.independent.total)


@pytest.mark.parametrize("load", [0.05, 0.3, 0.95])
def test_gradients_match_central_differences(load):
    """Implicit-function gradients of the fixed point, float64, relative error < 1e-4."""
    rate = load * float(sb.saturation_rate(COEF, **POINT, **MOE))
    args = dict(coef=COEF, rate=rate, k=4.0, alpha=0.7)

    def f(a):
        return sb.latency(a["coef"], rate=a["rate"], k=a["k"], alpha=a["alpha"],
                          output_len=128, **MOE)

    grads = jax.grad(f)(args)
    flat, _ = jax.tree.flatten(grads)
    leaves, tree = jax.tree.flatten(args)
    for i, (x, g) in enumerate(zip(leaves, flat, strict=True)):
        h = 1e-6 * (abs(x) or 1.0)  # fill = 0: an unused field
        up, down = list(leaves), list(leaves)
        up[i], down[i] = x + h, x - h
        fd = (f(jax.tree.unflatten(tree, up)) - f(jax.tree.unflatten(tree, down))) / (2 * h)
        assert float(g) == pytest.approx(float(fd), rel=1e-4), (i, float(g), float(fd))


def test_past_saturation_is_inf_with_zero_gradient():
    past = 1.01 * float(sb.saturation_rate(COEF, **POINT, **MOE))
    assert sb.latency(COEF, rate=past, **POINT, **MOE) == np.inf
    grad = jax.grad(lambda c: sb.latency(c, rate=past, **POINT, **MOE))(COEF)
    assert all(float(g) == 0.0 for g in grad)


def test_speedup_against_load_moe_versus_dense():
    """Property: SD's k + 1 tokens per pass load more experts than one token, so at zero load
    an MoE verifier gains less from SD than a dense verifier, whether the dense one has the
    same c1v, c2v (no expert terms) or carries the expert terms at full coverage; at high
    load the batch loads every expert with or without SD, so the MoE speedup meets that of
    the dense verifier at full coverage."""
    same_costs = COEF._replace(c1e=0.0, c2e=0.0)
    full = COEF._replace(c1v=COEF.c1v + COEF.c1e, c2v=COEF.c2v + COEF.c2e, c1e=0.0, c2e=0.0)
    zero = dict(rate=0.0, **POINT)
    moe = float(sb.speedup(COEF, **zero, **MOE))
    assert moe < float(sb.speedup(same_costs, **zero))
    assert moe < 0.9 * float(sb.speedup(full, **zero))
    # High load: 90% of the no-SD saturation, where SD is still stable.
    busy = 0.9 * float(sb.saturation_rate(COEF, k=0, alpha=0.0, output_len=128, **MOE))
    high = dict(rate=busy, **POINT)
    assert float(sb.speedup(COEF, **high, **MOE)) == pytest.approx(
        float(sb.speedup(full, **high)), rel=1e-3)


@pytest.mark.parametrize("k, load", [(0, 0.05), (4, 0.05), (4, 0.3)])
def test_simulator_agrees_with_the_fixed_point(k, load):
    """The simulator charges each step the coverage of its own tokens; at low and moderate
    load the mean-value fixed point is within 3% of it (measured: 0.1-1.2%). At low load the
    expert terms at full coverage are off by far more; by 30% of saturation the batch
    already loads nearly every expert."""
    point = dict(k=k, alpha=0.7, output_len=128)
    rate = load * float(sb.saturation_rate(COEF, **point, **MOE))
    trace = sb.simulate(COEF, rate=rate, n_requests=4000, seed=3, prompt_len=512, **point,
                        **MOE)
    simulated = trace["e2e_s"].iloc[400:].mean()
    assert float(sb.latency(COEF, rate=rate, **point, **MOE)) == pytest.approx(simulated,
                                                                               rel=0.03)
    if load < 0.1:
        assert float(sb.latency(COEF, rate=rate, **point)) > 1.2 * simulated


def test_planning_and_tuning_take_the_moe_variant_as_it_is():
    variant = sb.Variant("paper", **MOE)
    slo = 1.5 * float(sb.latency(COEF, rate=0.0, **POINT, **MOE))
    cap = sb.max_rate(COEF, slo=slo, variant=variant, **POINT)
    assert float(sb.latency(COEF, rate=float(cap.rate), **POINT, **MOE)) == pytest.approx(
        slo, rel=1e-6)
    choice = sb.tune_k(COEF, rate=rates()[1:3], alpha=0.7, output_len=128, variant=variant)
    ks = np.arange(0, 17)
    for rate, k in zip(rates()[1:3], choice.k, strict=True):
        exhaustive = sb.latency(COEF, rate=rate, k=ks, alpha=0.7, output_len=128, **MOE)
        assert k == ks[int(np.argmin(exhaustive))]


@pytest.mark.parametrize("settings, message", [
    (dict(experts=8), "give both experts="),
    (dict(experts=8, top_m=9), "1 <= top_m <= experts"),
    (dict(experts=8.0, top_m=2), "whole numbers"),
])
def test_bad_moe_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        sb.latency(COEF, rate=1.0, **POINT, **settings)


def test_report_plot_of_moe_against_dense(tmp_path):
    from sdbayes.report import plot_moe_vs_dense

    path = tmp_path / "moe_vs_dense.png"
    plot_moe_vs_dense(COEF, sb.Variant("stepped", **MOE), 0.8, 128.0, path)
    assert path.stat().st_size > 10_000
