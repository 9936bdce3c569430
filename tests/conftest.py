"""Test-wide JAX settings: float64 for gradient checks, and loud broadcasting bugs."""

import jax

jax.config.update("jax_enable_x64", True)
# Implicit rank promotion hides shape bugs; the library broadcasts explicitly.
jax.config.update("jax_numpy_rank_promotion", "raise")
