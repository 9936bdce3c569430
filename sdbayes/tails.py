"""Percentiles of per-request end-to-end latency, TTFT and TPOT: the tail model.

The mean-value model (:mod:`sdbayes.model`) gives each metric's mean. A request is slower
than the mean for these reasons, each with a variance taken from the same solve:

1. **Its acceptance draws.** A request that emits ``g`` tokens needs a random number of SD
   cycles ``C``, each emitting ``X`` tokens (``1 +`` drafts accepted before the first
   rejection). By renewal theory ``Var C = g * Var X / E^3`` with ``E = E[X]``: at
   ``alpha = 0.7`` and ``g = 128``, 3% of the decode time at ``k = 1``, 12% at ``k = 8``.
   The decode time is ``D = tau * C`` with ``tau`` the mean cycle time at the load.
2. **Its output length**, where lengths vary (``output_len_sd``, the sd about the mean
   ``g``): ``C`` grows by ``sd / E`` per request. It widens e2e; TPOT, per token, keeps
   only the acceptance and load terms, taken at the mean length.
3. **The load it meets.** Under an open loop the others in flight fluctuate about their
   mean ``B``; a request's latency grows by ``C2`` (the marginal demand) per other over its
   life. Their time average over a life has variance
   ``a2 * B * (2/3 + rho) / (1 - rho)``, ``rho = rate * C2`` the utilisation and ``a2`` the
   squared coefficient of variation of the inter-arrival times (``arrival_cv2``: 1 for
   Poisson arrivals, 0 for evenly spaced ones). Its two limits are exact or standard: ``2/3 B``
   for an infinite-server queue with fixed lives at light load, and growth as
   ``1 / (1 - rho)`` as in heavy traffic. The ``rho`` between was measured on the simulator
   (``bench/tails.py``). A closed loop holds its load: no such term. A fit calibrated on
   measured percentiles adds ``arrival_excess * 2/3 * B * C2^2``: load fluctuations its
   arrivals' spacing does not explain (client jitter, the engine's own scheduling), taken
   at their light-traffic size, not amplified towards saturation, where an empirical term
   should not be extrapolated.
4. **The step boundary it waits for** before its prefill: none with probability
   ``exp(-B)`` (the engine is idle), else the rest of a period that holds one decode step
   and the admission stalls (``c2p``) of the requests that arrived during the period
   before: the residual life of that period, whose moments give the wait's spread. Its
   mean is the model's own TTFT wait, which counts the stalls' variance too.

A fit that measured percentiles calibrates two more things per metric and percentile
(:func:`sdbayes.posterior.tail_errors`): a scale of the log ratio to the mean, and on open
loops a burst of arrivals whose prefills the slowest requests wait for
(:func:`burst_delay`), which real sweeps show and this model does not explain.

Shapes: end-to-end latency as a gamma distribution with the mean of the model and the
summed variances (right-skewed, as measured latencies are); TTFT as the prefill plus a wait
that is 0 or gamma-distributed; TPOT per request as the decode time ``D`` (gamma) over
``g - 1``, vLLM's definition. Gamma quantiles by the Wilson-Hilferty cube: smooth, so every
percentile is differentiable in ``k``, ``alpha``, ``rate`` and the coefficients.

Checked against the simulator (``bench/tails.py``, Poisson arrivals, k in 0..8, alpha 0.6
and 0.8, 30,000 requests a cell, 150,000 from 70% of saturation): p50, p90 and p99 of e2e
and TPOT within 5.1% from 10% to 85% of saturation; TTFT's p50 within 3%, its p90 and p99
within 6% up to 50% but for the p99 at 10% (-8%), and under-predicted by up to 10.5% at
85% (the simulator's waits spread more there: squared CV 0.61 against the model's 0.47).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri
from jax.typing import ArrayLike

from sdbayes.model import (
    Coefficients,
    PositionRates,
    Variant,
    _marginal_demand,
    _solve,
    _wasted_cycles,
    as_variant,
    saturation_rate,
    tokens_per_step,
    tokens_second_moment,
)

Array = jax.Array

QUANTILES = (0.5, 0.9, 0.99)
"""The percentiles :meth:`sdbayes.Posterior.predict` reports, as fractions."""

POISSON = 1.0
"""``arrival_cv2`` of Poisson arrivals (``vllm bench serve``'s default, and the
simulator's); evenly spaced arrivals (GuideLLM's constant rate) have 0, vLLM's gamma
arrivals ``1 / burstiness``."""

SHAPE_SD = 0.05
"""Relative error of a percentile's ratio to the mean where no fit has measured it: about
the tail model's error against the simulator up to 70% of saturation (``bench/tails.py``)."""

CALIBRATION_POINTS = 5
"""Fewest fitted points with a measured percentile for a fit to measure the tail model's
error on it (:func:`sdbayes.posterior.tail_errors`)."""

EXCESS_GRID = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""The values of the load's excess dispersion a fit chooses among
(:func:`sdbayes.posterior.tail_errors`)."""

_LIGHT = 2.0 / 3.0  # Var(time-averaged others) / B of an infinite-server queue, fixed lives


class Spread(NamedTuple):
    """What a request's metrics are made of at one operating point, each of its shape [s]."""

    latency: Array  # mean end-to-end latency; +inf past saturation
    prefill: Array  # the TTFT of a request admitted at once
    idle: Array  # probability that an arrival finds the engine idle (no wait)
    wait: Array  # mean wait for a step boundary of an arrival that finds it busy
    wait_cv2: Array  # that wait's squared coefficient of variation
    decode: Array  # mean time from first token to last
    decode_var: Array  # its variance [s^2] at the mean output length: acceptance and load
    length_var: Array  # what the spread of output lengths adds to it [s^2]
    output_len: Array  # mean tokens emitted [tokens]
    arriving: Array  # an open loop's burst_delay of a 1 s window [s]; 0 on a closed one

    @property
    def ttft(self) -> Array:
        """Mean time to first token, the model's :func:`sdbayes.ttft`."""
        return self.prefill + (1.0 - self.idle) * self.wait

    def mean(self, metric: str) -> Array:
        """The mean over requests of ``metric`` ("e2e", "ttft" or "tpot") [s]."""
        if metric == "tpot":
            return self.decode / jnp.maximum(self.output_len - 1.0, 1.0)
        return {"e2e": self.latency, "ttft": self.ttft}[metric]

    @property
    def wait_var(self) -> Array:
        """Variance of the wait for a step boundary over all arrivals [s^2]."""
        busy = 1.0 - self.idle
        return busy * self.wait**2 * (1.0 + self.wait_cv2) - (busy * self.wait) ** 2


def spread(coef: Coefficients, *, k, alpha, output_len, rate=None, concurrency=None,
           closed=None, arrival_cv2: ArrayLike = POISSON, output_len_sd: ArrayLike = 0.0,
           arrival_excess: ArrayLike = 0.0, variant: str | Variant = "paper") -> Spread:
    """The :class:`Spread` of an operating point, from one solve of the mean-value model.

    Arguments as :func:`percentile` (``closed`` picks per point where both loads are given,
    as in :func:`sdbayes.model.metrics`). Not jit-compiled itself.
    """
    variant = as_variant(variant)
    # One shape for every argument: the draws' axes meet the points' explicitly.
    given = [x for x in (k, output_len, rate, concurrency, closed, arrival_cv2, output_len_sd,
                         *coef) if x is not None]
    if not isinstance(alpha, PositionRates):
        given.append(alpha)
    shape = jnp.broadcast_shapes(*(jnp.shape(x) for x in given))

    def full(x):
        return None if x is None else jnp.broadcast_to(x, shape)

    coef = Coefficients(*(full(f) for f in coef))
    k, output_len, rate, concurrency, closed, arrival_cv2, output_len_sd = (
        full(x) for x in (k, output_len, rate, concurrency, closed, arrival_cv2,
                          output_len_sd))
    if not isinstance(alpha, PositionRates):
        alpha = full(alpha)
    d, total, others, stable, mean_wait = _solve(coef, k, alpha, output_len, rate,
                                                 concurrency, variant, closed)
    dtype = total.dtype
    e = tokens_per_step(k, alpha)
    var_x = tokens_second_moment(k, alpha, e) - e**2
    g = jnp.asarray(output_len, dtype)
    cycles = g / e + _wasted_cycles(k, alpha, e, variant.form)
    cycles_var = g * var_x / e**3

    finite = jnp.where(stable, total, 0.0)
    others = jnp.asarray(others, dtype)
    c2p = jnp.asarray(coef.c2p, dtype)
    if rate is None:
        throughput = jnp.asarray(concurrency, dtype) / jnp.where(stable, total, 1.0)
    else:
        throughput = jnp.asarray(rate, dtype)
        if concurrency is not None:
            closed = jnp.asarray(closed, bool)
            throughput = jnp.where(closed, jnp.asarray(concurrency, dtype)
                                   / jnp.where(stable, total, 1.0), throughput)
    busy = -jnp.expm1(-others)
    some = busy > 1e-12
    wait = jnp.where(some, mean_wait / jnp.where(some, busy, 1.0), 0.0)
    wait_cv2 = _residual_cv2(wait, throughput, c2p)

    decode = finite - (d.independent.prefill + mean_wait)
    tau = decode / cycles
    marginal = _marginal_demand(coef, d, others, variant)
    utilisation = jnp.clip(throughput * marginal, 0.0, 1.0 - 1e-6)
    load_var = marginal**2 * others * (
        jnp.asarray(arrival_cv2, dtype) * (_LIGHT + utilisation) / (1.0 - utilisation)
        + jnp.asarray(arrival_excess, dtype) * _LIGHT)
    arriving = burst_delay(c2p, throughput, 1.0)
    if rate is None:
        load_var, arriving = jnp.zeros_like(load_var), jnp.zeros_like(arriving)
    elif concurrency is not None:
        load_var, arriving = jnp.where(closed, 0.0, load_var), jnp.where(closed, 0.0, arriving)
    decode_var = tau**2 * cycles_var + load_var
    length_var = (tau * jnp.asarray(output_len_sd, dtype) / e) ** 2  # C ~ g / E per request
    return Spread(total, d.independent.prefill, 1.0 - busy, wait, wait_cv2,
                  jnp.where(stable, decode, jnp.inf), decode_var, length_var, g, arriving)


def _residual_cv2(wait, throughput, c2p):
    """Squared CV of the wait for the end of the period in progress, whose mean is ``wait``.

    A period is one decode step ``s`` plus ``c2p`` for each of the ``A ~ Poisson(m)``
    requests admitted at its start, ``m = throughput * E[S]``. An arrival waits the residual
    life ``R`` of its period: ``E[R] = E[S^2] / (2 E[S])``, ``E[R^2] = E[S^3] / (3 E[S])``.
    Only the ratio is used; ``s`` is set so that ``E[R]`` is the model's mean wait.
    """
    stretch = jnp.maximum(1.0 - throughput * c2p, 1e-12)
    # The step without stalls, from the model's mean wait (sdbayes.model._boundary_wait).
    s = jnp.maximum(2.0 * stretch * (wait - throughput * c2p**2 / 2.0), 0.0)
    m = throughput * s / stretch
    s1 = s + c2p * m
    s2 = c2p**2 * m + s1**2
    s3 = (s**3 + 3.0 * s**2 * c2p * m + 3.0 * s * c2p**2 * (m + m**2)
          + c2p**3 * (m + 3.0 * m**2 + m**3))
    positive = s1 > 0
    s1 = jnp.where(positive, s1, 1.0)
    r1, r2 = s2 / (2.0 * s1), s3 / (3.0 * s1)
    return jnp.where(positive, r2 / jnp.where(positive, r1, 1.0) ** 2 - 1.0, 1.0 / 3.0)


def _gamma_quantile(mean, var, z):
    """Quantile at standard-normal score ``z`` of a gamma with this mean and variance
    (Wilson-Hilferty); the mean itself where the variance is 0, +inf where the mean is."""
    finite = jnp.isfinite(mean) & (mean > 0)
    m = jnp.where(finite, mean, 1.0)
    shape = m**2 / jnp.maximum(jnp.where(finite, var, 0.0), 1e-12 * m**2)
    cube = jnp.maximum(1.0 - 1.0 / (9.0 * shape) + z / (3.0 * jnp.sqrt(shape)), 0.0) ** 3
    return jnp.where(finite, m * cube, mean)


def quantile(s: Spread, q: ArrayLike, metric: str, scale: ArrayLike | None = None,
             window: ArrayLike | None = None) -> Array:
    """The ``q``-quantile [s] of ``metric`` ("e2e", "ttft" or "tpot") per request at the
    operating point whose :class:`Spread` is ``s``; ``q`` in (0, 1), broadcasting. With
    ``scale``, its log ratio to the mean is scaled by that much, and with ``window`` [s]
    the :func:`burst_delay` of that window is added (open loops), as a fit calibrated them
    (:meth:`sdbayes.Posterior.tail_error`)."""
    value = _quantile(s, q, metric)
    if scale is not None:
        mean = s.mean(metric)
        proper = jnp.isfinite(value) & (mean > 0) & (value > 0)
        ratio = jnp.where(proper, value, 1.0) / jnp.where(proper, mean, 1.0)
        value = jnp.where(proper, mean * ratio ** jnp.asarray(scale, value.dtype), value)
    if window is None:
        return value
    return value + per_metric(jnp.asarray(window) * s.arriving, metric, s.output_len)


def burst_delay(c2p: ArrayLike, rate: ArrayLike, window: ArrayLike) -> Array:
    """What a burst of arrivals adds to the slowest requests' latency [s]: the prefills,
    ``c2p`` each, of the ``rate * window`` requests that arrive within ``window`` seconds.

    The source study's measured tails need it (``bench/real_data.py``): at the same load, a
    curve of short requests (acceptance 1, k = 10) has a p99 2-2.5x its mean where the model
    places 1.3x, and the gap grows with the request rate, about ``rate`` times the prefill
    cost times 1 s, on all three model sizes: the client releases requests in bursts, or
    the engine stalls and admits a backlog at once. Not a mechanism of the model; a fit
    measures ``window`` on its points' percentiles (:func:`sdbayes.posterior.tail_errors`).
    A closed loop (rate 0) has none.
    """
    return jnp.asarray(window) * jnp.asarray(rate) * jnp.asarray(c2p)


def error_sd(sd: ArrayLike, burst_sd: ArrayLike, c2p: ArrayLike, rate: ArrayLike,
             mean: ArrayLike, metric: str, output_len: ArrayLike) -> Array:
    """The sd of the tail model's error (log) on a percentile of ``metric`` at a point, as
    a fit measured it (:class:`sdbayes.posterior.TailError`): ``sd``, and ``burst_sd`` per
    unit of the burst's share, a second's :func:`burst_delay` over the metric's ``mean``
    [s] (0 on a closed loop, ``rate`` 0). Broadcasting."""
    mean = jnp.asarray(mean)
    proper = jnp.isfinite(mean) & (mean > 0)
    share = jnp.where(proper, per_metric(burst_delay(c2p, rate, 1.0), metric, output_len)
                      / jnp.where(proper, mean, 1.0), 0.0)
    return jnp.sqrt(jnp.asarray(sd) ** 2 + (jnp.asarray(burst_sd) * share) ** 2)


def per_metric(delay: ArrayLike, metric: str, output_len: ArrayLike) -> Array:
    """A delay [s] of a request's whole latency as ``metric`` counts it: all of it in e2e and
    TTFT, spread over the ``output_len - 1`` tokens after the first in TPOT."""
    if metric == "tpot":
        return delay / jnp.maximum(jnp.asarray(output_len) - 1.0, 1.0)
    return jnp.asarray(delay)


def _quantile(s: Spread, q: ArrayLike, metric: str) -> Array:
    """:func:`quantile` as the model places it."""
    q = jnp.asarray(q, s.latency.dtype)
    if metric == "e2e":
        return _gamma_quantile(s.latency, s.decode_var + s.length_var + s.wait_var, ndtri(q))
    if metric == "ttft":
        busy = 1.0 - s.idle
        waits = q > s.idle
        p = jnp.clip((q - s.idle) / jnp.where(busy > 0, busy, 1.0), 1e-9, 1.0 - 1e-9)
        tail = _gamma_quantile(s.wait, s.wait**2 * s.wait_cv2, ndtri(p))
        first = s.prefill + jnp.where(waits, tail, 0.0)
        return jnp.where(jnp.isfinite(s.latency), first, jnp.inf)
    if metric == "tpot":
        after_first = s.output_len - 1.0
        several = after_first > 0
        decode = _gamma_quantile(s.decode, s.decode_var, ndtri(q))
        return jnp.where(several, decode / jnp.where(several, after_first, 1.0), 0.0)
    raise ValueError(f"metric must be one of ('e2e', 'ttft', 'tpot'), got {metric!r}")


@partial(jax.jit, static_argnames=("metric", "variant", "experts", "top_m"))
def percentile(
    coef: Coefficients,
    *,
    q: ArrayLike,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    metric: str = "e2e",
    arrival_cv2: ArrayLike = POISSON,
    output_len_sd: ArrayLike = 0.0,
    arrival_excess: ArrayLike = 0.0,
    prompt_len: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """The ``q``-quantile over requests of end-to-end latency, TTFT or TPOT [s].

    What makes one request slower than another at the same operating point: its own
    acceptance draws, its output length, the load it meets and its wait for a step
    boundary (module docstring). Every output token counts as emitted by a cycle.

    Args:
      coef: cost coefficients [s].
      q: the quantile, in (0, 1) (0.99 for p99), broadcasting with the point.
      k, alpha, output_len, rate, concurrency, prompt_len, variant, experts, top_m: the
        operating point, as for :func:`sdbayes.latency`.
      metric: "e2e", "ttft" or "tpot" (static).
      arrival_cv2: squared coefficient of variation of the inter-arrival times of an open
        loop: 1 for Poisson arrivals (:data:`POISSON`), 0 for evenly spaced ones,
        ``1 / burstiness`` for ``vllm bench serve``'s gamma arrivals.
      output_len_sd: standard deviation of the requests' output lengths [tokens] about
        ``output_len``, their mean; 0 when every request emits the same number (``vllm
        bench serve --random-output-len`` with ``--ignore-eos``). It widens e2e, not TPOT.
      arrival_excess: how much more the load fluctuates than the arrivals' spacing says,
        as a fit measured it (:attr:`sdbayes.Posterior.arrival_excess`); 0 by default.

    Returns:
      Seconds, the broadcast shape of the arguments; ``+inf`` past saturation.
    """
    del prompt_len
    s = spread(coef, k=k, alpha=alpha, output_len=output_len, rate=rate,
               concurrency=concurrency, arrival_cv2=arrival_cv2, output_len_sd=output_len_sd,
               arrival_excess=arrival_excess, variant=as_variant(variant, experts, top_m))
    return quantile(s, q, metric)


_NEAR_SATURATION = 0.95  # of the saturation rate: where a finite run's tail shape is taken


@partial(jax.jit, static_argnames="variant")
def relative(coef: Coefficients, q: ArrayLike, *, k, alpha, output_len, rate, concurrency,
             closed, arrival_cv2, output_len_sd, arrival_excess=0.0,
             variant: str | Variant = "paper") -> dict[str, tuple]:
    """Each metric's quantiles relative to its mean, for scaling another model's means.

    :meth:`sdbayes.Posterior.predict` multiplies the means of its observation model
    (discrepancies, finite runs) by these. An open loop past 95% of saturation, which a
    finite run can measure, takes its shape from 95%.

    Args:
      coef: coefficient draws, fields of shape [D, R].
      q: quantiles, shape [Q].
      k, alpha, output_len, rate, concurrency, closed, arrival_cv2, output_len_sd: the
        rows, shape [R]; arrival_excess: a scalar (:func:`percentile`)
        (``rate`` 0 on closed rows, ``concurrency`` 1 on open ones).
      variant: model variant (static).

    Returns:
      ``{metric: (ratio, cv)}`` for "e2e", "ttft", "tpot": ``ratio`` of shape [Q, D, R],
      the quantile over the mean (1 where the mean is 0), and ``cv`` of shape [D, R], the
      metric's coefficient of variation over requests.
    """
    point = dict(k=k, alpha=alpha, output_len=output_len, variant=variant)
    limit = _NEAR_SATURATION * saturation_rate(coef, **point)
    s = spread(coef, rate=jnp.minimum(jnp.broadcast_to(rate, limit.shape), limit),
               concurrency=concurrency, closed=closed, arrival_cv2=arrival_cv2,
               output_len_sd=output_len_sd, arrival_excess=arrival_excess, **point)
    qs = jnp.asarray(q)[:, None, None]
    leading = Spread(*(f[None] for f in s))  # [1, D, R], against the quantiles [Q, 1, 1]
    after_first = jnp.maximum(s.output_len - 1.0, 1.0)
    variances = {"e2e": s.decode_var + s.length_var + s.wait_var, "ttft": s.wait_var,
                 "tpot": s.decode_var / after_first**2}
    out = {}
    for metric, var in variances.items():
        mean = s.mean(metric)
        positive = mean > 0
        safe = jnp.where(positive, mean, 1.0)
        ratio = jnp.where(positive[None], quantile(leading, qs, metric) / safe[None], 1.0)
        out[metric] = (ratio, jnp.where(positive, jnp.sqrt(jnp.maximum(var, 0.0)) / safe, 0.0))
    return out
