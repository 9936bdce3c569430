"""Where sdbayes keeps JAX's compiled programs between runs (JAX's persistent compilation
cache), so that a later run of the same programs reads them back instead of compiling them
again: a refit of data of a similar size (the sampler is padded to size buckets), ``plan``
and ``tune`` on any posterior of a form. Compiling is most of a short fit's wall time: the
8B split's second fit in one process takes 21 s with the cache, 45 s without
(``bench/peers.py``'s data), as NumPyro builds its parallel sampler anew on each run.

The folder is ``$SDBAYES_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdbayes/jax``
(``~/.cache/sdbayes/jax``); ``SDBAYES_CACHE_DIR=off`` turns it off. It holds at most
:data:`CACHE_BYTES` and is safe to delete. A cache the program set up itself
(``JAX_COMPILATION_CACHE_DIR``, ``jax.config``) wins.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CACHE_BYTES = 2 * 2**30
"""Most the cache keeps; JAX drops the least recently used programs past it."""
MIN_COMPILE_SECONDS = 0.1
"""Programs that compile faster are not kept. JAX's default, 1 s, would leave out the
planning programs. Not 0: a command runs hundreds of small programs, and JAX, to bound the
cache, lists every file in it on each write, so a cache of many small entries makes each
write slower (the test run with 0 went from 1,585 to 1,863 s)."""


def cache_folder() -> str | None:
    """The cache's folder by the rules above, or None where turned off."""
    folder = os.environ.get("SDBAYES_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdbayes" / "jax")
    return None if folder == "off" else folder


def set_cache_environment() -> None:
    """The cache set through JAX's environment variables, which it reads when it starts,
    for the ``sdbayes`` command: it would otherwise pay for importing JAX to set them.
    Does nothing once JAX is imported (see :func:`use_compilation_cache`)."""
    folder = cache_folder()
    if folder is None or "jax" in sys.modules:
        return
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", folder)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(MIN_COMPILE_SECONDS))
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(CACHE_BYTES))


def use_compilation_cache() -> str | None:
    """Turn the cache on in a running JAX, unless the program has set up one of its own
    or it is turned off; :func:`sdbayes.fit` calls it. Returns the folder in use, if any."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = cache_folder()
    if folder is not None:
        jax.config.update("jax_compilation_cache_dir", folder)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        jax.config.update("jax_compilation_cache_max_size", CACHE_BYTES)
    return folder
