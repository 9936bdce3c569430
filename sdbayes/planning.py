"""Risk-aware capacity planning: the highest request rate that meets an SLO with confidence.

A posterior gives ``D`` draws of the coefficients, so each draw has its own highest rate
``lam*_d`` at which the mean metric meets the SLO (docs/model.md section 4). The metric grows
with the rate, so ``P(metric <= SLO) >= confidence`` holds at every rate up to an order
statistic of the ``lam*_d``: the planned rate is the largest rate that at least
``confidence * D`` draws sustain.

The plain functions (:func:`rate_at_slo`, :func:`break_even_acceptance`) are pure, jit-able
and differentiable (closed form, or a bisection with implicit-function gradients), for use
inside research code; :func:`max_rate` wraps them for a :class:`~sdbayes.Posterior`.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sdbayes import observation, tails
from sdbayes.model import (
    Coefficients,
    Metrics,
    PositionRates,
    Variant,
    as_variant,
    demands,
    increasing_root,
    latency,
    metrics,
    saturation_rate,
)
from sdbayes.observation import LoadError

Array = jax.Array

METRICS = ("e2e", "ttft", "tpot")
"""Metrics a plan or a tuning can target: mean end-to-end latency, TTFT and TPOT [s]."""

def metric_value(coef: Coefficients, metric: str, *, k, alpha, output_len, rate=None,
                 concurrency=None, variant: str | Variant = "paper", quantile=None,
                 arrival_cv2=tails.POISSON, output_len_sd=0.0, arrival_excess=0.0,
                 tail_scale=None, tail_window=None,
                 load_error: LoadError | None = None) -> Array:
    """One of :data:`METRICS` [s]: its mean from the one model solve
    (:func:`sdbayes.model.metrics`), or with ``quantile`` its quantile over requests
    (:func:`sdbayes.tails.percentile`, with ``arrival_cv2``, ``output_len_sd`` and
    ``arrival_excess``; its log ratio to the mean scaled by ``tail_scale`` and, for an
    open loop, the :func:`~sdbayes.tails.burst_delay` of a ``tail_window`` added,
    :func:`sdbayes.tails.quantile`).

    With ``load_error`` (a group's discrepancy in load, fields broadcasting with the
    point, :meth:`sdbayes.Posterior.new_configuration`), an open loop's end-to-end latency
    moves by it as in the fit's likelihood (:func:`sdbayes.observation.forward`), TPOT
    with it; a quantile moves with its mean.

    Arguments as :func:`sdbayes.latency`; not jit-compiled itself (it runs in its caller's
    trace).
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    point = dict(k=k, alpha=alpha, output_len=output_len, rate=rate, concurrency=concurrency,
                 variant=variant)
    moves = load_error is not None and rate is not None and metric != "ttft"
    m = metrics(coef, **point) if quantile is None or moves else None
    if quantile is not None:
        s = tails.spread(coef, **point, arrival_cv2=arrival_cv2, output_len_sd=output_len_sd,
                         arrival_excess=arrival_excess)
        value = tails.quantile(s, quantile, metric, tail_scale, tail_window)
    else:
        value = select_metric(m, metric)
    if not moves:
        return value
    shift = observation.shift_in_load(load_error, observation.steady_sensitivity(m, rate),
                                      observation.load_share(m.latency, m.alone))
    factor = jnp.exp(shift)
    if metric == "tpot":
        moved = observation.per_token(m.latency * factor, m.ttft, output_len)
        factor = jnp.where(m.tpot > 0, moved / jnp.where(m.tpot > 0, m.tpot, 1.0), 1.0)
    return jnp.where(jnp.isfinite(value), value * factor, value)


def select_metric(m: Metrics, metric: str) -> Array:
    """The field of :class:`~sdbayes.model.Metrics` that a name in :data:`METRICS` means."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return {"e2e": m.latency, "ttft": m.ttft, "tpot": m.tpot}[metric]


@partial(jax.jit, static_argnames=("metric", "variant", "quantile"))
def rate_at_slo(
    coef: Coefficients,
    *,
    slo: ArrayLike,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    metric: str = "e2e",
    variant: str | Variant = "paper",
    quantile: float | None = None,
    arrival_cv2: ArrayLike = tails.POISSON,
    output_len_sd: ArrayLike = 0.0,
    arrival_excess: ArrayLike = 0.0,
    tail_scale: ArrayLike | None = None,
    tail_window: ArrayLike | None = None,
    load_error: LoadError | None = None,
) -> Array:
    """Highest open-loop arrival rate [req/s] at which ``metric`` is at most ``slo``: its
    mean, or with ``quantile`` (0.99 for p99) that quantile over requests.

    For the paper's mean end-to-end latency this is the closed form ``(1 - C1/SLO) / C2``;
    otherwise a bisection up to :func:`sdbayes.saturation_rate` through the model.

    Args:
      coef: cost coefficients [s], fields of any shape broadcasting with the point.
      slo: the target for the metric [s], > 0.
      k, alpha, output_len: the operating point, as for :func:`sdbayes.latency`.
      metric: one of :data:`METRICS`.
      variant: model variant.
      quantile: None for the mean, else in (0, 1) (static).
      arrival_cv2, output_len_sd, arrival_excess: the arrivals' squared CV, the output
        lengths' sd [tokens] and the load's excess dispersion, for a quantile
        (:func:`sdbayes.tails.percentile`).
      tail_scale, tail_window: the scale of a quantile's log ratio to the mean and its
        burst window [s] (:func:`metric_value`).
      load_error: a discrepancy in load the metric moves by (:func:`metric_value`).

    Returns:
      Rates [req/s] of the broadcast shape; 0 where the SLO is not met even at zero load.
    """
    point = dict(k=k, alpha=alpha, output_len=output_len, variant=variant)
    if (metric == "e2e" and quantile is None and load_error is None
            and as_variant(variant) == Variant("paper")):
        d = demands(coef, **point)
        c2 = d.dependent.total
        return jnp.maximum((1.0 - d.independent.total / jnp.asarray(slo, c2.dtype)) / c2, 0.0)
    limit = saturation_rate(coef, **point)
    slo = jnp.asarray(slo, limit.dtype)
    saturation = jnp.broadcast_to(limit, jnp.broadcast_shapes(limit.shape, slo.shape))
    return increasing_root(
        lambda rate: metric_value(coef, metric, rate=rate, quantile=quantile,
                                  arrival_cv2=arrival_cv2, output_len_sd=output_len_sd,
                                  arrival_excess=arrival_excess, tail_scale=tail_scale,
                                  tail_window=tail_window, load_error=load_error,
                                  **point) - slo,
        jnp.zeros_like(saturation), saturation)


@partial(jax.jit, static_argnames="variant")
def break_even_acceptance(
    coef: Coefficients,
    *,
    k: ArrayLike,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    variant: str | Variant = "paper",
) -> Array:
    """Acceptance rate below which draft length ``k`` is slower than no SD at the same load.

    The root in ``alpha`` of ``L(k, alpha) = L(0)``: mean latency falls as acceptance rises.
    Where the load saturates the engine without SD but not with it, the answer is the
    acceptance at which SD becomes stable.

    Args:
      coef: cost coefficients [s].
      k: draft length > 0.
      output_len: tokens per request.
      rate, concurrency: the load, as for :func:`sdbayes.latency`.
      variant: model variant.

    Returns:
      Acceptance in [0, 1] of the broadcast shape; ``+inf`` where SD does not pay even
      when every draft is accepted.
    """
    load = dict(output_len=output_len, rate=rate, concurrency=concurrency, variant=variant)
    baseline = latency(coef, k=0.0, alpha=0.0, **load)
    shape = jnp.broadcast_shapes(baseline.shape, jnp.shape(k))
    lo, hi = jnp.zeros(shape, baseline.dtype), jnp.ones(shape, baseline.dtype)

    def saving(alpha):  # time SD saves [s], > 0 where it pays; rises with acceptance
        with_sd = latency(coef, k=k, alpha=alpha, **load)
        gap = jnp.where(jnp.isfinite(baseline), baseline, 0.0) - with_sd
        return jnp.where(jnp.isfinite(baseline), gap, jnp.where(jnp.isfinite(with_sd), 1.0, -1.0))

    alpha = increasing_root(saving, lo, hi)
    return jnp.where(saving(hi) > 0, alpha, jnp.inf)


class InfeasibleSLO(ValueError):
    """No positive request rate meets the SLO with the asked confidence."""


class Capacity(NamedTuple):
    """What one replica sustains under an SLO; arrays of the operating points' shape.

    Attributes:
      rate: highest request rate [req/s] at which ``P(metric <= slo) >= confidence`` over
        the posterior draws; 0 where no positive rate does.
      feasible: whether that rate is positive.
      zero_load: the metric's ``confidence``-quantile over draws at zero load [s]: the
        smallest SLO that can be met with that confidence at all.
      per_draw: each draw's highest rate, shape [n_draws, ...] [req/s].
    """

    rate: np.ndarray
    feasible: np.ndarray
    zero_load: np.ndarray
    per_draw: np.ndarray

    def replicas(self, traffic: ArrayLike) -> np.ndarray:
        """Replicas needed to serve ``traffic`` [req/s], split evenly, under the same risk.

        Raises:
          InfeasibleSLO: where no rate meets the SLO, whatever the number of replicas.
        """
        if not np.all(self.feasible):
            worst = float(np.max(np.where(self.feasible, 0.0, self.zero_load)))
            raise InfeasibleSLO(
                f"the SLO is infeasible at any rate: even at zero load the metric's quantile "
                f"is {1e3 * worst:.1f} ms; relax the SLO or the confidence")
        return replicas_needed(traffic, self.rate)


def replicas_needed(traffic: ArrayLike, rate: ArrayLike) -> np.ndarray:
    """Fewest replicas, each holding at most ``rate`` [req/s], that serve ``traffic``."""
    traffic = np.asarray(traffic, float)
    if np.any(traffic < 0):
        raise ValueError("traffic must be >= 0 req/s")
    return np.ceil(traffic / np.asarray(rate) - 1e-12).astype(int)


@runtime_checkable
class Fitted(Protocol):
    """What planning and tuning need of a fit; :class:`sdbayes.Posterior` is one. Named
    by its methods so that planning does not import the fitting machinery."""

    FitWarning: type[Warning]
    diagnostics: object  # with .trustworthy and .verdict, or None
    variant: Variant
    arrival_excess: float

    def coefficients(self, group: str | int = 0) -> Coefficients: ...

    def new_configuration(self, key: jax.Array, group: str | int = 0): ...

    def tail_error(self, metric: str, q: float, closed: bool = False): ...


def coefficient_draws(source, group: str | int = 0, variant: str | Variant | None = None,
                      stacklevel: int = 3):
    """Coefficient draws and model variant from a ``Posterior`` or plain ``Coefficients``;
    a warning about an untrustworthy fit points ``stacklevel`` frames up (the caller's
    caller).

    Returns:
      (``Coefficients`` with fields of shape [n_draws], variant). Plain coefficients with
      scalar fields count as one draw; their variant is ``variant`` or ``"paper"``.
    """
    if isinstance(source, Fitted):
        if variant is not None and as_variant(variant) != source.variant:
            raise ValueError(f"the posterior was fitted with variant {source.variant}, "
                             f"not {as_variant(variant)}")
        if source.diagnostics is not None and not source.diagnostics.trustworthy:
            warnings.warn(f"planning on a fit that is {source.diagnostics.verdict}",
                          source.FitWarning, stacklevel=stacklevel)
        return source.coefficients(group), source.variant
    if isinstance(source, Coefficients):
        fields = jnp.broadcast_arrays(*(jnp.asarray(x, float) for x in source))
        return Coefficients(*(f.reshape(-1) for f in fields)), variant or "paper"
    raise TypeError(f"expected a Posterior or Coefficients, got {type(source).__name__}")


class PlanDraws(NamedTuple):
    """The draws a plan weighs (:func:`plan_draws`), ``D`` of them."""

    coef: Coefficients  # fields [D]
    variant: str | Variant
    load_error: LoadError | None  # the group's discrepancy in load, fields [D, ...]
    # The tail model's error at the quantile (log), z * tails.error_sd(sd, burst_sd, ...)
    # at the point: z [D] standard normal draws; sd 0 for a mean.
    z: np.ndarray
    sd: float = 0.0
    burst_sd: float = 0.0


def plan_draws(source, key: jax.Array, group: str | int = 0,
               variant: str | Variant | None = None, metric: str = "e2e",
               quantile: float | None = None, stacklevel: int = 2) -> PlanDraws:
    """The draws of what a metric will be at a configuration a plan is about.

    From a :class:`~sdbayes.Posterior` these are what its predictions draw for a
    configuration the fit has not measured (:meth:`~sdbayes.Posterior.new_configuration`):
    the coefficients times a fresh configuration discrepancy, the group's discrepancy in
    load and, for a quantile, the tail model's error as the fit measured it
    (:meth:`~sdbayes.Posterior.tail_error`). Planning on the coefficients alone takes a
    new curve's latency as known to within their posterior, which it is not: on the
    source study's 0.6B sweeps, 70% of p99 plans at 95% confidence lay above the rate
    where the held-out curve's measured p99 crossed its SLO (bench/tail_plan.py).
    Plain ``Coefficients`` are taken as they are. A warning about an untrustworthy fit
    points ``stacklevel`` frames up from here (the caller).
    """
    coef, variant = coefficient_draws(source, group, variant, stacklevel + 1)
    n_draws = coef.c1p.shape[0]
    if not isinstance(source, Fitted):
        return PlanDraws(coef, variant, None, np.zeros(n_draws))
    configuration_key, shape_key = jax.random.split(key)
    coef, load_error = source.new_configuration(configuration_key, group)
    z = np.asarray(jax.random.normal(shape_key, (n_draws,)))
    if quantile is None:
        return PlanDraws(coef, variant, load_error, z)
    error = source.tail_error(metric, quantile)
    return PlanDraws(coef, variant, load_error, z, error.sd, error.burst_sd)


def check_point(**values) -> None:
    """Raise ValueError naming the first operating-point argument out of its range."""
    ranges = {"k": (0.0, np.inf), "alpha": (0.0, 1.0), "output_len": (1e-300, np.inf),
              "rate": (0.0, np.inf), "concurrency": (1.0, np.inf)}
    for name, value in values.items():
        if value is None:
            continue
        x = np.asarray(value, float)
        low, high = ranges[name]
        if not np.all(np.isfinite(x) & (x >= low) & (x <= high)):
            bound = "in [0, 1]" if name == "alpha" else (
                "> 0" if name == "output_len" else f">= {low:g}")
            raise ValueError(f"{name} must be finite and {bound}, got {value}")


def tail_settings(source, quantile: float | None, arrival_cv2: float,
                  output_len_sd: float, metric: str = "e2e") -> dict:
    """The tail model's settings of :func:`max_rate` and :func:`sdbayes.tune_k`, checked
    (ValueError naming the first bad one), with what a posterior ``source`` fitted: the
    load's excess dispersion (``Posterior.arrival_excess``; 0 for plain coefficients) and,
    for a quantile of ``metric``, the scale of its log ratio to the mean and its burst
    window (``Posterior.tail_error``; None for plain coefficients), as the floats their
    jit-compiled kernels take."""
    if quantile is not None and not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    for name, value in (("arrival_cv2", arrival_cv2), ("output_len_sd", output_len_sd)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    fitted = isinstance(source, Fitted)
    calibrated = fitted and quantile is not None
    error = source.tail_error(metric, quantile) if calibrated else None
    return dict(quantile=None if quantile is None else float(quantile),
                arrival_cv2=float(arrival_cv2), output_len_sd=float(output_len_sd),
                arrival_excess=float(source.arrival_excess) if fitted else 0.0,
                tail_scale=error.scale if calibrated else None,
                tail_window=error.window if calibrated else None)


def order_statistic_index(n_draws: int, confidence: float) -> int:
    """Index into ascending draws of the value that ``confidence`` of them are at or above.

    ``sorted[n - need]`` with ``need = ceil(confidence * n)``: at least ``need`` draws are
    at or above it, and it is the largest value for which that holds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    need = math.ceil(confidence * n_draws - 1e-9)
    return n_draws - max(need, 1)


def max_rate(
    source,
    *,
    slo: float,
    metric: str = "e2e",
    confidence: float = 0.95,
    k: ArrayLike,
    alpha: ArrayLike,
    output_len: ArrayLike,
    prompt_len: ArrayLike | None = None,
    group: str | int = 0,
    variant: str | Variant | None = None,
    quantile: float | None = None,
    arrival_cv2: float = 1.0,
    output_len_sd: float = 0.0,
    seed: int = 0,
) -> Capacity:
    """Highest request rate one replica holds with ``P(metric <= slo) >= confidence``.

    The metric is the mean over requests, or with ``quantile`` that quantile over requests
    ("P(p99 e2e <= SLO) >= 95%" is ``quantile=0.99, confidence=0.95``; the tail model of
    :mod:`sdbayes.tails`).

    With a posterior the probability is over what its predictions draw for a
    configuration it has not measured (:func:`plan_draws`): its coefficients, the
    configurations' and the load's discrepancies, and the tail model's error.

    Args:
      source: a :class:`~sdbayes.Posterior` (its draws of ``group``), or ``Coefficients``
        whose fields are draws of shape [n_draws] (or scalars: a point estimate).
      slo: the target for the metric [s], > 0.
      metric: one of :data:`METRICS`.
      confidence: the probability, over the draws, that the SLO holds, in (0, 1).
      k, alpha, output_len: the operating point; arrays broadcast (e.g. ``k`` a grid of
        draft lengths to compare).
      prompt_len: accepted for symmetry with the model functions; does not enter.
      group: which fitted group of a posterior.
      variant: model variant for plain coefficients (a posterior knows its own).
      quantile: None (the mean) or the quantile over requests, in (0, 1).
      arrival_cv2: squared coefficient of variation of the inter-arrival times: 1 for
        Poisson arrivals, 0 for evenly spaced ones (only the quantiles depend on it); with
        a posterior, the load's excess dispersion its fit measured counts too
        (``Posterior.arrival_excess``).
      output_len_sd: standard deviation of the output lengths [tokens] (quantiles only).
      seed: seeds the discrepancies' draws (a posterior only).

    Returns:
      A :class:`Capacity` of the broadcast shape of the operating point.

    Example:
      >>> cap = sb.max_rate(post, slo=2.0, k=4, alpha=0.7, output_len=128)
      >>> cap.rate, cap.replicas(traffic=100.0)
    """
    del prompt_len
    check_point(k=k, alpha=alpha, output_len=output_len)
    if not np.all(np.asarray(slo) > 0):
        raise ValueError(f"slo must be > 0 seconds, got {slo}")
    tail = tail_settings(source, quantile, arrival_cv2, output_len_sd, metric)
    draws = plan_draws(source, jax.random.PRNGKey(seed), group, variant, metric, quantile,
                       stacklevel=3)
    n_draws = draws.coef.c1p.shape[0]
    index = order_statistic_index(n_draws, confidence)
    shape = np.broadcast_shapes(np.shape(k), np.shape(alpha), np.shape(output_len),
                                np.shape(slo))
    point = {name: jnp.asarray(np.broadcast_to(value, shape), float)[..., None]
             for name, value in dict(k=k, alpha=alpha, output_len=output_len).items()}
    model = dict(variant=draws.variant, load_error=draws.load_error, **tail, **point)
    slo = np.broadcast_to(slo, shape)[..., None]

    def planned(scale):
        # A draw whose tail runs e^x above the model's meets the SLO where the model meets
        # the SLO over e^x.
        return rate_at_slo(draws.coef, slo=jnp.asarray(slo / scale), metric=metric, **model)

    scale = np.exp(draws.z * draws.sd)  # [D]
    per_draw = planned(scale)  # [..., D]
    idle = np.asarray(metric_value(draws.coef, metric, rate=jnp.zeros(()), **model)) * scale
    if draws.burst_sd > 0:
        # The error grows with the burst's share of the metric, which grows with the rate:
        # each draw's error at the rate it first planned, and its rate again.
        mean = metric_value(draws.coef, metric, rate=per_draw, **{**model, "quantile": None})
        sd = tails.error_sd(draws.sd, draws.burst_sd, draws.coef.c2p, per_draw, mean, metric,
                            point["output_len"])
        per_draw = planned(np.exp(draws.z * np.asarray(sd)))
    rate = np.sort(np.asarray(per_draw), axis=-1)[..., index]
    zero_load = np.sort(np.asarray(idle), axis=-1)[..., n_draws - 1 - index]
    return Capacity(rate=rate, feasible=rate > 0, zero_load=zero_load,
                    per_draw=np.moveaxis(np.asarray(per_draw), -1, 0))
