"""Test-wide JAX settings: float64 for gradient checks, loud broadcasting bugs, and one CPU
device per chain."""

import gc
import os
import shutil
import tempfile

import jax
import pytest

import sdbayes as sb

jax.config.update("jax_enable_x64", True)
# pytest is one process: without devices, fits run their chains in lockstep on one core and
# leave the other idle. Kernels the notebook tests start inherit the setting (XLA_FLAGS).
sb.use_cpu_cores()


def pytest_configure(config):
    """One persistent compilation cache for the whole run, shared by the xdist workers and
    the processes tests start (notebook kernels, the command). NumPyro builds its parallel
    sampler anew on each run, so without it every fit compiles its sampler again (a fit of
    test_recovery's: 18 s, 5 s with the cache), and many fits share sizes and forms.
    Bounded, so that JAX locks it against two workers writing one entry; removed at the
    end."""
    if not hasattr(config, "workerinput"):  # the controller, or a run without workers
        config.sdbayes_jax_cache = tempfile.mkdtemp(prefix="sdbayes-tests-jax-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config.sdbayes_jax_cache
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
    jax.config.update("jax_compilation_cache_max_size",
                      int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))


def pytest_unconfigure(config):
    if hasattr(config, "sdbayes_jax_cache"):
        shutil.rmtree(config.sdbayes_jax_cache, ignore_errors=True)


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
