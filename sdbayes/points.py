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
