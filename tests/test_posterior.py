"""Posterior: prediction in chunks, the draws as ArviZ shows them."""

from pathlib import Path

import jax
import numpy as np
import pandas as pd

import sdbayes as sb
from sdbayes import posterior, predictive

ROOT = Path(__file__).resolve().parents[1]


def test_prediction_in_chunks_equals_it_whole(monkeypatch):
    """A grid larger than a chunk is predicted chunk by chunk: the same rows in the same
    order; for configurations the fit has seen no random draw enters the credible
    intervals, so they are equal (groups are resolved over the whole grid first: a chunk
    of k = 0 rows alone once lost its SD group); predictive intervals use other noise
    draws."""
    post = sb.load_posterior(ROOT / "calibration" / "example_posterior.nc")
    fitted = pd.read_csv(ROOT / "sdbayes" / "data" / "example_points.csv")
    grid = fitted[fitted["request_rate"].notna()].drop(columns=["e2e_mean_s"])
    grid = pd.concat([grid, grid.assign(request_rate=grid["request_rate"] * 0.5)])
    grid.index = np.arange(100, 100 + len(grid))  # an index prediction resets
    whole = post.predict(grid)
    draws = post.coefficients().c1p.shape[0]
    monkeypatch.setattr(posterior, "_PREDICT_CELLS", 7 * draws)  # chunks of 7 rows
    assert len(grid) > 2 * 7
    chunked = post.predict(grid)
    assert list(chunked.index) == list(range(len(grid)))
    credible = [c for c in whole if c.endswith(("_median_s", "_lower_s", "_upper_s",
                                                "_p99_pred_s")) and "_pi_" not in c]
    pd.testing.assert_frame_equal(chunked[credible], whole[credible])
    width = [np.median(p["e2e_pi_upper_s"] / p["e2e_pi_lower_s"]) for p in (chunked, whole)]
    assert abs(width[0] / width[1] - 1) < 0.1  # noise draws differ, their law does not


def test_grids_of_similar_sizes_share_one_compiled_program():
    """Rows are padded to a bucket size before the compiled prediction: grids of 9 to 12
    rows compile it once, return only their own rows, and a row's credible interval is the
    same whichever grid it is predicted in."""
    post = sb.load_posterior(ROOT / "calibration" / "example_posterior.nc")
    grid = pd.DataFrame(dict(k=3, acceptance=0.77, output_len=128.0,
                             request_rate=np.linspace(0.5, 3.0, 12)))
    first = post.predict(grid.iloc[:9], percentiles=False)
    compiled = predictive.outcomes._cache_size()
    for n in (10, 11, 12):
        assert len(post.predict(grid.iloc[:n], percentiles=False)) == n
    assert predictive.outcomes._cache_size() == compiled
    last = post.predict(grid, percentiles=False)
    pd.testing.assert_series_equal(last["e2e_upper_s"].iloc[:9], first["e2e_upper_s"])


def test_rows_of_a_new_configuration_share_its_discrepancy(monkeypatch):
    """A configuration the fit has not seen draws one discrepancy, which all its rows share
    (one curve across loads, as in the fit), whatever the chunks: predicted at two rates its
    mean latencies move together draw by draw; another new configuration draws its own;
    chunked or whole, the credible intervals of new configurations are the same."""
    post = sb.load_posterior(ROOT / "calibration" / "example_posterior.nc")
    grid = pd.DataFrame(dict(k=[3, 3, 3, 5], acceptance=[0.77, 0.77, 0.77, 0.61],
                             output_len=128.0, request_rate=[1.0, 2.0, 3.0, 1.0]))
    g = post._grid(grid)
    arrays, _ = sb.traces.to_points(g, post.groups, post.configs)
    novel = predictive.novel_configurations(g, arrays)
    assert (arrays.config < 0).all() and len(set(novel[:3])) == 1 and novel[3] != novel[0]
    key = jax.random.key(4)
    _, rows, _ = post._row_draws(post._new_group_rows(g, arrays), arrays.config,
                                 (key, key, key), novel)
    c2 = np.asarray(rows.c2v)  # [D, R]: the same group, so only the discrepancy differs
    np.testing.assert_array_equal(c2[:, 0], c2[:, 2])
    assert not np.allclose(c2[:, 0], c2[:, 3])
    whole = post.predict(grid, percentiles=False)
    monkeypatch.setattr(posterior, "_PREDICT_CELLS", post.coefficients().c1p.shape[0])
    chunked = post.predict(grid, percentiles=False)  # one row a chunk
    credible = [c for c in whole if c.endswith(("_median_s", "_lower_s", "_upper_s"))
                and "_pi_" not in c]
    pd.testing.assert_frame_equal(chunked[credible], whole[credible])


def test_draws_have_named_dimensions_and_units(tmp_path):
    """ArviZ reads a posterior as sdbayes means it: the coefficients by group label with
    their units, the per-coefficient sites by coefficient name. A file written before the
    names existed (the example posterior) gets them as it loads, and keeps them saved."""
    import arviz as az

    post = sb.load_posterior(ROOT / "calibration" / "example_posterior.nc")
    post.save(tmp_path / "named.nc")
    for draws in (post.idata.posterior, sb.load_posterior(tmp_path / "named.nc").idata.posterior):
        assert draws["c1p"].dims == ("chain", "draw", "group")
        assert list(draws["group"].values) == post.groups
        assert list(draws["log_c_std"]["coefficient"].values) == list(post.coefficient_names)
        assert draws["delta"].dims[2:] == ("config", "demand")
        assert all(draws[name].attrs["units"] == "s" for name in post.coefficient_names)
    summary = az.summary(post.idata, var_names=["c1p"], kind="stats")
    assert list(summary.index) == [f"c1p[{label}]" for label in post.groups]
    # The file holds costs in ms, as its units say; loading gives seconds back, to the
    # two roundings of float32 draws (2 x 2^-24 relative).
    in_file = az.from_netcdf(str(tmp_path / "named.nc")).posterior
    assert in_file["c1p"].attrs["units"] == "ms"
    np.testing.assert_allclose(in_file["c1p"].values, 1e3 * post.idata.posterior["c1p"].values)
    loaded = sb.load_posterior(tmp_path / "named.nc")
    for name in post.coefficient_names:
        np.testing.assert_allclose(loaded.idata.posterior[name].values,
                                   post.idata.posterior[name].values, rtol=2.4e-7)
    # The library's own summary still finds each coefficient's R-hat and ESS.
    assert post.summary()[["r_hat", "ess_bulk"]].notna().all().all()


def test_summaries_are_numpys_quantiles():
    """One sort per quantity gives np.quantile's inverted-CDF quantiles, for draw counts
    odd and even, with +inf draws kept (saturated) and NaN where any draw is undefined."""
    rng = np.random.default_rng(5)
    for n_draws in (1, 7, 400, 4001):
        x = rng.lognormal(size=(6, n_draws))  # [R, D]
        x[1, : n_draws // 3] = np.inf
        x[2, :] = np.inf
        x[3, -1] = np.nan
        probs = (0.5, 0.05, 0.95)
        got = predictive.summaries({"x": x}, probs)["x"]
        expected = np.quantile(x, probs, axis=1, method="inverted_cdf")
        np.testing.assert_array_equal(np.stack(got), expected)
