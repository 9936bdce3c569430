"""Gradient-based draft-length tuning under posterior risk (docs/model.md section 4).

The objective is a risk measure, over the posterior draws, of a mean metric at an operating
point: the posterior mean, a quantile, or the CVaR (mean of the worst tail). It is
minimised over a real-valued draft length ``k`` in ``[0, k_max]`` by safeguarded Newton
steps, with first and second derivatives from ``jax.jvp`` through the model, then the two
integer neighbours are compared. The objective is unimodal in ``k`` for this model (the
demands are a linear function over a concave one), so the better neighbour is the best
whole ``k``; the tests check it against exhaustive search.

The plain functions (:func:`risk_objective`, :func:`optimal_k`, :func:`goodput_k`,
:func:`sensitivities`) are pure and jit-able; ``vmap`` or broadcasting over rates gives a
schedule ``k*(rate)``. :func:`tune_k` wraps them for a :class:`~sdbayes.Posterior`.

Example, inside one's own jitted code::

    @jax.jit
    def schedule(coef_draws, rates):
        return sdbayes.tuning.optimal_k(coef_draws, rate=rates, alpha=0.7, output_len=128,
                                        risk="cvar", level=0.9)
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sdbayes import tails
from sdbayes.model import Coefficients, PositionRates, Variant, goodput, metrics
from sdbayes.planning import (
    check_point,
    coefficient_draws,
    metric_value,
    select_metric,
    tail_settings,
)

Array = jax.Array

RISKS = ("mean", "quantile", "cvar")
"""Risk measures over posterior draws: the mean, the ``level``-quantile, and the CVaR at
``level`` (the mean of the worst ``1 - level`` fraction of draws)."""

_TOLERANCE = 1e-3  # in k: finer than needed to pick the integer neighbours
_MAX_STEPS = 64


def risk_measure(values: Array, risk: str, level: float = 0.95) -> Array:
    """Reduce draws on the last axis, shape [..., D] -> [...].

    ``"quantile"`` is the smallest draw with at least ``level`` of the draws at or below it;
    ``"cvar"`` the mean of the largest ``ceil((1 - level) * D)`` draws. Both are
    differentiable almost everywhere: the derivative is that of the selected draws.
    """
    if risk not in RISKS:
        raise ValueError(f"risk must be one of {RISKS}, got {risk!r}")
    if risk == "mean":
        return values.mean(axis=-1)
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    n = values.shape[-1]
    if risk == "quantile":
        worst = n - max(math.ceil(level * n - 1e-9), 1) + 1
    else:
        worst = max(math.ceil((1.0 - level) * n - 1e-9), 1)
    # Which draws form the tail is piecewise constant in the values: select them without a
    # derivative, then differentiate through the selected values alone. The barrier keeps
    # top_k whole: XLA on CPU falls back to a 5x slower top_k when only a slice is used.
    fixed = jax.lax.stop_gradient(values)
    top = jax.lax.optimization_barrier(jax.lax.top_k(fixed, worst)[0])
    threshold = top[..., -1:]  # the worst-th largest draw
    chosen = (fixed == threshold) if risk == "quantile" else (fixed >= threshold)
    # Ties at the threshold share one value, so averaging over them changes nothing.
    return jnp.where(chosen, values, 0.0).sum(axis=-1) / chosen.sum(axis=-1)


def _expand(x):
    """Give an operating-point argument a trailing axis for the draws."""
    if x is None:
        return None
    if isinstance(x, PositionRates):
        return PositionRates(jnp.asarray(x.rates)[..., None, :])
    return jnp.asarray(x)[..., None]


def risk_objective(
    coef: Coefficients,
    k: ArrayLike,
    *,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    risk: str = "mean",
    level: float = 0.95,
    metric: str = "e2e",
    variant: str | Variant = "paper",
    quantile: float | None = None,
    arrival_cv2: ArrayLike = tails.POISSON,
    output_len_sd: ArrayLike = 0.0,
    arrival_excess: ArrayLike = 0.0,
    tail_scale: ArrayLike | None = None,
    tail_window: ArrayLike | None = None,
) -> Array:
    """Risk over posterior draws of a metric [s] at each operating point: its mean over
    requests, or with ``quantile`` that quantile over requests (:mod:`sdbayes.tails`).

    Args:
      coef: coefficient draws [s], fields of shape [D].
      k: draft length, real, shape [...] broadcasting with the other point arguments.
      alpha, output_len, rate, concurrency: the operating point, shape [...].
      risk: one of :data:`RISKS`; level: its level.
      metric: ``"e2e"``, ``"ttft"`` or ``"tpot"``.
      variant: model variant.
      quantile: None for the mean, else in (0, 1); arrival_cv2, output_len_sd,
        arrival_excess: the arrivals' squared CV, the output lengths' sd and the load's
        excess dispersion (:func:`sdbayes.tails.percentile`); tail_scale, tail_window: a
        fit's calibration of the quantile (:func:`sdbayes.planning.metric_value`).

    Returns:
      The risk [s], shape [...]; ``+inf`` where (enough) draws are saturated.
    """
    return _risk_and_pressure(coef, k, alpha=alpha, output_len=output_len, rate=rate,
                              concurrency=concurrency, risk=risk, level=level, metric=metric,
                              variant=variant, quantile=quantile, arrival_cv2=arrival_cv2,
                              output_len_sd=output_len_sd, arrival_excess=arrival_excess,
                              tail_scale=tail_scale, tail_window=tail_window)[0]


def _risk_and_pressure(coef, k, *, alpha, output_len, rate, concurrency, risk, level, metric,
                       variant, quantile=None, arrival_cv2=tails.POISSON, output_len_sd=0.0,
                       arrival_excess=0.0, tail_scale=None, tail_window=None):
    """The risk, and how close the load is to saturation, both of shape [...].

    The pressure is the draws' mean of rate * C2 (0 in a closed loop): where the risk is
    infinite, the tuner steps towards lower pressure.
    """
    point = dict(k=_expand(k), alpha=_expand(alpha), output_len=_expand(output_len),
                 rate=_expand(rate), concurrency=_expand(concurrency), variant=variant)
    m = metrics(coef, **point)
    per_draw = select_metric(m, metric)
    if quantile is not None:
        s = tails.spread(coef, arrival_cv2=arrival_cv2, output_len_sd=output_len_sd,
                         arrival_excess=arrival_excess, **point)
        per_draw = tails.quantile(s, quantile, metric, tail_scale, tail_window)
    value = risk_measure(per_draw, risk, level)
    if rate is None:
        return value, jnp.zeros(value.shape)
    return value, (_expand(rate) * m.dependent).mean(axis=-1)


def _newton_minimise(objective, start, k_max):
    """Minimise a unimodal objective elementwise on [0, k_max] by safeguarded Newton.

    ``objective(k) -> (value, pressure)``, both of shape of ``k``. Where the value is
    infinite (saturated) the step follows the pressure downhill, towards stability. A
    Newton step is taken when it lands inside the bracket known to hold the minimum, else
    the bracket is halved.
    """
    ones = jnp.ones_like(start)

    def first(k):
        return jax.jvp(objective, (k,), (ones,))

    def body(state):
        k, lo, hi, last_step, done, steps = state
        ((value, _), (slope, push)), (_, (curvature, _)) = jax.jvp(first, (k,), (ones,))
        finite = jnp.isfinite(value)
        downhill = jnp.where(finite, -jnp.sign(slope), -jnp.sign(push))
        stationary = downhill == 0
        lo = jnp.where((downhill > 0) | stationary, k, lo)
        hi = jnp.where((downhill < 0) | stationary, k, hi)
        newton = k - slope / jnp.where(curvature > 0, curvature, 1.0)
        # As rtsafe does: Newton only while it lands inside the bracket and at least halves
        # the step, else bisect. Kinks (a quantile switching draws) then cost no more than
        # bisection does.
        usable = (finite & (curvature > 0) & (newton > lo) & (newton < hi)
                  & (jnp.abs(newton - k) < 0.5 * last_step))
        k_new = jnp.where(usable, newton, 0.5 * (lo + hi))
        step = jnp.abs(k_new - k)
        converged = (step < _TOLERANCE) | (hi - lo < _TOLERANCE)
        keep = lambda new, old: jnp.where(done, old, new)  # noqa: E731
        return (keep(k_new, k), keep(lo, state[1]), keep(hi, state[2]),
                keep(step, last_step), done | converged, steps + 1)

    def going(state):
        return (~jnp.all(state[4])) & (state[5] < _MAX_STEPS)

    zeros = jnp.zeros_like(start)
    state = (start, zeros, zeros + k_max, zeros + k_max, jnp.zeros(start.shape, bool),
             jnp.asarray(0))
    return jax.lax.while_loop(going, body, state)[0]


class KChoice(NamedTuple):
    """A tuned draft length per operating point; arrays of the points' shape.

    Attributes:
      k: the best whole draft length in 0..k_max.
      k_real: the minimiser over real k.
      objective: the risk at ``k`` [s].
      feasible: whether the objective is finite at ``k`` (the load is stable there).
    """

    k: Array
    k_real: Array
    objective: Array
    feasible: Array


@partial(jax.jit, static_argnames=("risk", "level", "metric", "k_max", "variant", "quantile"))
def optimal_k(
    coef: Coefficients,
    *,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    risk: str = "mean",
    level: float = 0.95,
    metric: str = "e2e",
    k_max: int = 16,
    variant: str | Variant = "paper",
    quantile: float | None = None,
    arrival_cv2: ArrayLike = tails.POISSON,
    output_len_sd: ArrayLike = 0.0,
    arrival_excess: ArrayLike = 0.0,
    tail_scale: ArrayLike | None = None,
    tail_window: ArrayLike | None = None,
) -> KChoice:
    """The draft length minimising the risk of a metric over posterior draws.

    First the minimiser for the draws' median coefficients (one draw: cheap), then from
    there for the full risk objective; then the better integer neighbour (or k = 0 on a
    tie).

    Args:
      coef: coefficient draws [s], fields of shape [D].
      alpha, output_len, rate, concurrency: the operating points, broadcasting to [...].
      risk, level: the risk measure (:data:`RISKS`).
      metric: ``"e2e"``, ``"ttft"`` or ``"tpot"``.
      k_max: the largest draft length considered.
      variant: model variant.
      quantile, arrival_cv2, output_len_sd, arrival_excess, tail_scale, tail_window: as for
        :func:`risk_objective`.

    Returns:
      :class:`KChoice` with arrays of shape [...].
    """
    shape = np.broadcast_shapes(np.shape(output_len), np.shape(rate),
                                 np.shape(concurrency),
                                 np.shape(alpha.rates)[:-1] if isinstance(alpha, PositionRates)
                                 else np.shape(alpha))
    point = dict(alpha=alpha, output_len=output_len, rate=rate, concurrency=concurrency,
                 metric=metric, variant=variant, quantile=quantile, arrival_cv2=arrival_cv2,
                 output_len_sd=output_len_sd, arrival_excess=arrival_excess,
                 tail_scale=tail_scale, tail_window=tail_window)
    median = Coefficients(*(jnp.median(jnp.asarray(f, float), keepdims=True)
                            for f in coef))

    def objective_for(draws, risk_):
        return partial(_risk_and_pressure, draws, risk=risk_, level=level, **point)

    def objective_at(k):
        return risk_objective(coef, k, risk=risk, level=level, **point)

    start = jnp.full(shape, k_max / 2.0)
    central = _newton_minimise(objective_for(median, "mean"), start, k_max)
    k_real = _newton_minimise(objective_for(coef, risk), central, k_max)
    # The integer neighbours, and k = 0, which wins ties: where the metric does not depend
    # on k (TTFT at zero load) no drafting is the right answer.
    below = jnp.floor(k_real)
    best_k, best = jnp.zeros_like(k_real), objective_at(jnp.zeros_like(k_real))
    for candidate in (below, jnp.minimum(below + 1.0, k_max)):
        value = objective_at(candidate)
        better = value < best
        best_k, best = jnp.where(better, candidate, best_k), jnp.where(better, value, best)
    return KChoice(k=best_k.astype(int), k_real=k_real, objective=best,
                   feasible=jnp.isfinite(best))


def tune_k(
    source,
    *,
    alpha: ArrayLike,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    risk: str = "mean",
    level: float = 0.95,
    metric: str = "e2e",
    k_max: int = 16,
    prompt_len: ArrayLike | None = None,
    group: str | int = 0,
    variant: str | Variant | None = None,
    quantile: float | None = None,
    arrival_cv2: float = 1.0,
    output_len_sd: float = 0.0,
) -> KChoice:
    """Best draft length for each operating point under posterior risk.

    Args:
      source: a :class:`~sdbayes.Posterior` (draws of ``group``) or ``Coefficients`` of
        draws [n_draws] (or scalars).
      alpha: acceptance rate(s) in [0, 1].
      output_len: tokens per request.
      rate: arrival rate(s) [req/s]; an array gives the schedule ``k*(rate)``. Or
        ``concurrency`` for a closed loop.
      risk: ``"mean"``, ``"quantile"`` or ``"cvar"`` over the draws; level: its level.
      metric: ``"e2e"``, ``"ttft"`` or ``"tpot"``.
      k_max: largest draft length considered.
      prompt_len: accepted for symmetry; does not enter.
      group, variant: as for :func:`sdbayes.max_rate`.
      quantile: None to tune the mean metric, else its quantile over requests in (0, 1)
        (0.99: the p99); arrival_cv2: 1 for Poisson arrivals, 0 for evenly spaced ones;
        output_len_sd: the output lengths' sd [tokens].

    Returns:
      :class:`KChoice` of NumPy arrays of the operating points' broadcast shape.

    Example:
      >>> choice = sb.tune_k(post, rate=np.linspace(1, 12, 12), alpha=0.7, output_len=128,
      ...                    risk="quantile", level=0.95)
      >>> choice.k  # the schedule k*(rate)
    """
    del prompt_len
    if (rate is None) == (concurrency is None):
        raise TypeError("give exactly one of rate= (req/s) or concurrency=")
    if not (isinstance(k_max, int) and k_max >= 1):
        raise ValueError(f"k_max must be a whole number >= 1, got {k_max!r}")
    check_point(alpha=alpha, output_len=output_len, rate=rate, concurrency=concurrency)
    tail = tail_settings(source, quantile, arrival_cv2, output_len_sd, metric)
    coef, variant = coefficient_draws(source, group, variant)
    result = optimal_k(coef, alpha=alpha, output_len=output_len, rate=rate,
                       concurrency=concurrency, risk=risk, level=level, metric=metric,
                       k_max=k_max, variant=variant, **tail)
    return KChoice(*(np.asarray(x) for x in result))


@partial(jax.jit, static_argnames=("k_max", "variant"))
def goodput_k(coef: Coefficients, *, alpha: ArrayLike, batch_size: ArrayLike,
              k_max: int = 16, variant: str | Variant = "paper") -> Array:
    """SmartSpec-style rule: the whole k in 0..k_max maximising goodput at a batch size.

    Goodput is :func:`sdbayes.goodput`, emitted tokens per second of batch time.

    Args:
      coef: one set of coefficients [s] (e.g. the posterior mean), scalar fields.
      alpha: acceptance rate(s), shape [...].
      batch_size: requests decoding together, shape [...].
      k_max: largest draft length considered.
      variant: the model variant (static; an MoE verifier's record included).

    Returns:
      Integer k of the broadcast shape [...].
    """
    ks = jnp.arange(k_max + 1, dtype=float)
    rates = goodput(coef, k=ks, alpha=jnp.asarray(alpha, float)[..., None],
                    batch_size=jnp.asarray(batch_size, float)[..., None], variant=variant)
    return jnp.argmax(rates, axis=-1)


class Sensitivities(NamedTuple):
    """A metric and its derivatives at each operating point (same shapes)."""

    value: Array  # the metric [s]
    d_k: Array  # per unit of draft length [s]
    d_alpha: Array  # per unit of acceptance rate [s]


@partial(jax.jit, static_argnames=("metric", "variant"))
def sensitivities(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    metric: str = "e2e",
    variant: str | Variant = "paper",
) -> Sensitivities:
    """A mean metric and its derivatives in draft length and acceptance, by forward mode.

    Arguments as :func:`sdbayes.latency`, broadcasting. Derivatives are 0 past saturation.
    """
    shape = np.broadcast_shapes(np.shape(k), np.shape(alpha), np.shape(output_len),
                                 np.shape(rate), np.shape(concurrency), *map(np.shape, coef))
    k, alpha = (jnp.broadcast_to(jnp.asarray(x, float), shape) for x in (k, alpha))

    def value(k, alpha):
        return metric_value(coef, metric, k=k, alpha=alpha, output_len=output_len, rate=rate,
                            concurrency=concurrency, variant=variant)

    ones = jnp.ones(shape)
    at, d_k = jax.jvp(lambda k_: value(k_, alpha), (k,), (ones,))
    _, d_alpha = jax.jvp(lambda a: value(k, a), (alpha,), (ones,))
    return Sensitivities(at, d_k, d_alpha)


def batch_size_schedule(batch_sizes: ArrayLike, k: ArrayLike) -> list[list[int]]:
    """A schedule ``k*(batch size)`` as vLLM's ``num_speculative_tokens_per_batch_size``
    takes it (vLLM 0.24 and later): inclusive ranges ``[first, last, k]`` from batch size 1
    to the largest one given, each batch size using the k tuned at the largest tuned size
    not above it (the smallest tuned size's below it), neighbours of one k merged.

    Args:
      batch_sizes: requests in flight at which k was tuned, whole numbers >= 1, shape [n].
      k: the best draft length at each, shape [n] (:func:`tune_k` with ``concurrency=``).

    Example:
      >>> batch_size_schedule([1, 16, 64], [4, 2, 0])
      [[1, 15, 4], [16, 63, 2], [64, 64, 0]]
    """
    sizes, ks = np.asarray(batch_sizes), np.asarray(k)
    if sizes.shape != ks.shape or sizes.ndim != 1 or not sizes.size:
        raise ValueError("batch_sizes and k must be two 1-D arrays of one length")
    if (sizes < 1).any() or (sizes != np.round(sizes)).any():
        raise ValueError(f"batch sizes must be whole numbers >= 1, got {sizes.tolist()}")
    order = np.argsort(sizes)
    sizes, ks = sizes[order].astype(int), ks[order].astype(int)
    starts = np.concatenate([[1], sizes[1:]])
    ends = np.concatenate([sizes[1:] - 1, sizes[-1:]])
    ranges: list[list[int]] = []
    for first, last, best in zip(starts, ends, ks, strict=True):
        if ranges and ranges[-1][2] == best:
            ranges[-1][1] = int(last)
        elif last >= first:
            ranges.append([int(first), int(last), int(best)])
    return ranges


def speculative_config(schedule: list[list[int]], method: str, model: str) -> dict:
    """vLLM's ``--speculative-config`` for a :func:`batch_size_schedule`: the drafter's
    ``method`` and ``model``, ``num_speculative_tokens`` the schedule's largest k, and the
    schedule itself."""
    return {"method": method, "model": model,
            "num_speculative_tokens": max(k for _, _, k in schedule),
            "num_speculative_tokens_per_batch_size": schedule}
