"""Draft-length tuning: speed over posterior draws, and what tuning buys across loads.

    python bench/tune.py [n_points] [n_draws]

1. Time to tune ``n_points`` operating points (random rate and acceptance) over ``n_draws``
   posterior-like draws, after compilation, for each risk measure; and, as the baseline in
   the same run, exhaustive evaluation of the risk at k = 0..16.
2. A table of mean latency across loads for three policies: the tuned schedule k*(rate),
   the best fixed k (one k for every load, the one with the lowest mean latency over the
   loads), and the SmartSpec-style goodput rule (the k maximising goodput at the batch size
   that k itself brings about in steady state).
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import sdbayes as sb
from sdbayes.examples import EXAMPLE_COEFFICIENTS as COEF
from sdbayes.tuning import goodput_k, optimal_k, risk_objective

K_MAX = 16


def best_of(f, repeats=3):
    jax.block_until_ready(f())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f())
        times.append(time.perf_counter() - start)
    return min(times)


def posterior_like(n_draws, seed=0):
    """Draws log-normal about the example coefficients, 5% spread (a real fit's is 1-5%)."""
    rng = np.random.default_rng(seed)
    return sb.Coefficients(*(jnp.asarray(c * np.exp(0.05 * rng.standard_normal(n_draws)))
                             for c in COEF[:6]))


def timing(n_points, n_draws):
    coef = posterior_like(n_draws)
    rng = np.random.default_rng(1)
    rate = jnp.asarray(rng.uniform(0.0, 10.0, n_points))
    alpha = jnp.asarray(rng.uniform(0.5, 0.95, n_points))
    point = dict(rate=rate, alpha=alpha, output_len=128.0)
    objective = jax.jit(risk_objective, static_argnames=("risk", "level"))
    print(f"Tuning {n_points:,} operating points over {n_draws:,} draws on "
          f"{jax.devices()[0].device_kind} ({jax.device_count()} device(s)), after compilation:")
    print(f"{'risk':>9} {'tune_k [s]':>11} {'exhaustive 0..16 [s]':>21} {'ratio':>6}")
    for risk in ("mean", "quantile", "cvar"):
        tuned = best_of(lambda: optimal_k(coef, risk=risk, level=0.9, **point).k)  # noqa: B023
        full = best_of(lambda: [objective(coef, jnp.full(n_points, float(k)), risk=risk,  # noqa: B023
                                          level=0.9, **point) for k in range(K_MAX + 1)])
        print(f"{risk:>9} {tuned:>11.2f} {full:>21.2f} {tuned / full:>6.2f}")


def steady_goodput_k(rate, alpha):
    """The goodput rule in steady state: a k that the rule picks at the batch it causes."""
    ks = np.arange(K_MAX + 1.0)
    latency = np.asarray(sb.latency(COEF, k=ks, alpha=alpha, output_len=128.0, rate=rate))
    batch = np.where(np.isfinite(latency), 1.0 + rate * latency, 256.0)  # vLLM's cap
    picks = np.asarray(goodput_k(COEF, alpha=alpha, batch_size=batch, k_max=K_MAX))
    consistent = np.flatnonzero(picks == ks)
    return int(consistent[0]) if consistent.size else int(picks[0])


def policies():
    print("\nMean end-to-end latency [ms] by policy (example coefficients, 128 output tokens):")
    print(f"{'alpha':>5} {'rate':>6} {'load':>5} {'tuned k':>7} {'tuned':>7} {'fixed k':>7} "
          f"{'fixed':>7} {'goodput k':>9} {'goodput':>8}")
    for alpha in (0.6, 0.8, 0.9):
        top = float(np.max(sb.saturation_rate(COEF, k=np.arange(K_MAX + 1.0), alpha=alpha,
                                              output_len=128.0)))
        rates = top * np.array([0.05, 0.25, 0.5, 0.7, 0.85, 0.95])
        grid = np.asarray(sb.latency(COEF, k=np.arange(K_MAX + 1.0)[:, None], alpha=alpha,
                                     output_len=128.0, rate=rates))  # [k, rate]
        fixed = int(np.argmin(grid.mean(axis=1)))
        tuned = sb.tune_k(COEF, rate=rates, alpha=alpha, output_len=128).k
        for j, rate in enumerate(rates):
            good = steady_goodput_k(rate, alpha)
            print(f"{alpha:>5.2f} {rate:>6.2f} {rate / top:>5.0%} {tuned[j]:>7d} "
                  f"{1e3 * grid[tuned[j], j]:>7.0f} {fixed:>7d} {1e3 * grid[fixed, j]:>7.0f} "
                  f"{good:>9d} {1e3 * grid[good, j]:>8.0f}")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    timing(*(args or [10_000, 4_000]))
    policies()
