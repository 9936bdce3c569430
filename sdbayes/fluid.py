"""What a benchmark of finite length reports: the fluid model of an open-loop run.

The finite-run counterpart of docs/model.md section 1's steady model. A benchmark (GuideLLM's
constant-rate points, ``vllm bench serve``) offers ``rate`` requests a second to an empty
server for ``duration`` seconds and reports the mean over the requests that completed.
Well below saturation that is the steady mean of :func:`sdbayes.model.latency`. Near
saturation it is not: the backlog takes a time ``1 / X'(N)`` to build up (``X(N) = N /
L(N)`` the throughput with ``N`` in flight), which grows without bound at capacity; past it
the backlog grows for the whole run, and the requests still in flight at the end, the
slowest, are not counted. So the reported mean is finite where the steady one is ``+inf``,
and lower near capacity.

The fluid model: requests arrive evenly at ``rate`` from ``t = 0``; every request in flight
progresses at the same speed, ``1 / L(N(t))`` of its work a second, where ``N(t)`` is the
number in flight and ``L(B)`` the latency model's latency with ``B`` others in flight
throughout while ``rate`` requests a second are admitted (:func:`sdbayes.model.at_load`).
Requests therefore finish in the order they came. With the progress ``V(t) = integral dt /
L(N(t))``, the request arriving at ``a`` finishes when ``V = V(a) + 1``, and ``N(t) = rate *
(t - a*(t))`` with ``V(a*(t)) = V(t) - 1``: those in flight are those that came after the one
finishing now. Its equilibrium is the steady open-loop model (``N = rate * L``, ``L =
L(N)``), which a run reaches when it is long against the relaxation time. (The
``"stepped"`` form does not count requests waiting for a step boundary, ``2 W`` of each
one's latency, as load on the others; nor does its fluid.) The fluid model leaves out the
queue's random fluctuations, which the steady mean-value model also averages over, and any
cap on the requests in flight.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from sdbayes.model import Coefficients, PositionRates, Variant, _demands, as_variant, at_load

_ADVANCES = 3
STEPS = 128
"""Time steps of a run: the means are within 0.3% of their limit (0.1% at 256 steps)."""


class FiniteRun(NamedTuple):
    """Means over the requests a run completed [s], and its mean number in flight."""

    latency: jax.Array
    ttft: jax.Array
    tpot: jax.Array
    in_flight: jax.Array  # time average over the run [requests]


@partial(jax.jit, static_argnames=("variant", "steps"))
def finite_run(
    coef: Coefficients,
    *,
    k: ArrayLike,
    alpha: ArrayLike | PositionRates,
    output_len: ArrayLike,
    rate: ArrayLike,
    duration: ArrayLike,
    variant: str | Variant = "paper",
    steps: int = STEPS,
) -> FiniteRun:
    """Mean latency, TTFT and TPOT of the requests an open-loop run of ``duration`` completes.

    The fluid model of the module docstring, on ``steps`` steps of ``duration / steps``.

    Args:
      coef: cost coefficients [s]; fields broadcast with the operating point.
      k, alpha, output_len: the operating point, as for :func:`sdbayes.model.latency`.
      rate: arrival rate [req/s], > 0.
      duration: length of the run [s], > 0: arrivals stop and unfinished requests are
        dropped at its end.
      variant: the latency model's variant (static).
      steps: time steps (static).

    Returns:
      :class:`FiniteRun`, each field of the broadcast shape of the arguments. Where no
      request completes within ``duration`` the means are ``+inf``.
    """
    variant = as_variant(variant)
    full = _demands(coef, k, alpha, output_len, 1.0, variant.form)  # hoisted out of the scan

    def law(others):  # latency and TTFT with `others` in flight, admitting `rate` a second
        return at_load(coef, k, alpha, output_len, others, rate, variant, full)

    alone = full.independent.total  # of the point's and the coefficients' shape
    rate, duration, output_len, _ = jnp.broadcast_arrays(
        *(jnp.asarray(x, alone.dtype) for x in (rate, duration, output_len, alone)))
    shape = rate.shape
    dt = duration / steps
    flat_dt = dt.reshape(-1)

    def step(carry, j):
        # progress: V at t_0 .. t_j, +inf beyond, [steps + 1, *shape]; oldest: the last
        # cohort with V <= V(t_j) - 1, the one finishing now, [*shape]
        progress, oldest, before, share = carry
        now = progress[j]
        target = now - 1.0
        # It moves on by about L(then) / L(now) cohorts a step, at most one while the
        # backlog builds up: a few checks instead of a search.
        for _ in range(_ADVANCES):
            following = jnp.take_along_axis(progress, (oldest + 1)[None], axis=0)[0]
            oldest = jnp.where(following <= target, oldest + 1, oldest)
        low = jnp.take_along_axis(progress, oldest[None], axis=0)[0]
        high = jnp.take_along_axis(progress, (oldest + 1)[None], axis=0)[0]
        fraction = jnp.clip((target - low) / jnp.where(high > low, high - low, 1.0), 0.0, 1.0)
        done_at = jnp.where(target > 0, (oldest + fraction) * dt, 0.0)
        in_flight = rate * (j * dt - done_at)
        # The latency at mid-step, N extrapolated: second order in dt, where the left end
        # would be first (its error is ten times larger at 256 steps).
        latency, first = law(share * jnp.maximum(1.5 * in_flight - 0.5 * before, 0.0))
        if variant.form == "stepped":  # as its steady form: others = rate * (L - 2 W)
            share = 1.0 - 2.0 * (first - full.independent.prefill) / latency
        return ((progress.at[j + 1].set(now + dt / latency), oldest, in_flight, share),
                (first, in_flight))

    start = jnp.full((steps + 1,) + shape, jnp.inf, rate.dtype).at[0].set(0.0)
    carry = (start, jnp.zeros(shape, jnp.int32), jnp.zeros(shape, rate.dtype),
             jnp.ones(shape, rate.dtype))
    (progress, *_), (first, in_flight) = jax.lax.scan(step, carry, jnp.arange(steps))
    progress, first = progress.reshape(steps + 1, -1), first.reshape(steps, -1)
    arrivals = jnp.arange(steps)[:, None] * flat_dt[None, :]  # [steps, P]: cohort i arrives at t_i
    finished = progress[:-1] + 1.0 <= progress[-1:]
    ends = _time_at(progress, jnp.where(finished, progress[:-1] + 1.0, 0.0), flat_dt)
    count = finished.sum(axis=0)

    def mean(x):
        total = jnp.where(finished, x, 0.0).sum(axis=0)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.inf).reshape(shape)

    latency, ttft = mean(ends - arrivals), mean(first)
    after_first = output_len - 1.0
    several = after_first > 0
    tpot = jnp.where(several, (latency - ttft) / jnp.where(several, after_first, 1.0), 0.0)
    return FiniteRun(latency, ttft, jnp.where(jnp.isfinite(latency), tpot, jnp.inf),
                     in_flight.mean(axis=0))


def _time_at(progress, value, dt):
    """When progress reached ``value``, by linear interpolation on ``progress`` (increasing,
    +inf where not reached yet); 0 for values <= 0. ``progress`` [steps + 1, P]; ``value``
    [P] or [m, P]; ``dt`` [P]; returns the shape of ``value`` [s]."""
    steps = progress.shape[0] - 1

    def one(column, targets, width):
        after = jnp.clip(jnp.searchsorted(column, targets, side="right"), 1, steps)
        low, high = column[after - 1], column[after]
        gap = jnp.where(jnp.isfinite(high) & (high > low), high - low, 1.0)
        fraction = jnp.clip((targets - low) / gap, 0.0, 1.0)
        return jnp.where(targets > 0, (after - 1 + fraction) * width, 0.0)

    value = jnp.asarray(value)
    if value.ndim == 1:
        return jax.vmap(one, in_axes=(1, 0, 0))(progress, value, dt)
    return jax.vmap(one, in_axes=(1, 1, 0), out_axes=1)(progress, value, dt)
