"""A discrete-event simulator of one vLLM-like replica serving with speculative decoding.

The ground truth for testing calibration, for measuring the analytic model's error, and for
tail latencies (docs/model.md section 1). It reads the cost coefficients mechanistically:

- Requests arrive (Poisson at ``rate``, at given times, or a closed loop of ``concurrency``
  requests), wait in a FIFO queue, and are admitted at an engine-step boundary while fewer
  than ``max_batch`` requests are in the engine (vLLM's ``max_num_seqs``).
- Admitting a request stalls the engine by ``c2p``; the request's prefill completes ``c1p``
  after its admission (its time to first token) and it joins the decode batch at the next
  step boundary.
- A decode step with ``n`` requests decoding lasts ``(c1v + k*c1d) + (n - 1)*(c2v + k*c2d)``
  plus, for an MoE verifier (``experts``, ``top_m``), ``phi * (c1e + (n - 1)*c2e)`` with
  ``phi`` the fraction of experts its ``n * (k + 1)`` tokens load
  (:func:`sdbayes.model.expert_coverage`; full coverage without them). Under the
  ``"filling"`` form (``variant="filling"``)
  the ``n - 1`` others count as :func:`sdbayes.model.batch_load` of them (the marginal cost
  of a request grows as the batch fills the GPU). Each request in a step emits ``1 +``
  (drafts accepted before the first rejection, at most ``k``) tokens. A request leaves once
  it has emitted its ``output_len`` tokens, as in the analytic model, where they take
  ``output_len / E`` steps.

Acceptance does not depend on timing, so each request's number of decode steps is drawn up
front, vectorised; the event loop then advances from event to event (arrival, prefill done,
departure), skipping the decode steps in between in one go, so its cost grows with the number
of requests, not of tokens.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import jax
import numpy as np
import pandas as pd

from sdbayes.model import (
    Coefficients,
    PositionRates,
    Variant,
    as_variant,
    batch_load,
    decode_step,
    expert_coverage,
)


class Uniform(NamedTuple):
    """Whole token counts drawn uniformly from ``low..high``, both included."""

    low: int
    high: int


class Empirical(NamedTuple):
    """Token counts drawn with replacement from observed ``values``."""

    values: tuple[int, ...] | np.ndarray


Lengths = int | Uniform | Empirical


def simulate(
    coef: Coefficients,
    *,
    k: int,
    alpha: float | PositionRates,
    prompt_len: Lengths,
    output_len: Lengths,
    n_requests: int | None = None,
    rate: float | None = None,
    concurrency: int | None = None,
    arrival_times: np.ndarray | None = None,
    max_batch: int = 256,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
    seed: int | jax.Array = 0,
    hardware: str = "simulated",
    verifier: str = "simulated",
    drafter: str = "simulated",
    method: str = "simulated",
) -> pd.DataFrame:
    """Simulate one serving replica and return its per-request trace.

    Give exactly one kind of load: ``rate`` (Poisson arrivals), ``concurrency`` (a closed
    loop: a new request arrives whenever one finishes) or ``arrival_times``.

    Args:
      coef: cost coefficients [s], scalars.
      k: draft length, a whole number >= 0 (0 = no SD).
      alpha: per-token acceptance probability in [0, 1], or :class:`PositionRates` of
        length >= ``k`` (conditional rates, as in the analytic model).
      prompt_len: prompt tokens: a whole number, :class:`Uniform` or :class:`Empirical`.
        Recorded only: the base model's costs do not depend on it.
      output_len: tokens each request emits, likewise.
      n_requests: how many requests; with ``arrival_times``, defaults to their number.
      rate: Poisson arrival rate [req/s], > 0.
      concurrency: requests kept in flight, >= 1.
      arrival_times: arrival time of each request [s], shape [n_requests], >= 0.
      max_batch: most requests in the engine at once (prefilling or decoding), >= 1.
      variant: the model variant whose step costs the engine charges: under
        ``"filling"`` a step with n decoding costs :func:`~sdbayes.model.batch_load` of the
        n - 1 others (``coef.fill, fill_half``), under the others the others themselves
        (the simulator always runs whole steps, so ``"paper"`` and ``"stepped"`` are one).
        A :class:`~sdbayes.model.Variant` carries an MoE verifier.
      experts, top_m: an MoE verifier's number of experts M and routed experts per token
        m; without them the expert terms ``c1e, c2e`` count at full coverage.
      seed: an int or a JAX PRNG key; the same seed gives the same trace.
      hardware, verifier, drafter, method: names written into the trace's config columns.

    Returns:
      Per-request rows in the canonical schema (see :mod:`sdbayes.traces`), in arrival
      order: the configuration, ``arrival_s, prompt_len, output_len, ttft_s, e2e_s,
      draft_tokens, accepted_tokens``, and ``admitted_s`` (when prefill started).

    Raises:
      ValueError: a bad argument, named.
    """
    rates = _survival(k, alpha)
    n, arrivals = _arrivals(n_requests, rate, concurrency, arrival_times)
    if max_batch < 1 or int(max_batch) != max_batch:
        raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch}")
    for name in Coefficients._fields:
        value = float(getattr(coef, name))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"coefficient {name} must be finite and >= 0, got {value}")
    variant = as_variant(variant, experts, top_m)
    filling = variant.form == "filling"
    if coef.fill > 0 and not filling:
        raise ValueError(f"coefficient fill={float(coef.fill):g} belongs to the filling form; "
                         "give variant='filling'")
    if filling and not coef.fill_half > 0:
        raise ValueError(f"fill_half must be > 0 under the filling form, got {coef.fill_half}")

    rng = _generator(seed)
    prompts = _draw_lengths(rng, prompt_len, n, "prompt_len")
    outputs = _draw_lengths(rng, output_len, n, "output_len")
    if rate is not None:
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    steps, accepted = _decode_steps(rng, outputs, rates)

    batch = np.arange(max_batch + 1, dtype=float)
    c = Coefficients(*(float(x) for x in coef))
    phi = 1.0
    if variant.moe:
        phi = np.asarray(expert_coverage(batch * (k + 1), variant.experts, variant.top_m), float)
    others = batch - 1
    if filling:
        others = np.asarray(batch_load(np.maximum(others, 0), c.fill, c.fill_half), float)
    step_time = decode_step(c, k, phi, others)
    in_flight = n if concurrency is None else min(int(concurrency), n)
    arrivals, admitted, ready, finished = _run(arrivals, in_flight, steps, step_time,
                                               c.c1p, c.c2p, max_batch)

    trace = pd.DataFrame({
        "hardware": hardware, "verifier": verifier,
        "drafter": drafter if k > 0 else "", "method": method if k > 0 else "none",
        "k": k,
        "request_rate": float(rate) if rate is not None else np.nan,
        "concurrency": pd.array([concurrency] * n, dtype="Int64"),
        "acceptance": float(alpha) if not isinstance(alpha, PositionRates) else np.nan,
        "arrival_s": arrivals,
        "prompt_len": prompts,
        "output_len": outputs,
        "ttft_s": ready - arrivals,
        "e2e_s": finished - arrivals,
        "draft_tokens": k * steps,
        "accepted_tokens": accepted,
        "admitted_s": admitted,
    })
    if k == 0:
        trace["acceptance"] = 0.0
    return trace


def _generator(seed) -> np.random.Generator:
    if isinstance(seed, jax.Array):
        return np.random.default_rng(np.asarray(jax.random.key_data(seed)).ravel().tolist())
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        return np.random.default_rng(int(seed))
    raise ValueError(f"seed must be a whole number >= 0 or a JAX PRNG key, got {seed!r}")


def _survival(k, alpha) -> np.ndarray:
    """P(at least j drafts accepted in a step), j = 1..k: shape [k], non-increasing."""
    if not (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 0):
        raise ValueError(f"k must be a whole number >= 0 for the simulator, got {k!r}")
    if isinstance(alpha, PositionRates):
        conditional = np.asarray(alpha.rates, float)
        if conditional.ndim != 1 or conditional.size < k:
            raise ValueError(f"PositionRates must be one vector of at least k = {k} rates, "
                             f"got shape {conditional.shape}")
        conditional = conditional[:k]
    else:
        conditional = np.full(k, alpha, dtype=float)
    if not np.all((conditional >= 0) & (conditional <= 1)):  # also catches NaN
        raise ValueError(f"acceptance must lie in [0, 1], got {alpha!r}")
    return np.cumprod(conditional)


def _arrivals(n_requests, rate, concurrency, arrival_times):
    given = [name for name, value in
             (("rate", rate), ("concurrency", concurrency), ("arrival_times", arrival_times))
             if value is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of rate=, concurrency= or arrival_times=, "
                         f"got {given or 'none'}")
    if arrival_times is not None:
        arrivals = np.asarray(arrival_times, float)
        if arrivals.ndim != 1 or arrivals.size == 0:
            raise ValueError("arrival_times must be a non-empty 1-D array")
        if not np.all(np.isfinite(arrivals) & (arrivals >= 0)):
            raise ValueError("arrival_times must be finite and >= 0")
        if n_requests is not None and n_requests != arrivals.size:
            raise ValueError(f"n_requests={n_requests} but {arrivals.size} arrival_times")
        order = np.argsort(arrivals, kind="stable")
        if np.any(order != np.arange(arrivals.size)):
            raise ValueError("arrival_times must be sorted")
        return arrivals.size, arrivals
    if n_requests is None or int(n_requests) != n_requests or n_requests < 1:
        raise ValueError(f"n_requests must be a whole number >= 1, got {n_requests!r}")
    n = int(n_requests)
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number > 0 [req/s], got {rate!r}")
    if concurrency is not None and not (int(concurrency) == concurrency and concurrency >= 1):
        raise ValueError(f"concurrency must be a whole number >= 1, got {concurrency!r}")
    return n, np.zeros(n)


def _draw_lengths(rng, spec, n, name) -> np.ndarray:
    if isinstance(spec, Uniform):
        if not 1 <= spec.low <= spec.high:
            raise ValueError(f"{name}: Uniform needs 1 <= low <= high, got {spec}")
        return rng.integers(spec.low, spec.high + 1, n)
    if isinstance(spec, Empirical):
        values = np.asarray(spec.values)
        if values.size == 0 or np.any(values < 1) or np.any(values != np.round(values)):
            raise ValueError(f"{name}: Empirical needs whole numbers >= 1")
        return rng.choice(values.astype(np.int64), n)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool) and spec >= 1:
        return np.full(n, int(spec), dtype=np.int64)
    raise ValueError(f"{name} must be a whole number >= 1, Uniform or Empirical; got {spec!r}")


def _decode_steps(rng, outputs, survival):
    """Decode steps each request needs to emit its tokens, and the drafts it had accepted.

    A step emits ``1 + G`` tokens with ``P(G >= j) = survival[j-1]``; one uniform U per step
    gives ``G = #{j : U < survival[j-1]}``. Steps are drawn in blocks until every request
    has its tokens. Returns two int arrays of shape [n].
    """
    n = outputs.size
    steps = np.zeros(n, np.int64)
    accepted = np.zeros(n, np.int64)
    remaining = outputs.astype(np.int64).copy()
    active = np.arange(n)
    mean_tokens = 1.0 + survival.sum()
    descending = -survival  # ascending, for searchsorted
    while active.size:
        block = int(math.ceil(remaining[active].max() / mean_tokens * 1.25)) + 4
        block = max(1, min(block, 20_000_000 // active.size))
        u = rng.random((active.size, block))
        drafts = np.searchsorted(descending, -u, side="left")  # G per step
        emitted = np.cumsum(1 + drafts, axis=1)
        kept = np.cumsum(drafts, axis=1)
        done = emitted[:, -1] >= remaining[active]
        last = np.argmax(emitted >= remaining[active][:, None], axis=1)
        rows = np.arange(active.size)
        steps[active] += np.where(done, last + 1, block)
        accepted[active] += np.where(done, kept[rows, last], kept[:, -1])
        remaining[active] -= emitted[:, -1]
        active = active[~done]
    return steps, accepted


def _run(arrivals, issued, steps, step_time, c1p, c2p, max_batch):
    """The event loop. Returns arrival, admission, prefill-done and finish times, shape [n].

    Time advances from one event to the next. ``done_steps`` counts decode steps since the
    start; a decoding request leaves when that count reaches the count it joined at plus the
    steps it needs, so the steps in between need no per-request work. Only the first
    ``issued`` arrivals are known at the start; when ``issued < n`` (a closed loop) the next
    request arrives whenever one finishes.
    """
    n = steps.size
    arrivals = arrivals.copy()
    admitted = np.full(n, np.nan)
    ready = np.full(n, np.nan)
    finished = np.full(n, np.nan)
    decoding: list[tuple[int, int]] = []  # heap of (step count at which it leaves, request)
    prefilling: list[tuple[float, int]] = []  # heap of (prefill done time, request)
    t = 0.0
    done_steps = 0
    next_in = 0  # first request not yet admitted; admission is FIFO by arrival order
    n_done = 0
    while n_done < n:
        admitted_now = 0
        while (next_in < issued and arrivals[next_in] <= t
               and len(decoding) + len(prefilling) < max_batch):
            admitted[next_in] = t
            ready[next_in] = t + c1p
            heapq.heappush(prefilling, (t + c1p, next_in))
            next_in += 1
            admitted_now += 1
        t += admitted_now * c2p
        while prefilling and prefilling[0][0] <= t:
            _, i = heapq.heappop(prefilling)
            heapq.heappush(decoding, (done_steps + int(steps[i]), i))

        room = len(decoding) + len(prefilling) < max_batch
        next_arrival = arrivals[next_in] if (room and next_in < issued) else math.inf
        next_ready = prefilling[0][0] if prefilling else math.inf
        interrupt = min(next_arrival, next_ready)
        if not decoding:  # idle until something arrives or finishes its prefill
            if interrupt == math.inf:
                raise RuntimeError("simulator stalled with requests left: a bug in sdbayes")
            t = max(t, interrupt)
            continue
        step = step_time[len(decoding)]
        advance = decoding[0][0] - done_steps  # steps until the next departure
        if interrupt < math.inf:  # an arrival or prefill joins at the next step boundary
            advance = min(advance, max(1, math.ceil((interrupt - t) / step)))
        t += advance * step
        done_steps += advance
        while decoding and decoding[0][0] <= done_steps:
            _, i = heapq.heappop(decoding)
            finished[i] = t
            n_done += 1
            if issued < n:
                arrivals[issued] = t
                issued += 1
    return arrivals, admitted, ready, finished
