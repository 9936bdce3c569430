"""The mean-value latency model of speculative decoding under continuous batching.

Statement of the model: docs/model.md section 1. A request that emits ``g`` tokens needs
``n = g / E(k, alpha)`` SD cycles, each one verifier pass over ``k + 1`` tokens and ``k``
drafter passes. With ``B`` other requests in flight its latency is ``L = C1 + B * C2``:

    C1 = c1p + n * (c1v + k * c1d)     load-independent demand [s]
    C2 = c2p + n * (c2v + k * c2d)     load-dependent demand per other request [s]

Under an open-loop arrival rate ``lam`` Little's Law gives ``B = lam * L`` and so
``L = C1 / (1 - lam * C2)``; under a closed loop of ``N`` requests ``B = N - 1``.

An MoE verifier (``experts=M, top_m=m``, or a :class:`Variant`) adds ``phi * c1e`` and
``phi * c2e`` to the verification costs, ``phi`` the fraction of experts a pass over
``T = (k + 1) * (1 + B)`` tokens loads (:func:`expert_coverage`). As ``B`` depends on ``L``,
the open-loop latency is then a fixed point, solved by a bracketed root search with
implicit-function gradients (``_open_coverage``); it is the closed form when
``c1e = c2e = 0``.

Every public function is pure and ``jax.jit``-compiled, broadcasts its array arguments
against each other (NumPy rules), accepts a real-valued ``k`` and is differentiable with
respect to ``k``, ``alpha``, ``rate`` and every coefficient. Seconds and tokens throughout.
Past saturation (``lam * C2 >= 1``) latencies are ``+inf``, never NaN, and their gradients
are zero, not NaN. Dtypes follow JAX: float32 by default, float64 when
``jax_enable_x64`` is on.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jax.Array

# Below this |log alpha| the geometric sum is evaluated by its Taylor series in log alpha:
# the closed form is 0/0 at alpha = 1. The series' first omitted term is ~ (k*u)^4 / 120,
# below 1e-9 relative for k <= 16 at this threshold.
_TAYLOR_BELOW = 1e-3


VARIANTS = ("paper", "stepped", "filling")
"""Model variants.

``"paper"``: the source paper's form, the reference: a request takes ``g / E`` SD cycles and
``L = C1 + B * C2``.

``"stepped"``: the engine runs in whole steps, as a vLLM-like engine (and the simulator) does.
(1) Cycles are whole, so the last one is partly wasted: by renewal theory a request takes
``g / E + (E[X^2] - E) / (2 E^2)`` cycles on average for X tokens per cycle, about half a
cycle more. (2) A request waits for a step boundary twice, to be admitted and to join the
decode batch after its prefill: ``L = C1 + B * C2 + 2 * W`` with ``W`` the boundary wait of
:func:`ttft`. Neither adds a coefficient; each is a few percent of the latency
(docs/model.md section 1; ``bench/analytic_vs_simulated.py`` measures both variants).

``"filling"``: the marginal cost of a request in a decode step grows as the batch fills the
GPU. A step over a small batch leaves much of the GPU idle (its kernels are bound by
latency, not by bandwidth or compute), so the first others in flight cost less per step
than later ones. With ``B`` others the per-cycle load-dependent latency
``D2 = n * (c2v + k*c2d)`` counts ``G(B)`` others instead of ``B`` (prefill stalls,
``c2p``, stay linear):

    L = C1 + B * c2p + G(B) * D2,
    G(B) = B + fill * (B - fill_half * log(1 + B / fill_half))        (:func:`batch_load`)

``G'(B) = 1 + fill * B / (B + fill_half)`` rises from 1 (an empty batch) to ``1 + fill``
(a full one), half-way at ``B = fill_half``. Two coefficients: ``fill`` (dimensionless,
the relative rise of the marginal cost of a step) and ``fill_half`` (requests);
``fill = 0`` is the paper's form. The open-loop latency solves ``L = C1 + rate*L*c2p +
G(rate * L) * D2`` (one root, found by bisection and Newton with implicit gradients); it
saturates at ``rate = 1 / (c2p + (1 + fill) * D2)``. The simulator charges a step with
``n`` requests decoding ``(c1v + k*c1d) + G(n - 1) * (c2v + k*c2d)``. The other forms
ignore ``fill`` and ``fill_half``.
"""

_jit = partial(jax.jit, static_argnames=("variant", "experts", "top_m"))
_GRID = 17  # points of the scan for the MoE fixed point's first crossing
# Fixed points (MoE, "filling") are refined by halvings to 1/4096 of a bracket (a grid cell
# for MoE), where the residual is close to linear, then Newton steps (quadratic convergence)
# to float64 resolution.
_REFINE_BISECTIONS, _REFINE_NEWTON = 12, 4
_BISECTIONS = 64  # halvings of a bracket: below float64 resolution


class Variant(NamedTuple):
    """A model variant: its form (one of :data:`VARIANTS`) and an optional MoE verifier.

    With ``experts`` (M) and ``top_m`` (m) set, a verifier pass over ``T`` tokens loads a
    fraction :func:`expert_coverage` of the experts, and the expert terms ``c1e, c2e`` are
    scaled by it (docs/model.md section 1, MoE). Hashable, so it can be a static argument;
    every ``variant=`` argument takes one of these or a form's name.
    """

    form: str = "paper"
    experts: int | None = None
    top_m: int | None = None

    @property
    def moe(self) -> bool:
        return self.experts is not None

    # A dense form equals its name, so that ``posterior.variant == "paper"`` reads as it
    # says; hashed alike, a jit-compiled function given either form compiles once.
    def __eq__(self, other) -> bool:
        if isinstance(other, str):
            return not self.moe and self.form == other
        return tuple.__eq__(self, other)

    def __ne__(self, other) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return tuple.__hash__(self) if self.moe else hash(self.form)

    def __str__(self) -> str:
        return self.form + (f" (MoE: {self.experts} experts, top-{self.top_m})"
                            if self.moe else "")


def as_variant(variant: str | Variant = "paper", experts: int | None = None,
               top_m: int | None = None) -> Variant:
    """A checked :class:`Variant` from a form's name or a Variant, and MoE settings."""
    if isinstance(variant, Variant):
        if experts is not None or top_m is not None:
            if variant.moe and (experts, top_m) != (variant.experts, variant.top_m):
                raise ValueError(f"experts={experts}, top_m={top_m} contradict {variant}")
            variant = variant._replace(experts=experts, top_m=top_m)
    else:
        variant = Variant(variant, experts, top_m)
    if variant.form not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant.form!r}")
    if (variant.experts is None) != (variant.top_m is None):
        raise ValueError("give both experts= (M) and top_m= (m) for an MoE verifier, or neither")
    if variant.moe and variant.form == "filling":
        raise ValueError("the filling form does not take an MoE verifier (experts=, top_m=)")
    if variant.moe:
        m, big_m = variant.top_m, variant.experts
        whole = all(isinstance(x, int) and not isinstance(x, bool) for x in (m, big_m))
        if not (whole and 1 <= m <= big_m):
            raise ValueError(f"need whole numbers 1 <= top_m <= experts, got top_m={m!r}, "
                             f"experts={big_m!r}")
    return variant


def expert_coverage(tokens: ArrayLike, experts: int, top_m: int) -> Array:
    """Fraction of ``experts`` that a pass over ``tokens`` tokens loads with top-``top_m``
    routing: ``phi(T) = 1 - (1 - m/M)**T``; 1 for every T > 0 when ``m = M``.

    Args:
      tokens: tokens in the pass, any shape, >= 0, may be real.
      experts, top_m: M and m (Python ints).
    """
    tokens = jnp.asarray(tokens, _float_dtype(tokens))
    if top_m >= experts:
        return jnp.where(tokens > 0, 1.0, 0.0).astype(tokens.dtype)
    return -jnp.expm1(tokens * math.log1p(-top_m / experts))


class Coefficients(NamedTuple):
    """Per-phase cost coefficients, a pytree (each field a scalar or a batch of draws).

    Load-independent (``c1*``) terms are the cost of a request alone; load-dependent
    (``c2*``) terms are the extra cost it bears for each other request in flight.
    """

    c1p: ArrayLike  # prefill, per request [s]
    c1v: ArrayLike  # verification, per verifier pass [s]
    c1d: ArrayLike  # drafting, per drafter pass [s]
    c2p: ArrayLike  # prefill, per request, per other request in flight [s]
    c2v: ArrayLike  # verification, per pass, per other request in flight [s]
    c2d: ArrayLike  # drafting, per pass, per other request in flight [s]
    c1e: ArrayLike = 0.0  # MoE expert loading, per verifier pass at full coverage [s]
    c2e: ArrayLike = 0.0  # the same, per other request in flight [s]
    fill: ArrayLike = 0.0  # "filling" form: rise of the marginal D2, empty to full batch [1]
    fill_half: ArrayLike = 1.0  # "filling" form: others at half that rise [requests]


def batch_load(others: ArrayLike, fill: ArrayLike, fill_half: ArrayLike) -> Array:
    """Others in flight weighted by their marginal cost, ``G(B)`` of the ``"filling"`` form.

    ``G(B) = B + fill * (B - fill_half * log(1 + B / fill_half))``: ``B`` when ``fill = 0``,
    ``(1 + fill) * B`` less a constant for ``B >> fill_half``. Increasing and convex in B.

    Args:
      others: other requests in flight, >= 0, any shape.
      fill: relative rise of the marginal cost, >= 0; fill_half: others at half of it, > 0
        [requests]; both broadcast with ``others``.
    """
    others = jnp.asarray(others, _float_dtype(others, fill, fill_half))
    return others + fill * (others - fill_half * jnp.log1p(others / fill_half))


class PositionRates(NamedTuple):
    """Per-position conditional acceptance rates, to pass as ``alpha``.

    ``rates[..., i]`` is the probability that draft position ``i + 1`` is accepted given
    that positions ``1..i`` were (vLLM's /metrics per-position rates are unconditional:
    divide consecutive ones to get these).
    """

    rates: ArrayLike  # [..., K], each in [0, 1]


class PhaseDemands(NamedTuple):
    """One kind of demand (load-independent or load-dependent) split by phase [s]."""

    prefill: Array
    drafting: Array
    verification: Array

    @property
    def total(self) -> Array:
        return self.prefill + self.drafting + self.verification


class Demands(NamedTuple):
    """Per-request demand of an operating point, by phase.

    ``independent.total`` is ``C1`` (also called A): the latency of a request alone.
    ``dependent.total`` is ``C2`` (also called G): what each other request in flight adds.
    """

    independent: PhaseDemands
    dependent: PhaseDemands


def _float_dtype(*args):
    return jnp.result_type(float, *args)


@jax.jit
def tokens_per_step(k: ArrayLike, alpha: ArrayLike | PositionRates) -> Array:
    """Expected tokens emitted per SD cycle, E(k, alpha): accepted drafts plus the bonus.

    With one acceptance rate, ``E = sum_{j=0..k} alpha**j = (1 - alpha**(k+1)) / (1 - alpha)``,
    continued to real ``k``; it is 1 at ``k = 0`` and ``k + 1`` at ``alpha = 1``, finite and
    smooth there. With :class:`PositionRates` ``a_1..a_K``,
    ``E = 1 + sum_i w_i * prod_{j<=i} a_j`` with ``w_i = clip(k - i + 1, 0, 1)``: exact for
    whole ``k``, linear in between, and ``k`` beyond ``K`` counts as ``K``.

    Args:
      k: draft length, any shape, >= 0, may be real.
      alpha: per-token acceptance probability in [0, 1], broadcasting with ``k``; or
        :class:`PositionRates` whose ``rates[..., :-1]`` broadcast with ``k``.

    Returns:
      E, the broadcast shape of ``k`` and ``alpha`` (or of ``k`` and ``rates[..., 0]``).
    """
    if isinstance(alpha, PositionRates):
        return _tokens_per_step_positions(k, alpha.rates)
    dtype = _float_dtype(k, alpha)
    k = jnp.asarray(k, dtype)
    alpha = jnp.asarray(alpha, dtype)
    k, alpha = jnp.broadcast_arrays(k, alpha)
    n = k + 1.0

    # Double `where`s keep the branch not taken finite, so its gradient is not NaN.
    positive = alpha > 0
    safe = jnp.where(positive, alpha, 0.5)
    # log alpha, <= 0: log1p keeps it exact near 1, where alpha - 1 is exact; log near 0.
    u = jnp.where(safe < 0.5, jnp.log(safe), jnp.log1p(safe - 1.0))
    near_one = jnp.abs(u) < _TAYLOR_BELOW
    u_far = jnp.where(near_one, -1.0, u)
    closed = jnp.expm1(n * u_far) / jnp.expm1(u_far)
    # Taylor series of sum_j exp(j*u): power sums S_m = sum_{j<=k} j^m, polynomials in k.
    s1 = k * n / 2.0
    s2 = k * n * (2.0 * k + 1.0) / 6.0
    s3 = s1 * s1
    series = n + u * (s1 + u * (s2 / 2.0 + u * s3 / 6.0))
    e = jnp.where(near_one, series, closed)
    # At alpha = 0, E = 1 for every k, with dE/dalpha = 1 once k > 0.
    at_zero = 1.0 + alpha * (k > 0).astype(dtype)
    return jnp.where(positive, e, at_zero)


def _position_terms(k, rates):
    """Per-position survival ``P(X > i) = prod_{j<=i} a_j`` and their weights, positions 1..K.

    The weight ``clip(k - i + 1, 0, 1)`` counts whole positions up to ``k`` and the fraction
    of the next. Returns (positions, weights, survival), each of shape [..., K].
    """
    dtype = _float_dtype(k, rates)
    rates, k = jnp.asarray(rates, dtype), jnp.asarray(k, dtype)
    batch = jnp.broadcast_shapes(k.shape, rates.shape[:-1])
    rates = jnp.broadcast_to(rates, batch + rates.shape[-1:])
    k = jnp.broadcast_to(k, batch)[..., None]
    positions = jnp.cumsum(jnp.ones_like(rates), axis=-1)
    weights = jnp.clip(k - positions + 1.0, 0.0, 1.0)
    return positions, weights, jnp.cumprod(rates, axis=-1)


def _tokens_per_step_positions(k, rates):
    _, weights, survival = _position_terms(k, rates)
    return 1.0 + jnp.sum(weights * survival, axis=-1)


@_jit
def demands(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    prompt_len: ArrayLike | None = None,
    coverage: ArrayLike | None = None,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Demands:
    """Per-request demand by phase: what ``C1`` and ``C2`` are made of.

    Under the ``"stepped"`` variant the cycle count includes the partly wasted last cycle.
    The MoE terms ``c1e, c2e`` enter verification scaled by the expert coverage, the
    fraction of experts a pass loads (:func:`expert_coverage`).

    Args:
      coef: cost coefficients [s]; fields broadcast with the operating point.
      k: draft length (0 = no SD), >= 0, may be real.
      alpha: acceptance probability in [0, 1], or :class:`PositionRates`.
      output_len: tokens each request emits, > 0.
      prompt_len: accepted so a whole operating point can be passed; the base model's
        coefficients belong to one prompt length, so it does not enter.
      coverage: fraction of experts loaded per verifier pass, in [0, 1]. By default 1
        (full coverage, what a loaded MoE server reaches and what a dense model's zero
        ``c1e, c2e`` make moot); for an MoE verifier (``experts``, ``top_m``) the
        coverage at the load given by ``rate`` or ``concurrency`` (the fixed point of
        :func:`latency`), or of a request alone (``k + 1`` tokens a pass) without a load.
      rate, concurrency: the load, for an MoE verifier's coverage only.
      variant: one of :data:`VARIANTS` or a :class:`Variant` (static).
      experts, top_m: an MoE verifier's M and m (static), as for :func:`latency`.

    Returns:
      :class:`Demands`, every leaf of the broadcast shape of the arguments.
    """
    del prompt_len
    variant = as_variant(variant, experts, top_m)
    if coverage is None and variant.moe:
        if rate is not None or concurrency is not None:
            return _solve(coef, k, alpha, output_len, rate, concurrency, variant)[0]
        coverage = expert_coverage(jnp.asarray(k, _float_dtype(k)) + 1.0, variant.experts,
                                   variant.top_m)
    return _demands(coef, k, alpha, output_len, 1.0 if coverage is None else coverage,
                    variant.form)


def _demands(coef, k, alpha, output_len, coverage, form) -> Demands:
    """:func:`demands` at a given expert coverage (any shape broadcasting with the point)."""
    e = tokens_per_step(k, alpha)
    extra = _wasted_cycles(k, alpha, e, form)
    dtype = _float_dtype(e, output_len, coverage, *coef)
    e, extra, k, output_len, coverage, *fields = jnp.broadcast_arrays(
        *(jnp.asarray(x, dtype) for x in (e, extra, k, output_len, coverage, *coef))
    )
    c = Coefficients(*fields)
    cycles = output_len / e + extra

    def phases(prefill, verify, expert, draft):
        return PhaseDemands(prefill=prefill, drafting=cycles * k * draft,
                            verification=cycles * (verify + coverage * expert))

    return Demands(
        independent=phases(c.c1p, c.c1v, c.c1e, c.c1d),
        dependent=phases(c.c2p, c.c2v, c.c2e, c.c2d),
    )


def _wasted_cycles(k, alpha, e, variant):
    """Mean cycles beyond ``g / E``: 0 for the paper's form, else ``(E[X^2] - E) / (2 E^2)``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != "stepped":
        return jnp.zeros_like(e)
    # "stepped": whole cycles
    return (tokens_second_moment(k, alpha, e) - e) / (2.0 * e**2)


def tokens_second_moment(k, alpha, e):
    """``E[X^2]`` of the tokens ``X`` one SD cycle emits, given ``e = E[X]``.

    ``E[X^2] - E = 2 * sum_j j * P(X > j)``; with one alpha that sum is ``alpha * dE/dalpha``.
    Shapes as :func:`tokens_per_step`; not jit-compiled itself.
    """
    if isinstance(alpha, PositionRates):
        positions, weights, survival = _position_terms(k, alpha.rates)
        weighted = jnp.sum(positions * weights * survival, axis=-1)
    else:
        alpha = jnp.broadcast_to(jnp.asarray(alpha, e.dtype), e.shape)
        k = jnp.broadcast_to(jnp.asarray(k, e.dtype), e.shape)
        _, slope = jax.jvp(lambda a: tokens_per_step(k, a), (alpha,), (jnp.ones_like(alpha),))
        weighted = alpha * slope
    return e + 2.0 * weighted


def _solve(coef, k, alpha, output_len, rate, concurrency, variant, closed=None):
    """Demands, mean latency [s], mean others in flight, stability, and boundary wait [s].

    One of ``rate`` (open loop) and ``concurrency`` (closed loop) is given; or both, with
    the boolean array ``closed`` choosing per point (for fitting traces of both kinds).
    Where the load is past saturation, latency is +inf and ``others`` and the wait are 0
    (finite stand-ins so that callers' products stay finite); callers mask with ``stable``.
    The demands returned are those at the point's expert coverage (MoE), else full.
    """
    if closed is None and (rate is None) == (concurrency is None):
        raise TypeError("give exactly one of rate= (open loop, req/s) "
                        "or concurrency= (closed loop)")
    variant = as_variant(variant)
    full = _demands(coef, k, alpha, output_len, 1.0, variant.form)
    dtype = full.independent.total.dtype
    d_open = d_closed = full
    if variant.moe:  # demands are linear in the coverage: d(phi) = bare + phi * (full - bare)
        bare = _demands(coef, k, alpha, output_len, 0.0, variant.form)

        def at(phi):
            return jax.tree.map(lambda b, f: b + phi * (f - b), bare, full)

        if concurrency is not None:  # N - 1 others: no fixed point
            d_closed = at(_step_coverage(variant, k, jnp.asarray(concurrency, dtype) - 1.0,
                                         dtype))
        if rate is not None:
            passes = jnp.asarray(k, dtype) + 1.0  # tokens a request puts in each pass
            d_open = at(_open_coverage(bare, full, passes, jnp.asarray(rate, dtype), variant))
    if concurrency is not None:
        c1, c2, concurrency = jnp.broadcast_arrays(
            d_closed.independent.total, d_closed.dependent.total,
            jnp.asarray(concurrency, dtype))
        closed_others = concurrency - 1.0
        closed_total = c1 + _dependent_latency(coef, d_closed, closed_others, variant)
        closed_throughput = concurrency / closed_total  # Little's Law
    if rate is not None:
        c1, c2, c2_full, rate = jnp.broadcast_arrays(
            d_open.independent.total, d_open.dependent.total, full.dependent.total,
            jnp.asarray(rate, dtype))
        if variant.form == "filling":
            open_total, open_stable = _open_filling(coef, d_open, rate)
        else:
            # Saturation is where the load-dependent demand at full coverage meets 1 / rate.
            open_stable = 1.0 - rate * c2_full > 0
            # Double `where`s keep the untaken branch finite, so its gradient is 0, not NaN.
            open_total = c1 / jnp.where(open_stable, 1.0 - rate * c2, 1.0)
        open_others = jnp.where(open_stable, rate * open_total, 0.0)
    if rate is None:
        d, total, others, throughput = d_closed, closed_total, closed_others, closed_throughput
        stable = jnp.ones(total.shape, bool)
    elif concurrency is None:
        d, total, others, throughput, stable = d_open, open_total, open_others, rate, open_stable
    else:
        closed = jnp.broadcast_to(jnp.asarray(closed, bool), open_total.shape)
        d = jax.tree.map(lambda a, b: jnp.where(closed, a, b), d_closed, d_open)
        total = jnp.where(closed, closed_total, open_total)
        others = jnp.where(closed, closed_others, open_others)
        throughput = jnp.where(closed, closed_throughput, rate)
        stable = closed | open_stable
    wait = jnp.where(stable, _boundary_wait(coef, k, others, throughput, variant), 0.0)
    if variant.form == "stepped":
        total = total + 2.0 * wait
    return d, jnp.where(stable, total, jnp.inf), others, stable, wait


def at_load(coef, k, alpha, output_len, others, admissions, variant: Variant, demands=None):
    """Latency and TTFT [s] of a request with ``others`` in flight throughout, while the
    server admits ``admissions`` requests a second: the relation both loops solve at their
    fixed points (``others = rate * L`` open, ``N - 1`` closed), and what the fluid model of
    :mod:`sdbayes.fluid` follows as its load changes. ``demands``: the point's
    :class:`Demands` at full coverage, for a dense verifier evaluated at many loads (they do
    not depend on the load). Not jit-compiled itself."""
    dtype = _float_dtype(others, output_len, *coef)
    others = jnp.asarray(others, dtype)
    d = (demands if demands is not None and not variant.moe
         else _demands(coef, k, alpha, output_len, _step_coverage(variant, k, others, dtype),
                       variant.form))
    total = d.independent.total + _dependent_latency(coef, d, others, variant)
    wait = _boundary_wait(coef, k, others, admissions, variant)
    if variant.form == "stepped":
        total = total + 2.0 * wait
    return total, d.independent.prefill + wait


def _cycle_load(coef, others, variant: Variant):
    """Others in flight as the per-cycle load-dependent costs count them:
    :func:`batch_load` under the ``"filling"`` form, else themselves."""
    if variant.form != "filling":
        return others
    return batch_load(others, coef.fill, coef.fill_half)


def _dependent_latency(coef, d: Demands, others, variant: Variant):
    """Latency [s] that ``others`` in flight add: ``B * C2``, or under ``"filling"``
    ``B * c2p + G(B) * D2`` (prefill stalls linear, decode cycles filling the GPU)."""
    dependent = d.dependent
    others, total, prefill, cycles = jnp.broadcast_arrays(
        others, dependent.total, dependent.prefill, dependent.drafting + dependent.verification)
    if variant.form != "filling":
        return others * total
    return others * prefill + _cycle_load(coef, others, variant) * cycles


def _marginal_demand(coef, d: Demands, others, variant: Variant):
    """What one more request in flight adds at a load of ``others`` [s], the slope of
    :func:`_dependent_latency`: ``C2``, or ``c2p + G'(B) * D2`` under ``"filling"`` with
    ``G'(B) = 1 + fill * B / (B + fill_half)``."""
    if variant.form != "filling":
        return d.dependent.total
    slope = 1.0 + coef.fill * others / (others + coef.fill_half)
    return _with_cycle_slope(d, slope)


def _full_batch_demand(coef, d: Demands, form: str):
    """The marginal load-dependent demand of one more request in a full batch [s]: ``C2``,
    or ``c2p + (1 + fill) * D2`` under ``"filling"`` (``G'`` at its limit); its inverse
    is the saturation rate."""
    if form != "filling":
        return d.dependent.total
    return _with_cycle_slope(d, 1.0 + jnp.asarray(coef.fill, d.dependent.total.dtype))


def _with_cycle_slope(d: Demands, slope):
    """``c2p + slope * D2`` [s]: the load-dependent demand with the decode cycles' part
    weighted by the marginal batch load ``slope``."""
    dependent = d.dependent
    return dependent.prefill + slope * (dependent.drafting + dependent.verification)


def _open_filling(coef, d: Demands, rate):
    """Open-loop latency of the ``"filling"`` form and its stability, each of the broadcast
    shape of the demands and ``rate``.

    ``L`` solves ``r(L) = L - C1 - rate*L*c2p - G(rate * L) * D2 = 0``. As
    ``B <= G(B) <= (1 + fill) * B``, the paper's closed forms at ``C2`` and at the full
    batch's demand bracket the root, and ``r`` increases while that demand is below
    ``1 / rate`` (``G' < 1 + fill``): one root. Past that, latency is a finite stand-in
    (callers mask it with ``stable``).
    """
    variant = Variant("filling")
    full = _full_batch_demand(coef, d, "filling")
    c1, c2, full, rate = jnp.broadcast_arrays(d.independent.total, d.dependent.total, full,
                                              jnp.asarray(rate, full.dtype))
    stable = 1.0 - rate * full > 0
    lo = c1 / jnp.where(stable, 1.0 - rate * c2, 1.0)
    hi = c1 / jnp.where(stable, 1.0 - rate * full, 1.0)
    # The bracket only steers the search; the root's gradient comes from the residual.
    lo = jax.lax.stop_gradient(jnp.where(stable, lo, 1.0))
    hi = jax.lax.stop_gradient(jnp.where(stable, jnp.maximum(hi, lo), 1.0))

    def residual(latency):
        return latency - c1 - _dependent_latency(coef, d, rate * latency, variant)

    total = increasing_root(residual, lo, hi, iterations=_REFINE_BISECTIONS,
                            newton=_REFINE_NEWTON)
    return total, stable


def _open_coverage(bare: Demands, full: Demands, passes, rate, variant: Variant) -> Array:
    """Expert coverage at the open-loop fixed point of an MoE verifier.

    A pass holds ``T = (k + 1) * (1 + rate * L)`` tokens (the request's and the others'),
    so the demands depend on the latency they determine: ``L`` solves
    ``r(L) = L - C1(phi(L)) - rate * L * C2(phi(L)) = 0``. Bounding ``phi`` between its
    zero-load value ``phi(k + 1)`` and 1 brackets the root between the two closed forms,
    ``r <= 0`` at the low one and ``>= 0`` at the high one; the first crossing on a grid
    over the bracket picks the smallest root (the one a server filling up from empty
    reaches; it is unique when ``2 * c2e <= (k + 1) * |log(1 - m/M)| * c1e``, where ``-r``
    is concave), and a bisection with implicit-function gradients refines it. Past
    saturation at full coverage (``rate * C2(1) >= 1``) it returns 1, a finite stand-in.

    Returns:
      ``phi(T(L))``, the broadcast shape of the demands, ``passes`` and ``rate``.
    """
    def coverage(latency):
        return expert_coverage(passes * (1.0 + rate * latency), variant.experts, variant.top_m)

    a1, a2, f1, f2, passes, rate = jnp.broadcast_arrays(
        bare.independent.total, bare.dependent.total, full.independent.total,
        full.dependent.total, passes, rate)
    b1, b2 = f1 - a1, f2 - a2

    def residual(latency):
        phi = coverage(latency)
        return latency - (a1 + b1 * phi) - rate * latency * (a2 + b2 * phi)

    stable = 1.0 - rate * f2 > 0
    phi0 = expert_coverage(passes, variant.experts, variant.top_m)
    lo = (a1 + b1 * phi0) / jnp.where(stable, 1.0 - rate * (a2 + b2 * phi0), 1.0)
    hi = f1 / jnp.where(stable, 1.0 - rate * f2, 1.0)
    lo, hi = jnp.where(stable, lo, 1.0), jnp.where(stable, jnp.maximum(hi, lo), 1.0)
    # The bracket only steers the search; the root's gradient comes from the residual.
    lo, hi = jax.lax.stop_gradient(lo), jax.lax.stop_gradient(hi)
    grid = jax.vmap(lambda t: lo + (hi - lo) * t)(jnp.linspace(0.0, 1.0, _GRID, dtype=lo.dtype))
    crossed = (jax.vmap(residual)(grid) >= 0).at[-1].set(True)  # [_GRID, ...]
    first = jnp.argmax(crossed, axis=0)[None]
    sub_lo = jnp.take_along_axis(grid, jnp.maximum(first - 1, 0), axis=0)[0]
    sub_hi = jnp.take_along_axis(grid, first, axis=0)[0]
    latency = increasing_root(residual, sub_lo, sub_hi, iterations=_REFINE_BISECTIONS,
                              newton=_REFINE_NEWTON)
    return jnp.where(stable, coverage(latency), 1.0)


def _step_coverage(variant: Variant, k, others, dtype):
    """Expert coverage of a decode step holding the request and ``others`` [..]: 1 if dense."""
    if not variant.moe:
        return 1.0
    tokens = (jnp.asarray(k, dtype) + 1.0) * (1.0 + others)
    return expert_coverage(tokens, variant.experts, variant.top_m)


def increasing_root(residual, lo: Array, hi: Array, iterations: int = _BISECTIONS,
                    newton: int = 0) -> Array:
    """Elementwise root of ``residual``, increasing on ``[lo, hi]``, by bisection.

    ``residual`` may be ``+inf`` (e.g. past saturation) but not NaN. Where it is positive
    already at ``lo`` the answer is ``lo``. Gradients with respect to whatever ``residual``
    closes over come from the implicit function theorem (``jax.lax.custom_root``), exact
    and as cheap as one more evaluation.

    Args:
      residual: maps an array of the shape of ``lo`` to one of the same shape; elementwise.
      lo, hi: the bracket, arrays of one shape.
      iterations: bisection steps.
      newton: Newton steps after them, each kept inside the last bracket: for a smooth
        residual a few bisections and Newton steps reach full precision in far fewer
        evaluations than bisection alone.

    Returns:
      The root, of the shape of ``lo``.
    """

    def solve(f, _):
        def halve(_, bounds):
            a, b = bounds
            mid = 0.5 * (a + b)
            above = f(mid) > 0
            return jnp.where(above, a, mid), jnp.where(above, mid, b)

        def newton_step(_, x):
            value, slope = jax.jvp(f, (x,), (jnp.ones_like(x),))
            step = jnp.where(slope > 0, value / jnp.where(slope > 0, slope, 1.0), 0.0)
            return jnp.clip(x - step, a, b)

        a, b = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
        x = jax.lax.fori_loop(0, newton, newton_step, 0.5 * (a + b))
        return jnp.where(f(lo) > 0, lo, x)

    def tangent_solve(g, y):
        slope = g(jnp.ones_like(y))
        return y / jnp.where(slope != 0, slope, jnp.inf)

    return jax.lax.custom_root(residual, 0.5 * (lo + hi), solve, tangent_solve)


class Metrics(NamedTuple):
    """Mean end-to-end latency, TTFT and TPOT [s], and the demands C1 and C2 [s]."""

    latency: Array
    ttft: Array
    tpot: Array
    alone: Array  # C1, the load-independent demand
    dependent: Array  # C2, the demand per other request in flight
    marginal: Array  # what one more request in flight adds at this load: C2 but "filling"


def metrics(coef, *, k, alpha, output_len, rate, concurrency, closed=None, variant="paper",
            experts=None, top_m=None):
    """All metrics from one solve: the single place TTFT and TPOT are derived.

    Arguments as :func:`latency`; with both ``rate`` and ``concurrency`` given, the boolean
    array ``closed`` picks per point (the probabilistic model's traces mix both kinds).
    Not jit-compiled itself: it runs inside its caller's trace.
    """
    variant = as_variant(variant, experts, top_m)
    d, total, others, stable, wait = _solve(coef, k, alpha, output_len, rate, concurrency,
                                            variant, closed)
    first = jnp.where(stable, d.independent.prefill + wait, jnp.inf)
    return Metrics(total, first, _per_token(total, first, stable, output_len),
                   d.independent.total, d.dependent.total,
                   _marginal_demand(coef, d, others, variant))


def _per_token(total, first, stable, output_len):
    """(L - TTFT) / (g - 1); 0 where g <= 1, +inf where unstable."""
    decode = jnp.where(stable, total - jnp.where(stable, first, 0.0), 0.0)
    decode, after_first = jnp.broadcast_arrays(decode, jnp.asarray(output_len, decode.dtype) - 1.0)
    several = after_first > 0
    per_token = jnp.where(several, decode / jnp.where(several, after_first, 1.0), 0.0)
    return jnp.where(stable, per_token, jnp.inf)


def decode_step(c: Coefficients, k, phi, others, fixed=1.0):
    """Duration of one decode step [s]: ``fixed`` times the verifier and drafter passes'
    load-independent costs, plus ``others`` times their load-dependent ones, the MoE
    expert terms at coverage ``phi``. Shared by the model, goodput and the simulator, for
    JAX or NumPy arrays alike."""
    return (fixed * (c.c1v + phi * c.c1e + k * c.c1d)
            + others * (c.c2v + phi * c.c2e + k * c.c2d))


def _boundary_wait(coef, k, others, throughput, variant: Variant):
    """Mean wait of an arrival for the step in progress to end [s] (see :func:`ttft`), with
    ``others`` in flight counted as the variant's load-dependent costs count them
    (:func:`_cycle_load`) and the step's expert coverage (:func:`_step_coverage`)."""
    loaded = _cycle_load(coef, others, variant)
    coverage = _step_coverage(variant, k, others, others.dtype)
    k, others, loaded, throughput, phi, *fields = jnp.broadcast_arrays(
        *(jnp.asarray(x, others.dtype)
          for x in (k, others, loaded, throughput, coverage, *coef))
    )
    c = Coefficients(*fields)
    busy = -jnp.expm1(-others)
    step = decode_step(c, k, phi, loaded - busy, fixed=busy)
    stretch = jnp.maximum(1.0 - throughput * c.c2p, 1e-12)  # > 0 while stable
    # The residual life of a period, E[S^2] / (2 E[S]): its mean half plus what the
    # Poisson number of admission stalls in it adds by its variance.
    return step / (2.0 * stretch) + busy * throughput * c.c2p**2 / 2.0


@_jit
def latency(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    prompt_len: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """Mean end-to-end request latency [s].

    Args:
      coef: cost coefficients [s].
      k: draft length, >= 0, may be real.
      alpha: acceptance probability in [0, 1], or :class:`PositionRates`.
      output_len: tokens each request emits, > 0.
      rate: open-loop arrival rate [req/s], >= 0. Give this or ``concurrency``.
      concurrency: requests kept in flight (closed loop), >= 1.
      prompt_len: see :func:`demands`.
      variant: one of :data:`VARIANTS` or a :class:`Variant` (static).
      experts, top_m: an MoE verifier's number of experts M and routed experts per token
        m (static). Then latency solves the fixed point of :func:`expert_coverage`: a
        verifier pass over ``T = (k + 1) * (1 + rate * L)`` tokens costs
        ``c1v + phi(T) * c1e`` and ``c2v + phi(T) * c2e``. Without them the expert terms
        count at full coverage.

    Returns:
      Latency of the arguments' broadcast shape; ``+inf`` at and past saturation (for an
      MoE verifier: past ``1 / C2`` at full coverage, what a loaded batch reaches).
    """
    del prompt_len
    return _solve(coef, k, alpha, output_len, rate, concurrency,
                  as_variant(variant, experts, top_m))[1]


@_jit
def ttft(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    prompt_len: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """Mean time to first token [s]: the request's prefill plus the wait for a step boundary.

    A new request is admitted when the decode step in progress ends, then prefills for
    ``c1p``. The engine is busy with probability ``rho = 1 - exp(-B)`` (``B`` others in
    flight, Poisson-distributed about their mean); a busy step holds ``B / rho`` requests
    on average and is stretched by the admission stalls ``c2p`` of the requests arriving
    during it. An arrival waits the rest of its period, ``E[S^2] / (2 E[S])``: half a
    period, plus what the Poisson number of stalls in it adds by its variance:

        TTFT = c1p + [rho*(c1v + c1e + k*c1d) + (B - rho)*(c2v + c2e + k*c2d)]
                     / (2 * (1 - throughput * c2p))
                   + rho * throughput * c2p^2 / 2

    It equals ``c1p`` at zero load. This is not the prefill share of the latency
    (``c1p + B*c2p`` in :func:`demands`): other requests' admissions stall a request over
    its whole life, mostly after its first token. Arguments as :func:`latency`; ``+inf``
    past saturation.
    """
    del prompt_len
    return metrics(coef, k=k, alpha=alpha, output_len=output_len, rate=rate,
                   concurrency=concurrency, variant=as_variant(variant, experts, top_m)).ttft


@_jit
def tpot(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    prompt_len: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """Mean time per output token after the first [s], vLLM's ``(L - TTFT) / (g - 1)``.

    Arguments as :func:`latency`; 0 where ``output_len <= 1`` (as vLLM reports it);
    ``+inf`` past saturation.
    """
    del prompt_len
    return metrics(coef, k=k, alpha=alpha, output_len=output_len, rate=rate,
                   concurrency=concurrency, variant=as_variant(variant, experts, top_m)).tpot


@_jit
def saturation_rate(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    prompt_len: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """Arrival rate [req/s] at which the mean latency diverges, ``1 / C2``.

    For an MoE verifier (``experts``, ``top_m``) ``C2`` is at full expert coverage: near
    saturation the batch is large enough to load every expert. Under the ``"filling"``
    form it is ``1 / (c2p + (1 + fill) * D2)``, the marginal demand in a full batch.
    """
    del prompt_len
    form = as_variant(variant, experts, top_m).form
    return 1.0 / _full_batch_demand(coef, _demands(coef, k, alpha, output_len, 1.0, form), form)


@_jit
def speedup(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike | None = None,
    concurrency: ArrayLike | None = None,
    prompt_len: ArrayLike | None = None,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """Mean latency without SD over mean latency with draft length ``k``, at the same load.

    Arguments as :func:`latency`. Where only one side is past saturation the speedup is
    ``+inf`` (SD still stable) or 0 (SD saturated); where both are, it is NaN: there is no
    steady state to compare.
    """
    del prompt_len
    variant = as_variant(variant, experts, top_m)
    with_sd = _solve(coef, k, alpha, output_len, rate, concurrency, variant)[1]
    no_sd = jnp.zeros_like(with_sd)
    without = _solve(coef, no_sd, 0.0, output_len, rate, concurrency, variant)[1]
    sd_stable, base_stable = jnp.isfinite(with_sd), jnp.isfinite(without)
    ratio = jnp.where(base_stable, without, 1.0) / jnp.where(sd_stable, with_sd, 1.0)
    return jnp.where(
        sd_stable,
        jnp.where(base_stable, ratio, jnp.inf),
        jnp.where(base_stable, 0.0, jnp.nan),
    )


@partial(jax.jit, static_argnames=("variant", "experts", "top_m"))
def goodput(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    batch_size: ArrayLike,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
) -> Array:
    """Emitted tokens per second of batch time for ``batch_size`` requests decoding together.

    SmartSpec's criterion (docs/model.md section 4): ``B * E(k, alpha) / T_cycle`` with
    ``T_cycle = (c1v + k*c1d) + (B - 1) * (c2v + k*c2d)``, plus the MoE terms
    ``phi * (c1e + (B - 1) * c2e)`` with ``phi`` the :func:`expert_coverage` of the step's
    ``B * (k + 1)`` tokens (full coverage without ``experts``, ``top_m``). Under the
    ``"filling"`` form the ``B - 1`` others count as :func:`batch_load` of them.

    Args:
      coef: cost coefficients [s].
      k: draft length, >= 0, may be real.
      alpha: acceptance probability in [0, 1], or :class:`PositionRates`.
      batch_size: requests decoding in the batch, >= 1.
      variant, experts, top_m: the model variant and an MoE verifier's M and m (static),
        as for :func:`latency`.

    Returns:
      Tokens per second, the broadcast shape of the arguments.
    """
    e = tokens_per_step(k, alpha)
    dtype = _float_dtype(e, batch_size, *coef)
    e, k, batch, *fields = jnp.broadcast_arrays(
        *(jnp.asarray(x, dtype) for x in (e, k, batch_size, *coef))
    )
    c = Coefficients(*fields)
    variant = as_variant(variant, experts, top_m)
    phi = _step_coverage(variant, k, batch - 1.0, dtype)
    cycle = decode_step(c, k, phi, _cycle_load(c, batch - 1.0, variant))
    return batch * e / cycle
