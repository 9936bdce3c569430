"""The simulator: its mechanics, its agreement with the analytic model where that is exact,
determinism and argument checks."""

import jax
import numpy as np
import pytest

import sdbayes as sb

COEF = sb.Coefficients(c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)
POINT = dict(k=4, alpha=0.7, prompt_len=512, output_len=128)


def in_system(trace, times):
    """Requests arrived and not yet finished at each of `times`."""
    arrivals = np.sort(trace["arrival_s"].to_numpy())
    finishes = np.sort((trace["arrival_s"] + trace["e2e_s"]).to_numpy())
    return np.searchsorted(arrivals, times, "right") - np.searchsorted(finishes, times, "right")


def test_littles_law():
    rate = 0.7 * float(sb.saturation_rate(COEF, k=4, alpha=0.7, output_len=128))
    trace = sb.simulate(COEF, rate=rate, n_requests=60_000, seed=3, **POINT)
    end = trace["arrival_s"].iloc[-1]
    # Occupancy sampled at random instants, against rate x mean latency (nominal rate).
    times = np.random.default_rng(0).uniform(0.05 * end, 0.95 * end, 20_000)
    occupancy = in_system(trace, times).mean()
    middle = trace[(trace["arrival_s"] > 0.05 * end) & (trace["arrival_s"] < 0.95 * end)]
    assert occupancy == pytest.approx(rate * middle["e2e_s"].mean(), rel=0.02)


# The analytic model takes g / E steps; the simulator needs whole steps, the last one partly
# wasted, about half a step more: a relative excess of ~E / (2g), 2.5% at E = 6.3, g = 128.
@pytest.mark.parametrize("k, alpha, g", [(0, 0.0, 128), (4, 0.7, 128), (8, 0.95, 512)])
def test_zero_load_matches_the_analytic_model(k, alpha, g):
    trace = sb.simulate(COEF, k=k, alpha=alpha, prompt_len=512, output_len=g,
                        rate=1e-3, n_requests=2_000, seed=1)
    model = float(sb.latency(COEF, k=k, alpha=alpha, output_len=g, rate=1e-3))
    assert trace["e2e_s"].mean() == pytest.approx(model, rel=0.02)
    alone = np.isclose(trace["ttft_s"], COEF.c1p, rtol=1e-9)  # prefill only
    assert alone.mean() > 0.99  # at 1e-3 req/s a request rarely meets another


@pytest.mark.parametrize("k, alpha", [(4, 0.7), (8, 0.95), (2, 0.5)])
def test_stepped_variant_counts_whole_cycles(k, alpha):
    # The renewal correction accounts for the partly wasted last cycle: the sampling error
    # of 2,000 requests' mean is ~0.1%, so 0.5% leaves room and still fails the paper form
    # at k = 8 (2.3% off).
    trace = sb.simulate(COEF, k=k, alpha=alpha, prompt_len=512, output_len=128,
                        rate=1e-3, n_requests=2_000, seed=5)
    model = float(sb.latency(COEF, k=k, alpha=alpha, output_len=128, rate=1e-3,
                             variant="stepped"))
    assert trace["e2e_s"].mean() == pytest.approx(model, rel=0.005)


@pytest.mark.parametrize("k, alpha", [(1, 0.5), (4, 0.7), (6, 0.9), (3, 1.0), (3, 0.0)])
def test_tokens_per_step_is_e(k, alpha):
    trace = sb.simulate(COEF, k=k, alpha=alpha, prompt_len=16, output_len=200,
                        rate=1.0, n_requests=3_000, seed=2)
    steps = trace["draft_tokens"].sum() / k
    mean_tokens = 1 + trace["accepted_tokens"].sum() / steps
    survival = alpha ** np.arange(k + 1)  # P(step emits > j tokens), j = 0..k
    e = survival.sum()
    sd = np.sqrt(((2 * np.arange(k + 1) + 1) * survival).sum() - e**2)
    # four standard errors (the ratio estimator's O(1/n) bias is far smaller)
    assert abs(mean_tokens - e) <= 4 * sd / np.sqrt(steps) + 1e-12
    np.testing.assert_allclose(e, sb.tokens_per_step(float(k), alpha), rtol=1e-12)


def test_per_position_rates():
    rates = sb.PositionRates(np.array([0.9, 0.8, 0.5, 0.5, 0.1]))
    trace = sb.simulate(COEF, k=3, alpha=rates, prompt_len=16, output_len=300,
                        rate=1.0, n_requests=3_000, seed=4)
    steps = trace["draft_tokens"].sum() / 3
    mean_tokens = 1 + trace["accepted_tokens"].sum() / steps
    survival = np.concatenate([[1.0], np.cumprod([0.9, 0.8, 0.5])])
    e = survival.sum()
    sd = np.sqrt(((2 * np.arange(4) + 1) * survival).sum() - e**2)
    assert abs(mean_tokens - e) <= 4 * sd / np.sqrt(steps)
    assert trace["acceptance"].isna().all()  # no single alpha to report


def test_full_and_no_acceptance_are_deterministic_in_steps():
    full = sb.simulate(COEF, k=3, alpha=1.0, prompt_len=8, output_len=100, rate=1.0,
                       n_requests=50, seed=0)
    assert (full["draft_tokens"] == 3 * 25).all() and (full["accepted_tokens"] == 75).all()
    none = sb.simulate(COEF, k=3, alpha=0.0, prompt_len=8, output_len=100, rate=1.0,
                       n_requests=50, seed=0)
    assert (none["draft_tokens"] == 300).all() and (none["accepted_tokens"] == 0).all()


def test_deterministic_under_a_seed():
    a = sb.simulate(COEF, rate=5.0, n_requests=500, seed=7, **POINT)
    b = sb.simulate(COEF, rate=5.0, n_requests=500, seed=7, **POINT)
    c = sb.simulate(COEF, rate=5.0, n_requests=500, seed=8, **POINT)
    assert a.equals(b) and not a["e2e_s"].equals(c["e2e_s"])
    key = jax.random.key(7)
    assert sb.simulate(COEF, rate=5.0, n_requests=500, seed=key, **POINT).equals(
        sb.simulate(COEF, rate=5.0, n_requests=500, seed=key, **POINT))


def test_trace_follows_the_schema_and_aggregates():
    trace = sb.simulate(COEF, rate=4.0, n_requests=2_000, seed=0, hardware="H100x1",
                        verifier="Qwen3-8B", drafter="eagle", method="eagle3",
                        k=4, alpha=0.7, prompt_len=sb.Uniform(400, 600),
                        output_len=sb.Empirical([64, 128, 256]))
    sb.validate(trace)
    assert trace["prompt_len"].between(400, 600).all()
    assert set(trace["output_len"]) == {64, 128, 256}
    points = sb.aggregate(trace)
    assert len(points) == 1
    row = points.iloc[0]
    assert row["n_requests"] == 2_000 and row["acceptance"] == 0.7
    assert row["e2e_p50_s"] < row["e2e_p90_s"] < row["e2e_p99_s"]
    assert row["throughput_rps"] == pytest.approx(4.0, rel=0.1)


def test_max_batch_one_serves_one_at_a_time():
    trace = sb.simulate(COEF, rate=2.0, n_requests=300, max_batch=1, seed=0, **POINT)
    start = trace["admitted_s"].to_numpy()
    end = (trace["arrival_s"] + trace["e2e_s"]).to_numpy()
    assert np.all(start[1:] >= end[:-1] - 1e-9)


def test_closed_loop_keeps_concurrency_in_flight():
    trace = sb.simulate(COEF, concurrency=8, n_requests=2_000, seed=0, **POINT)
    end = (trace["arrival_s"] + trace["e2e_s"]).max()
    times = np.random.default_rng(1).uniform(0, 0.9 * end, 500)
    assert np.all(in_system(trace, times) == 8)
    model = float(sb.latency(COEF, concurrency=8, k=4, alpha=0.7, output_len=128))
    assert trace["e2e_s"].iloc[200:].mean() == pytest.approx(model, rel=0.03)


def test_given_arrival_times():
    arrivals = np.array([0.0, 0.0, 1.0, 50.0])
    trace = sb.simulate(COEF, arrival_times=arrivals, seed=0, **POINT)
    np.testing.assert_array_equal(trace["arrival_s"], arrivals)
    # The last request finds the engine empty: prefill, then its steps alone.
    last = trace.iloc[3]
    alone = COEF.c1p + last["draft_tokens"] / 4 * (COEF.c1v + 4 * COEF.c1d)
    assert last["e2e_s"] == pytest.approx(alone, rel=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rate=0.0), "rate must be"),
        (dict(rate=-1.0), "rate must be"),
        (dict(rate=float("nan")), "rate must be"),
        (dict(k=-1), "k must be"),
        (dict(k=2.5), "k must be"),
        (dict(alpha=1.5), "acceptance must lie in"),
        (dict(alpha=-0.1), "acceptance must lie in"),
        (dict(alpha=float("nan")), "acceptance must lie in"),
        (dict(alpha=sb.PositionRates(np.array([0.5]))), "at least k = 4"),
        (dict(rate=None), "exactly one of"),
        (dict(concurrency=4), "exactly one of"),
        (dict(n_requests=0), "n_requests"),
        (dict(output_len=0), "output_len"),
        (dict(prompt_len=sb.Uniform(10, 5)), "prompt_len"),
        (dict(max_batch=0), "max_batch"),
        (dict(seed=-1), "seed"),
        (dict(coef=COEF._replace(c1v=-0.1)), "c1v"),
    ],
)
def test_bad_arguments(change, message):
    args = dict(coef=COEF, rate=1.0, n_requests=10, seed=0, **POINT)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        sb.simulate(**args)
