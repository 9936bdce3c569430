"""Test-wide JAX settings: float64 for gradient checks, loud broadcasting bugs, and one CPU
device per chain."""

import gc

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


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Each holds a few memory
    mappings (about 3 per program), and a worker that runs half the suite compiled enough
    of them to reach the kernel's limit (vm.max_map_count, 65,530): LLVM then segfaulted
    in a compile late in the run (9,195 mappings after four modules here)."""
    yield
    jax.clear_caches()
    gc.collect()
