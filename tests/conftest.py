"""Test-wide JAX settings: float64 for gradient checks, and loud broadcasting bugs."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


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
