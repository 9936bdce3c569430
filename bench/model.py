"""Latency-model throughput: operating points per second, for values and for gradients.

    python bench/model.py [n_points]

Times jit-compiled `sb.latency` over n_points operating points (random k, alpha, rate), and
`jax.grad` of their summed latency with respect to k (a tuning step), after compilation.
Then the same for an MoE verifier (128 experts, top-8, expert terms added to the example
coefficients), whose latency is a fixed point (grid scan and bisection); and the p99 of
e2e over requests of the tail model (``sdbayes.tails.percentile``). Prints the device, the
figures, and the ratios gradient / value, MoE / dense and p99 / mean.
"""

import sys
import time

import jax
import jax.numpy as jnp

import sdbayes as sb
from sdbayes.examples import EXAMPLE_COEFFICIENTS as COEF


def best_of(f, *args, repeats=5):
    jax.block_until_ready(f(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def main(n: int = 10_000_000) -> None:
    keys = jax.random.split(jax.random.key(0), 3)
    k = jax.random.uniform(keys[0], (n,), minval=0.0, maxval=10.0)
    alpha = jax.random.uniform(keys[1], (n,), minval=0.5, maxval=1.0)
    rate = jax.random.uniform(keys[2], (n,), minval=0.0, maxval=8.0)

    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {n:,} points, "
          f"float{32 if k.dtype == jnp.float32 else 64}")
    moe = dict(experts=128, top_m=8)
    times = {}
    for name, coef, settings in (("dense", COEF, {}),
                                 ("MoE", COEF._replace(c1e=COEF.c1v, c2e=COEF.c2v), moe)):
        def latency(k, a, r, coef=coef, settings=settings):
            return sb.latency(coef, k=k, alpha=a, output_len=128.0, rate=r, **settings)

        value = jax.jit(latency)
        grad = jax.jit(jax.grad(lambda k, a, r, f=latency: jnp.sum(f(k, a, jnp.minimum(r, 3.0)))))
        t_value, t_grad = best_of(value, k, alpha, rate), best_of(grad, k, alpha, rate)
        times[name] = t_value
        print(f"{name:5s} latency:        {t_value * 1e3:9.2f} ms  {n / t_value:14,.0f} points/s")
        print(f"{name:5s} d latency / dk: {t_grad * 1e3:9.2f} ms  {n / t_grad:14,.0f} points/s  "
              f"({t_grad / t_value:.1f}x the value)")
    print(f"MoE / dense latency: {times['MoE'] / times['dense']:.0f}x")

    def p99(k, a, r):
        return sb.tails.percentile(COEF, q=0.99, k=k, alpha=a, output_len=128.0, rate=r)

    t_tail = best_of(jax.jit(p99), k, alpha, rate)
    print(f"dense p99 (sdbayes.tails): {t_tail * 1e3:9.2f} ms  {n / t_tail:14,.0f} points/s  "
          f"({t_tail / times['dense']:.1f}x the mean latency)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000)
