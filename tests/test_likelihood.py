"""The probabilistic model (sdbayes.likelihood): priors, the coordinates the sampler works
in, the likelihood's error terms and the configuration discrepancies, on traces drawn from
the model itself (helpers shared with tests/test_inference.py)."""

import numpy as np
import pandas as pd
import pytest

import sdbayes as sb
from sdbayes import likelihood, observation
from tests.test_inference import LOADS, SMALL, TRUE, model_traces

USES_NUMPYRO = True  # conftest: NumPyro needs implicit rank promotion


def test_roofline_prior_medians():
    from sdbayes.likelihood import HardwareSpec, ModelSpec, roofline_prior

    gpu = HardwareSpec(memory_bandwidth=3.35e12, peak_flops=989e12)  # H100 SXM, bf16 dense
    verifier = ModelSpec(params=8e9, kv_bytes_per_token=147_456)  # Qwen3-8B: 36 x 8 x 128 x 2 x 2
    drafter = ModelSpec(params=0.5e9)
    prior = roofline_prior(gpu, verifier, drafter, prompt_len=512, output_len=128)
    m = prior.median()
    weights = 8e9 * 2 / 3.35e12
    assert m.c1v == pytest.approx(weights)
    assert m.c1d == pytest.approx(0.5e9 * 2 / 3.35e12)
    assert m.c2v == pytest.approx(147_456 * (512 + 64) / 3.35e12)
    assert m.c2d == pytest.approx(0.1 * m.c2v)
    assert m.c2p == pytest.approx(2 * 8e9 * 512 / 989e12)
    assert m.c1p == pytest.approx(m.c2p + weights)
    assert np.all(prior.scale == 1.0)


@pytest.mark.filterwarnings("ignore::sdbayes.posterior.FitWarning")
def test_student_t_likelihood_tolerates_an_outlier():
    traces = model_traces()
    traces.loc[5, "e2e_mean_s"] *= 3.0  # one wild measurement
    robust = sb.fit(traces, likelihood="student_t", seed=0, **SMALL)
    plain = sb.fit(traces, seed=0, **SMALL)
    assert robust.idata.attrs["sdbayes_likelihood"] == "student_t"
    c1v = {name: p.summary().set_index("coefficient").loc["c1v"]
           for name, p in (("robust", robust), ("plain", plain))}
    assert c1v["robust"]["unit"] == "s"
    assert c1v["robust"]["lower"] <= TRUE.c1v <= c1v["robust"]["upper"]
    # measured here: robust mean 0.0140 (truth 0.014), log-normal mean 0.0187
    assert abs(c1v["robust"]["mean"] / TRUE.c1v - 1) < 0.05
    assert abs(c1v["plain"]["mean"] / TRUE.c1v - 1) > 0.15


LOG_TRUE = np.log([getattr(TRUE, name) for name in likelihood.COEFFICIENTS])


def _points_and_prior(traces):
    points, _ = sb.traces.to_points(sb.traces.validate(traces))
    return points, likelihood.data_prior(points)


def test_least_squares_frame_centres_on_the_truth():
    points, prior = _points_and_prior(model_traces())
    frame = likelihood.least_squares_frame(points, prior, ("e2e",))
    # A least-squares estimate from 24 points of 2% noise, weighted as if 2.8%: each true
    # log coefficient lies within 3 of its standard errors (0.3% misses for a normal one).
    assert np.all(np.abs(frame.loc - LOG_TRUE) <= 3 * frame.scale)
    assert np.all(frame.scale < 0.5 * prior.scale)
    # One point identifies little: the prior's rows keep the widths finite, at most its own.
    one, one_prior = _points_and_prior(model_traces().iloc[[5]])
    alone = likelihood.least_squares_frame(one, one_prior, ("e2e",))
    assert np.all(np.isfinite(alone.loc)) and np.all(alone.scale <= one_prior.scale)
    assert np.any(alone.scale > 0.5 * one_prior.scale)


def test_frame_changes_coordinates_not_the_model():
    from numpyro.infer.util import log_density

    points, prior = _points_and_prior(model_traces())
    args = dict(points=points, prior=prior, n_groups=1, metrics=("e2e",))
    frames = (prior, likelihood.least_squares_frame(points, prior, ("e2e",)))
    others = dict(sigma_e2e=0.02, tau_q=0.01, discrepancy=np.array([0.02, 0.03]),
                  delta_free=np.zeros((int(points.config.max()) + 1, 2)), load_scale=0.02,
                  load_weights=np.full((1, observation.LOAD_BASIS), 0.3))
    log_c = [LOG_TRUE, LOG_TRUE + np.array([0.01, -0.002, 0.003, 0.02, -0.01, 0.0])]

    def joint(frame, x):
        values = dict(others, log_c_std=(x - frame.loc) / frame.scale)
        density, trace = log_density(likelihood.model, (), dict(args, frame=frame), values)
        assert np.allclose(trace["log_c"]["value"], x, rtol=1e-6)
        return float(density)

    # The same joint density up to a frame's constant Jacobian: equal differences.
    first, second = ([joint(f, x) for x in log_c] for f in frames)
    assert first[0] - first[1] == pytest.approx(second[0] - second[1], rel=1e-4, abs=1e-3)


def _two_groups():
    other = TRUE._replace(c1p=TRUE.c1p * 1.2, c2v=TRUE.c2v * 0.8)
    traces = pd.concat([model_traces(), model_traces(1, ("A100", "Qwen3-8B", "eagle", "eagle3"),
                                                     other)], ignore_index=True)
    return _points_and_prior(traces)


def test_groups_in_their_frames_are_the_same_model():
    from numpyro.infer.util import log_density

    points, prior = _two_groups()
    frames = [likelihood.least_squares_frame(likelihood._subset(points, points.group == g),
                                            prior, ("e2e",)) for g in range(2)]
    framed = likelihood.group_frames(frames)._replace(centred=np.array([True, False]))
    args = dict(points=points, prior=prior, n_groups=2, metrics=("e2e",), load_error_scale=0.0,
                discrepancy_scale=0.0)
    mu, others = LOG_TRUE + 0.1, dict(sigma_e2e=0.02, tau_q=0.01)
    settings = [(np.full(6, 0.2), np.stack([LOG_TRUE, LOG_TRUE + 0.05])),
                (np.full(6, 0.1), np.stack([LOG_TRUE + 0.02, LOG_TRUE - 0.01]))]

    def joint(frame, tau, log_c):
        z = (log_c - mu) / tau  # non-centred coordinates
        if frame is not None:  # group 0 in its frame
            z[0] = np.linalg.solve(frame.tril[0], log_c[0] - frame.loc[0])
        density, trace = log_density(likelihood.model, (), dict(args, frame=frame),
                                     dict(others, mu=mu, tau=tau, z=z))
        assert np.allclose(np.log(np.stack([trace[n]["value"] for n in likelihood.COEFFICIENTS],
                                           axis=-1)), log_c, rtol=1e-6)
        return float(density)

    # Densities in z: the non-centred one is the framed one's times tau per centred
    # coefficient (d log_c / dz), the framed one's times its constant |tril|.
    differences = [joint(framed, tau, x) - joint(None, tau, x) + np.log(tau).sum()
                   for tau, x in settings]
    assert differences[0] == pytest.approx(differences[1], rel=1e-5, abs=1e-4)


def test_groups_the_data_pin_are_sampled_in_their_frames():
    centre = LOG_TRUE + np.array([[0.0], [0.3], [-0.3]])  # three groups 30% apart
    frame = lambda loc, width: likelihood.Frame(loc, np.full(6, width), np.eye(6))  # noqa: E731
    pinned = likelihood.group_frames([frame(loc, 0.01) for loc in centre])
    assert pinned.centred.all() and np.allclose(pinned.tril[0], 0.01 * np.eye(6))
    # Groups whose measurements tell them apart less than their spread: non-centred.
    loose = likelihood.group_frames([frame(loc, 1.0) for loc in centre])
    alike = likelihood.group_frames([frame(LOG_TRUE, 0.02) for _ in centre])
    assert not loose.centred.any() and not alike.centred.any()


@pytest.mark.parametrize("variant, coef", [("paper", TRUE),
                                           ("filling", TRUE._replace(fill=1.5, fill_half=4.0))])
def test_queueing_error_scales_with_the_sensitivity_to_load(variant, coef):
    import jax
    import jax.numpy as jnp

    traces = model_traces()
    closed = traces.iloc[:6].assign(request_rate=np.nan, concurrency=[1, 4, 16, 64, 128, 2])
    points, _ = sb.traces.to_points(sb.traces.validate(pd.concat([traces, closed])))
    sensitivity = observation.forward(coef, points, variant).sensitivity

    def log_latency(log_scale):  # every load-dependent coefficient scaled by exp(log_scale)
        scaled = observation.scale_demands(coef, 1.0, jnp.exp(log_scale))
        return jnp.log(observation.forward(scaled, points, variant).e2e)

    _, slope = jax.jvp(log_latency, (jnp.zeros(()),), (jnp.ones(()),))
    # The tau_q term is scaled by d log L / d log C2, however the load enters.
    assert np.allclose(sensitivity, slope, rtol=1e-4, atol=1e-6)
    is_closed = np.asarray(points.closed)
    # A closed loop has no arrival rate feeding back: its sensitivity stays under 1 even
    # with 128 in flight, where L / C1 - 1 would call it many times that.
    assert np.all(np.asarray(sensitivity)[is_closed] < 1.0)
    assert np.max(np.asarray(sensitivity)[~is_closed]) > 1.5  # load 0.7: about 0.7 / 0.3


def _curve_discrepancy_traces(seed, spread=0.08, noise=0.005):
    """Operating points of 18 curves whose C1 and C2 each stray from the group's by a
    log-normal factor of sd ``spread``, measured with ``noise``."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in (1, 2, 3, 4, 6, 8):
        for alpha in (0.5, 0.7, 0.9):
            c1, c2 = np.exp(spread * rng.normal(size=2))
            coef = observation.scale_demands(TRUE, c1, c2)
            point = dict(k=k, alpha=alpha, output_len=128)
            saturation = float(sb.saturation_rate(coef, **point))
            for load in LOADS:
                e2e = float(sb.latency(coef, rate=load * saturation, **point))
                e2e *= np.exp(noise * rng.normal())
                rows.append(dict(hardware="H100", verifier="v", drafter="d", method="m", k=k,
                                 acceptance=alpha, request_rate=load * saturation,
                                 prompt_len=512, output_len=128, e2e_mean_s=e2e,
                                 e2e_se_s=noise * e2e))
    return pd.DataFrame(rows)


def test_least_squares_frame_is_as_wide_as_the_curves_scatter():
    """Residuals of one curve share its discrepancy: the frame's widths are cluster-robust.
    Measured over these 8 seeds: 1 of 48 true log coefficients lies more than 3 widths
    from the centre (31 of 48 with the plain least-squares widths)."""
    misses = 0
    for seed in range(8):
        points, prior = _points_and_prior(_curve_discrepancy_traces(seed))
        frame = likelihood.least_squares_frame(points, prior, ("e2e",))
        misses += int(np.sum(np.abs(frame.loc - LOG_TRUE) > 3 * frame.scale))
    assert misses <= 3


def test_discrepancies_leave_the_coefficients_their_part():
    """Projected configuration discrepancies are orthogonal to what a change of the
    coefficients does to each curve's log C1 and log C2 (finite differences here), and the
    discrepancy in load has no level over the open loops, weighted as the likelihood sees
    them (``sum S_i**2 eta(q_i) = 0``)."""
    from numpyro.infer.util import log_density

    traces = _curve_discrepancy_traces(0)
    points, prior = _points_and_prior(traces)
    start = likelihood.anchor(points, prior, 1, ("e2e",))
    rng = np.random.default_rng(1)
    values = dict(log_c_std=np.zeros(6), sigma_e2e=0.02, tau_q=0.01,
                  discrepancy=np.array([0.05, 0.05]),
                  delta_free=rng.normal(size=(int(points.config.max()) + 1, 2)),
                  load_scale=0.05, load_weights=rng.normal(size=(1, observation.LOAD_BASIS)))
    _, trace = log_density(likelihood.model, (), dict(
        points=points, prior=prior, n_groups=1, metrics=("e2e",), frame=start.frames[0],
        confounding=start.confounding), values)
    delta = np.asarray(trace["delta"]["value"])  # [configs, 2]

    coef = sb.Coefficients(*np.exp(start.frames[0].loc))
    first = np.unique(points.config, return_index=True)[1]
    point = dict(k=points.k[first], alpha=points.alpha[first],
                 output_len=points.output_len[first])

    def log_demands(c):  # [2, configs]
        d = sb.demands(c, **point)
        return np.log([np.asarray(d.independent.total), np.asarray(d.dependent.total)])

    for name in likelihood.COEFFICIENTS:
        nudged = coef._replace(**{name: getattr(coef, name) * np.exp(1e-3)})
        direction = (log_demands(nudged) - log_demands(coef)) / 1e-3  # [2, configs]
        for e in range(2):  # cosines: under 1e-3, where a random delta's are about 0.2
            cosine = direction[e] @ delta[:, e] / np.linalg.norm(delta[:, e])
            assert abs(cosine) <= 1e-3 * np.linalg.norm(direction[e]), name
    assert np.abs(delta).max() > 0.1  # and not by being zero

    at_anchor = observation.forward(coef, points, "paper")
    error = observation.LoadError(values["load_weights"][0], 1.0,
                                  np.asarray(trace["load_offset"]["value"])[0])
    eta = np.asarray(observation.discrepancy_in_load(error, at_anchor.share))
    weight = np.asarray(at_anchor.sensitivity) ** 2
    assert abs(weight @ eta) < 1e-5 * weight.sum() * np.abs(eta).max()
    level = np.asarray(observation.discrepancy_in_load(error._replace(offset=0.0),
                                                       at_anchor.share))
    assert abs(weight @ level) > 0.01 * weight.sum() * np.abs(level).max()


def test_padding_to_a_size_bucket_changes_shapes_not_the_model():
    """The sampler's data padded to a size bucket (``inference._padded``, 23 finite-run rows
    to 24, 6 configurations to 8) give the data's log density plus the padded
    configurations' standard-normal ``delta_free`` prior at any parameters: the padded row
    counts nothing and the padded configurations' discrepancies are 0."""
    from numpyro.infer.util import log_density
    from scipy.stats import norm

    from sdbayes import inference

    traces = model_traces().iloc[:-1].assign(duration_s=90.0)
    points, prior = _points_and_prior(traces)
    start = likelihood.anchor(points, prior, 1, ("e2e",))
    data = dict(points=points, prior=prior, frame=start.frames[0], loads=start.loads,
                confounding=start.confounding)
    padded = inference._padded(data, 8)
    assert start.loads is not None and len(padded["points"].k) == 24
    rng = np.random.default_rng(2)
    free = rng.normal(size=(8, 2))
    values = dict(log_c_std=0.5 * rng.normal(size=6), sigma_e2e=0.02, tau_q=0.01,
                  discrepancy=np.array([0.05, 0.05]), load_scale=0.05,
                  load_weights=rng.normal(size=(1, observation.LOAD_BASIS)))
    settings = dict(n_groups=1, metrics=("e2e",))
    whole, whole_trace = log_density(likelihood.model, (), dict(settings, **data, n_configs=6),
                                     dict(values, delta_free=free[:6]))
    bucket, bucket_trace = log_density(likelihood.model, (),
                                       dict(settings, **padded, n_configs=8),
                                       dict(values, delta_free=free))
    assert float(bucket) == pytest.approx(float(whole) + norm.logpdf(free[6:]).sum(),
                                          rel=1e-5)
    delta = np.asarray(bucket_trace["delta"]["value"])
    assert np.all(delta[6:] == 0)
    np.testing.assert_allclose(delta[:6], whole_trace["delta"]["value"], rtol=1e-5, atol=1e-7)
