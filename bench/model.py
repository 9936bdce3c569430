"""Latency-model throughput: operating points per second, for values and for gradients.

    python bench/model.py [n_points]

Times jit-compiled `sb.latency` over n_points operating points (random k, alpha, rate), and
`jax.grad` of their summed latency with respect to k (a tuning step), after compilation.
Prints the device, both figures, and the ratio gradient / value.
"""

import sys
import time

import jax
import jax.numpy as jnp

import sdbayes as sb
from sdbayes.__main__ import EXAMPLE_COEFFICIENTS as COEF


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

    value = jax.jit(lambda k, a, r: sb.latency(COEF, k=k, alpha=a, output_len=128.0, rate=r))
    grad = jax.jit(jax.grad(lambda k, a, r: jnp.sum(
        sb.latency(COEF, k=k, alpha=a, output_len=128.0, rate=jnp.minimum(r, 5.0)))))
    t_value = best_of(value, k, alpha, rate)
    t_grad = best_of(grad, k, alpha, rate)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {n:,} points, "
          f"float{32 if k.dtype == jnp.float32 else 64}")
    print(f"latency:        {t_value * 1e3:9.2f} ms  {n / t_value:14,.0f} points/s")
    print(f"d latency / dk: {t_grad * 1e3:9.2f} ms  {n / t_grad:14,.0f} points/s  "
          f"({t_grad / t_value:.1f}x the value)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000_000)
