"""Posterior predictive draws: one compiled program from a posterior's draws to each grid
row's outcomes (:func:`outcomes`), and their summaries (:func:`summaries`).

:meth:`sdbayes.Posterior.predict` resolves a grid's groups and configurations, then hands
each chunk of rows here: the rows' coefficients (a fitted group's, or drawn from the pooled
population), the configurations' discrepancies, the discrepancy in load, the forward model
of :mod:`sdbayes.observation`, the predictive noise and, with percentiles, the tail model
of :mod:`sdbayes.tails`, as arrays of [draws, rows]. Nothing here knows the netCDF file or
ArviZ: the draws come in as :attr:`sdbayes.Posterior._sites`, a dict of device arrays.
"""

from __future__ import annotations

import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from statistics import NormalDist
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from sdbayes import observation, tails
from sdbayes.model import Coefficients, demands, saturation_rate, speedup
from sdbayes.points import Points
from sdbayes.traces import config_keys, group_labels


def novel_configurations(grid: pd.DataFrame, arrays: Points) -> np.ndarray:
    """Each row's id of a configuration the fit has not seen (0 for a fitted one): a hash of
    its group label and configuration key (:func:`sdbayes.traces.config_keys`), so that the
    rows of one such configuration (one curve: its loads) share one fresh discrepancy
    whatever the grid's chunks or other rows, as the fit's rows of one configuration share
    theirs; shape [R], uint32."""
    labels = group_labels(grid)
    keys = config_keys(grid, arrays.group)
    return np.array([zlib.crc32(repr((label,) + key[1:]).encode()) if config < 0 else 0
                     for label, key, config in zip(labels, keys, arrays.config, strict=True)],
                    dtype=np.uint32)


def effective_loads(rows: Coefficients, arrays, variant) -> observation.EffectiveLoads:
    """The finite runs' effective-load tables about the draws' median, wide enough for
    every draw (rows' coefficient fields [D, R])."""
    draws = Coefficients(*(np.broadcast_to(np.asarray(f), np.shape(rows.c1p)) for f in rows))
    anchor = Coefficients(*(np.median(f, axis=0) for f in draws))
    point = dict(k=arrays.k, alpha=arrays.alpha, output_len=arrays.output_len, variant=variant)
    capacity = np.log(np.asarray(saturation_rate(draws, **point)))  # [D, R]
    span = np.abs(capacity - np.log(np.asarray(saturation_rate(anchor, **point)))).max(axis=0)

    def log_alone(coef):  # log C1 at full expert coverage, as the tables take it
        return np.log(np.asarray(demands(coef, **point, coverage=1.0).independent.total))

    c1_span = np.abs(log_alone(draws) - log_alone(anchor)).max(axis=0)
    return observation.effective_loads(anchor, arrays, variant, span=np.clip(span, 0.05, 2.0),
                                       c1_span=np.clip(c1_span, 0.02, 1.0))


def column(grid: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric column of the grid as floats, NaN where missing or absent."""
    if name not in grid:
        return np.full(len(grid), np.nan)
    return grid[name].astype("Float64").to_numpy(float, na_value=np.nan)


def row_spreads(grid: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The grid's ``arrival_cv2`` (Poisson where not given) and ``output_len_sd`` (0 where
    not given), each [R]."""
    cv2, lengths = column(grid, "arrival_cv2"), column(grid, "output_len_sd")
    return np.where(np.isnan(cv2), tails.POISSON, cv2), np.nan_to_num(lengths)


def tail_shapes(rows: Coefficients, arrays, arrival_cv2, output_len_sd, variant,
                 excess: float):
    """:func:`sdbayes.tails.relative` at the rows (:func:`row_spreads`)."""
    return tails.relative(rows, np.array(tails.QUANTILES), k=arrays.k, alpha=arrays.alpha,
                          output_len=arrays.output_len, rate=arrays.rate,
                          concurrency=arrays.concurrency, closed=arrays.closed,
                          arrival_cv2=arrival_cv2, output_len_sd=output_len_sd,
                          arrival_excess=excess, variant=variant)


class GroupLoadError(NamedTuple):
    """The discrepancy in load of each fitted group and, in a last slot, of a group the fit
    has not seen (a fresh draw, offsets 0): weights and offset [D, G + 1, LOAD_BASIS],
    scale [D]. Kept by group so that no [D, R, LOAD_BASIS] array is built: the compiled
    forward model gathers each row's slot itself (:meth:`at`)."""

    weights: jax.Array
    offset: jax.Array
    scale: jax.Array

    def at(self, slot) -> observation.LoadError:
        """The :class:`~sdbayes.observation.LoadError` of rows in slots ``slot`` [R]."""
        return observation.LoadError(_gather(self.weights, slot), self.scale[:, None],
                                     _gather(self.offset, slot))


def _gather(x, index):
    """``x[:, index]`` for ``x`` of shape [D, G, K] and ``index`` [R]: [D, R, K], gathered
    slice by slice of the last axis. XLA then fuses each [D, R] gather into what reads it;
    the [D, R, K] gather in one piece is materialised and costs some ten times more."""
    return jnp.stack([x[:, :, j][:, index] for j in range(x.shape[-1])], axis=-1)


@partial(jax.jit, static_argnames=("names", "student_load"))
def row_draws(sites: dict, group, config, novel, keys, names: tuple[str, ...],
               student_load: bool):
    """Each row's coefficient draws and its group's discrepancy in load.

    Args:
      sites: the posterior's draws (:attr:`sdbayes.Posterior._sites`).
      group: each row's group [R], -1 for one the fit has not seen: its coefficients are
        drawn from the pooled population, one draw shared by all such rows.
      config: each row's configuration [R], -1 for one the fit has not seen: it draws a
        fresh discrepancy, one per ``novel`` id [R] (uint32), which rows of one
        configuration share (:func:`novel_configurations`).
      keys: JAX PRNG keys (group, configuration, load) for those draws.
      names: the coefficients, in the order of ``sites["coef"]``'s last axis.
      student_load: a new group's weights in load from the Student-t prior they were fitted
        under, else standard normal (files written before).

    Returns:
      ``(coef, rows, load)``: the group's coefficients and the configuration's (the
      group's scaled by its discrepancy), fields [D, R]; :class:`GroupLoadError` or None.
    """
    key_group, key_config, key_load = keys
    fitted = _gather(sites["coef"], jnp.maximum(group, 0))  # [D, R, C]
    if "mu" in sites:
        z = jax.random.normal(key_group, sites["mu"].shape)
        population = jnp.exp(sites["mu"] + sites["tau"] * z)[:, None, :]
        fitted = jnp.where((group < 0)[None, :, None], population, fitted)
    coef = Coefficients(**{name: fitted[..., j] for j, name in enumerate(names)})
    rows = coef
    if "discrepancy" in sites:
        spread = sites["discrepancy"]  # [D, 2]
        delta = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key_config, i),
                                                     spread.shape[:1] + (2,)),
                         out_axes=1)(novel)  # [D, R, 2]
        if "delta" in sites:
            delta = jnp.where((config >= 0)[None, :, None],
                              _gather(sites["delta"], jnp.maximum(config, 0)), delta)
        rows = observation.configured(coef, delta, spread[:, None, :])
    if "load_weights" not in sites:
        return coef, rows, None
    weights = sites["load_weights"]  # [D, G, LOAD_BASIS]
    shape = (weights.shape[0], 1, weights.shape[2])
    fresh = (observation.sample_load_weights(key_load, shape) if student_load
             else jax.random.normal(key_load, shape))
    offset = sites.get("load_offset", jnp.zeros_like(weights))
    return coef, rows, GroupLoadError(jnp.concatenate([weights, fresh], axis=1),
                                       jnp.concatenate([offset, jnp.zeros(shape)], axis=1),
                                       sites["load_scale"])


class TailInputs(NamedTuple):
    """What the percentiles need beyond the means, per row [R]: the arrivals' squared
    coefficient of variation, the spread of output lengths, the load's excess dispersion
    (a scalar), the requests a measured percentile is over (NaN where not given); and the
    tail model's calibration per metric, quantile and row [3, Q, R], the scale of its log
    ratio, the sd of its error, the burst window and the error's sd per burst share
    (:class:`sdbayes.posterior.TailError`, of the row's kind of loop)."""

    arrival_cv2: np.ndarray
    output_len_sd: np.ndarray
    excess: float
    n_requests: np.ndarray
    shape_scale: jax.Array
    shape_sd: jax.Array
    window: jax.Array
    burst_sd: jax.Array


@partial(jax.jit, static_argnames=("names", "student_load", "variant", "likelihood",
                                   "forward"))
def outcomes(sites: dict, arrays: Points, resolved, novel, loads, relative_se: dict, keys,
              tail: TailInputs | None, *, names: tuple[str, ...], student_load: bool,
              variant, likelihood: str, forward):
    """The draws :meth:`sdbayes.Posterior.predict` summarises, in one compiled program.

    Args:
      sites, names, student_load: the posterior's draws (:func:`row_draws`).
      arrays: the rows (:class:`sdbayes.points.Points`, [R]).
      resolved: each row's group [R], -1 for one the fit has not seen.
      novel: each row's id of a configuration the fit has not seen [R] (:func:`row_draws`).
      loads: the finite runs' effective loads (or None), of the same draws.
      relative_se: each metric's relative standard error per row [R] (0 where not given).
      keys: JAX PRNG keys: the group's, configuration's and load's draws
        (:func:`row_draws`), the predictive noise, the tail model's error.
      tail: what the percentiles need, or None to skip them.
      variant, likelihood: the fit's (static).
      forward: :func:`sdbayes.observation.forward`, looked up by the caller at each call so
        that what prediction runs is what the likelihood runs (static).

    Returns:
      ``(draws, means)``: ``draws`` maps each summarised quantity to its draws, transposed
      to [R, D] for sorting: "e2e", "ttft", "tpot" (the configuration's mean) and, suffixed
      "_measured", a measured mean; with ``tail``, "e2e_p50" ... and their "_measured";
      "speedup" and "saturation_rate". ``means`` maps "e2e", "ttft", "tpot", "speedup"
      (over the draws where it is defined), "saturation_rate" and "p_saturated" to their
      posterior means [R].
    """
    key_noise, key_tail = keys[3:]
    coef, rows, load = row_draws(sites, resolved, arrays.config, novel, keys[:3], names,
                                  student_load)
    slot = jnp.where(resolved >= 0, resolved, sites["coef"].shape[1])
    predicted = forward(rows, arrays, variant, loads, None if load is None else load.at(slot))
    # Intervals are per metric, so one standard draw per draw and row serves them all.
    noise = observation.standard_noise(likelihood, key_noise, predicted.e2e.shape)  # [D, R]
    tau_q = sites["tau_q"][:, None]
    draws, means, spreads = {}, {}, {}
    for metric in ("e2e", "ttft", "tpot"):
        x = predicted.mean(metric)
        sigma = sites.get(f"sigma_{metric}", sites["sigma_e2e"])[:, None]
        spread = observation.spread(sigma, tau_q, predicted.sensitivity,
                                    relative_se[metric][None, :])
        draws[metric], draws[f"{metric}_measured"] = x, _noisy(x, spread * noise)
        means[metric] = x.mean(axis=0)
        # A percentile's own sampling error replaces the row's standard error of a mean.
        spreads[metric] = observation.spread(sigma, tau_q, predicted.sensitivity)
    if tail is not None:
        draws |= _percentile_draws(rows, arrays, variant, tail, means=draws, spreads=spreads,
                                   noise=noise, key=key_tail)
    point = dict(k=arrays.k, alpha=arrays.alpha, output_len=arrays.output_len,
                 variant=variant)
    closed = arrays.closed
    gain = jnp.where(closed,
                     speedup(coef, concurrency=jnp.where(closed, arrays.concurrency, 1.0),
                             **point),
                     speedup(coef, rate=jnp.where(closed, 0.0, arrays.rate), **point))
    compared = ~jnp.isnan(gain)  # NaN where both are saturated: no speedup to speak of
    count = compared.sum(axis=0)
    means["speedup"] = jnp.where(count > 0, jnp.where(compared, gain, 0.0).sum(axis=0)
                                 / jnp.maximum(count, 1), jnp.nan)
    draws["speedup"] = gain
    draws["saturation_rate"] = saturation_rate(rows, **point)
    means["saturation_rate"] = draws["saturation_rate"].mean(axis=0)
    means["p_saturated"] = (~jnp.isfinite(predicted.e2e)).mean(axis=0)
    return {name: x.T for name, x in draws.items()}, means


def _noisy(x, error):
    """Draws ``x`` times ``exp(error)``; +inf where ``x`` is (a saturated draw), and where
    a draw's noise near saturation overflows."""
    finite = jnp.isfinite(x)
    return jnp.where(finite, jnp.where(finite, x, 1.0) * jnp.exp(jnp.where(finite, error, 0.0)),
                     jnp.inf)


def percentile_names() -> list[str]:
    """``e2e_p50, e2e_p90, ... tpot_p99``: the percentiles' names, metric by metric."""
    return [f"{metric}_p{100 * q:g}" for metric in ("e2e", "ttft", "tpot")
            for q in tails.QUANTILES]


def _percentile_draws(rows: Coefficients, arrays, variant, tail: TailInputs, *,
                      means: dict, spreads: dict, noise, key) -> dict:
    """Draws of p50/p90/p99 of each metric over requests and of a measured one: each draw's
    mean times the tail model's quantile-to-mean ratio at the row
    (:func:`sdbayes.tails.relative`) raised to its fitted scale (``tail.shape_scale``), plus
    the delay of its fitted burst window (``tail.window``, :func:`sdbayes.tails.burst_delay`;
    open loops), each percentile at least the one below it.

    A measured percentile varies as the measured mean does (the same ``noise`` draw [D, R],
    so the fitted relative error ``spreads``), by the tail model's own error (a normal draw
    times its sd, :func:`sdbayes.tails.error_sd` of ``tail.shape_sd`` and ``tail.burst_sd``
    at the draw's mean) and, over ``n_requests`` requests, by its sampling
    error (:func:`sampling_sd`).
    """
    shapes = tail_shapes(rows, arrays, tail.arrival_cv2, tail.output_len_sd, variant,
                          tail.excess)
    shape_noise = jax.random.normal(key, (len(tails.QUANTILES),) + noise.shape)
    names = iter(percentile_names())
    draws = {}
    for m, metric in enumerate(("e2e", "ttft", "tpot")):
        ratio, cv = shapes[metric]
        # The arrays' rate is 0 on closed rows: no burst there.
        delay = tails.per_metric(tails.burst_delay(rows.c2p[None], arrays.rate[None, None],
                                                   tail.window[m][:, None]),
                                 metric, arrays.output_len[None, None])  # [Q, D, R]
        mean = means[metric]  # [D, R]
        scaled = ratio ** tail.shape_scale[m][:, None, :]
        x = jax.lax.cummax(mean[None] * scaled + delay, axis=0)  # [Q, D, R]
        proper = jnp.isfinite(mean) & (mean > 0)
        ratio = jnp.where(proper[None], x / jnp.where(proper, mean, 1.0)[None], scaled)
        for j, q in enumerate(tails.QUANTILES):
            name = next(names)
            sampling = jnp.nan_to_num(sampling_sd(q, tail.n_requests, cv, ratio[j]))
            sd = jnp.sqrt(spreads[metric] ** 2 + sampling**2)
            draws[name] = x[j]
            model_sd = tails.error_sd(tail.shape_sd[m, j][None], tail.burst_sd[m, j][None],
                                      rows.c2p, arrays.rate[None], mean, metric,
                                      arrays.output_len[None])  # [D, R]
            draws[f"{name}_measured"] = _noisy(x[j], sd * noise + model_sd * shape_noise[j])
    return draws


def summaries(draws: dict, probs: tuple[float, ...]) -> dict[str, tuple[np.ndarray, ...]]:
    """Quantiles ``probs`` over draws of each [R, D] array of ``draws``, as
    ``np.quantile(..., method="inverted_cdf")`` gives them: one sort per array, the
    arrays sorted in parallel threads (NumPy's sort releases the GIL). +inf draws stay
    +inf; a row with a NaN draw has NaN quantiles."""
    def summarise(x):
        x = np.array(x)  # a writable host copy, sorted in place
        x.sort(axis=1)
        n = x.shape[1]
        picked = [x[:, min(max(math.ceil(n * p) - 1, 0), n - 1)].astype(float) for p in probs]
        undefined = np.isnan(x[:, -1])  # NaN sorts last
        return tuple(np.where(undefined, np.nan, q) if undefined.any() else q
                     for q in picked)

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return dict(zip(draws, pool.map(summarise, draws.values()), strict=True))


def sampling_sd(q: float, n, cv, ratio):
    """The relative sampling sd of a ``q``-percentile over ``n`` requests whose metric has
    coefficient of variation ``cv`` and percentile-to-mean ``ratio``:
    ``sqrt(q (1 - q) / n) / (f(x_q) x_q)``, with the density ``f`` taken as normal's."""
    density = NormalDist().pdf(NormalDist().inv_cdf(q))
    shape = jnp.broadcast_shapes(jnp.shape(n), jnp.shape(cv))
    return jnp.broadcast_to(jnp.sqrt(q * (1 - q) / jnp.asarray(n)), shape) * cv / (density * ratio)
