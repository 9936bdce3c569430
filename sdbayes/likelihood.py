"""The probabilistic model: priors over the cost coefficients and the likelihood of traces.

docs/model.md section 3. The six coefficients of each group (hardware x model pair; eight with
an MoE verifier's expert terms ``c1e, c2e``) are sampled in log space. With one group
their prior is a log-normal per coefficient (sampled in coordinates shaped like the
posterior, :func:`least_squares_frame`: that changes the sampler's work, not the model);
with several, the groups' log coefficients are partially pooled, ``log c[g] ~ Normal(mu,
tau)``, with ``mu`` under that log-normal prior and ``tau ~ HalfNormal(pool_scale)`` per
coefficient (sampled non-centred, ``log c[g] = mu + tau * z[g]``, except for the groups
the data pin, which are sampled in their own least-squares frame: :func:`group_frames`).

Each observed mean is compared on the log scale with what the observation model
(:mod:`sdbayes.observation`) predicts the row reports, the steady mean or, for a run of
given length, that run's mean, with a relative error of standard deviation

    s_i = sqrt(sigma**2 + (tau_q * S_i)**2 + (se_i / y_i)**2)

- ``sigma``: the relative measurement and model error common to all points of a metric,
  log-normal a priori around 2% (90% between 0.17% and 24%; fits of the source study's real
  vLLM sweeps find 0.5% to 4%). No model reproduces a measured mean exactly, nor does a
  rerun, so the prior keeps ``sigma`` off zero. A half-normal's mode at zero gives
  ``log sigma`` an exponential left tail wherever the points' own standard errors
  dominate, and NUTS then needs twice the steps per draw;
- ``tau_q``: each run's own relative error in its load-dependent demand, scaled by the
  row's sensitivity to it ``S_i = d log L / d log C2`` (0 alone; ``x / (1 - x)`` at ``x``
  of saturation for a steady open loop; under 1 for a closed one): near saturation the
  queue amplifies a small error in capacity, and the intervals widen as it does;
- ``se_i``: the point's own standard error, so points measured from few requests count less.

Model discrepancy by configuration: the six-coefficient form is an approximation, and its
error is systematic, the same for all loads of one curve (configuration: group, k, alpha,
lengths). Each configuration's load-independent and load-dependent demands ``C1, C2`` are
scaled by ``exp(delta)``, ``delta ~ Normal(0, discrepancy)`` with ``discrepancy`` (two
relative sds, for C1 and C2) learned. Without it a small systematic misfit would pin the
coefficients, with intervals far too narrow; with it, their intervals reflect how well the
form fits. Predictions for a configuration draw a fresh ``delta`` in the predictive interval.

Log-normal by default, Student-t (4 degrees of freedom) for traces with outliers.
End-to-end latency is always fitted; TTFT and TPOT join where the fit asks for them.
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

from sdbayes import observation
from sdbayes.model import Coefficients, Variant, _demands, as_variant, tokens_per_step
from sdbayes.observation import EffectiveLoads
from sdbayes.points import Points

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
_ERROR_LOG_SD = 1.5


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
    load_error_scale: float = 0.05,
    variant: str = "paper",
    frame: Frame | GroupFrames | None = None,
    loads: EffectiveLoads | None = None,
    confounding: Confounding | None = None,
    n_configs: int | None = None,
):
    """The NumPyro model of the operating points' observed means.

    Args:
      points: the operating points, arrays of shape [n].
      prior: log-normal prior of the coefficients (the population's, with groups).
      n_groups: number of groups; ``points.group`` indexes them.
      metrics: which of ``"e2e", "ttft", "tpot"`` to fit, each measured somewhere (and
        fitted only where measured).
      likelihood: ``"lognormal"`` or ``"student_t"``.
      pool_scale: half-normal scale of the between-group sd of log coefficients.
      error_median: prior median of each metric's relative error ``sigma`` (log-normal,
        log-space sd :data:`_ERROR_LOG_SD`).
      queue_error_scale: half-normal scale of ``tau_q``.
      discrepancy_scale: half-normal scale of the configuration discrepancy sds; 0 leaves
        the discrepancy out.
      load_error_scale: the prior sd of the open loops' discrepancy in load at any load
        (:class:`sdbayes.observation.LoadError`, its amplitude integrated out,
        :data:`sdbayes.observation.LOAD_DF`); 0 leaves it out.
      variant: the latency model's variant, a name in :data:`sdbayes.model.VARIANTS` or a
        :class:`~sdbayes.model.Variant` (with MoE settings, ``c1e, c2e`` are fitted too).
      frame: the coordinates in which the log coefficients are sampled: with one group a
        :class:`Frame`, ``log_c = frame.loc + frame.scale * log_c_std``, by default the
        prior's; with several a :class:`GroupFrames` (:func:`_pooled_in_frames`), by
        default all non-centred. Any frame gives the same model; see
        :func:`least_squares_frame` for why NUTS wants one shaped like the posterior.
      loads: the effective-load tables of the rows that are finite runs
        (:func:`sdbayes.observation.effective_loads`); without them every row is steady.
      confounding: what the coefficients explain, taken out of the discrepancies
        (:func:`confounding`); without it the discrepancies are free and trade off against
        the coefficients along a ridge, where NUTS mixes badly.
      n_configs: the number of configurations ``points.config`` indexes, by default its
        largest plus one. Given, the arrays may be traced (NUTS's compiled sampler takes
        them as arguments, :func:`sdbayes.inference.fit`).

    Sample sites: ``c1p .. c2d`` (and ``c1e, c2e`` for MoE) of shape [n_groups] (seconds),
    ``sigma_<metric>``, ``tau_q``, ``discrepancy`` [2], ``delta_free`` [n_configs, 2] and
    their projection ``delta`` (deterministic); ``load_weights`` [n_groups, LOAD_BASIS], the
    deterministic ``load_offset`` (same shape) and ``load_scale`` (a constant, kept with the
    draws for prediction); with one
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
        centre, width = (loc, scale) if frame is None else map(jnp.asarray, frame[:2])
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
        if frame is not None:
            log_c = _pooled_in_frames(log_c, z, mu, tau, frame)
    c = jnp.exp(log_c)  # [n_groups, n_coefficients]
    for i, name in enumerate(names):
        numpyro.deterministic(name, c[:, i])

    # One gather for all coefficients, none with one group: a gather's gradient is a
    # scatter-add, which costs a CPU more than the whole latency model.
    per_point = c[0] if n_groups == 1 else c[points.group]  # [n_coefficients] or [n, ...]
    coef = Coefficients(**{name: per_point[..., i] for i, name in enumerate(names)})
    if discrepancy_scale > 0:
        spread_c = numpyro.sample("discrepancy", dist.HalfNormal(discrepancy_scale).expand([2]))
        with numpyro.plate("config", n_configs if n_configs is not None
                           else int(points.config.max()) + 1):
            # Non-centred: the spreads are often tiny, where a centred delta is a funnel.
            free = numpyro.sample("delta_free", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        delta = numpyro.deterministic("delta", free if confounding is None else jnp.einsum(
            "ecd,de->ce", jnp.asarray(confounding.projection), free))
        coef = observation.configured(coef, delta[points.config], spread_c)

    load_error = None
    if load_error_scale > 0:
        scale = numpyro.deterministic("load_scale", jnp.asarray(
            observation.load_scale(load_error_scale)))
        with numpyro.plate("group_load", n_groups):
            weights = numpyro.sample("load_weights", observation.load_weights_prior()
                                     )  # [n_groups, LOAD_BASIS]
        offset = numpyro.deterministic("load_offset", jnp.zeros(weights.shape)
                                       if confounding is None
                                       else jnp.asarray(confounding.load_offset))
        weights, offset = ((x[0] if n_groups == 1 else x[points.group])
                           for x in (weights, offset))  # [LOAD_BASIS] or [n, LOAD_BASIS]
        load_error = observation.LoadError(weights, scale, offset)

    predicted = observation.forward(coef, points, variant, loads, load_error)
    tau_q = numpyro.sample("tau_q", dist.HalfNormal(queue_error_scale))
    for metric in metrics:
        present, log_observed, relative_se = observation.fitted(points, metric)
        sigma = numpyro.sample(f"sigma_{metric}",
                               dist.LogNormal(math.log(error_median), _ERROR_LOG_SD))
        spread = observation.spread(sigma, tau_q, predicted.sensitivity, relative_se)
        noise = observation.noise(likelihood, observation.log_mean(predicted.mean(metric),
                                                                   present), spread)
        with numpyro.plate(f"points_{metric}", present.size):
            numpyro.sample(f"obs_{metric}", noise.mask(jnp.asarray(present)), obs=log_observed)


def _pooled_in_frames(log_c, z, mu, tau, frames: GroupFrames):
    """Log coefficients [n_groups, C] of the groups the data pin (``frames.centred``) in
    their own frame, ``log_c[g] = loc[g] + tril[g] @ z[g]``, the others' non-centred
    ``log_c`` unchanged.

    The density is the same model's: a pinned group's ``z`` has the density its
    ``log_c`` has under ``Normal(mu, tau)`` (the map is affine, its Jacobian constant), put
    in place of the standard normal it was sampled under. Why: non-centred, a group's
    ``z`` is as correlated as its coefficients (sums of them are what the data fix) and
    ``tau`` times narrower than its prior; in a frame from its own least-squares fit it is
    nearly white, and NUTS's diagonal mass suits it.
    """
    framed = frames.loc + jnp.einsum("gij,gj->gi", frames.tril, z)
    centred = jnp.asarray(frames.centred)[:, None]
    numpyro.factor("pooled_in_frames", jnp.sum(jnp.where(
        centred, dist.Normal(mu, tau).log_prob(framed) - dist.Normal(0.0, 1.0).log_prob(z),
        0.0)))
    return jnp.where(centred, framed, log_c)


_LEAST_SPREAD = 0.01  # groups closer than 1% in a coefficient are as good as alike


class GroupFrames(NamedTuple):
    """Coordinates for several groups' log coefficients (the model's ``frame`` with
    several groups, :func:`group_frames`): each pinned group's ``z`` is whitened by its
    least-squares fit."""

    loc: np.ndarray  # [n_groups, C]: least-squares log coefficients
    tril: np.ndarray  # [n_groups, C, C]: Cholesky factors of their covariances
    centred: np.ndarray  # [n_groups] bool: sampled in the frame (else non-centred)


def group_frames(frames: list[Frame]) -> GroupFrames:
    """The coordinates of several groups from their least-squares frames.

    A group is sampled in its frame where the data pin it better than the population
    does: where its widths are below the groups' spread about the population on geometric
    average over its coefficients (one weakly identified coefficient, c1p often, does not
    keep the rest non-centred). The spread is estimated from the frames: the variance of
    their centres less the mean squared width, at least 1%. Elsewhere (groups with little
    data, or groups all alike) a group stays non-centred, as a centred one then forms a
    funnel with ``tau``.
    """
    loc = np.stack([f.loc for f in frames])  # [G, C]
    scale = np.stack([f.scale for f in frames])
    spread = np.sqrt(np.maximum(loc.var(axis=0) - np.mean(scale**2, axis=0), 0.0))
    tril = np.linalg.cholesky(np.stack([f.scale[:, None] * f.correlation * f.scale[None, :]
                                        for f in frames]))
    pinned = np.mean(np.log(scale) - np.log(np.maximum(spread, _LEAST_SPREAD)), axis=1) < 0
    return GroupFrames(loc, tril, pinned)


def least_squares_frame(points: Points, prior: Prior, metrics: tuple[str, ...],
                        variant: str | Variant = "paper", error: float = 0.02,
                        loads: EffectiveLoads | None = None,
                        start: np.ndarray | None = None) -> Frame:
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
    float64 by a trust-region least-squares method. The widths are the larger of
    ``sqrt(diag((J^T J)^-1))`` of its weighted Jacobian, which the prior's rows keep
    finite, and the cluster-robust (sandwich) standard errors with one cluster per
    configuration: the residuals of one curve share its discrepancy, and on the source
    study's 0.6B sweeps the plain widths were 20 times too narrow, so that chains started
    that far from the posterior did not meet in warm-up.

    Args:
      points: the operating points, of one group.
      prior: the coefficients' log-normal prior.
      metrics: the metrics fitted.
      variant: the latency model's variant.
      error: the relative error weighting each observation.
      loads: the finite runs' effective-load tables, as the model takes them.
      start: where the solver starts, log coefficients; by default the prior's centre.

    Returns:
      The frame (:class:`Frame`); the prior's centres and widths, uncorrelated, if the fit
      fails.
    """
    names = coefficient_names(variant)
    observed = [observation.fitted(points, m) for m in metrics]
    weights = [1.0 / np.sqrt(error**2 + se**2) for _, _, se in observed]

    def residuals(log_c):  # [n_observations + n_coefficients]
        coef = Coefficients(**dict(zip(names, jnp.exp(log_c), strict=True)))
        predicted = observation.forward(coef, points, variant, loads)
        rows = [((observation.log_mean(predicted.mean(m), present) - log_y) * w)[present]
                for m, (present, log_y, _), w in zip(metrics, observed, weights, strict=True)]
        return jnp.concatenate(rows + [(log_c - prior.loc) / prior.scale])

    with jax.enable_x64(True):
        fit = least_squares(jax.jit(residuals),
                            np.asarray(prior.loc if start is None else start, float),
                            jac=jax.jit(jax.jacfwd(residuals)), method="trf")
    bread = np.linalg.pinv(fit.jac.T @ fit.jac)
    # Cluster of each residual: its configuration, each prior row one of its own.
    clusters = np.concatenate([np.asarray(points.config)[present] for present, _, _ in observed]
                              + [np.max(points.config, initial=0) + 1 + np.arange(len(names))])
    scores = np.zeros((clusters.max() + 1, len(names)))
    np.add.at(scores, clusters, fit.jac * fit.fun[:, None])
    robust = bread @ (scores.T @ scores) @ bread
    width = np.sqrt(np.maximum(np.diag(bread), np.diag(robust)))
    if not (np.isfinite(fit.x).all() and np.isfinite(width).all() and (width > 0).all()):
        return Frame(prior.loc, prior.scale, np.eye(len(names)))
    correlation = bread / np.sqrt(np.outer(np.diag(bread), np.diag(bread)))
    return Frame(fit.x, np.minimum(width, prior.scale), correlation)


class Frame(NamedTuple):
    """One group's least-squares frame (:func:`least_squares_frame`): centres and widths of
    its log coefficients, shape [C] each, and their correlation [C, C]."""

    loc: np.ndarray
    scale: np.ndarray
    correlation: np.ndarray


class Anchor(NamedTuple):
    """Where a fit starts from: least-squares coefficients of each group, the sampler's
    frame (one group only), the finite runs' effective-load tables built about them and
    what the coefficients explain there (:func:`confounding`)."""

    frames: list[Frame]  # one per group
    loads: EffectiveLoads | None  # None when no row is a finite run
    confounding: Confounding


class Confounding(NamedTuple):
    """What the coefficients explain, taken out of the discrepancies so that neither can
    stand in for the other (:func:`confounding`)."""

    projection: np.ndarray  # [2, n_configs, n_configs]: delta (C1, C2) = P @ delta_free
    load_offset: np.ndarray  # [n_groups, LOAD_BASIS]: see observation.load_offsets


def confounding(points: Points, frames: list[Frame], variant: str | Variant,
                loads: EffectiveLoads | None = None) -> Confounding:
    """The discrepancies' projections off what the coefficients explain, at each group's
    least-squares coefficients (``frames``).

    A configuration's discrepancy scales its ``C1`` and ``C2``; so does a change of the
    group's coefficients, by ``d log C / d log c`` (each coefficient's share of ``C``),
    which differs between configurations only through k, alpha and the lengths. Left
    free, the discrepancies' components along those directions trade off against the
    coefficients along a ridge that only their prior bounds (posterior correlations of
    0.86-0.94 on the source study's sweeps, NUTS's trees at their depth limit). Each
    group's discrepancy vectors, one per demand, are projected on the orthogonal
    complement of the columns of that Jacobian: the discrepancies keep what no choice of
    coefficients explains, the coefficients the rest. Likewise the discrepancy in load
    loses its level (:func:`sdbayes.observation.load_offsets`).

    Args:
      points: the fitted rows.
      frames: each group's least-squares frame (:func:`least_squares_frame`).
      variant: the latency model's variant.
      loads: the finite runs' effective-load tables.
    """
    variant = as_variant(variant)
    names = coefficient_names(variant)
    n_configs, n_groups = int(points.config.max()) + 1, len(frames)
    first = np.unique(points.config, return_index=True)[1]  # a row of each configuration
    group = np.asarray(points.group)[first]

    def log_demands(log_c, k, alpha, output_len):  # [2]: log C1, log C2 of a configuration
        coef = Coefficients(**dict(zip(names, jnp.exp(log_c), strict=True)))
        d = _demands(coef, k, alpha, output_len, 1.0, variant.form)
        return jnp.log(jnp.stack([d.independent.total, d.dependent.total]))

    anchors = np.stack([frame.loc for frame in frames])[group]  # [n_configs, C]
    jacobian = np.asarray(jax.vmap(jax.jacfwd(log_demands))(
        anchors, points.k[first], points.alpha[first], points.output_len[first]))  # [., 2, C]
    projection = np.zeros((2, n_configs, n_configs))
    for g in range(n_groups):
        mine = np.flatnonzero(group == g)
        for e in range(2):
            j = jacobian[mine, e]  # [m, C]
            projection[e][np.ix_(mine, mine)] = np.eye(len(mine)) - j @ np.linalg.pinv(j)
    at_anchor = observation.forward(_rows_at_frames(frames, points, names), points, variant,
                                    loads)
    return Confounding(projection, observation.load_offsets(at_anchor, points, n_groups))


def anchor(points: Points, prior: Prior, n_groups: int, metrics: tuple[str, ...],
           variant: str | Variant = "paper") -> Anchor:
    """Least-squares fits of each group, and the effective-load tables of the rows that are
    finite runs (:mod:`sdbayes.observation`) about them.

    The tables need coefficients and a good fit of finite runs needs the tables: a first
    fit treats every row as steady (one past saturation counts for nothing), tables about
    it let a second fit see the runs as they are, and the tables the model gets are built
    about that one.
    """
    groups = [np.flatnonzero(points.group == g) for g in range(n_groups)]

    def fit_groups(loads, frames=None):
        return [least_squares_frame(_subset(points, rows), prior, metrics, variant,
                                    loads=None if loads is None else _subset(loads, rows),
                                    start=None if frames is None else frames[g].loc)
                for g, rows in enumerate(groups)]

    def tables(frames):
        return observation.effective_loads(
            _rows_at_frames(frames, points, coefficient_names(variant)), points, variant)

    frames, loads = fit_groups(None), None
    if (~points.closed & np.isfinite(points.duration)).any():
        frames = fit_groups(tables(frames), frames)
        loads = tables(frames)
    return Anchor(frames, loads, confounding(points, frames, variant, loads))


def _rows_at_frames(frames: list[Frame], points: Points, names) -> Coefficients:
    """Each row's coefficients at its group's frame centre (fields [n])."""
    per_row = np.stack([np.exp(frame.loc) for frame in frames])[points.group]  # [n, C]
    return Coefficients(**{name: per_row[:, i] for i, name in enumerate(names)})


def _subset(rows_of: NamedTuple, rows: np.ndarray):
    """The rows ``rows`` of a NamedTuple of per-row arrays (:class:`Points`,
    :class:`~sdbayes.observation.EffectiveLoads`)."""
    return type(rows_of)(*(np.asarray(field)[rows] for field in rows_of))


def effective_loads_at(samples: dict, points: Points, variant: str | Variant
                       ) -> EffectiveLoads:
    """The finite runs' effective-load tables about the median of posterior draws: each
    row's coefficients, its group's scaled by its configuration's discrepancy.

    Args:
      samples: NumPyro draws of the model's sites (``c1p`` .. of shape [S, n_groups],
        ``delta`` [S, n_configs, 2], ``discrepancy`` [S, 2]).
      points: the fitted rows.
      variant: the latency model's variant.
    """
    names = coefficient_names(variant)
    per_row = np.stack([np.asarray(samples[n]) for n in names], axis=-1)[:, points.group]
    coef = Coefficients(**{name: per_row[..., i] for i, name in enumerate(names)})
    if "delta" in samples:
        coef = observation.configured(coef, np.asarray(samples["delta"])[:, points.config],
                                      np.asarray(samples["discrepancy"])[:, None, :])
    anchor = Coefficients(*(np.median(np.asarray(field), axis=0) if np.ndim(field) else field
                            for field in coef))
    return observation.effective_loads(anchor, points, variant)
