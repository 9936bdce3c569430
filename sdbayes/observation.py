"""The observation model: what a trace row reports, and how far a measurement strays from it.

Fitting (the likelihood of :func:`sdbayes.likelihood.model`) and prediction
(:meth:`sdbayes.Posterior.predict`) both go through the functions here, so the two cannot
drift apart:

- :func:`configured`: a configuration's coefficients, the group's scaled by its
  discrepancy (``C1`` and ``C2`` times ``exp(delta * discrepancy)``);
- :func:`forward`: the mean each row reports, and its sensitivity to a small error in
  ``C2``. A closed loop (``concurrency``) and an open loop without a run length report the
  steady means of :mod:`sdbayes.model`. An open loop with a run length (``duration_s``)
  reports what that run completes (:mod:`sdbayes.fluid`): finite even past
  saturation, and below the steady mean near it;
- :func:`spread` and :func:`noise`: the relative error of a measured mean, on the log scale.

**Finite runs, cheaply.** The fluid model of a run is a scan over its length, a hundred
times the cost of a steady solve and too slow inside NUTS (2.7 ms against 20 us a gradient
for 150 rows). A run's mean is instead read from the steady relation of the latency model,
the latency with ``B`` others in flight (:func:`sdbayes.model.at_load`), at an *effective*
``B``: the one at which it gives the run's mean. ``log B_eff`` is a smooth function of the
offered load ``u = log(rate / saturation_rate)`` and of ``log C1``, which
:func:`effective_loads` tabulates per row from the exact fluid model about an anchor (a
pilot fit's median when fitting, the posterior median when predicting), scaling ``C2`` so
that ``u`` spans the posterior and ``C1`` by 10% either way; a second table does the same
for the run's mean TTFT. Read back through the steady relation, the run's mean keeps its
exact dependence on every coefficient at a given ``B`` and follows the run's own
dependence on load and on ``C1``. It is exact at the table's nodes and within 1% of the
fluid model about them; the filling form's shape terms, which the tables hold at the
anchor's, move it by up to 0.4% per 1% change near capacity
(``tests/test_observation.py``). The steady relation grows without bound in ``B``, so past
saturation the mean stays finite, as the run's does.

**Discrepancy in load.** The mean-value forms are approximations whose error grows with
the load (docs/model.md section 1); an open loop's number in flight fluctuates, a closed loop's
does not. Open loops' log latencies move by ``S_i * eta(q_i)``: ``eta`` a smooth function,
per group, of the load-dependent share of latency ``q = (L - C1) / L`` (a Gaussian process,
:class:`LoadError`), a relative error in ``C2`` that the queue amplifies as it does any
(``S_i``, below). Learned from the loads a fit sees, it reverts to its prior beyond them,
so intervals widen where the fit extrapolates in load.

**Noise.** A measured mean ``y_i`` differs from the forward model's ``m_i`` on the log scale
by a normal (or Student-t) error of standard deviation

    s_i = sqrt(sigma**2 + (tau_q * S_i)**2 + (se_i / y_i)**2),

``sigma`` the metric's relative error at light load, ``se_i`` the row's standard error, and
``S_i = d log m_i / d log C2`` the row's sensitivity to its load-dependent demand: each run
has its own small error in capacity (a relative ``tau_q``), which near saturation the queue
amplifies (``S = x / (1 - x)`` for the paper's open loop at ``x`` of saturation; under 1 for
a closed loop; bounded for a finite run, whose backlog has no time to grow without bound).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import gammaln

from sdbayes.fluid import finite_run
from sdbayes.model import (
    Coefficients,
    Variant,
    _demands,
    _full_batch_demand,
    _marginal_demand,
    as_variant,
    at_load,
    metrics,
    saturation_rate,
)

LIKELIHOODS = ("lognormal", "student_t")
STUDENT_DF = 4.0  # even: :func:`standard_noise` draws it from uniforms
NODES = 17
"""Nodes of each row's effective-load table."""
FIT_SPAN, FIT_C1_SPAN = 0.3, 0.1
"""Half-widths of the fit's tables: C2 within a factor exp(0.3) = 1.35 of the anchor's, C1
within exp(0.1) = 1.1 (and as much again by extrapolation)."""
_SATURATED = 1e30  # [s]: a finite stand-in for a steady mean past saturation
_BISECTIONS = 48
_FEWEST = 1e-6  # others in flight: the table's floor, as its log is tabulated


class Observation(NamedTuple):
    """What the forward model predicts a row reports, each of shape [..., n]."""

    e2e: jax.Array  # mean end-to-end latency [s]; +inf for a steady mean past saturation
    ttft: jax.Array  # mean time to first token [s]
    tpot: jax.Array  # mean time per output token after the first [s]
    sensitivity: jax.Array  # d log e2e / d log C2 [1]; 0 past saturation
    share: jax.Array  # load-dependent share of the latency, (L - C1) / L, before load_error

    def mean(self, metric: str) -> jax.Array:
        return getattr(self, metric)


class LoadError(NamedTuple):
    """A group's discrepancy of open loops in load, a smooth function ``eta(q)`` of the
    load-dependent share of latency ``q = (L - C1) / L`` in [0, 1): a Gaussian process of
    squared-exponential covariance (length :data:`LOAD_LENGTH` in ``q``) in the
    Hilbert-space basis of :data:`LOAD_BASIS` functions on ``[-0.5, 1.5]`` (Riutort-Mayol et
    al., 2023), ``scale`` times the ``weights`` (multivariate Student-t, :data:`LOAD_DF`, in
    fits; standard normal in those made before), each basis function less
    its ``offset``: a fit sets the offsets so that ``eta`` has no level over the loads it
    sees (:func:`load_offsets`), as a level is a change of ``C2``, the coefficients' part.
    Fields broadcast against the rows: scale [..., 1], weights and offset [..., n,
    LOAD_BASIS] or [LOAD_BASIS]."""

    weights: jax.Array
    scale: jax.Array
    offset: jax.Array | float = 0.0


class EffectiveLoads(NamedTuple):
    """Per-row tables of a finite run's effective load, from :func:`effective_loads`.

    Rows that are no finite run (closed loops, open loops without a run length) have
    ``run`` false and placeholder tables. For row ``i``, metric ``e`` (0: latency, 1: TTFT),
    slice ``a`` (of 3) and node ``j`` (of :data:`NODES`), ``log_others[i, e, a, j]`` is the
    log of the others in flight at which the steady relation gives the run's mean of that
    metric, when the offered load is ``u = start[i] + j * step[i]`` and ``C1`` is
    ``exp((a - 1) * c1_step[i])`` times the anchor's ``exp(log_c1[i])``; ``slope`` is its
    derivative in ``u``.
    """

    run: np.ndarray  # bool [n]
    start: np.ndarray  # [n]
    step: np.ndarray  # [n]
    log_c1: np.ndarray  # [n]
    c1_step: np.ndarray  # [n]
    log_others: np.ndarray  # [n, 2, 3, NODES]
    slope: np.ndarray  # [n, 2, 3, NODES]


def configured(coef: Coefficients, delta, discrepancy) -> Coefficients:
    """A configuration's coefficients: every load-independent term (``c1*``) times
    ``exp(delta[..., 0] * discrepancy[..., 0])``, every load-dependent one (``c2*``) times
    ``exp(delta[..., 1] * discrepancy[..., 1])``.

    Args:
      coef: the group's coefficients; fields broadcast with ``delta[..., 0]``.
      delta: standardised discrepancies, shape [..., 2].
      discrepancy: their standard deviations, shape [..., 2], broadcasting with ``delta``.
    """
    scale = jnp.exp(jnp.asarray(delta) * jnp.asarray(discrepancy))
    return scale_demands(coef, scale[..., 0], scale[..., 1])


def scale_demands(coef: Coefficients, c1_scale, c2_scale) -> Coefficients:
    """Coefficients with every load-independent term (``c1*``) times ``c1_scale`` and every
    load-dependent one (``c2*``) times ``c2_scale``: ``C1`` and ``C2`` scaled."""
    return coef._replace(**{name: getattr(coef, name) * (c1_scale if name.startswith("c1")
                                                         else c2_scale)
                            for name in Coefficients._fields if name[:2] in ("c1", "c2")})


def forward(coef: Coefficients, points, variant: str | Variant,
            loads: EffectiveLoads | None = None,
            load_error: LoadError | None = None) -> Observation:
    """The means each row reports and their sensitivity to ``C2`` (module docstring).

    Args:
      coef: cost coefficients [s]; fields scalars, [n] or [..., n].
      points: :class:`sdbayes.points.Points` of n rows.
      variant: the latency model's variant.
      loads: the rows' effective-load tables (:func:`effective_loads`); without them
        every row is steady.
      load_error: the open loops' discrepancy in load; each open loop's log latency moves
        by its sensitivity times ``eta(q)``, a relative error in ``C2`` at its load.

    Returns:
      :class:`Observation`, fields of the broadcast shape of ``coef`` and [n].
    """
    variant = as_variant(variant)
    closed = points.closed
    open_rate = jnp.where(closed, 0.0, points.rate)  # a closed loop has none feeding back
    point = dict(k=points.k, alpha=points.alpha, output_len=points.output_len)
    m = metrics(coef, **point, rate=open_rate,
                concurrency=jnp.where(closed, points.concurrency, 1.0), closed=closed,
                variant=variant)
    sensitivity = steady_sensitivity(m, open_rate)
    alone = jnp.broadcast_to(m.alone, jnp.shape(sensitivity))
    e2e, ttft, tpot = m.latency, m.ttft, m.tpot
    batch = jnp.shape(e2e)  # coefficient draws [...] by rows [n]: broadcast explicitly

    def wide(x):
        return jnp.broadcast_to(jnp.asarray(x), batch)

    open_rate, closed = wide(open_rate), wide(closed)
    if loads is not None:
        run = wide(loads.run)
        k, alpha, output_len = wide(points.k), wide(points.alpha), wide(points.output_len)
        full = _demands(coef, k, alpha, output_len, 1.0, variant.form)
        capacity = 1.0 / _full_batch_demand(coef, full, variant.form)
        offered = jnp.log(jnp.where(run, open_rate, 1.0) / capacity)
        log_c1 = jnp.log(full.independent.total)
        log_others, slope = _interpolate(loads, offered, log_c1, 0)
        others = jnp.exp(log_others)
        admissions = jnp.where(run, open_rate, 0.0)
        latency = at_load(coef, k, alpha, output_len, others, admissions, variant, full)[0]
        first = at_load(coef, k, alpha, output_len,
                        jnp.exp(_interpolate(loads, offered, log_c1, 1)[0]), admissions,
                        variant, full)[1]
        marginal = _marginal_demand(coef, full, others, variant)
        # With B others in flight, d log L / d log C2 is the load-dependent share of L plus
        # what the run's own B_eff(u) adds: d log L / d log B = B * marginal / L, times
        # d log B / du, and du / d log C2 = 1.
        run_sensitivity = ((latency - full.independent.total) / latency
                           + others * marginal / latency * slope)
        e2e = jnp.where(run, latency, e2e)
        ttft = jnp.where(run, first, ttft)
        tpot = jnp.where(run, per_token(latency, first, output_len), tpot)
        sensitivity = jnp.where(run, run_sensitivity, sensitivity)
        alone = jnp.where(run, full.independent.total, alone)
    finite = jnp.isfinite(e2e)
    share = load_share(e2e, alone)
    if load_error is not None:
        shift = jnp.where(closed, 0.0, shift_in_load(load_error, sensitivity, share))
        # Double `where`: the product's untaken branch stays finite, its gradient 0.
        e2e = jnp.where(finite, jnp.where(finite, e2e, 1.0) * jnp.exp(shift), e2e)
        tpot = jnp.where(finite, per_token(e2e, ttft, wide(points.output_len)), tpot)
    return Observation(e2e, ttft, tpot, sensitivity, share)


def steady_sensitivity(m, open_rate):
    """``d log L / d log C2`` of the steady latency of :class:`sdbayes.model.Metrics`
    ``m`` at open-loop arrival rates ``open_rate`` (0 for a closed loop); 0 where saturated.

    It is ``(L - C1) / (L * (1 - rate * marginal))``, marginal what one more request in
    flight adds: x / (1 - x) for the paper's open loop, growing without bound towards
    saturation; (L - C1) / L < 1 for a closed loop, which has no rate feeding back. (The
    stepped form's boundary waits, a few percent of L, are left out.)
    """
    stable = jnp.isfinite(m.latency)
    rate, marginal, alone, total = jnp.broadcast_arrays(
        jnp.asarray(open_rate), m.marginal, m.alone, jnp.where(stable, m.latency, 1.0))
    room = jnp.where(stable, 1.0 - rate * marginal, 1.0)
    return jnp.where(stable, (total - alone) / (total * room), 0.0)


def load_share(latency, alone):
    """The load-dependent share ``q = (L - C1) / L`` in [0, 1] of latencies ``L`` whose
    load-independent part is ``alone`` (a placeholder where ``L`` is infinite)."""
    finite = jnp.isfinite(latency)
    return jnp.clip(1.0 - alone / jnp.where(finite, latency, 1.0), 0.0, 1.0)


def shift_in_load(error: LoadError, sensitivity, share):
    """The log latency's move by the discrepancy in load: ``sensitivity * eta(share)``.

    Held within a factor of e^3 either way: far from the data (a sampler's first steps,
    draws near saturation) a product of two large numbers would overflow.
    """
    return jnp.clip(sensitivity * discrepancy_in_load(error, share), -3.0, 3.0)


LOAD_BASIS = 16
"""Basis functions of the open loops' discrepancy in load (:class:`LoadError`)."""
LOAD_LENGTH = 0.3
"""Length scale of the discrepancy in load, in the load-dependent share ``q``. A sweep
measures some 8 to 10 loads over ``q`` in [0, 0.8]: a length below their spacing (0.1)
could not be learned from them, one above 0.5 makes a near-straight line, which the
coefficients already are. 0.3 lets it follow one bend between the loads measured and
revert to its prior a third of the range beyond them. It is fixed, not sampled: with the
length free as well, NUTS met 200 divergent transitions in 1,000 draws on the source
study's sweeps (none with it fixed)."""
_LOAD_CENTRE, _LOAD_HALF_WIDTH = 0.5, 1.0  # the basis lives on [-0.5, 1.5], q on [0, 1]
# Basis function m (from 1) is sin(m * angle), angle = _LOAD_FREQUENCY * (q + 0.5), times
# the square root of the squared-exponential kernel's spectral density at its frequency.
_LOAD_FREQUENCY = np.pi / (2 * _LOAD_HALF_WIDTH)
_LOAD_SPECTRAL = np.sqrt(np.sqrt(2 * np.pi) * LOAD_LENGTH * np.exp(
    -0.5 * (LOAD_LENGTH * _LOAD_FREQUENCY * np.arange(1, LOAD_BASIS + 1)) ** 2))
LOAD_DF = 10.0
"""Degrees of freedom of the discrepancy in load's weights, which are multivariate
Student-t: standard-normal weights times an amplitude whose square has an inverse-gamma
prior, with the amplitude integrated out. Sampled, the amplitude (then HalfNormal) made a
funnel with the non-centred weights: where the data pin ``eta``, the weights' width goes as
one over it (109 divergent transitions in 4,000 draws of ``bench/fit.py``'s traces; none
integrated out). The data still set how far ``eta`` strays, through the shared tail. 4
degrees of freedom did as well but doubled the leapfrog steps on the 0.6B sweeps (252 a
draw, against 128 with 10 and 100 sampled)."""


class _IsotropicStudentT(dist.Distribution):
    """A multivariate Student-t with zero location and identity scale, event shape
    [size]: ``MultivariateStudentT(df, 0, I)``'s law without its triangular solves and
    log-determinant, which the sampler's every gradient would pay for an identity."""

    support = dist.constraints.real_vector

    def __init__(self, df: float, size: int):
        self.df = df
        super().__init__(batch_shape=(), event_shape=(size,))

    def sample(self, key, sample_shape=()):
        return sample_load_weights(key, sample_shape + self.event_shape, self.df)

    def log_prob(self, value):
        nu, k = self.df, self.event_shape[0]
        norm = gammaln((nu + k) / 2) - gammaln(nu / 2) - k / 2 * np.log(nu * np.pi)
        return norm - (nu + k) / 2 * jnp.log1p(jnp.sum(value**2, axis=-1) / nu)


def load_weights_prior() -> dist.Distribution:
    """The prior of one group's weights of the discrepancy in load: a multivariate
    Student-t of :data:`LOAD_DF` degrees of freedom, identity scale, event shape
    [LOAD_BASIS]."""
    return _IsotropicStudentT(LOAD_DF, LOAD_BASIS)


def sample_load_weights(key, shape: tuple[int, ...], df: float = LOAD_DF) -> jax.Array:
    """Draws of :func:`load_weights_prior` of shape ``shape`` (the last axis
    :data:`LOAD_BASIS`): normal weights over the square root of a shared chi-square over
    its ``df`` degrees of freedom, every shape explicit."""
    normal_key, gamma_key = jax.random.split(key)
    spread = jax.random.gamma(gamma_key, df / 2, shape[:-1] + (1,)) / (df / 2)
    return jax.random.normal(normal_key, shape) / jnp.sqrt(spread)


def load_scale(sd: float) -> float:
    """The weights' scale that gives ``eta`` a prior sd of ``sd`` at any load: a Student-t
    of ``LOAD_DF`` degrees of freedom has variance ``LOAD_DF / (LOAD_DF - 2)``."""
    return sd * float(np.sqrt((LOAD_DF - 2.0) / LOAD_DF))


def discrepancy_in_load(error: LoadError, share):
    """``eta(q)`` at load-dependent shares ``q`` [..., n] (:class:`LoadError`).

    Two paths, one value (up to rounding):
    - one set of weights [LOAD_BASIS] for every row (a fit of one group): the
      :func:`load_basis` matrix [..., n, LOAD_BASIS] times the weights, whose gradient is
      one matrix product;
    - weights per row or draw (prediction, fleets): each basis function is a sine of a
      multiple of one angle, so the weighted sum runs Clenshaw's recurrence. One sine and
      one cosine a row serve all :data:`LOAD_BASIS` of them, and no [..., n, LOAD_BASIS]
      array is built (prediction over millions of draws x rows spent most of its time in
      those sines).
    """
    weights, offset = jnp.asarray(error.weights), jnp.asarray(error.offset)
    if weights.ndim == 1 and offset.ndim <= 1:
        # One set of weights for every row (a fit of one group): a product with the basis
        # matrix. The recurrence's gradient runs a reduction over the rows for each of
        # the LOAD_BASIS weights, a kernel each; this way a fit's gradient costs 10-20%
        # less (416 -> 370 us, median of 3, on bench/peers.py's 8B data).
        level = jnp.sum(offset * weights)
        product = jnp.matmul(load_basis(share), weights, precision=jax.lax.Precision.HIGHEST)
        return error.scale * (product - level)
    shape = jnp.broadcast_shapes(jnp.shape(share), weights.shape[:-1], offset.shape[:-1])
    angle = _LOAD_FREQUENCY * (jnp.broadcast_to(share, shape) - _LOAD_CENTRE
                               + _LOAD_HALF_WIDTH)
    amplitude = _LOAD_SPECTRAL / np.sqrt(_LOAD_HALF_WIDTH)

    def basis_slice(x, m):  # function m's slice of weights or offsets, [..., n]
        return jnp.broadcast_to(x if x.ndim == 0 else x[..., m], shape)

    # Slices, not a sum over the last axis: where the weights are gathered per row from
    # per-group ones, XLA then gathers each slice alone, never the [..., n, M] array.
    two_cos = 2.0 * jnp.cos(angle)
    later = latest = level = jnp.zeros(shape)  # b_{m+2}, b_{m+1}, sum of offsets
    for m in reversed(range(LOAD_BASIS)):
        w = basis_slice(weights, m)
        later, latest = latest, amplitude[m] * w + two_cos * latest - later
        level = level + basis_slice(offset, m) * w
    total = latest * jnp.sin(angle) - level
    return jnp.broadcast_to(error.scale, shape) * total


def load_basis(share):
    """The discrepancy in load's basis functions, each times the square root of its
    spectral density, at shares ``q`` [..., n]: shape [..., n, LOAD_BASIS]."""
    angle = _LOAD_FREQUENCY * (jnp.asarray(share) - _LOAD_CENTRE + _LOAD_HALF_WIDTH)
    # sin(m a) by the recurrence s_m = 2 cos(a) s_(m-1) - s_(m-2): one sine and one cosine
    # a row, not LOAD_BASIS of each (16 sines a row took 50 us of a fit's gradient).
    two_cos, sines = 2.0 * jnp.cos(angle), [jnp.zeros_like(angle), jnp.sin(angle)]
    for _ in range(LOAD_BASIS - 1):
        sines.append(two_cos * sines[-1] - sines[-2])
    return jnp.stack(sines[1:], axis=-1) * (_LOAD_SPECTRAL / np.sqrt(_LOAD_HALF_WIDTH))


def load_offsets(anchor: Observation, points, n_groups: int) -> np.ndarray:
    """Each group's basis offsets (:class:`LoadError`) that leave the discrepancy in load
    no level over the group's open loops, as the anchor's coefficients see them: shape
    [n_groups, LOAD_BASIS].

    A constant ``eta`` moves each open loop's log latency by ``S_i * eta``, what the same
    relative change of ``C2`` does: the coefficients and ``eta``'s level would trade off
    along a ridge that only ``eta``'s prior bounds, where NUTS needs hundreds of steps a
    draw and its chains do not mix (the source study's 0.6B sweeps without throughput runs,
    before this and the configuration discrepancies' projection: R-hat 1.35, ESS 5).
    Each offset is its basis function's mean over those rows, weighted by ``S_i**2`` (the
    least-squares projection of ``S * phi`` on ``S``), so that ``S * eta`` is orthogonal
    to ``S``. A group without open loops keeps offsets 0.

    Args:
      anchor: :func:`forward` at the anchor's coefficients, without a load error; fields
        [n].
      points: the fitted rows (:class:`sdbayes.points.Points`).
      n_groups: the number of groups.
    """
    weight = np.where(~np.asarray(points.closed) & np.isfinite(np.asarray(anchor.e2e)),
                      np.asarray(anchor.sensitivity, float) ** 2, 0.0)  # [n]
    basis = np.asarray(load_basis(np.asarray(anchor.share, float)))  # [n, M]
    offsets = np.zeros((n_groups, LOAD_BASIS))
    for g in range(n_groups):
        w = np.where(np.asarray(points.group) == g, weight, 0.0)
        if w.sum() > 0:
            offsets[g] = w @ basis / w.sum()
    return offsets


def per_token(latency, first, output_len):
    """TPOT from latency and TTFT: (L - TTFT) / (g - 1), 0 where g <= 1."""
    after_first = jnp.asarray(output_len) - 1.0
    several = after_first > 0
    return jnp.where(several, (latency - first) / jnp.where(several, after_first, 1.0), 0.0)


def spread(sigma, tau_q, sensitivity, relative_se=0.0):
    """Standard deviation of a measured mean's log about the forward model's (module
    docstring); arguments broadcast."""
    return jnp.sqrt(sigma**2 + (tau_q * sensitivity) ** 2 + jnp.asarray(relative_se) ** 2)


def noise(likelihood: str, loc, scale) -> dist.Distribution:
    """The distribution of a measured mean's log: normal (``"lognormal"``) or Student-t with
    :data:`STUDENT_DF` degrees of freedom (``"student_t"``, robust to outliers)."""
    if likelihood == "student_t":
        return dist.StudentT(STUDENT_DF, loc, scale)
    if likelihood == "lognormal":
        return dist.Normal(loc, scale)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def standard_noise(likelihood: str, key, shape) -> jax.Array:
    """Draws of :func:`noise` at location 0 and scale 1, of the given shape.

    A Student-t draw is a normal one over the square root of a chi-square over its degrees
    of freedom; with an even number ``2m`` of them the chi-square is ``-2 log`` of a product
    of ``m`` uniforms, some thirty times faster on a CPU than ``jax.random.t``'s gamma
    (which prediction draws for every draw x row).
    """
    if likelihood != "student_t":
        return jax.random.normal(key, shape)
    normal_key, uniform_key = jax.random.split(key)
    halves = int(STUDENT_DF) // 2
    uniforms = jax.random.uniform(uniform_key, (halves,) + tuple(shape), minval=1e-38)
    chi_square = -2.0 * jnp.sum(jnp.log(uniforms), axis=0)
    return jax.random.normal(normal_key, shape) / jnp.sqrt(chi_square / STUDENT_DF)


def observed(points, metric: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where a metric was measured, the log of its measured means (0 elsewhere) and their
    relative standard errors (0 where unknown), each of shape [n]. In jnp: a fit traces the
    points."""
    measured = jnp.asarray(getattr(points, metric))
    present = jnp.isfinite(measured) & (measured > 0)
    se = jnp.nan_to_num(jnp.asarray(getattr(points, f"{metric}_se")))
    relative_se = jnp.where(present, se / jnp.where(present, measured, 1.0), 0.0)
    return present, jnp.log(jnp.where(present, measured, 1.0)), relative_se


def fitted(points, metric: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`observed`, where the metric enters the likelihood: everywhere for e2e; TTFT
    and TPOT not on closed loops of more than one request. A closed loop sends its
    requests at once (GuideLLM's throughput run: 128), so their prefills queue behind each
    other in a burst the mean-value model does not describe; fitted, its TTFT pulled the
    prefill costs until the 8B sweeps' loads beyond the fitted ones came out 4.4x too slow
    (``bench/real_data.py --all-metrics``)."""
    present, log_value, relative_se = observed(points, metric)
    if metric != "e2e":
        present = present & ~(jnp.asarray(points.closed, bool)
                              & (jnp.asarray(points.concurrency) > 1))
    return present, log_value, relative_se


def log_mean(value, present):
    """The log of predicted means, shape [..., n], where a metric was measured. A
    coefficient set that puts a measured steady point past saturation has zero likelihood;
    a huge finite stand-in says so without an infinite location."""
    return jnp.log(jnp.where(present & jnp.isfinite(value), value, _SATURATED))


def effective_loads(anchor: Coefficients, points, variant: str | Variant,
                    span=FIT_SPAN, c1_span=FIT_C1_SPAN) -> EffectiveLoads:
    """Tabulate each finite run's effective load about the anchor's coefficients.

    For each open-loop row with a run length, the anchor's load-dependent coefficients are
    scaled so that the offered load ``u = log(rate / saturation_rate)`` takes
    :data:`NODES` values within ``span`` of the anchor's, and its load-independent ones by
    ``exp(-c1_span), 1, exp(c1_span)``; at each node the fluid model
    (:func:`sdbayes.fluid.finite_run`) gives the run's mean latency, and a bisection
    the others in flight at which the steady relation (:func:`sdbayes.model.at_load`)
    gives the same; another those at which it gives the run's mean TTFT.

    Args:
      anchor: coefficients [s], fields scalars or [n].
      points: :class:`sdbayes.points.Points` of n rows.
      variant: the latency model's variant.
      span, c1_span: half-widths of the tables in ``u`` and ``log C1``, scalars or [n].

    Returns:
      :class:`EffectiveLoads` of the n rows.
    """
    variant = as_variant(variant)
    n = len(points.k)
    run = ~np.asarray(points.closed) & np.isfinite(np.asarray(points.duration, float))
    start, step, log_c1, c1_step = np.zeros(n), np.ones(n), np.zeros(n), np.ones(n)
    log_others, slope = np.zeros((n, 2, 3, NODES)), np.zeros((n, 2, 3, NODES))
    rows = np.flatnonzero(run)
    if rows.size:
        half = np.broadcast_to(np.asarray(span, float), (n,))[rows]
        c1_half = np.broadcast_to(np.asarray(c1_span, float), (n,))[rows]
        pick = Coefficients(*(np.broadcast_to(np.asarray(f, float), (n,))[rows, None, None]
                              for f in anchor))
        point = {name: np.asarray(getattr(points, name), float)[rows, None, None]
                 for name in ("k", "alpha", "output_len", "rate", "duration")}
        u_offsets = half[:, None, None] * np.linspace(-1.0, 1.0, NODES)  # [m, 1, NODES]
        c1_offsets = c1_half[:, None, None] * np.array([-1.0, 0.0, 1.0])[:, None]  # [m, 3, 1]
        table = np.asarray(_tabulate(pick, c1_offsets, u_offsets, **point, variant=variant))
        capacity = np.asarray(saturation_rate(pick, k=point["k"], alpha=point["alpha"],
                                              output_len=point["output_len"],
                                              variant=variant))[:, 0, 0]
        alone = _demands(pick, point["k"], point["alpha"], point["output_len"], 1.0,
                         variant.form).independent.total
        start[rows] = np.log(point["rate"][:, 0, 0] / capacity) - half
        step[rows] = 2.0 * half / (NODES - 1)
        log_c1[rows] = np.log(np.asarray(alone))[:, 0, 0]
        c1_step[rows] = c1_half
        log_others[rows] = table
        slope[rows] = np.gradient(table, axis=-1) / step[rows, None, None, None]
    return EffectiveLoads(run, start, step, log_c1, c1_step, log_others, slope)


@partial(jax.jit, static_argnames="variant")
def _tabulate(anchor, c1_offsets, u_offsets, *, k, alpha, output_len, rate, duration,
              variant):
    """log B_eff of latency and TTFT at each node: rows [m, 1, 1] against offsets of ``log
    C1`` [m, 3, 1] and of ``log C2`` [m, 1, NODES]; returns [m, 2, 3, NODES]."""
    coef = scale_demands(anchor, jnp.exp(c1_offsets), jnp.exp(u_offsets))
    run = finite_run(coef, k=k, alpha=alpha, output_len=output_len, rate=rate,
                     duration=duration, variant=variant)
    targets = jnp.stack([run.latency, run.ttft])  # [2, m, 3, NODES]

    def means(log_others):  # the latency at the first, the TTFT at the second
        return jnp.stack([at_load(coef, k, alpha, output_len, jnp.exp(log_others[e]), rate,
                                  variant)[e] for e in (0, 1)])

    def halve(_, bounds):  # latency and TTFT increase with the others in flight: bisect
        low, high = bounds
        mid = 0.5 * (low + high)
        below = means(mid) < targets
        return jnp.where(below, mid, low), jnp.where(below, high, mid)

    low = jnp.full(targets.shape, np.log(_FEWEST))
    high = jnp.broadcast_to(jnp.log(10.0 * rate * duration + 10.0), targets.shape)
    low, high = jax.lax.fori_loop(0, _BISECTIONS, halve, (low, high))
    return jnp.moveaxis(0.5 * (low + high), 0, 1)  # [m, 2, 3, NODES]


def _interpolate(loads: EffectiveLoads, offered, log_c1, metric: int):
    """log B_eff of a metric (0: latency, 1: TTFT) and its derivative in ``u``, at offered
    loads ``u`` and ``log C1`` [..., n]: in ``u`` a cubic Hermite spline through each
    slice's nodes, linear beyond them; across the three slices in ``log C1`` a quadratic,
    held within two slices' steps."""
    shape = jnp.shape(offered)
    start, step, anchor_c1, c1_step = (jnp.broadcast_to(jnp.asarray(x), shape) for x in (
        loads.start, loads.step, loads.log_c1, loads.c1_step))
    t = (offered - start) / step
    j = jnp.clip(jnp.floor(t), 0, NODES - 2).astype(jnp.int32)
    s = jnp.clip(t - j, 0.0, 1.0)
    s2, s3 = s * s, s * s * s
    beyond = (t < 0) | (t > NODES - 1)
    edge = jnp.where(t < 0, t, t - (NODES - 1)) * step  # how far beyond the nodes
    z = jnp.clip((log_c1 - anchor_c1) / c1_step, -2.0, 2.0)
    weights = (0.5 * z * (z - 1.0), 1.0 - z * z, 0.5 * z * (z + 1.0))  # Lagrange, slices
    values = jnp.asarray(loads.log_others).reshape(-1)  # one gather a slice from flat tables
    slopes = jnp.asarray(loads.slope).reshape(-1)
    value = slope = 0.0
    for a, weight in enumerate(weights):
        flat = jnp.broadcast_to(((np.arange(len(loads.run)) * 2 + metric) * 3 + a) * NODES,
                                shape)
        y0, y1 = values[flat + j], values[flat + j + 1]
        m0, m1 = slopes[flat + j] * step, slopes[flat + j + 1] * step
        inside = ((2 * s3 - 3 * s2 + 1) * y0 + (s3 - 2 * s2 + s) * m0
                  + (3 * s2 - 2 * s3) * y1 + (s3 - s2) * m1)
        d_inside = ((6 * s2 - 6 * s) * (y0 - y1) + (3 * s2 - 4 * s + 1) * m0
                    + (3 * s2 - 2 * s) * m1) / step
        end_slope = jnp.where(t < 0, slopes[flat], slopes[flat + NODES - 1])
        value += weight * jnp.where(beyond, jnp.where(t < 0, y0, y1) + end_slope * edge,
                                    inside)
        slope += weight * jnp.where(beyond, end_slope, d_inside)
    return value, slope
