"""Fitting the probabilistic model to traces: NUTS by default, SVI for large trace sets."""

from __future__ import annotations

import json
import os
import warnings
from functools import partial
from pathlib import Path

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pandas as pd
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO, init_to_median
from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal

from sdbayes import observation
from sdbayes.cache import use_compilation_cache
from sdbayes.likelihood import (
    METRICS,
    Prior,
    anchor,
    data_prior,
    effective_loads_at,
    group_frames,
)
from sdbayes.likelihood import model as numpyro_model
from sdbayes.model import VARIANTS, Variant, as_variant
from sdbayes.observation import LIKELIHOODS, EffectiveLoads
from sdbayes.points import Points, bucket, pad_rows
from sdbayes.posterior import Posterior, compare, diagnose, tail_errors
from sdbayes.traces import (
    SCHEMA_VERSION,
    TraceError,
    aggregate,
    config_keys,
    grain,
    group_labels,
    read_points,
    to_points,
    validate,
)

METHODS = ("nuts", "svi")
AUTO = "auto"
"""``fit(..., variant=AUTO)`` fits every form that applies and keeps the best (PSIS-LOO)."""
CHAIN_METHODS = ("parallel", "vectorized", "sequential")
_WARMUP_TREE_DEPTH = 6
_FULL_COVARIANCE_SIZE = 500  # latents; past it SVI's guide is low-rank
LOAD_ERROR_SCALE = 0.05
"""Prior sd of the open loops' discrepancy in load, a relative error in ``C2`` (``S *
eta(q)`` in log latency), the same as when its amplitude was HalfNormal(0.05). Against a
simulator the mean-value form errs by 8-16% in latency at 85% of saturation (docs/model.md
section 1), where the sensitivity ``S`` is about 5.7: an ``eta`` of 1.4-2.8%, well inside
its prior, leaving room (the Student-t tail, :data:`sdbayes.observation.LOAD_DF`) for a
real server to need more."""
_SAMPLER_STEPS = 8
"""Sizes per doubling that the sampler pads the rows and configurations to
(:func:`sdbayes.points.bucket`): data sets whose sizes fall in one bucket share a compiled
sampler, and padding adds at most an eighth to each gradient's work."""
_PILOT_DRAWS = 200  # warm-up and draws of the pilot run that places the finite-run tables


def fit(
    traces: pd.DataFrame | str | Path | list[str | Path],
    method: str = "nuts",
    *,
    variant: str | Variant = "paper",
    experts: int | None = None,
    top_m: int | None = None,
    prior: Prior | None = None,
    metrics: tuple[str, ...] | None = None,
    likelihood: str = "lognormal",
    num_warmup: int = 1000,
    num_samples: int = 1000,
    num_chains: int = 4,
    chain_method: str | None = None,
    svi_steps: int = 5000,
    seed: int | jax.Array = 0,
    progress: bool = True,
    pool_scale: float = 0.5,
) -> Posterior:
    """Fit posteriors over the cost coefficients to operating points.

    Only steady points are fitted (``steady`` false marks saturated runs). Per-request
    tables are aggregated first. Several groups (hardware x model pair, see
    :func:`sdbayes.traces.group_labels`) are pooled partially.

    Args:
      traces: an operating-point or per-request table, or paths of CSV/Parquet files.
      method: ``"nuts"`` (default) or ``"svi"`` (a multivariate-normal guide, low-rank past
        500 latents; for trace sets too large for NUTS, at the cost of approximate and
        narrower intervals: bench/fleet_fit.py compares the two).
      variant: the latency model's variant (:data:`sdbayes.model.VARIANTS`): ``"paper"``,
        the reference, ``"stepped"`` (whole steps and step-boundary waits) or
        ``"filling"`` (a marginal cost rising as the batch fills the GPU); or ``"auto"``:
        fit each form that applies and keep the one PSIS-LOO prefers
        (:func:`choose_variant`, which records the choice and the LOO table).
      experts, top_m: for an MoE verifier, its number of experts M and routed experts per
        token m, from the model's config; the expert-loading terms ``c1e, c2e`` are then
        fitted too (compare with a dense fit by :func:`sdbayes.compare`).
      prior: log-normal prior of the coefficients; by default
        :func:`sdbayes.likelihood.data_prior`. See also :func:`sdbayes.likelihood.roofline_prior`.
        A six-coefficient prior is extended to the variant's terms by ``Prior.for_variant``.
      metrics: which of ``"e2e", "ttft", "tpot"`` to fit; by default the mean end-to-end
        latency alone. TTFT and TPOT are still predicted, from its coefficients. Fitted,
        they leave out closed loops of more than one request
        (:func:`sdbayes.observation.fitted`); on the source study's 8B sweeps all three
        then extrapolate in load to 10.3% (the e2e alone: 9.9%; ``bench/real_data.py
        --all-metrics``).
      likelihood: ``"lognormal"`` or ``"student_t"`` (robust to outliers).
      num_warmup, num_samples, num_chains: NUTS settings (``num_samples`` draws from SVI).
      chain_method: how NUTS runs its chains: ``"parallel"`` (one per JAX device; the
        default where there are enough, see :func:`sdbayes.use_cpu_cores`),
        ``"vectorized"`` (in lockstep on one device: the default otherwise, and the choice
        for a GPU) or ``"sequential"``.
      svi_steps: optimisation steps for SVI.
      seed: an int or a JAX PRNG key.
      progress: show a progress bar.
      pool_scale: half-normal scale of the between-group sd of log coefficients.

    Compiled programs are kept between runs in sdbayes's compilation cache
    (:mod:`sdbayes.cache`; ``SDBAYES_CACHE_DIR=off`` turns it off), unless the program has
    set up a JAX compilation cache of its own: a later fit of data of a similar size, in
    this process or another, skips compiling its sampler.

    Returns:
      A :class:`Posterior`; its ``diagnostics`` say whether it can be trusted, and a
      :class:`sdbayes.posterior.FitWarning` is raised as a warning when it cannot.

    Raises:
      TraceError: bad traces, or no steady points.
      ValueError: a bad argument.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    use_compilation_cache()
    auto = isinstance(variant, str) and variant == AUTO
    forms = [f for f in VARIANTS if not (f == "filling" and experts is not None)]
    variants = [as_variant(f if auto else variant, experts, top_m) for f in
                (forms if auto else [variant])]
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    for name, value, least in (("num_warmup", num_warmup, 0), ("num_samples", num_samples, 1),
                               ("num_chains", num_chains, 1), ("svi_steps", svi_steps, 1)):
        if not isinstance(value, int | np.integer) or value < least:
            raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
    if chain_method is None:
        chain_method = ("sequential" if num_chains == 1 else
                        "parallel" if jax.local_device_count() >= num_chains else "vectorized")
        cores = os.cpu_count() or 1
        if chain_method == "vectorized" and jax.default_backend() == "cpu" and cores > 1:
            warnings.warn(f"{num_chains} chains run in lockstep on one CPU device, which keeps "
                          f"one of {cores} cores busy: call sdbayes.use_cpu_cores() at the "
                          "start of the program to run them in parallel (2.5x faster on 2 "
                          "cores, bench/ingest.py), or pass chain_method='vectorized'",
                          stacklevel=2)
    if chain_method not in CHAIN_METHODS:
        raise ValueError(f"chain_method must be one of {CHAIN_METHODS}, got {chain_method!r}")
    points_df, provenance = _read_traces(traces)
    steady = points_df[points_df["steady"]].reset_index(drop=True)
    if steady.empty:
        raise TraceError([f"{provenance}: no steady operating points to fit"])
    settings = dict(method=method, prior=prior, metrics=metrics, likelihood=likelihood,
                    num_warmup=num_warmup, num_samples=num_samples, num_chains=num_chains,
                    chain_method=chain_method, svi_steps=svi_steps, seed=seed,
                    progress=progress, pool_scale=pool_scale)
    fits = {v.form: _fit_variant(steady, provenance, v, **settings) for v in variants}
    posterior = choose_variant(fits) if auto else fits[variants[0].form]
    for problem in posterior.diagnostics.problems:
        warnings.warn(problem, posterior.FitWarning, stacklevel=2)
    return posterior


def _fit_variant(steady: pd.DataFrame, provenance: str, variant: Variant, *, method, prior,
                 metrics, likelihood, num_warmup, num_samples, num_chains, chain_method,
                 svi_steps, seed, progress, pool_scale) -> Posterior:
    """One variant's fit of validated steady operating points (:func:`fit`'s arguments)."""
    points, groups = to_points(steady, validated=True)
    configs = list(dict.fromkeys(config_keys(steady, points.group)))
    if metrics is None:
        metrics = ("e2e",)
    unknown = set(metrics) - set(METRICS)
    if unknown or "e2e" not in metrics:
        raise ValueError(f"metrics must include 'e2e' and be among {METRICS}, got {metrics}")
    # Only what some row measures: the sampler traces the points and cannot ask.
    metrics = tuple(m for m in metrics if np.any(observation.fitted(points, m)[0]))
    prior = prior if prior is not None else data_prior(points)
    prior = prior.for_variant(variant)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    args = dict(points=points, prior=prior, n_groups=len(groups), metrics=tuple(metrics),
                likelihood=likelihood, pool_scale=pool_scale, variant=variant,
                # The filling form's two shape terms play the discrepancy in load's part:
                # with both, neither is identified (fill, fill_half drift 5-fold).
                load_error_scale=0.0 if variant.form == "filling" else LOAD_ERROR_SCALE)
    start = anchor(points, prior, len(groups), tuple(metrics), variant)
    args["loads"], args["confounding"] = start.loads, start.confounding
    # Coordinates shaped like the posterior (see least_squares_frame), the start at their
    # centre.
    if len(groups) == 1:
        args["frame"] = start.frames[0]
        init = partial(_start_at_frame)  # NumPyro takes init strategies as partials
    else:
        args["frame"] = group_frames(start.frames)
        init = partial(_start_in_frames, centres=args["frame"].loc)

    if method == "nuts":
        # The model's settings bound to it, its arrays passed to the compiled sampler as
        # arguments (jit_model_args, _parallel_chains) rather than baked into it as
        # constants: a later fit of data of the same shapes, in a new process too, reads
        # the sampler from the persistent compilation cache instead of compiling it again.
        # Padded to size buckets too, so that data of a similar size share the program.
        data = ("points", "prior", "frame", "loads", "confounding")
        n_configs = bucket(len(configs), _SAMPLER_STEPS)
        model = partial(numpyro_model, n_configs=n_configs,
                        **{name: value for name, value in args.items() if name not in data})

        def padded():
            return _padded({name: args[name] for name in data}, n_configs)

        # Coefficients are strongly correlated (C1 and C2 are sums of them): a dense mass
        # block for them; the many per-configuration sites stay diagonal, as dense over
        # them would cost O(d^2) a step.
        coefficient_sites = ("log_c_std",) if len(groups) == 1 else ("mu", "tau")
        # Warm-up starts from a unit mass matrix. Without a frame (several groups), the
        # coefficients' posterior sds (often 1e-3 in log space) against the error scales'
        # (about 1) make its early trajectories run to the full 1023 steps. Trees of at
        # most 63 steps let the mass matrix adapt at a small fraction of that cost; the
        # draws then get the full depth.
        def kernel():  # a new one per run: a used kernel fails with vectorized chains
            return NUTS(model, init_strategy=init, target_accept_prob=0.9,
                        dense_mass=[coefficient_sites],
                        max_tree_depth=(_WARMUP_TREE_DEPTH, 10))

        parallel = chain_method == "parallel"

        def sampler(**draws):
            mcmc = MCMC(kernel(), num_chains=num_chains, jit_model_args=True, **draws,
                        chain_method=_parallel_chains if parallel else chain_method,
                        progress_bar=progress and not parallel)
            if parallel and progress and not {"CI", "PYTEST_XDIST_WORKER"} & set(os.environ):
                mcmc.progress_bar = True  # NumPyro turns it off for any callable; pmap's works
            return mcmc

        if start.loads is not None:
            # The finite runs' tables are exact about their anchor, a least-squares fit
            # without the discrepancies; the posterior can lie elsewhere (the filling
            # form's shape terms move most). A short pilot run finds where, and the
            # tables the draws use are built about its median.
            pilot_key, key = jax.random.split(key)
            pilot = sampler(num_warmup=min(num_warmup, _PILOT_DRAWS),
                            num_samples=min(num_samples, _PILOT_DRAWS))
            pilot.run(pilot_key, **padded())
            args["loads"] = effective_loads_at(pilot.get_samples(), points, variant)
        mcmc = sampler(num_warmup=num_warmup, num_samples=num_samples)
        mcmc.run(key, extra_fields=("diverging", "num_steps"), **padded())
        idata = _unpadded(az.from_numpyro(mcmc, log_likelihood=True), len(points.k),
                          len(configs))
        extra = {}
    else:
        idata, extra = _svi(key, args, init, svi_steps, num_samples, progress)

    idata.attrs.update(
        sdbayes_schema_version=SCHEMA_VERSION,
        sdbayes_variant=variant.form,
        **({"sdbayes_experts": variant.experts, "sdbayes_top_m": variant.top_m}
           if variant.moe else {}),
        sdbayes_method=method,
        **({"sdbayes_chain_method": chain_method} if method == "nuts" else {}),
        sdbayes_likelihood=likelihood,
        sdbayes_metrics=json.dumps(list(metrics)),
        sdbayes_groups=json.dumps(groups),
        sdbayes_configs=json.dumps(configs),
        sdbayes_group_columns=json.dumps(_group_columns(steady, groups)),
        sdbayes_units="coefficients in seconds; rates in requests per second",
        sdbayes_provenance=provenance,
        sdbayes_n_points=len(steady),
        **({"sdbayes_load_df": observation.LOAD_DF} if args["load_error_scale"] > 0 else {}),
        sdbayes_prior_loc=json.dumps(np.asarray(prior.loc).tolist()),
        sdbayes_prior_scale=json.dumps(np.asarray(prior.scale).tolist()),
        **extra,
    )
    posterior = Posterior(idata)
    posterior.diagnostics = diagnose(posterior, len(steady))
    posterior.idata.attrs["sdbayes_tail_errors"] = json.dumps(tail_errors(posterior, steady,
                                                                        validated=True))
    return posterior


def _padded(data: dict, n_configs: int) -> dict:
    """The sampler's data (the model's ``points, loads, confounding``, ...) padded to
    :func:`sdbayes.points.bucket` sizes, ``n_configs`` configurations (a bucket): rows
    repeat the last with no measurement, so the likelihood masks them, and the
    configurations past the data's have no rows and a projection of zero, so their
    ``delta`` is 0 and their ``delta_free`` keeps its prior. :func:`_unpadded` cuts the
    draws back."""
    points, confounding = data["points"], data["confounding"]
    size = bucket(len(points.k), _SAMPLER_STEPS)
    pad = partial(pad_rows, size=size)
    unmeasured = np.arange(size) >= len(points.k)
    padded = Points(*map(pad, points))
    padded = padded._replace(**{m: np.where(unmeasured, np.nan, getattr(padded, m))
                                for m in METRICS})
    extra = n_configs - confounding.projection.shape[-1]
    projection = np.pad(confounding.projection, ((0, 0), (0, extra), (0, extra)))
    loads = None if data["loads"] is None else EffectiveLoads(*map(pad, data["loads"]))
    return dict(data, points=padded, loads=loads,
                confounding=confounding._replace(projection=projection))


def _unpadded(idata: az.InferenceData, n_rows: int, n_configs: int) -> az.InferenceData:
    """``idata`` of a sampler run on :func:`_padded` data, cut back to the data's
    ``n_rows`` rows (log-likelihoods, observations) and ``n_configs`` configurations."""
    draws = idata.posterior
    idata.posterior = draws.isel({draws[name].dims[2]: slice(n_configs)
                                  for name in ("delta", "delta_free") if name in draws})
    for group in set(idata.groups()) & {"log_likelihood", "observed_data"}:
        rows = getattr(idata, group)
        setattr(idata, group, rows.isel({array.dims[-1]: slice(n_rows)
                                         for array in rows.data_vars.values()}))
    return idata


def choose_variant(fits: dict[str, Posterior], margin: float = 2.0) -> Posterior:
    """The fit PSIS-LOO prefers among fits of the same traces by different forms, with the
    choice and the LOO table recorded in it (``Posterior.variant_choice``).

    The forms are nested in complexity (``"paper"``, then ``"stepped"``, which adds no
    coefficient but models the engine's steps, then ``"filling"``, two coefficients more).
    The simplest whose expected log predictive density is within ``margin`` standard
    errors of the best's is kept: a difference smaller than that is noise in the
    estimate, and a simpler form extrapolates no worse for it. Fits whose chains did not
    converge (divergent transitions, R-hat above 1.05: ``Diagnostics.converged``) are left
    out of the choice while any other converged, as their LOO estimates are not to be
    trusted either (the filling form where the data show no filling: its shape terms are
    then unidentified).

    Args:
      fits: form's name -> its fit, all of the same operating points (NUTS or SVI).
      margin: how many standard errors of the difference count as a tie.

    Returns:
      The chosen :class:`Posterior`.
    """
    shown = compare(fits)
    converged = [f for f in shown.index if _converged(fits[f])] or list(shown.index)
    left_out = [f for f in shown.index if f not in converged]
    table = (compare({f: fits[f] for f in converged}) if left_out and len(converged) > 1
             else shown.loc[converged])
    best = table.index[0]
    order = [f for f in VARIANTS if f in table.index] + [
        f for f in table.index if f not in VARIANTS]
    tied = [f for f in order
            if f == best or table.loc[f, "elpd_diff"] <= margin * table.loc[f, "dse"]]
    chosen = tied[0]
    if chosen == best:
        reason = (f"{chosen}: the highest expected log predictive density (PSIS-LOO)"
                  + (f", ahead of {table.index[1]} by {table['elpd_diff'].iloc[1]:.1f} "
                     f"(standard error {table['dse'].iloc[1]:.1f})" if len(table) > 1 else ""))
    else:
        reason = (f"{chosen}: within {margin:g} standard errors of the best, {best} "
                  f"(behind by {table.loc[chosen, 'elpd_diff']:.1f}, standard error "
                  f"{table.loc[chosen, 'dse']:.1f}), and simpler")
    if left_out:
        reason += f"; left out as not converged: {', '.join(left_out)}"
    posterior = fits[chosen]
    columns = ["elpd_loo", "p_loo", "elpd_diff", "dse", "warning"]
    posterior.idata.attrs["sdbayes_variant_choice"] = reason
    posterior.idata.attrs["sdbayes_loo"] = shown[columns].reset_index(names="variant").to_json(
        orient="records")
    return posterior


def _converged(posterior: Posterior) -> bool:
    return posterior.diagnostics is None or posterior.diagnostics.converged


def _start_at_frame(site):
    """NUTS's start: the coefficients at their frame's centre, the rest at prior medians."""
    if site["name"] == "log_c_std":
        return jnp.zeros(site["fn"].shape())
    return init_to_median(site)


def _start_in_frames(site, centres=None):
    """NUTS's start with several groups: every group at its frame's centre (the pinned) or
    at the population's (the rest), the population at the centres' mean and spread."""
    if site["name"] == "z":
        return jnp.zeros(site["fn"].shape())
    if site["name"] == "mu":
        return jnp.asarray(centres.mean(axis=0))
    if site["name"] == "tau":
        return jnp.asarray(np.maximum(centres.std(axis=0), 0.01))
    return init_to_median(site)


def use_cpu_cores(devices: int | None = None) -> int:
    """Let NUTS run its chains in parallel on a CPU: split it into ``devices`` JAX devices.

    JAX treats all of a CPU's cores as one device, where :func:`fit` can only run its
    chains in lockstep (``"vectorized"``), which keeps one core busy and makes every
    iteration wait for the longest trajectory of any chain. With at least as many devices
    as chains, :func:`fit` runs one chain per device instead (on 2 cores, 4 chains sample
    about 3x faster: ``bench/fit.py``). Call it at the start of a program, before JAX computes
    anything; the ``sdbayes`` command does. Devices beyond the cores are threads sharing
    them.

    Args:
      devices: how many CPU devices; by default the number of cores, at least 4 (the
        default number of chains).

    Returns:
      The number of CPU devices JAX now has: fewer than asked when JAX had already
      started, in which case a warning says so.
    """
    devices = devices or max(4, os.cpu_count() or 1)
    numpyro.set_host_device_count(devices)
    have = len(jax.devices("cpu"))
    if have < devices:
        warnings.warn(f"JAX had already started with {have} CPU device(s); call "
                      "sdbayes.use_cpu_cores before any JAX computation", stacklevel=2)
    return have


def _read_traces(traces) -> tuple[pd.DataFrame, str]:
    """Operating points from a table or files (per-request rows aggregated), and their source."""
    if isinstance(traces, pd.DataFrame):
        source = "<DataFrame>"
        if grain(traces, source) == "per_request":
            return aggregate(traces, source), source  # validated as it aggregates
        return validate(traces, source=source), source
    paths = [traces] if isinstance(traces, (str, Path)) else list(traces)
    return read_points(paths), ", ".join(map(str, paths))


def _group_columns(points: pd.DataFrame, groups: list[str]) -> list[dict[str, str]]:
    """The configuration names of each group, from its first SD row (or first row)."""
    labels = np.array(group_labels(points))
    columns = []
    for label in groups:
        rows = points[labels == label]
        rows = rows[rows["k"] > 0] if (rows["k"] > 0).any() else rows
        columns.append({c: str(rows.iloc[0][c]) for c in ("hardware", "verifier", "drafter",
                                                          "method")})
    return columns


def _parallel_chains(run_chain):
    """NumPyro's parallel chains (one per device, ``jax.pmap``) with the model's arrays as
    arguments of the mapped program: NumPyro's own "parallel" closes over them, which
    makes them constants of the compiled program, so that a new data set compiles it
    anew. ``run_chain`` is NumPyro's chain body with the model's arguments bound."""
    bound = dict(getattr(run_chain, "keywords", None) or {})
    if "args" not in bound or "kwargs" not in bound:  # another NumPyro: as it does
        return jax.pmap(run_chain)
    args, kwargs = bound.pop("args"), bound.pop("kwargs")

    def chain(init, args, kwargs):
        return run_chain.func(init, args=args, kwargs=kwargs, **bound)

    return lambda init: jax.pmap(chain, in_axes=(0, None, None))(init, args, kwargs)


def _svi(key, args, init, steps, num_samples, progress):
    sites = numpyro.handlers.trace(numpyro.handlers.seed(numpyro_model, 0)).get_trace(**args)
    latent = [name for name, site in sites.items()
              if site["type"] in ("sample", "deterministic") and not site.get("is_observed")]
    size = sum(int(np.size(site["value"])) for site in sites.values()
               if site["type"] == "sample" and not site.get("is_observed"))
    # A full covariance has size^2 / 2 parameters: past a few hundred latents (a fleet of
    # groups) it learns too slowly and, with one sample a step, diverged; a low-rank one
    # keeps the strongest correlations (each group's coefficients) at O(size * rank).
    full = size <= _FULL_COVARIANCE_SIZE
    guide = (AutoMultivariateNormal if full else AutoLowRankMultivariateNormal)(
        numpyro_model, init_loc_fn=init, init_scale=0.01)
    svi = SVI(numpyro_model, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    fit_key, draw_key = jax.random.split(key)
    # A step whose draw leaves the model's domain (a load past saturation) is skipped
    # rather than allowed to turn every parameter into NaN.
    result = svi.run(fit_key, steps, progress_bar=progress, stable_update=True, **args)
    tail = np.asarray(result.losses[-max(steps // 10, 1):])
    finite = tail[np.isfinite(tail)]
    if finite.size < tail.size / 2 or not all(
            np.isfinite(p).all() for p in jax.tree_util.tree_leaves(result.params)):
        raise RuntimeError("SVI diverged (non-finite ELBO); try NUTS or another seed")
    draws = Predictive(numpyro_model, guide=guide, params=result.params,
                       num_samples=num_samples, return_sites=latent)(draw_key, **args)
    keep = {name: np.asarray(v)[None] for name, v in draws.items()}
    # Pointwise log-likelihood of the draws, so that SVI fits compare by PSIS-LOO too.
    pointwise = numpyro.infer.log_likelihood(numpyro_model, draws, **args)
    idata = az.from_dict(posterior=keep,
                         log_likelihood={k: np.asarray(v)[None] for k, v in pointwise.items()})
    return idata, {"sdbayes_svi_final_loss": float(np.mean(finite)),
                   "sdbayes_svi_guide": f"{'full' if full else 'low-rank'} multivariate normal "
                                        f"over {size} latents"}

