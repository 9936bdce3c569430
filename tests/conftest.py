"""Test-wide JAX settings: float64 for gradient checks, loud broadcasting bugs, and one CPU
device per chain."""

import jax
import pytest

import sdbayes as sb

jax.config.update("jax_enable_x64", True)
# pytest is one process: without devices, fits run their chains in lockstep on one core and
# leave the other idle. Kernels the notebook tests start inherit the setting (XLA_FLAGS).
sb.use_cpu_cores()


@pytest.fixture(autouse=True)
def strict_rank_promotion(request):
    """Implicit rank promotion hides shape bugs; sdbayes broadcasts explicitly.

    NumPyro's own internals rely on implicit promotion, so modules that fit (those that
    set ``USES_NUMPYRO = True``) are exempt.
    """
    if getattr(request.module, "USES_NUMPYRO", False):
        yield
        return
    with jax.numpy_rank_promotion("raise"):
        yield
