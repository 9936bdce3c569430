"""The observation model (sdbayes.observation): one forward model for fitting and
prediction, and its cheap form of a finite run against the exact fluid model."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from numpyro.infer.util import log_density
from scipy import stats

import sdbayes as sb
from sdbayes import likelihood, observation
from sdbayes.fluid import finite_run
from sdbayes.points import Points

USES_NUMPYRO = True  # conftest: NumPyro needs implicit rank promotion
jax.config.update("jax_enable_x64", True)

# Costs of the order the source study's Qwen3-8B sweeps fit (saturating near 13 req/s).
COEF = sb.Coefficients(0.0876, 0.0143, 0.0014, 0.032, 9.9e-5, 3.6e-5, fill=2.38,
                       fill_half=10.6)
POINT = dict(k=4.0, alpha=0.7, output_len=128.0)
LOADS = np.array([0.2, 0.5, 0.8, 0.9, 0.97, 1.0, 1.05, 1.2])  # of the saturation rate
EXAMPLE = Path(__file__).resolve().parents[1] / "calibration" / "example_posterior.nc"


def runs(variant, duration=90.0, loads=LOADS):
    """Open-loop rows of a 90 s run at ``loads`` of the saturation rate."""
    rates = loads * float(sb.saturation_rate(COEF, **POINT, variant=variant))
    n = len(rates)
    return Points(group=np.zeros(n, int), config=np.zeros(n, int), k=np.full(n, POINT["k"]),
                  alpha=np.full(n, POINT["alpha"]), output_len=np.full(n, POINT["output_len"]),
                  rate=rates, concurrency=np.ones(n), closed=np.zeros(n, bool),
                  e2e=np.ones(n), e2e_se=np.zeros(n), ttft=np.ones(n), ttft_se=np.zeros(n),
                  tpot=np.ones(n), tpot_se=np.zeros(n), duration=np.full(n, duration))


def exact(coef, points, variant):
    return finite_run(coef, **POINT, rate=points.rate, duration=points.duration,
                      variant=variant)


@pytest.mark.parametrize("variant, bound", [("paper", 0.012), ("stepped", 0.012),
                                            ("filling", 0.05)])
def test_a_finite_run_is_its_fluid_model_about_the_anchor(variant, bound):
    """Exact at the anchor; about it (C1 within 3%, C2 within 10%, the filling form's
    shape terms within 10%) within ``bound``. Measured at most: 0.9% (paper), 0.8%
    (stepped), 0.5% (filling with its shape terms held) and 4.0% (with fill or fill_half 10%
    off, which the tables hold at the anchor's), the largest near capacity; 0.1% below 80%
    of it. (The stepped form is left out
    at 1.2 times capacity: there the admissions' stalls alone come near the whole time,
    its boundary waits diverge, and the fluid model itself returns nonsense.)"""
    points = runs(variant, loads=LOADS[:-1] if variant == "stepped" else LOADS)
    loads = observation.effective_loads(COEF, points, variant)
    at_anchor = observation.forward(COEF, points, variant, loads)
    fluid = exact(COEF, points, variant)
    assert np.allclose(at_anchor.e2e, fluid.latency, rtol=1e-4)
    assert np.allclose(at_anchor.ttft, fluid.ttft, rtol=1e-3)
    assert np.allclose(at_anchor.tpot, fluid.tpot, rtol=1e-3)
    worst = 0.0
    for c1 in (0.97, 1.0, 1.03):
        for c2 in (0.9, 0.95, 1.05, 1.1):
            for fill, half in (((0.9, 1), (1.1, 1), (1, 0.9), (1, 1.1))
                               if variant == "filling" else ((1, 1),)):
                coef = observation.scale_demands(COEF, c1, c2)._replace(
                    fill=COEF.fill * fill, fill_half=COEF.fill_half * half)
                got = np.asarray(observation.forward(coef, points, variant, loads).e2e)
                want = np.asarray(exact(coef, points, variant).latency)
                worst = max(worst, float(np.max(np.abs(got / want - 1))))
    assert worst < bound


@pytest.mark.parametrize("variant", ["paper", "filling"])
def test_a_finite_run_is_finite_and_its_sensitivity_bounded(variant):
    """Past saturation a run reports a finite mean, the steady model +inf; the sensitivity
    to C2 is the fluid model's (finite differences of it, within 3%) and stays bounded:
    a 90 s run's backlog has no time to grow without bound."""
    points = runs(variant)
    loads = observation.effective_loads(COEF, points, variant)
    run = observation.forward(COEF, points, variant, loads)
    steady = observation.forward(COEF, points, variant)
    assert np.isfinite(run.e2e).all() and np.isinf(steady.e2e[LOADS >= 1.0]).all()
    assert (np.asarray(run.e2e) <= np.asarray(steady.e2e) * 1.001).all()

    def log_run(log_c2):
        coef = observation.scale_demands(COEF, 1.0, jnp.exp(log_c2))
        return np.log(np.asarray(exact(coef, points, variant).latency))

    h = 0.03
    slope = (log_run(h) - log_run(-h)) / (2 * h)
    assert np.allclose(run.sensitivity, slope, rtol=0.03, atol=0.01)
    assert np.all(np.asarray(run.sensitivity) < 10.0)


def test_the_sensitivity_is_that_of_the_forward_model():
    """d log L / d log C2 as the noise term takes it equals the forward model's own
    derivative: steady open and closed loops, and finite runs."""
    variant = "filling"
    points = runs(variant)
    points = points._replace(closed=np.array([False] * 6 + [True] * 2),
                             concurrency=np.array([1.0] * 6 + [16.0, 128.0]),
                             duration=np.where(np.arange(8) % 2 == 0, 90.0, np.inf))
    loads = observation.effective_loads(COEF, points, variant)

    def log_latency(log_c2):
        coef = observation.scale_demands(COEF, 1.0, jnp.exp(log_c2))
        return jnp.log(observation.forward(coef, points, variant, loads).e2e)

    _, slope = jax.jvp(log_latency, (jnp.zeros(8),), (jnp.ones(8),))
    sensitivity = observation.forward(COEF, points, variant, loads).sensitivity
    stable = np.isfinite(np.asarray(observation.forward(COEF, points, variant, loads).e2e))
    assert np.allclose(np.asarray(sensitivity)[stable], np.asarray(slope)[stable], rtol=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_fitting_and_prediction_share_the_forward_model(monkeypatch):
    """Change the forward model in one place, observation.forward, and both the likelihood
    the fit maximises and the predictions change as one."""
    posterior = sb.load_posterior(EXAMPLE)
    grid = pd.DataFrame(dict(k=[2, 4], acceptance=[0.7, 0.8], output_len=[128.0, 128.0],
                             prompt_len=[512.0, 512.0], request_rate=[2.0, 3.0],
                             e2e_mean_s=[1.0, 1.2], e2e_se_s=[0.01, 0.012]))
    points, _ = sb.traces.to_points(sb.traces.validate(grid.assign(
        hardware="h", verifier="v", drafter="d", method="m")))
    prior = likelihood.data_prior(points)
    args = dict(points=points, prior=prior, n_groups=1, metrics=("e2e",))
    values = dict(log_c_std=np.zeros(6), sigma_e2e=0.02, tau_q=0.01,
                  discrepancy=np.array([0.02, 0.03]), delta_free=np.zeros((2, 2)),
                  load_scale=0.02, load_weights=np.full((1, observation.LOAD_BASIS), 0.5))

    def log_likelihood(points):
        return float(log_density(likelihood.model, (), dict(args, points=points), values)[0])

    before = posterior.predict(grid)
    halved = points._replace(e2e=points.e2e / 2, e2e_se=points.e2e_se / 2)
    plain = log_likelihood(halved)
    original = observation.forward

    def doubled(*arguments, **options):
        out = original(*arguments, **options)
        return out._replace(e2e=2.0 * out.e2e)

    monkeypatch.setattr(observation, "forward", doubled)
    after = posterior.predict(grid)
    # Twice the latency predicted: measurements twice as long are as likely as before.
    assert log_likelihood(points) == pytest.approx(plain, rel=1e-9)
    for column in ("e2e_median_s", "e2e_lower_s", "e2e_upper_s"):
        assert np.allclose(after[column], 2.0 * before[column], rtol=1e-6)
    assert np.allclose(after["ttft_median_s"], before["ttft_median_s"], rtol=1e-9)


def test_fresh_load_weights_follow_the_fitted_prior():
    """A group the fit has not seen draws its weights of the discrepancy in load from the
    prior they were fitted under: each a Student-t of LOAD_DF degrees of freedom (KS test,
    20,000 draws, seed fixed), sharing one scale per draw, so |w| correlate across the
    basis; eta's prior sd is LOAD_ERROR_SCALE."""
    from scipy import stats

    from sdbayes.inference import LOAD_ERROR_SCALE

    draws = np.asarray(observation.sample_load_weights(jax.random.key(0),
                                                       (20_000, observation.LOAD_BASIS)))
    assert stats.kstest(draws[:, 0], "t", args=(observation.LOAD_DF,)).pvalue > 0.01
    assert np.corrcoef(np.abs(draws[:, 0]), np.abs(draws[:, 1]))[0, 1] > 0.05
    sd = observation.load_scale(LOAD_ERROR_SCALE) * draws.std()
    assert sd == pytest.approx(LOAD_ERROR_SCALE, rel=0.02)


def test_the_load_weights_prior_is_the_multivariate_student_t():
    """The prior's log density equals SciPy's multivariate t of LOAD_DF degrees of freedom,
    identity scale, at points near and far (the closed form leaves out only solves with an
    identity), per group under a plate's batch shape; its draws have the event's shape."""
    prior = observation.load_weights_prior()
    size = observation.LOAD_BASIS
    near_and_far = np.array([1.0, 20.0])[:, None, None]
    values = np.random.default_rng(4).standard_t(3, (2, 5, size)) * near_and_far
    reference = stats.multivariate_t(np.zeros(size), np.eye(size), df=observation.LOAD_DF)
    np.testing.assert_allclose(prior.expand((5,)).log_prob(values), reference.logpdf(values),
                               rtol=1e-12)
    assert prior.expand((3,)).sample(jax.random.key(0), (7,)).shape == (7, 3, size)


def test_the_discrepancy_in_load_is_its_basis_weighted():
    """eta(q), summed by Clenshaw's recurrence, equals the basis functions times their
    weights less the offsets, for weights per row and per group, at shares across [0, 1]."""
    rng = np.random.default_rng(3)
    share = rng.uniform(0.0, 1.0, (5, 40))  # [D, n]
    basis = np.asarray(observation.load_basis(share), float)  # [D, n, M]
    for weights in (rng.standard_t(10, (5, 40, observation.LOAD_BASIS)),
                    rng.standard_t(10, observation.LOAD_BASIS)):
        offset = rng.normal(0.0, 0.3, np.shape(weights))
        error = observation.LoadError(weights, np.full((5, 1), 0.04), offset)
        expected = 0.04 * np.sum((basis - offset) * weights, axis=-1)
        eta = np.asarray(observation.discrepancy_in_load(error, share))
        assert eta.shape == share.shape
        # float32 arithmetic on terms of order 1: agreement to 1e-6 of eta's own scale
        assert np.allclose(eta, expected, atol=1e-6 * 0.04 * np.abs(weights).sum())


@pytest.mark.parametrize("likelihood, law", [("student_t", stats.t(observation.STUDENT_DF)),
                                             ("lognormal", stats.norm())])
def test_standard_noise_follows_its_likelihood(likelihood, law):
    """100,000 draws pass a Kolmogorov-Smirnov test against the likelihood's standard law:
    the statistic is below its 1% critical value, 1.63 / sqrt(n)."""
    n = 100_000
    draws = np.asarray(observation.standard_noise(likelihood, jax.random.key(7), (n,)))
    assert stats.kstest(draws, law.cdf).statistic < 1.63 / np.sqrt(n)


def test_ttft_and_tpot_of_a_closed_burst_are_measured_not_fitted():
    """A closed loop of many requests (GuideLLM's throughput run) keeps its e2e in the
    likelihood, not its TTFT and TPOT; the synchronous point (one in flight) and the open
    loops keep all three."""
    grid = pd.DataFrame(dict(k=4, acceptance=0.7, output_len=128.0, prompt_len=512.0,
                             request_rate=[2.0, None, None], concurrency=[None, 1.0, 128.0],
                             e2e_mean_s=[1.0, 0.9, 5.0], ttft_mean_s=[0.1, 0.08, 2.0],
                             tpot_mean_s=[0.007, 0.006, 0.02], hardware="h", verifier="v",
                             drafter="d", method="m"))
    points, _ = sb.traces.to_points(sb.traces.validate(grid))
    for metric, kept in (("e2e", [True, True, True]), ("ttft", [True, True, False]),
                         ("tpot", [True, True, False])):
        present, log_value, _ = observation.fitted(points, metric)
        assert present.tolist() == kept, metric
        assert observation.observed(points, metric)[0].all()  # measured, all of them
        np.testing.assert_allclose(log_value, np.log(grid[f"{metric}_mean_s"]))
