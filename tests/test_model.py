"""The latency model's laws, checked against a plain NumPy reference and finite differences."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdbayes as sb

COEF = sb.Coefficients(c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)
POINT = dict(k=4.0, alpha=0.7, output_len=128.0)


def reference_latency(coef, k, alpha, g, rate):
    """DESIGN.md section 1 written out in NumPy, for integer k: the test oracle."""
    e = sum(alpha**j for j in range(int(k) + 1))
    n = g / e
    c1 = coef.c1p + n * (coef.c1v + k * coef.c1d)
    c2 = coef.c2p + n * (coef.c2v + k * coef.c2d)
    return c1 / (1 - rate * c2) if rate * c2 < 1 else np.inf


def central_difference(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


class TestTokensPerStep:
    def test_one_token_without_drafts(self):
        alpha = jnp.linspace(0.0, 1.0, 11)
        np.testing.assert_array_equal(sb.tokens_per_step(0.0, alpha), np.ones(11))

    def test_k_plus_one_at_full_acceptance(self):
        k = jnp.array([0.0, 0.5, 1.0, 3.7, 10.0, 16.0])
        np.testing.assert_allclose(sb.tokens_per_step(k, 1.0), k + 1, rtol=1e-14)

    @pytest.mark.parametrize("k", [1.0, 2.5, 7.0, 16.0])
    def test_closed_form_everywhere_including_near_one(self, k):
        # Points on both sides of the series/closed-form switch at |log alpha| = 1e-3.
        alpha = np.array([0.0, 1e-6, 0.3, 0.5, 0.9, 0.998, 0.9989, 0.9991, 0.99999])
        expected = np.where(alpha == 0, 1.0, (1 - alpha ** (k + 1)) / (1 - alpha))
        np.testing.assert_allclose(sb.tokens_per_step(k, alpha), expected, rtol=1e-9)

    @pytest.mark.parametrize("k", [1, 3, 8])
    def test_sum_of_powers_for_whole_k(self, k):
        alpha = np.linspace(0, 1, 21)
        expected = sum(alpha**j for j in range(k + 1))
        np.testing.assert_allclose(sb.tokens_per_step(float(k), alpha), expected, rtol=1e-12)

    @pytest.mark.parametrize("k", [1.0, 4.0, 6.3])
    def test_smooth_at_full_acceptance(self, k):
        # dE/dalpha at 1 is sum_j j = k(k+1)/2 (the series' linear term), and the gradient
        # agrees with a central difference that straddles alpha = 1.
        grad = jax.grad(sb.tokens_per_step, argnums=1)(k, 1.0)
        np.testing.assert_allclose(grad, k * (k + 1) / 2, rtol=1e-12)
        fd = central_difference(lambda a: sb.tokens_per_step(k, a), 1.0, 1e-5)
        np.testing.assert_allclose(grad, fd, rtol=1e-6)

    def test_gradients_finite_at_the_edges(self):
        for k, alpha in itertools.product([0.0, 0.5, 3.0], [0.0, 1e-300, 0.5, 1.0]):
            dk, da = jax.grad(sb.tokens_per_step, argnums=(0, 1))(k, alpha)
            assert np.isfinite(dk) and np.isfinite(da), (k, alpha)
        # At alpha = 0: E = 1 for every k, with slope 1 in alpha once there are drafts.
        assert jax.grad(sb.tokens_per_step, argnums=1)(3.0, 0.0) == 1.0
        assert jax.grad(sb.tokens_per_step, argnums=1)(0.0, 0.0) == 0.0

    def test_per_position_rates(self):
        rates = np.array([0.9, 0.8, 0.6, 0.5])
        expected = 1 + np.cumsum(np.cumprod(rates))
        for k in range(1, 5):
            got = sb.tokens_per_step(float(k), sb.PositionRates(rates))
            np.testing.assert_allclose(got, expected[k - 1], rtol=1e-14)
        # Between whole k it interpolates; beyond K it stays at K's value.
        half = sb.tokens_per_step(1.5, sb.PositionRates(rates))
        np.testing.assert_allclose(half, (expected[0] + expected[1]) / 2, rtol=1e-14)
        np.testing.assert_allclose(sb.tokens_per_step(9.0, sb.PositionRates(rates)), expected[-1])

    def test_equal_position_rates_match_scalar_alpha(self):
        alpha = np.array([0.3, 0.75, 1.0])
        rates = sb.PositionRates(np.repeat(alpha[:, None], 6, axis=1))
        np.testing.assert_allclose(
            sb.tokens_per_step(np.full(3, 6.0), rates), sb.tokens_per_step(6.0, alpha), rtol=1e-12
        )


class TestLatency:
    def test_matches_reference(self):
        for k, alpha, rate in itertools.product([0, 1, 4, 10], [0.5, 0.8, 1.0], [0.0, 2.0, 9.0]):
            got = sb.latency(COEF, k=float(k), alpha=alpha, output_len=128.0, rate=rate)
            want = reference_latency(COEF, k, alpha, 128.0, rate)
            np.testing.assert_allclose(got, want, rtol=1e-12)

    def test_vectorised_equals_scalar_loop(self):
        k = np.array([0.0, 1.0, 2.0, 4.0, 8.0])[:, None]
        rate = np.linspace(0.0, 16.0, 9)[None, :]
        grid = sb.latency(COEF, k=k, alpha=0.8, output_len=128.0, rate=rate)
        assert grid.shape == (5, 9)
        for i, j in itertools.product(range(5), range(9)):
            one = sb.latency(COEF, k=k[i, 0], alpha=0.8, output_len=128.0, rate=rate[0, j])
            np.testing.assert_array_equal(grid[i, j], one)

    def test_coefficients_broadcast_over_posterior_draws(self):
        draws = sb.Coefficients(*(np.full(7, c) * np.linspace(0.9, 1.1, 7) for c in COEF[:6]))
        got = sb.latency(draws, rate=3.0, **POINT)
        assert got.shape == (7,)
        for i in range(7):
            one = sb.Coefficients(*(c[i] for c in draws[:6]))
            np.testing.assert_allclose(got[i], sb.latency(one, rate=3.0, **POINT), rtol=1e-14)

    def test_mixed_ranks_broadcast_explicitly(self):
        # conftest makes implicit rank promotion raise; the model must broadcast itself.
        draws = sb.Coefficients(*(c * np.linspace(0.9, 1.1, 4)[:, None] for c in COEF))
        rates = np.linspace(0.0, 5.0, 3)
        for f in (sb.latency, sb.ttft, sb.tpot, sb.speedup):
            assert f(draws, rate=rates, **POINT).shape == (4, 3), f.__name__
        assert sb.goodput(draws, k=rates, alpha=0.7, batch_size=8).shape == (4, 3)

    def test_increasing_in_rate_below_saturation(self):
        saturation = float(sb.saturation_rate(COEF, **POINT))
        rates = np.linspace(0.0, 0.999 * saturation, 500)
        lat = np.asarray(sb.latency(COEF, rate=rates, **POINT))
        assert np.all(np.diff(lat) > 0)
        slope = jax.vmap(jax.grad(lambda r: sb.latency(COEF, rate=r, **POINT)))(rates)
        assert np.all(slope > 0)

    def test_saturation_at_one_over_g(self):
        d = sb.demands(COEF, **POINT)
        saturation = sb.saturation_rate(COEF, **POINT)
        np.testing.assert_allclose(saturation, 1 / d.dependent.total, rtol=1e-14)
        just_below = sb.latency(COEF, rate=saturation * (1 - 1e-9), **POINT)
        assert np.isfinite(just_below) and just_below > 1e6 * d.independent.total
        for factor in (1.0, 1.0 + 1e-9, 2.0, 1e6):
            past = sb.latency(COEF, rate=saturation * factor, **POINT)
            assert past == np.inf, factor

    def test_past_saturation_is_inf_with_zero_gradient(self):
        rates = np.array([20.0, 100.0, np.inf])
        for f in (sb.latency, sb.ttft, sb.tpot):
            values = f(COEF, rate=rates, **POINT)
            assert np.all(values == np.inf), f.__name__
        grads = jax.grad(lambda c, r: sb.latency(c, rate=r, **POINT), argnums=(0, 1))(COEF, 50.0)
        assert all(g == 0 for g in jax.tree_util.tree_leaves(grads))

    def test_zero_load_is_the_synchronous_latency(self):
        d = sb.demands(COEF, **POINT)
        np.testing.assert_allclose(sb.latency(COEF, rate=0.0, **POINT), d.independent.total)
        np.testing.assert_allclose(sb.latency(COEF, concurrency=1, **POINT), d.independent.total)

    def test_closed_loop(self):
        d = sb.demands(COEF, **POINT)
        n = np.array([1, 8, 128])
        np.testing.assert_allclose(
            sb.latency(COEF, concurrency=n, **POINT),
            d.independent.total + (n - 1) * d.dependent.total,
            rtol=1e-14,
        )

    def test_load_argument_is_required_and_exclusive(self):
        with pytest.raises(TypeError, match="exactly one"):
            sb.latency(COEF, **POINT)
        with pytest.raises(TypeError, match="exactly one"):
            sb.latency(COEF, rate=1.0, concurrency=4, **POINT)

    def test_demand_decomposition(self):
        d = sb.demands(COEF, k=4.0, alpha=0.7, output_len=128.0)
        n = 128.0 / sb.tokens_per_step(4.0, 0.7)
        np.testing.assert_allclose(d.independent.prefill, COEF.c1p)
        np.testing.assert_allclose(d.independent.drafting, n * 4 * COEF.c1d, rtol=1e-14)
        np.testing.assert_allclose(d.independent.verification, n * COEF.c1v, rtol=1e-14)
        np.testing.assert_allclose(d.dependent.prefill, COEF.c2p)
        np.testing.assert_allclose(d.dependent.drafting, n * 4 * COEF.c2d, rtol=1e-14)
        np.testing.assert_allclose(d.dependent.verification, n * COEF.c2v, rtol=1e-14)
        no_sd = sb.demands(COEF, k=0.0, alpha=0.7, output_len=128.0)
        assert no_sd.independent.drafting == 0 and no_sd.dependent.drafting == 0

    def test_ttft_and_tpot_add_up_to_latency(self):
        rates = np.array([0.0, 3.0, 9.0])
        g = 128.0
        total = sb.latency(COEF, rate=rates, **POINT)
        first = sb.ttft(COEF, rate=rates, **POINT)
        per_token = sb.tpot(COEF, rate=rates, **POINT)
        np.testing.assert_allclose(first + (g - 1) * per_token, total, rtol=1e-12)
        np.testing.assert_allclose(first[0], COEF.c1p)
        assert sb.tpot(COEF, rate=1.0, k=4.0, alpha=0.7, output_len=1.0) == 0.0

    def test_float32_by_default(self):
        with jax.enable_x64(False):
            args = dict(k=jnp.float32(4.0), alpha=jnp.float32(1.0), output_len=128)
            coef = sb.Coefficients(*(jnp.float32(c) for c in COEF[:6]))
            lat = sb.latency(coef, rate=jnp.float32(3.0), **args)
            assert lat.dtype == jnp.float32 and np.isfinite(lat)
            grad = jax.grad(lambda a: sb.latency(coef, rate=3.0, k=4.0, alpha=a, output_len=128))
            assert np.isfinite(grad(jnp.float32(1.0)))


@pytest.mark.parametrize("variant", ["paper", "stepped"])
def test_mixed_loads_in_one_solve_match_the_public_functions(variant):
    closed = np.array([True, False, False, True])
    rate = np.array([0.0, 3.0, 50.0, 0.0])  # the third is past saturation
    concurrency = np.array([1.0, 1.0, 1.0, 32.0])
    point = dict(k=np.array([4.0, 2.0, 4.0, 8.0]), alpha=np.array([0.7, 0.9, 0.7, 0.8]),
                 output_len=128.0, variant=variant)
    got = sb.model.metrics(COEF, rate=rate, concurrency=concurrency, closed=closed, **point)
    for name, f in (("latency", sb.latency), ("ttft", sb.ttft), ("tpot", sb.tpot)):
        by_rate = f(COEF, rate=rate, **point)
        by_concurrency = f(COEF, concurrency=concurrency, **point)
        np.testing.assert_allclose(getattr(got, name), np.where(closed, by_concurrency, by_rate),
                                   rtol=1e-12)
    np.testing.assert_allclose(got.alone, sb.demands(COEF, **point).independent.total)


class TestSteppedVariant:
    @pytest.mark.parametrize("k, alpha", [(0, 0.3), (1, 0.5), (4, 0.7), (8, 0.95), (3, 1.0)])
    def test_wasted_cycles_are_the_renewal_correction(self, k, alpha):
        # X = tokens per cycle: P(X > j) = alpha**j, j = 0..k. Mean cycles to emit g tokens
        # exceed g / E by (E[X^2] - E) / (2 E^2).
        survival = alpha ** np.arange(k + 1)
        e, second = survival.sum(), ((2 * np.arange(k + 1) + 1) * survival).sum()
        extra = (second - e) / (2 * e**2)
        g = 128.0
        paper = sb.demands(COEF, k=float(k), alpha=alpha, output_len=g)
        stepped = sb.demands(COEF, k=float(k), alpha=alpha, output_len=g, variant="stepped")
        per_cycle = COEF.c1v + k * COEF.c1d
        np.testing.assert_allclose(
            stepped.independent.total - paper.independent.total, extra * per_cycle, rtol=1e-10
        )

    def test_position_rates_match_scalar_alpha(self):
        rates = sb.PositionRates(np.full(5, 0.7))
        a = sb.demands(COEF, k=5.0, alpha=rates, output_len=128.0, variant="stepped")
        b = sb.demands(COEF, k=5.0, alpha=0.7, output_len=128.0, variant="stepped")
        np.testing.assert_allclose(a.independent.total, b.independent.total, rtol=1e-12)

    def test_two_boundary_waits(self):
        rates = np.array([0.0, 2.0, 6.0, 9.0])
        stepped = sb.latency(COEF, rate=rates, variant="stepped", **POINT)
        cycles_only = sb.demands(COEF, variant="stepped", **POINT)
        c1, c2 = cycles_only.independent.total, cycles_only.dependent.total
        wait = sb.ttft(COEF, rate=rates, variant="stepped", **POINT) - COEF.c1p
        np.testing.assert_allclose(stepped, c1 / (1 - rates * c2) + 2 * wait, rtol=1e-12)
        assert wait[0] == 0 and np.all(np.diff(wait) > 0)

    def test_same_saturation_as_its_cycles(self):
        saturation = sb.saturation_rate(COEF, variant="stepped", **POINT)
        assert np.isfinite(sb.latency(COEF, rate=0.999 * saturation, variant="stepped", **POINT))
        assert sb.latency(COEF, rate=saturation, variant="stepped", **POINT) == np.inf

    def test_unknown_variant(self):
        with pytest.raises(ValueError, match="variant must be one of"):
            sb.latency(COEF, rate=1.0, variant="fancy", **POINT)


class TestSpeedup:
    def test_zero_load_speedup_is_ratio_of_load_independent_demands(self):
        for k, alpha in itertools.product([1.0, 4.0, 10.0], [0.5, 0.9]):
            sd = sb.demands(COEF, k=k, alpha=alpha, output_len=128.0).independent.total
            base = sb.demands(COEF, k=0.0, alpha=alpha, output_len=128.0).independent.total
            for tiny in (0.0, 1e-9):
                got = sb.speedup(COEF, k=k, alpha=alpha, output_len=128.0, rate=tiny)
                np.testing.assert_allclose(got, base / sd, rtol=1e-7)

    def test_matches_design_formula(self):
        # speedup = (1/C1R) * (1 + (1 - C2R) * r / (1 - r)), r = rate * C2 without SD.
        sd = sb.demands(COEF, **POINT)
        base = sb.demands(COEF, k=0.0, alpha=0.7, output_len=128.0)
        c1r = sd.independent.total / base.independent.total
        c2r = sd.dependent.total / base.dependent.total
        rates = np.linspace(0, 0.95 / base.dependent.total, 7)
        r = rates * base.dependent.total
        want = (1 / c1r) * (1 + (1 - c2r) * r / (1 - r))
        np.testing.assert_allclose(sb.speedup(COEF, rate=rates, **POINT), want, rtol=1e-10)

    def test_saturated_sides(self):
        sat_sd = float(sb.saturation_rate(COEF, **POINT))
        sat_base = float(sb.saturation_rate(COEF, k=0.0, alpha=0.7, output_len=128.0))
        lo, hi = sorted([sat_sd, sat_base])
        between = sb.speedup(COEF, rate=(lo + hi) / 2, **POINT)
        assert between == (np.inf if sat_sd > sat_base else 0.0)
        assert np.isnan(sb.speedup(COEF, rate=2 * hi, **POINT))


class TestGradients:
    """Gradients of the latency equal central finite differences, relative error < 1e-4."""

    POINTS = [
        dict(k=4.0, alpha=0.7, output_len=128.0, rate=3.0),
        dict(k=2.5, alpha=0.95, output_len=256.0, rate=6.0),
        dict(k=7.0, alpha=1.0, output_len=64.0, rate=1.0),
        dict(k=1.0, alpha=0.5, output_len=128.0, rate=0.0),
    ]

    @staticmethod
    def near_saturation(point, fraction=0.95):
        load = {name: point[name] for name in ("k", "alpha", "output_len")}
        return dict(point, rate=fraction * float(sb.saturation_rate(COEF, **load)))

    @pytest.mark.parametrize("variant", sb.model.VARIANTS)
    @pytest.mark.parametrize("metric", [sb.latency, sb.ttft, sb.tpot])
    @pytest.mark.parametrize("name", ["k", "alpha", "rate", "output_len"])
    def test_operating_point(self, name, metric, variant):
        for point in self.POINTS + [self.near_saturation(p) for p in self.POINTS]:
            def f(x, point=point):
                return metric(COEF, variant=variant, **dict(point, **{name: x}))

            x = point[name]
            h = 1e-6 * max(abs(x), 1.0)
            np.testing.assert_allclose(jax.grad(f)(x), central_difference(f, x, h), rtol=1e-4)

    @pytest.mark.parametrize("field", sb.Coefficients._fields[:6])
    def test_coefficients(self, field):
        for point in self.POINTS + [self.near_saturation(p) for p in self.POINTS]:
            def f(value, point=point):
                return sb.latency(COEF._replace(**{field: value}), **point)

            x = getattr(COEF, field)
            np.testing.assert_allclose(
                jax.grad(f)(x), central_difference(f, x, 1e-6 * x), rtol=1e-4
            )

    def test_gradient_at_full_acceptance(self):
        point = dict(k=3.0, output_len=128.0, rate=2.0)
        grad = jax.grad(lambda a: sb.latency(COEF, alpha=a, **point))(1.0)
        fd = central_difference(lambda a: sb.latency(COEF, alpha=a, **point), 1.0, 1e-6)
        np.testing.assert_allclose(grad, fd, rtol=1e-4)
        assert grad < 0  # more acceptance, fewer cycles, less latency

    def test_vmap_of_grad_over_posterior_draws(self):
        draws = sb.Coefficients(*(c * np.linspace(0.8, 1.2, 5) for c in COEF))
        dk = jax.vmap(jax.grad(lambda c, k: sb.latency(c, k=k, alpha=0.8, output_len=128.0,
                                                       rate=2.0), argnums=1),
                      in_axes=(0, None))(draws, 3.0)
        assert dk.shape == (5,) and np.all(np.isfinite(dk))


class TestGoodput:
    def test_matches_smartspec_formula(self):
        batch = np.array([1.0, 8.0, 64.0])
        for k in (0.0, 2.0, 5.0):
            e = sb.tokens_per_step(k, 0.8)
            cycle = (COEF.c1v + k * COEF.c1d) + (batch - 1) * (COEF.c2v + k * COEF.c2d)
            np.testing.assert_allclose(
                sb.goodput(COEF, k=k, alpha=0.8, batch_size=batch), batch * e / cycle, rtol=1e-12
            )


@pytest.mark.parametrize("function", [sb.demands, sb.latency, sb.ttft, sb.tpot, sb.speedup,
                                      sb.saturation_rate, sb.tails.percentile])
def test_a_whole_operating_point_passes_as_keywords_and_its_prompt_length_changes_nothing(
        function):
    # docs/architecture.md: every function takes the point as keywords, prompt_len included,
    # so one ``**point`` serves them all; the coefficients belong to one prompt length.
    point = dict(sb.examples.EXAMPLE_POINT)
    load = {} if function is sb.saturation_rate else dict(rate=2.0)
    extra = dict(q=0.99) if function is sb.tails.percentile else {}
    short = function(COEF, **point, **load, **extra)
    long = function(COEF, **{**point, "prompt_len": 4 * point["prompt_len"]}, **load, **extra)
    for a, b in zip(jax.tree.leaves(short), jax.tree.leaves(long), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)
