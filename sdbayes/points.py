"""Operating points as arrays: what the likelihood and the predictions read.

Kept apart from :mod:`sdbayes.traces` (tables, files, pandas) so that the probabilistic
model depends on NumPy arrays alone (docs/architecture.md, layers).
"""

from typing import NamedTuple

import numpy as np


class Points(NamedTuple):
    """Operating points as arrays, each of shape [n] (see :func:`to_points`).

    Observations missing for a point are NaN; their standard errors 0 where unknown.
    """

    group: np.ndarray  # int, index into the group labels
    config: np.ndarray  # int, index of the configuration (group, k, alpha, lengths)
    k: np.ndarray  # draft length
    alpha: np.ndarray  # acceptance probability
    output_len: np.ndarray  # [tokens]
    rate: np.ndarray  # [req/s], 0 for closed-loop points
    concurrency: np.ndarray  # requests in flight, 1 for open-loop points
    closed: np.ndarray  # bool: closed-loop point
    e2e: np.ndarray  # mean end-to-end latency [s]
    e2e_se: np.ndarray
    ttft: np.ndarray  # mean time to first token [s]
    ttft_se: np.ndarray
    tpot: np.ndarray  # mean time per output token [s]
    tpot_se: np.ndarray
    duration: np.ndarray  # length of the run [s], +inf where not given


def bucket(n: int, steps: int = 2) -> int:
    """The padded size of ``n`` rows: the least size at least ``n`` (and 8) on a grid of
    ``steps`` sizes per doubling. With 2 (8, 12, 16, 24, 32, 48...: powers of two and
    their halfway points) padding adds at most a third; with 8 at most an eighth.
    Compiled programs are shaped by their arrays, so inputs of sizes in one bucket share
    one program."""
    if n <= 8:
        return 8
    step = max(1, (1 << (n - 1).bit_length()) // (2 * steps))
    return -(-n // step) * step


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` [n, ...] padded to ``size`` rows by repeating its last."""
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])
