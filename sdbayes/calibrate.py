"""The probabilistic model: priors over the cost coefficients and the likelihood of traces.

DESIGN.md section 3. The six coefficients of each group (hardware x model pair; eight with
an MoE verifier's expert terms ``c1e, c2e``) are sampled in log space. With one group
their prior is a log-normal per coefficient (sampled in coordinates shaped like the
posterior, :func:`least_squares_frame`: that changes the sampler's work, not the model);
with several, the groups' log coefficients are partially pooled: ``log c[g] = mu + tau *
z[g]``, ``z ~ Normal(0, 1)`` (non-centred), with ``mu`` under that log-normal prior and
``tau ~ HalfNormal(pool_scale)`` per coefficient.

Each observed mean is compared on the log scale with the latency model's prediction (the
very functions of :mod:`sdbayes.model`), with a relative error of standard deviation

    s_i = sqrt(sigma**2 + (tau_q * (L_i / C1_i - 1))**2 + (se_i / y_i)**2)

- ``sigma``: the relative measurement and model error common to all points of a metric,
  log-normal a priori around 2% (90% between 0.17% and 24%; fits of the source study's real
  vLLM sweeps find 0.5% to 4%). No model reproduces a measured mean exactly, nor does a
  rerun, so the prior keeps ``sigma`` off zero. A half-normal's mode at zero gives
  ``log sigma`` an exponential left tail wherever the points' own standard errors
  dominate, and NUTS then needs twice the steps per draw;
- ``tau_q``: model error that grows with queueing, scaled by the point's sensitivity to load
  ``d log L / d log C2`` (0 alone; ``x / (1 - x)`` at ``x = rate * C2`` of saturation for
  an open loop; under 1 for a closed one, :func:`predicted_means`): the mean-value form
  under-predicts at high load (DESIGN.md section 1), and this term lets the intervals
  widen where it does;
- ``se_i``: the point's own standard error, so points measured from few requests count less.

Model discrepancy by configuration: the six-coefficient form is an approximation, and its
error is systematic, the same for all loads of one curve (configuration: group, k, alpha,
lengths). Each configuration's load-independent and load-dependent demands ``C1, C2`` are
scaled by ``exp(delta)``, ``delta ~ Normal(0, discrepancy)`` with ``discrepancy`` (two
relative sds, for C1 and C2) learned. Without it a small systematic misfit would pin the
coefficients, with intervals far too narrow; with it, their intervals reflect how well the
form fits. Predictions for a configuration draw a fresh ``delta`` in the predictive interval.

Log-normal by default, Student-t (4 degrees of freedom) for traces with outliers.
End-to-end latency is always fitted; TTFT and TPOT join where the traces have them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from scipy.optimize import least_squares

from sdbayes.model import Coefficients, Variant, as_variant, metrics, tokens_per_step
from sdbayes.traces import Points

COEFFICIENTS = ("c1p", "c1v", "c1d", "c2p", "c2v", "c2d")
MOE_COEFFICIENTS = ("c1e", "c2e")
"""Expert-loading terms, fitted only for an MoE verifier (a :class:`~sdbayes.model.Variant`
with ``experts`` and ``top_m``)."""
FILL_COEFFICIENTS = ("fill", "fill_half")
"""How the marginal load-dependent cost grows as the batch fills the GPU, fitted only under
the ``"filling"`` form (:func:`sdbayes.model.batch_load`)."""
# Their prior, log-normal: a marginal cost rising by 0.1x..2.6x between an empty and a full
# batch, half-way at 1.5..40 others (90% intervals). A GPU runs some tens of decode
# requests before its kernels stop being latency-bound; wide enough for the data to decide.
_FILL_PRIOR = ((math.log(0.5), 1.0), (math.log(8.0), 1.0))
METRICS = ("e2e", "ttft", "tpot")
LIKELIHOODS = ("lognormal", "student_t")
_STUDENT_DF = 4.0
_ERROR_LOG_SD = 1.5
_SATURATED = 1e30  # [s]


def coefficient_names(variant: str | Variant = "paper") -> tuple[str, ...]:
    """The coefficients a variant fits: :data:`COEFFICIENTS`, plus ``c1e, c2e`` for MoE,
    plus ``fill, fill_half`` under the ``"filling"`` form."""
    variant = as_variant(variant)
    return (COEFFICIENTS + (MOE_COEFFICIENTS if variant.moe else ())
            + (FILL_COEFFICIENTS if variant.form == "filling" else ()))


class Prior(NamedTuple):
    """Log-normal prior of each coefficient: ``log c ~ Normal(loc, scale)``, shape [6] each
    (more for the variants that fit more), in the order of :func:`coefficient_names`
    (locations are logs of seconds, of requests for ``fill_half``)."""

    loc: np.ndarray
    scale: np.ndarray

    def median(self, variant: str | Variant = "paper") -> Coefficients:
        """The prior's median coefficients; ``variant`` names them when there are more
        than six."""
        names = coefficient_names(variant)
        return Coefficients(**{n: float(math.exp(x))
                               for n, x in zip(names, self.loc, strict=True)})

    def for_variant(self, variant: str | Variant) -> Prior:
        """This prior extended to the terms a variant adds, when it has only the six:
        ``c1e`` and ``c2e`` centred on ``c1v`` and ``c2v`` (loading all experts costs about
        what the rest of a pass does), as wide as those; ``fill`` and ``fill_half`` as
        :data:`FILL_COEFFICIENTS` says."""
        variant = as_variant(variant)
        if len(self.loc) != len(COEFFICIENTS):
            return self  # already the variant's (the model checks the count)
        loc, scale = list(np.asarray(self.loc, float)), list(np.asarray(self.scale, float))
        if variant.moe:
            loc, scale = loc + [loc[1], loc[4]], scale + [scale[1], scale[4]]
        if variant.form == "filling":
            loc += [m for m, _ in _FILL_PRIOR]
            scale += [s for _, s in _FILL_PRIOR]
        return Prior(np.array(loc), np.array(scale))


class ModelSpec(NamedTuple):
    """What the roofline prior needs to know about a model."""

    params: float  # parameter count
    bytes_per_param: float = 2.0  # 2 for bf16/fp16, 1 for fp8
    kv_bytes_per_token: float = 0.0  # KV cache bytes per token (all layers, K and V)


class HardwareSpec(NamedTuple):
    memory_bandwidth: float  # [bytes/s]
    peak_flops: float  # dense [FLOP/s] at the serving precision


def data_prior(points: Points, scale: float = 2.0) -> Prior:
    """A weakly informative prior scaled to the data: medians of the right order, wide.

    Anchors: the time per SD cycle of the least-loaded points bounds ``c1v + k*c1d``; the
    highest measured rate bounds ``C2`` from above (``rate * C2 < 1``); TTFT at low load is
    about ``c1p``. Each median is a round fraction of its anchor and ``scale`` (log space,
    default 2: a factor of 7 either way at one standard deviation) keeps the prior from
    deciding anything the data can.
    """
    e = np.asarray(tokens_per_step(points.k, points.alpha), float)
    cycles = points.output_len / e
    per_cycle = np.nanmin(points.e2e / cycles)
    shortest = np.nanmin(points.e2e)
    first = np.nanmin(points.ttft) if np.isfinite(points.ttft).any() else 0.05 * shortest
    open_rates = points.rate[~points.closed]
    if open_rates.size and open_rates.max() > 0:
        c2_total = 0.5 / open_rates.max()
    else:  # closed loop only: C2 ~ (L - C1) / (N - 1) at the largest concurrency
        i = int(np.argmax(points.concurrency))
        spread = max(points.e2e[i] - shortest, 0.1 * shortest)
        c2_total = spread / max(points.concurrency[i] - 1, 1)
    typical_cycles = float(np.median(cycles))
    medians = np.array([
        first,  # c1p
        0.7 * per_cycle,  # c1v
        0.05 * per_cycle,  # c1d
        0.3 * c2_total,  # c2p
        0.5 * c2_total / typical_cycles,  # c2v
        0.05 * c2_total / typical_cycles,  # c2d
    ])
    return Prior(loc=np.log(medians), scale=np.full(6, scale))


def roofline_prior(
    hardware: HardwareSpec,
    verifier: ModelSpec,
    drafter: ModelSpec | None,
    *,
    prompt_len: float,
    output_len: float,
    scale: float = 1.0,
) -> Prior:
    """A prior centred on roofline estimates from the hardware and the models.

    - ``c1v``: reading the verifier's weights once, ``params * bytes / bandwidth``;
      ``c1d`` the same for the drafter (for a model-free drafter, 1% of ``c1v``).
    - ``c2v``: reading one more request's KV cache, ``kv_bytes * (P + g/2) / bandwidth``
      (the mean KV length, as the source paper found); ``c2d`` likewise for the drafter
      (10% of ``c2v`` where its KV size is not given).
    - ``c1p``: prefill compute, ``2 * params * P / peak_flops``, plus one weight read;
      ``c2p``: the compute alone, which is what a new prompt takes from the others.

    Args:
      hardware: memory bandwidth and peak FLOP/s of the GPU (all of them, for tensor
        parallelism).
      verifier, drafter: model specs; ``drafter=None`` for a model-free method (ngram).
      prompt_len, output_len: typical lengths [tokens].
      scale: log-space standard deviation (1: a factor of 2.7 at one sd).
    """
    bw, flops = hardware.memory_bandwidth, hardware.peak_flops
    weights = verifier.params * verifier.bytes_per_param / bw
    kv_len = prompt_len + output_len / 2
    c2v = max(verifier.kv_bytes_per_token * kv_len / bw, 1e-7)
    if drafter is None:
        c1d, c2d = 0.01 * weights, 0.1 * c2v
    else:
        c1d = drafter.params * drafter.bytes_per_param / bw
        c2d = drafter.kv_bytes_per_token * kv_len / bw or 0.1 * c2v
    prefill = 2.0 * verifier.params * prompt_len / flops
    medians = np.array([prefill + weights, weights, c1d, prefill, c2v, c2d])
    return Prior(loc=np.log(medians), scale=np.full(6, float(scale)))


def scale_demands(coef: Coefficients, c1_scale, c2_scale) -> Coefficients:
    """Coefficients with every load-independent term (``c1*``) times ``c1_scale`` and every
    load-dependent one (``c2*``) times ``c2_scale``: ``C1`` and ``C2`` scaled."""
    return coef._replace(**{name: getattr(coef, name) * (c1_scale if name.startswith("c1")
                                                         else c2_scale)
                            for name in Coefficients._fields if name[:2] in ("c1", "c2")})


def predicted_means(coef, points: Points, variant):
    """Predicted means of each metric, and their sensitivity to load, shape [n]: how much a
    relative error in ``C2`` moves log L, ``d log L / d log C2``.

    The model's likelihood and :meth:`sdbayes.Posterior.predict` both use this. Past
    saturation the means are +inf and the sensitivity 0.
    """
    open_rate = jnp.where(points.closed, 0.0, points.rate)  # a closed loop has none feeding back
    m = metrics(coef, k=points.k, alpha=points.alpha, output_len=points.output_len,
                rate=open_rate, concurrency=jnp.where(points.closed, points.concurrency, 1.0),
                closed=points.closed, variant=variant)
    stable = jnp.isfinite(m.latency)  # past saturation the likelihood is zero anyway
    total = jnp.where(stable, m.latency, 1.0)
    # d log L / d log C2 = (L - C1) / (L * (1 - rate * marginal)), marginal what one more
    # request in flight adds: for the paper's open loop that is L / C1 - 1 = x / (1 - x),
    # growing without bound towards saturation. A closed loop has no rate feeding back
    # (L = C1 + (N - 1) * C2), so its sensitivity is (L - C1) / L < 1: a throughput run is
    # as informative about C2 as a light point, however long its latency. (The stepped
    # form's boundary waits, a few percent of L, are left out of the derivative.)
    rate, marginal, alone, total = jnp.broadcast_arrays(open_rate, m.marginal, m.alone, total)
    room = jnp.where(stable, 1.0 - rate * marginal, 1.0)
    inflation = jnp.where(stable, (total - alone) / (total * room), 0.0)
    return {"e2e": m.latency, "ttft": m.ttft, "tpot": m.tpot}, inflation


def model(
    points: Points,
    prior: Prior,
    n_groups: int,
    metrics: tuple[str, ...] = METRICS,
    likelihood: str = "lognormal",
    pool_scale: float = 0.5,
    error_median: float = 0.02,
    queue_error_scale: float = 0.05,
    discrepancy_scale: float = 0.05,
    variant: str = "paper",
    frame: Prior | None = None,
):
    """The NumPyro model of the operating points' observed means.

    Args:
      points: the operating points, arrays of shape [n].
      prior: log-normal prior of the coefficients (the population's, with groups).
      n_groups: number of groups; ``points.group`` indexes them.
      metrics: which of ``"e2e", "ttft", "tpot"`` to fit (each only where observed).
      likelihood: ``"lognormal"`` or ``"student_t"``.
      pool_scale: half-normal scale of the between-group sd of log coefficients.
      error_median: prior median of each metric's relative error ``sigma`` (log-normal,
        log-space sd :data:`_ERROR_LOG_SD`).
      queue_error_scale: half-normal scale of ``tau_q``.
      discrepancy_scale: half-normal scale of the configuration discrepancy sds; 0 leaves
        the discrepancy out.
      variant: the latency model's variant, a name in :data:`sdbayes.model.VARIANTS` or a
        :class:`~sdbayes.model.Variant` (with MoE settings, ``c1e, c2e`` are fitted too).
      frame: the coordinates in which the log coefficients are sampled (one group only),
        ``log_c = frame.loc + frame.scale * log_c_std``; by default the prior's. Any frame
        gives the same model; see :func:`least_squares_frame` for why NUTS
        wants one shaped like the posterior.

    Sample sites: ``c1p .. c2d`` (and ``c1e, c2e`` for MoE) of shape [n_groups] (seconds),
    ``sigma_<metric>``, ``tau_q``, ``discrepancy`` [2], ``delta`` [n_configs, 2]; with one
    group ``log_c`` and its frame coordinates ``log_c_std`` [n_coefficients], with several
    ``mu``, ``tau`` [n_coefficients] and ``z`` [n_groups, n_coefficients]; observed
    ``obs_<metric>`` of shape [n].
    """
    names = coefficient_names(variant)
    if len(prior.loc) != len(names):
        raise ValueError(f"the prior has {len(prior.loc)} coefficients, variant {variant} "
                         f"fits {len(names)} ({', '.join(names)})")
    loc, scale = jnp.asarray(prior.loc), jnp.asarray(prior.scale)
    if n_groups == 1:
        centre, width = (loc, scale) if frame is None else map(jnp.asarray, frame)
        with numpyro.plate("coefficient", len(names)):
            std = numpyro.sample("log_c_std", dist.Normal((loc - centre) / width,
                                                          scale / width))
        log_c = numpyro.deterministic("log_c", centre + width * std)[None, :]
    else:
        with numpyro.plate("coefficient", len(names)):
            mu = numpyro.sample("mu", dist.Normal(loc, scale))
            tau = numpyro.sample("tau", dist.HalfNormal(pool_scale))
        with (numpyro.plate("group", n_groups, dim=-2),
              numpyro.plate("coefficient", len(names), dim=-1)):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
        log_c = mu + tau * z
    c = jnp.exp(log_c)  # [n_groups, n_coefficients]
    for i, name in enumerate(names):
        numpyro.deterministic(name, c[:, i])

    # One gather for all coefficients, none with one group: a gather's gradient is a
    # scatter-add, which costs a CPU more than the whole latency model.
    per_point = c[0] if n_groups == 1 else c[points.group]  # [n_coefficients] or [n, ...]
    coef = Coefficients(**{name: per_point[..., i] for i, name in enumerate(names)})
    if discrepancy_scale > 0:
        spread_c = numpyro.sample("discrepancy", dist.HalfNormal(discrepancy_scale).expand([2]))
        with numpyro.plate("config", int(points.config.max()) + 1):
            # Non-centred: the spreads are often tiny, where a centred delta is a funnel.
            delta = numpyro.sample("delta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        scale_c = jnp.exp(delta[points.config] * spread_c)  # [n, 2]: C1 and C2 multipliers
        coef = scale_demands(coef, scale_c[:, 0], scale_c[:, 1])

    predicted, inflation = predicted_means(coef, points, variant)
    tau_q = numpyro.sample("tau_q", dist.HalfNormal(queue_error_scale))
    for metric in metrics:
        present, log_observed, relative_se = _observed(points, metric)
        if not present.any():
            continue
        sigma = numpyro.sample(f"sigma_{metric}",
                               dist.LogNormal(math.log(error_median), _ERROR_LOG_SD))
        spread = jnp.sqrt(sigma**2 + (tau_q * inflation) ** 2 + jnp.asarray(relative_se) ** 2)
        mean = _log_predicted(predicted[metric], present)
        noise = (dist.StudentT(_STUDENT_DF, mean, spread) if likelihood == "student_t"
                 else dist.Normal(mean, spread))
        with numpyro.plate(f"points_{metric}", present.size):
            numpyro.sample(f"obs_{metric}", noise.mask(jnp.asarray(present)), obs=log_observed)


def least_squares_frame(points: Points, prior: Prior, metrics: tuple[str, ...],
                        variant: str | Variant = "paper", error: float = 0.02) -> Prior:
    """Coordinates for one group's log coefficients shaped like their posterior (the
    model's ``frame``): centred on a least-squares fit, as wide as its standard errors.

    Why: with many points the coefficients' posterior sds are often 1e-3 in log space.
    NumPyro, like Stan, regularises the mass matrix it adapts in warm-up by adding about
    1e-5 to each variance, which swamps theirs: NUTS then takes steps to suit the
    regularisation and needs twice the leapfrog steps a draw (four times in the prior's
    coordinates). In coordinates of posterior sd near 1 the addition is negligible, and
    warm-up starts where the posterior is. Only the centre must be good: a width ten
    times too narrow still leaves sds of 10, which the mass matrix adapts to.

    The fit is the model's likelihood without its discrepancy and queueing error (relative
    error ``error`` and each point's own standard error), plus the prior, solved in
    float64 by a trust-region least-squares method; the widths are ``sqrt(diag((J^T
    J)^-1))`` of its weighted Jacobian, which the prior's rows keep finite.

    Args:
      points: the operating points, of one group.
      prior: the coefficients' log-normal prior.
      metrics: the metrics fitted.
      variant: the latency model's variant.
      error: the relative error weighting each observation.

    Returns:
      The frame: centres and widths of the log coefficients (a :class:`Prior`); the prior
      itself if the fit fails.
    """
    names = coefficient_names(variant)
    observed = [_observed(points, m) for m in metrics]
    weights = [1.0 / np.sqrt(error**2 + se**2) for _, _, se in observed]

    def residuals(log_c):  # [n_observations + n_coefficients]
        coef = Coefficients(**dict(zip(names, jnp.exp(log_c), strict=True)))
        predicted, _ = predicted_means(coef, points, variant)
        rows = [((_log_predicted(predicted[m], present) - log_y) * w)[present]
                for m, (present, log_y, _), w in zip(metrics, observed, weights, strict=True)]
        return jnp.concatenate(rows + [(log_c - prior.loc) / prior.scale])

    with jax.enable_x64(True):
        fit = least_squares(jax.jit(residuals), np.asarray(prior.loc, float),
                            jac=jax.jit(jax.jacfwd(residuals)), method="trf")
        width = np.sqrt(np.diag(np.linalg.pinv(fit.jac.T @ fit.jac)))
    if not (np.isfinite(fit.x).all() and np.isfinite(width).all() and (width > 0).all()):
        return prior
    return Prior(loc=fit.x, scale=np.minimum(width, prior.scale))


def _observed(points: Points, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a metric was measured, the log of its measured means (0 elsewhere) and their
    relative standard errors (0 where unknown), each of shape [n]."""
    observed = np.asarray(getattr(points, metric), float)
    present = np.isfinite(observed) & (observed > 0)
    se = np.nan_to_num(np.asarray(getattr(points, f"{metric}_se"), float))
    relative_se = np.where(present, se / np.where(present, observed, 1.0), 0.0)
    return present, np.log(np.where(present, observed, 1.0)), relative_se


def _log_predicted(value, present):
    """The log of predicted means, shape [n]. A coefficient set that puts a measured steady
    point past saturation has zero likelihood; a huge finite stand-in says so without an
    infinite location."""
    return jnp.log(jnp.where(present & jnp.isfinite(value), value, _SATURATED))
