"""The fitted posterior: coefficient draws, diagnostics, prediction, and the netCDF file."""

from __future__ import annotations

import json
import math
import warnings
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import xarray as xr
from scipy.optimize import least_squares, nnls
from scipy.stats import norm

from sdbayes import observation, predictive, tails
from sdbayes.files import replacing
from sdbayes.likelihood import coefficient_names
from sdbayes.model import Coefficients, Variant
from sdbayes.points import Points, bucket, pad_rows
from sdbayes.traces import TraceError, group_labels, to_points

_RHAT_LIMIT = 1.01
_RHAT_MIXED = 1.05  # above it chains plainly disagree; below, a short fit's R-hat is noisy
_ESS_PER_CHAIN = 100
# Prediction works through its grid in chunks of at most this many draws x rows, so that
# each of its [draws, rows] arrays stays near 16 MB whatever the grid's size.
_PREDICT_CELLS = 2_000_000
_IDENTIFIED_SD_RATIO = 0.5  # posterior sd of log c over prior sd above this: not learned


UNITS = {"fill": "1", "fill_half": "requests"}
"""Units of the fitted terms that are not seconds."""

_IN_FILE = {"s": ("ms", 1e3)}
"""How :meth:`Posterior.save` writes a unit (as what, times what): the file shows costs in
milliseconds for people and for ArviZ's summaries; a load turns them back into seconds."""
_FROM_FILE = {shown: scale for shown, scale in _IN_FILE.values()}


# Each site's dimensions past (chain, draw); the coefficients' own are ("group",).
_DIMENSIONS = {"log_c": ("coefficient",), "log_c_std": ("coefficient",), "mu": ("coefficient",),
               "tau": ("coefficient",), "z": ("group", "coefficient"),
               "discrepancy": ("demand",), "delta": ("config", "demand"),
               "delta_free": ("config", "demand"), "load_weights": ("group", "load_basis"),
               "load_offset": ("group", "load_basis")}


def _name_dimensions(idata: az.InferenceData, groups: list[str], names: tuple[str, ...]):
    """Names the posterior's dimensions in place (``group`` with the group labels as its
    coordinates, ``coefficient``, ``config``, ``demand``: C1, C2) and gives each
    coefficient its unit, so that ArviZ's summaries and plots say what they show; files
    written before are renamed as they load."""
    draws = idata.posterior
    variables = {}
    for name, array in draws.data_vars.items():
        dims = ("group",) if name in names else _DIMENSIONS.get(name, ())
        if array.ndim == 2 + len(dims):
            array = xr.DataArray(array.values, dims=("chain", "draw", *dims),
                                 attrs=array.attrs)
        if name in names:
            if array.attrs.get("units") in _FROM_FILE:  # as saved: back to seconds
                array = array / _FROM_FILE[array.attrs["units"]]
            array.attrs["units"] = UNITS.get(name, "s")
        variables[name] = array
    coords = {"chain": draws["chain"].values, "draw": draws["draw"].values, "group": groups,
              "coefficient": list(names), "demand": ["C1", "C2"]}
    named = xr.Dataset(variables, attrs=draws.attrs)
    idata.posterior = named.assign_coords({d: v for d, v in coords.items() if d in named.dims})


def in_milliseconds(summary: pd.DataFrame) -> pd.DataFrame:
    """A :meth:`Posterior.summary` table for people: the rows in seconds shown in ms (their
    ``mean, sd, lower, upper`` times 1000, ``unit`` ``"ms"``), the others as they are."""
    shown = summary.copy()
    seconds = shown["unit"] == "s"
    for column in ("mean", "sd", "lower", "upper"):
        shown[column] = np.where(seconds, 1e3 * shown[column], shown[column])
    shown["unit"] = np.where(seconds, "ms", shown["unit"])
    return shown


class FitWarning(UserWarning):
    """A fit whose numbers should not be trusted as they are."""


class Diagnostics(NamedTuple):
    """Convergence and identification of a fit; ``problems`` lists what is wrong, if anything.

    R-hat and ESS are rank-normalised split statistics over the coefficients and error
    scales (a single chain is split in halves); NaN for SVI, whose draws are independent
    by construction and whose error is that of its approximation.
    """

    max_rhat: float
    min_ess_bulk: float
    min_ess_tail: float
    divergences: int
    problems: tuple[str, ...]
    method: str = "nuts"

    @property
    def trustworthy(self) -> bool:
        return not self.problems

    @property
    def converged(self) -> bool:
        """No divergent transition and R-hat at most 1.05 (always, for SVI): the chains
        explored one posterior, however few their draws, so that fits may be compared by
        their LOO. ``trustworthy`` asks more: R-hat at most 1.01, enough ESS, identified
        coefficients. Between the two limits R-hat is within its own noise for short chains
        (a fit of 2 x 300 draws of data from its own form reached 1.02)."""
        return self.method != "nuts" or (self.divergences == 0
                                         and self.max_rhat <= _RHAT_MIXED)

    @property
    def verdict(self) -> str:
        """One line: whether the fit can be trusted, and why."""
        if self.problems:
            return "NOT TRUSTWORTHY: " + "; ".join(self.problems)
        if self.method == "svi":
            return ("approximate (SVI): no convergence diagnostics apply; check intervals "
                    "that matter against a NUTS fit")
        return (f"converged: R-hat at most {self.max_rhat:.3f}, ESS at least "
                f"{min(self.min_ess_bulk, self.min_ess_tail):.0f}, no divergent transitions")


TAIL_SCALES = (0.25, 4.0)
"""The bounds of the scale a fit puts on the tail model's log ratios (:func:`tail_errors`):
past them the model misses a mechanism, and its error is left to the sd."""

BURST_WINDOWS = (0.0, 5.0)
"""The bounds of the burst window a fit measures (:func:`tail_errors`,
:func:`sdbayes.tails.burst_delay`) [s]: a backlog of more than 5 s of arrivals is an
outage, not a tail."""

_BURST_SD_MAX = 5.0  # error sd per unit burst share: at most 0.5 where the burst is 10% of the mean
_BODY = 0.9  # the highest percentile that measures the load's excess dispersion

CLOSED = "closed_"
"""Prefix of the tail errors measured on closed loops in :func:`tail_errors`' result."""


class TailError(NamedTuple):
    """The tail model's error on a percentile, as a fit measured it
    (:meth:`Posterior.tail_error`): the measured percentile is the mean times the model's
    ratio to it raised to ``scale``, plus the :func:`~sdbayes.tails.burst_delay` of a
    ``window`` of arrivals (open loops), give or take ``sd`` in log."""

    scale: float  # of log(the model's ratio), fitted in log by least squares
    sd: float  # the rms of what is left, net of the percentiles' sampling
    window: float = 0.0  # [s] of arrivals whose prefills the slowest requests wait for
    # Open loops: sd per unit of a second's burst delay over the mean; the error at a point
    # is sqrt(sd^2 + (burst_sd * that share)^2) (sdbayes.tails.error_sd).
    burst_sd: float = 0.0


class Posterior:
    """Posterior over the cost coefficients, wrapping ArviZ InferenceData.

    Attributes:
      idata: the ``arviz.InferenceData``; its ``attrs`` carry the schema version, model
        variant, units, groups and the traces' provenance.
      groups: the group labels (hardware | verifier | drafter (method)).
      diagnostics: :class:`Diagnostics`.
    """

    FitWarning = FitWarning

    def __init__(self, idata: az.InferenceData, diagnostics: Diagnostics | None = None):
        self.idata = idata
        self._parsed_tail_errors: tuple[str | None, dict] = (None, {})  # see _tail_errors
        self.groups: list[str] = json.loads(idata.attrs["sdbayes_groups"])
        self.group_columns: list[dict] = json.loads(idata.attrs["sdbayes_group_columns"])
        _name_dimensions(idata, self.groups, self.coefficient_names)
        if diagnostics is None and "sdbayes_diagnostics" in idata.attrs:
            stored = json.loads(idata.attrs["sdbayes_diagnostics"])
            diagnostics = Diagnostics(**{**stored, "problems": tuple(stored["problems"])})
        self.diagnostics = diagnostics

    @property
    def variant(self) -> Variant:
        """The model variant fitted, with an MoE verifier's ``experts`` and ``top_m`` where
        it has one; a dense form equals its name (``post.variant == "paper"``)."""
        attrs = self.idata.attrs
        if "sdbayes_experts" in attrs:
            return Variant(attrs["sdbayes_variant"], int(attrs["sdbayes_experts"]),
                           int(attrs["sdbayes_top_m"]))
        return Variant(attrs["sdbayes_variant"])

    @property
    def coefficient_names(self) -> tuple[str, ...]:
        """The coefficients fitted: ``c1p .. c2d``, and ``c1e, c2e`` for an MoE verifier."""
        return coefficient_names(self.variant)

    @property
    def metrics(self) -> list[str]:
        return json.loads(self.idata.attrs["sdbayes_metrics"])

    def _draws(self, name: str) -> np.ndarray:
        """Draws of a site with chains flattened: shape [n_draws, ...]."""
        values = self.idata.posterior[name].values
        return values.reshape((-1,) + values.shape[2:])

    def coefficients(self, group: str | int = 0) -> Coefficients:
        """Coefficient draws of one group (its index or label), each field of shape
        [n_draws] (seconds); a ``ValueError`` names the groups there are if none matches."""
        index = self._group_index(group)
        return Coefficients(**{name: self._draws(name)[:, index]
                               for name in self.coefficient_names})

    def _group_index(self, group: str | int) -> int:
        """The index of a group given by index or label (ValueError naming the groups)."""
        if isinstance(group, str) and group in self.groups:
            return self.groups.index(group)
        if isinstance(group, int | np.integer) and 0 <= group < len(self.groups):
            return int(group)
        listed = "; ".join(f"{i}: {label}" for i, label in enumerate(self.groups))
        raise ValueError(f"group {group!r}: the posterior has {len(self.groups)} group(s) "
                         f"({listed})")

    def new_configuration(self, key: jax.Array, group: str | int = 0
                          ) -> tuple[Coefficients, observation.LoadError | None]:
        """Draws of what a configuration of ``group`` the fit has not measured (another k,
        acceptance or lengths) costs: the group's coefficients, each draw scaled by a fresh
        draw of the configurations' discrepancy (fields [n_draws]), and the group's fitted
        discrepancy in load (weights and offset [n_draws, LOAD_BASIS], scale [n_draws]; None
        for a posterior fitted without it). What :meth:`predict` draws for such a row, so
        that a plan is as uncertain as a prediction of the curve it is about; ``key`` is a
        JAX PRNG key.
        """
        config_key, load_key = jax.random.split(key)
        _, rows, load = self._row_draws(np.array([self._group_index(group)]), np.array([-1]),
                                        (key, config_key, load_key))
        error = None if load is None else load.at(np.array([self._group_index(group)]))
        if error is not None:
            error = observation.LoadError(error.weights[:, 0], error.scale[:, 0],
                                          error.offset[:, 0])
        # Fields the form does not fit are scalars, the others [D, 1].
        return Coefficients(*(f[:, 0] if jnp.ndim(f) == 2 else f for f in rows)), error

    def summary(self, ci: float = 0.9) -> pd.DataFrame:
        """One row per group and coefficient: mean, sd, equal-tailed interval (``lower``,
        ``upper``), R-hat, ESS, and the ``unit`` of the values: seconds (``"s"``) for the
        cost coefficients, ``"1"`` for ``fill``, ``"requests"`` for ``fill_half``.
        """
        stats = _convergence(self.idata, list(self.coefficient_names))
        rows = []
        tail = (1 - ci) / 2
        for g, label in enumerate(self.groups):
            for name in self.coefficient_names:
                x = self._draws(name)[:, g]
                key = f"{name}[{label}]"
                row = stats.loc[key] if key in stats.index else None
                rows.append({
                    "group": label, "coefficient": name, "unit": UNITS.get(name, "s"),
                    "mean": x.mean(), "sd": x.std(),
                    "lower": np.quantile(x, tail), "upper": np.quantile(x, 1 - tail),
                    "r_hat": row["r_hat"] if row is not None else math.nan,
                    "ess_bulk": row["ess_bulk"] if row is not None else math.nan,
                    "ess_tail": row["ess_tail"] if row is not None else math.nan,
                })
        return pd.DataFrame(rows)

    def save(self, path: str | Path) -> None:
        """Write the posterior (with diagnostics and provenance) as netCDF; an existing
        file is replaced only once the new one is complete. Costs are written in ms (their
        ``units`` attribute says so), for ``az.summary`` of the file; :func:`load_posterior`
        reads them back in seconds."""
        if self.diagnostics is not None:
            self.idata.attrs["sdbayes_diagnostics"] = json.dumps(
                {**self.diagnostics._asdict(), "problems": list(self.diagnostics.problems)})
        saved = self.idata.copy()
        for name in self.coefficient_names:
            array = saved.posterior[name]
            shown, scale = _IN_FILE.get(array.attrs["units"], (array.attrs["units"], 1.0))
            saved.posterior[name] = (array * scale).assign_attrs(units=shown)
        with replacing(path) as temporary:
            saved.to_netcdf(str(temporary))

    def predict(self, points: pd.DataFrame, ci: float = 0.9, seed: int = 0,
                percentiles: bool = True, arrival_excess: float | None = None) -> pd.DataFrame:
        """Posterior prediction for a grid of operating points: the fitted observation
        model (:mod:`sdbayes.observation`) run again on new rows.

        Each row needs ``k, acceptance, output_len`` and ``request_rate`` or
        ``concurrency``; ``hardware, verifier, drafter, method`` pick its group (they may
        be left out when the posterior has one group). A group the fit has not seen gets
        coefficients drawn from the pooled population when the fit had several groups. A
        configuration (group, k, acceptance, lengths) the fit has seen keeps its fitted
        discrepancy; a new one draws a fresh one, which all its rows (its loads) share. An
        open-loop row with ``duration_s`` is a benchmark run of that length, started empty:
        its means are those of the requests it completes (:mod:`sdbayes.fluid`), finite
        even past saturation and lower than the steady ones near it. Without
        ``duration_s`` the means are steady, +inf past saturation.

        Args:
          points: the operating points, a table of shape [n rows].
          ci: mass of the central intervals.
          seed: for the predictive noise, new configurations' and new groups' draws.
          percentiles: also predict p50/p90/p99 over requests (below); False skips them
          and their cost.
          arrival_excess: the load's excess dispersion for the percentiles
          (:func:`sdbayes.tails.percentile`); by default the fit's own
          (:attr:`arrival_excess`).

        Returns:
          The input columns plus, for metric m in e2e, ttft, tpot: ``m_pred_s`` (posterior
          mean of the mean), ``m_median_s`` (its posterior median: the better point
          prediction near saturation, where a few draws make the mean huge or infinite),
          ``m_lower_s, m_upper_s`` (credible interval of the configuration's mean),
          ``m_pi_lower_s, m_pi_upper_s`` (predictive interval of a measured mean, with the
          fitted relative error, and the row's own standard error ``m_se_s`` where it
          gives one, as the likelihood counts it); ``speedup_pred, speedup_lower,
          speedup_upper`` over k = 0 at the same load; ``saturation_rate_pred, _lower,
          _upper`` [req/s]; ``p_saturated``, the posterior probability that a steady load
          is past saturation, and ``saturated``, true where it is more likely than not (the
          median is then +inf; a mean is +inf where any draw is saturated). With
          ``percentiles``, for m in e2e, ttft, tpot and p in 50, 90, 99, the p-th
          percentile of m over requests (:mod:`sdbayes.tails`): ``m_pP_pred_s`` (posterior
          median), ``m_pP_lower_s, m_pP_upper_s`` (credible interval) and ``m_pP_pi_lower_s,
          m_pP_pi_upper_s`` (predictive interval of a measured percentile, over the row's
          ``n_requests`` where given). An open loop's arrivals are Poisson unless the row
          gives ``arrival_cv2`` (0 for evenly spaced ones); every request emits
          ``output_len`` tokens unless the row gives their spread, ``output_len_sd``.
        """
        if not 0 < ci < 1:
            raise ValueError(f"ci must lie in (0, 1), got {ci}")
        points = points.reset_index(drop=True)
        # Groups and configurations are resolved over the whole grid (a k = 0 row joins
        # the SD group of its table), then the rows are predicted in chunks.
        grid = self._grid(points)
        arrays, _ = to_points(grid, self.groups, self.configs)
        resolved = self._new_group_rows(grid, arrays)
        novel = predictive.novel_configurations(grid, arrays)
        keys = jax.random.split(jax.random.key(seed), 5)
        size = max(1, _PREDICT_CELLS // self._draws("c1p").shape[0])
        excess = self.arrival_excess if arrival_excess is None else float(arrival_excess)
        tail = dict(percentiles=percentiles, excess=excess)
        if len(points) <= size:
            return self._predict(points, grid, arrays, resolved, novel, ci, keys, **tail)

        def chunk_keys(i):  # draws a group or configuration shares keep their keys
            group, config, load, noise, tail = keys
            return (group, config, load, jax.random.fold_in(noise, i),
                    jax.random.fold_in(tail, i))

        parts = []
        for i, start in enumerate(range(0, len(points), size)):
            rows = slice(start, start + size)
            parts.append(self._predict(points.iloc[rows], grid.iloc[rows],
                                       Points(*(field[rows] for field in arrays)),
                                       resolved[rows], novel[rows], ci, chunk_keys(i),
                                       **tail))
        return pd.concat(parts, ignore_index=True)

    def _predict(self, points: pd.DataFrame, grid: pd.DataFrame, arrays: Points,
                 resolved: np.ndarray, novel: np.ndarray, ci: float, keys, percentiles: bool,
                 excess: float) -> pd.DataFrame:
        """:meth:`predict` of rows whose groups are resolved, up to :data:`_PREDICT_CELLS`
        draws x rows: their draws in one compiled program
        (:func:`sdbayes.predictive.outcomes`), then their summaries
        (:func:`sdbayes.predictive.summaries`)."""
        variant = self.variant
        n = len(resolved)
        # Rows padded (repeating the last) to a bucket size, so that grids of similar sizes
        # share one compiled program; the padding's outcomes are dropped below.
        pad = partial(pad_rows, size=bucket(n))
        arrays, resolved, novel = Points(*map(pad, arrays)), pad(resolved), pad(novel)
        loads = None
        if (~arrays.closed & np.isfinite(arrays.duration)).any():
            _, rows, _ = self._row_draws(resolved, arrays.config, keys[:3], novel)
            loads = predictive.effective_loads(rows, arrays, variant)
        tail = None
        if percentiles:
            errors = np.array([[[self.tail_error(m, q, closed) for q in tails.QUANTILES]
                                for m in ("e2e", "ttft", "tpot")] for closed in (False, True)])
            # Each row's TailError by its kind of loop: [3, Q, fields, R].
            errors = np.where(arrays.closed, errors[1, ..., None], errors[0, ..., None])
            tail = predictive.TailInputs(
                *map(pad, predictive.row_spreads(grid)), excess,
                pad(predictive.column(grid, "n_requests")), *np.moveaxis(errors, 2, 0))
        draws, means = predictive.outcomes(
            self._sites, arrays, resolved, novel, loads,
            {m: observation.observed(arrays, m)[2] for m in ("e2e", "ttft", "tpot")}, keys,
            tail, names=self.coefficient_names,
            student_load="sdbayes_load_df" in self.idata.attrs, variant=variant,
            likelihood=self.idata.attrs.get("sdbayes_likelihood", "lognormal"),
            forward=observation.forward)
        lo, hi = (1 - ci) / 2, 1 - (1 - ci) / 2
        summary = predictive.summaries({name: x[:n] for name, x in draws.items()}, (0.5, lo, hi))
        means = {name: np.asarray(value[:n], float) for name, value in means.items()}
        out = points.reset_index(drop=True).copy()
        columns = {}
        for metric in ("e2e", "ttft", "tpot"):
            columns[f"{metric}_pred_s"] = means[metric]
            (columns[f"{metric}_median_s"], columns[f"{metric}_lower_s"],
             columns[f"{metric}_upper_s"]) = summary[metric]
            columns[f"{metric}_pi_lower_s"], columns[f"{metric}_pi_upper_s"] = (
                summary[f"{metric}_measured"][1:])
        if percentiles:
            for name in predictive.percentile_names():
                (columns[f"{name}_pred_s"], columns[f"{name}_lower_s"],
                 columns[f"{name}_upper_s"]) = summary[name]
                columns[f"{name}_pi_lower_s"], columns[f"{name}_pi_upper_s"] = (
                    summary[f"{name}_measured"][1:])
        for name in ("speedup", "saturation_rate"):
            columns[f"{name}_pred"] = means[name]
            columns[f"{name}_lower"], columns[f"{name}_upper"] = summary[name][1:]
        columns["p_saturated"] = means["p_saturated"]
        columns["saturated"] = means["p_saturated"] >= 0.5
        return pd.concat([out, pd.DataFrame(columns, index=out.index)], axis=1)

    @property
    def arrival_excess(self) -> float:
        """How much the fit found the server's load to fluctuate beyond its arrivals'
        spacing (:func:`tail_errors`, :func:`sdbayes.tails.percentile`); 0 where it
        measured nothing."""
        return float(self._tail_errors.get("arrival_excess", 0.0))

    @property
    def _tail_errors(self) -> dict[str, float]:
        """:func:`tail_errors`' result as the fit stored it, parsed once per stored text
        (prediction asks for it per metric and percentile)."""
        text = self.idata.attrs.get("sdbayes_tail_errors", "{}")
        if self._parsed_tail_errors[0] != text:
            self._parsed_tail_errors = (text, json.loads(text))
        return self._parsed_tail_errors[1]

    def tail_error(self, metric: str, q: float, closed: bool = False) -> TailError:
        """The error of the log of the tail model's ``q``-quantile of ``metric`` relative to
        the mean, as the fit measured it on its points' percentiles (:func:`tail_errors`)
        of open loops, or with ``closed`` of closed ones (the other kind's where it measured
        too few): how far to scale the model's log ratio (``scale``, which prediction and
        planning apply) and the sd of what is left; scale 1 and sd
        :data:`sdbayes.tails.SHAPE_SD` where it measured none.

        A quantile between two measured ones (the p95 of an SLO, between the p90 and the
        p99) takes their errors interpolated linearly in the normal quantile of ``q``; one
        outside the measured ones (a p99.9) is taken as measured nowhere, since the
        calibration says nothing of how the tail goes on past what it saw."""
        errors = self._tail_errors

        def measured(prefix: str) -> dict[float, TailError]:
            named = {p: f"{prefix}{metric}_p{100 * p:g}" for p in tails.QUANTILES}
            return {p: TailError(float(errors.get(f"{name}_scale", 1.0)), float(errors[name]),
                                 float(errors.get(f"{name}_window", 0.0)),
                                 float(errors.get(f"{name}_burst_sd", 0.0)))
                    for p, name in named.items() if name in errors}

        mine, other = measured(CLOSED if closed else ""), measured("" if closed else CLOSED)
        known = mine if q in mine or _between(q, mine) else other
        if q in known:
            return known[q]
        if not _between(q, known):
            return TailError(1.0, tails.SHAPE_SD, 0.0)
        z = norm.ppf(list(known))
        return TailError(*(float(np.interp(norm.ppf(q), z, [e[i] for e in known.values()]))
                           for i in range(len(TailError._fields))))

    @property
    def variant_choice(self) -> tuple[str, pd.DataFrame] | None:
        """Why ``fit(..., variant="auto")`` kept this form, and the PSIS-LOO table of the
        forms it compared (:func:`sdbayes.inference.choose_variant`); None otherwise."""
        if "sdbayes_variant_choice" not in self.idata.attrs:
            return None
        table = pd.DataFrame(json.loads(self.idata.attrs["sdbayes_loo"])).set_index("variant")
        return self.idata.attrs["sdbayes_variant_choice"], table

    @property
    def configs(self) -> list[tuple] | None:
        """The fitted configurations' keys (:func:`sdbayes.traces.config_keys`), in the
        order of the ``delta`` draws; None for a posterior saved without them."""
        stored = self.idata.attrs.get("sdbayes_configs")
        return None if stored is None else [tuple(key) for key in json.loads(stored)]

    def _grid(self, points: pd.DataFrame) -> pd.DataFrame:
        """The grid as a validatable operating-point table (placeholders where needed)."""
        grid = points.reset_index(drop=True).copy()
        # Placeholders for what validation wants but prediction does not use: a measurement,
        # and the prompt length, which the six-coefficient form does not depend on.
        if "e2e_mean_s" not in grid.columns:
            grid["e2e_mean_s"] = 1.0
        if "prompt_len" not in grid.columns:
            grid["prompt_len"] = 1.0
        missing = [c for c in ("hardware", "verifier", "drafter", "method") if c not in grid]
        if missing:
            if len(self.groups) != 1:
                raise TraceError([f"prediction grid: missing column(s) {missing}: the posterior "
                                  f"has {len(self.groups)} groups, name one per row"])
            for column in missing:
                grid[column] = self.group_columns[0][column]
                if column == "method":
                    grid.loc[grid["k"] == 0, "method"] = "none"
        return grid

    def _new_group_rows(self, grid: pd.DataFrame, arrays) -> np.ndarray:
        """Rows of no fitted group; k = 0 rows join the one group of their hardware and verifier."""
        group = arrays.group.copy()
        for i in np.flatnonzero(group < 0):
            row = grid.iloc[i]
            same = [g for g, cols in enumerate(self.group_columns)
                    if cols["hardware"] == row["hardware"] and cols["verifier"] == row["verifier"]]
            if row["k"] == 0 and len(same) == 1:
                group[i] = same[0]
        if (group < 0).any() and "mu" not in self.idata.posterior:
            labels = group_labels(grid)
            unknown = sorted({labels[i] for i in np.flatnonzero(group < 0)})
            raise TraceError([f"prediction grid: group {u!r} was not fitted (fitted: "
                              f"{self.groups})" for u in unknown])
        return group

    @cached_property
    def _sites(self) -> dict[str, jax.Array]:
        """The draws prediction reads, on the device: the coefficients stacked [D, G, C]
        (``"coef"``) and whichever of the other sites the fit has, chains flattened."""
        sites = {"coef": jnp.stack([self._draws(name) for name in self.coefficient_names],
                                   axis=-1)}
        for name in ("mu", "tau", "discrepancy", "delta", "load_weights", "load_offset",
                     "load_scale", "tau_q", "sigma_e2e", "sigma_ttft", "sigma_tpot"):
            if name in self.idata.posterior:
                sites[name] = jnp.asarray(self._draws(name))
        if self.configs is None:  # no keys to match a row's configuration against
            sites.pop("delta", None)
        return sites

    def _row_draws(self, group: np.ndarray, config: np.ndarray, keys, novel=None):
        """:func:`sdbayes.predictive.row_draws` of this posterior's draws (``novel`` 0 by
        default)."""
        novel = np.zeros(len(config), np.uint32) if novel is None else novel
        return predictive.row_draws(self._sites, group, config, novel, keys,
                          names=self.coefficient_names,
                          student_load="sdbayes_load_df" in self.idata.attrs)


def _between(q: float, measured: dict) -> bool:
    """Whether ``q`` lies between the lowest and the highest of the measured quantiles."""
    return len(measured) >= 2 and min(measured) < q < max(measured)


def tail_errors(posterior: Posterior, points: pd.DataFrame, *,
                validated: bool = False) -> dict[str, float]:
    """Calibrate the tail model on fitted points that measured percentiles.

    First the load's excess dispersion: where at least
    :data:`sdbayes.tails.CALIBRATION_POINTS` open loops measured e2e p50s or p90s, the
    ``arrival_excess`` (from :data:`sdbayes.tails.EXCESS_GRID`; the tail model's term of
    load fluctuations beyond the arrivals' spacing) that brings the predicted ratios of
    those to the mean closest to the measured ones (least squares in log). A server sees
    its load fluctuate more than the client's spacing says (the study's "constant"
    GuideLLM rates do not reach the server evenly spaced); a simulator's Poisson arrivals
    need none. The p99 is left out: a burst reaching a few percent of the requests moves it
    alone. Then, for each column ``e2e_p50_s``, ``ttft_p99_s``... with that many values
    beside their metric's mean, two terms fitted together by least squares in log
    (:func:`_tail_fit`): a scale of the model's log ratio to the mean (keyed
    ``"e2e_p50_scale"``, within :data:`TAIL_SCALES`), which moves a tail the model places
    too near the mean (or too far) where its log ratio is large and leaves it where it is
    near 0, as at light load without SD, where the model is exact; and on open loops a
    burst window (keyed ``"e2e_p50_window"``, within :data:`BURST_WINDOWS`,
    :func:`sdbayes.tails.burst_delay`). Prediction and planning apply both. What is left,
    less what the percentiles' sampling over ``n_requests`` explains (in variance; see
    :func:`sdbayes.predictive.sampling_sd`), is the sd of the tail model's own error, keyed
    ``"e2e_p50"``: what the model does not know about the truth. On open loops it grows
    with the burst's share of the percentile, by ``"e2e_p50_burst_sd"``
    (:func:`_error_sds`, :func:`sdbayes.tails.error_sd`). A plan weighs it
    (:func:`sdbayes.planning.plan_draws`), a prediction adds the sampling back. Open and
    closed loops are measured apart (a closed loop's keys start with :data:`CLOSED`) where
    each kind has enough points: a GuideLLM throughput run (every request sent at once)
    has TTFT tails that an open loop never shows.

    Not a likelihood term: the coefficients do not learn from percentiles. ``validated``:
    ``points`` is what :func:`sdbayes.traces.validate` returned (a fit's own table).

    Returns:
      ``{"arrival_excess": float, "e2e_p99": sd, "e2e_p99_scale": scale,
      "e2e_p99_window": window, "e2e_p99_burst_sd": sd per burst share,
      "closed_e2e_p99": sd, ...}``.
    """
    columns = [(m, j, f"{m}_p{100 * q:g}") for m in ("e2e", "ttft", "tpot")
               for j, q in enumerate(tails.QUANTILES)]
    measured = [(m, j, c) for m, j, c in columns if f"{c}_s" in points
                and f"{m}_mean_s" in points
                and (points[f"{c}_s"].notna() & points[f"{m}_mean_s"].notna()).sum()
                >= tails.CALIBRATION_POINTS]
    if not measured:
        return {}
    points = points.reset_index(drop=True)
    rows, arrays, grid = _fitted_rows(posterior, points, validated)
    # The body of the distribution, which a burst reaching a few percent of the requests
    # leaves alone, measures the load's excess dispersion; the burst is the p99's.
    body = [(j, c) for m, j, c in measured if m == "e2e" and tails.QUANTILES[j] <= _BODY]
    excess = _arrival_excess(posterior, points, body, rows, arrays, grid)
    shapes = predictive.tail_shapes(rows, arrays, *predictive.row_spreads(grid),
                                    posterior.variant, excess)
    n = predictive.column(grid, "n_requests")
    # A window's delay per second of it, [R]: the prefills of a second's arrivals (the
    # arrays' rate is 0 on closed loops).
    per_window = np.asarray(tails.burst_delay(np.median(np.asarray(rows.c2p), axis=0),
                                              arrays.rate, 1.0))
    errors = {"arrival_excess": excess}
    for metric, j, name in measured:
        ratio, cv = shapes[metric]
        ratio, cv = np.median(np.asarray(ratio)[j], axis=0), np.median(np.asarray(cv), axis=0)
        model = np.log(ratio)
        mean = points[f"{metric}_mean_s"].to_numpy(float)
        measured_log = np.log(points[f"{name}_s"].to_numpy(float) / mean)
        burst = np.asarray(tails.per_metric(per_window, metric, arrays.output_len)) / mean
        sampling = np.nan_to_num(predictive.sampling_sd(tails.QUANTILES[j], n, cv, ratio))
        for prefix, kind in (("", ~arrays.closed), (CLOSED, arrays.closed)):
            kept = np.isfinite(measured_log - model) & kind
            if kept.sum() < tails.CALIBRATION_POINTS:
                continue
            x, y, b = model[kept], measured_log[kept], burst[kept]
            scale, window = _tail_fit(x, y, b)
            left = y - np.log(np.exp(scale * x) + window * b)
            errors[f"{prefix}{name}_scale"] = scale
            if prefix == CLOSED:
                rms = np.sum(left**2) / (kept.sum() - 1)
                errors[prefix + name] = float(np.sqrt(max(rms - np.mean(sampling[kept] ** 2),
                                                          0.0)))
            else:
                errors[name], errors[f"{name}_burst_sd"] = _error_sds(left, b, sampling[kept])
                errors[f"{name}_window"] = window
    return errors


def _error_sds(left: np.ndarray, burst: np.ndarray, sampling: np.ndarray
               ) -> tuple[float, float]:
    """``(sd, burst_sd)`` of the tail model's error on open loops, whose variance at a point
    is ``sd^2 + (burst_sd * burst)^2`` beside its percentile's sampling variance: the
    squared errors ``left`` (n / (n - 1) of them) less the sampling variances, regressed
    on ``1`` and ``burst^2`` with non-negative weights. Where the burst is a large share of
    the percentile (short requests at high rates, acceptance near 1), the error is larger:
    on the source study's 8B sweeps, held-out p99 errors scattered by 0.04 where the burst
    is under 8% of the mean and by 0.12 where it is over 17%, and one pooled sd put 20% of
    the p99s at acceptance 1 above a one-sided 95% bound (4 folds of held-out curves, as
    bench/tail_plan.py makes them; 3% with the burst's term)."""
    n = left.size
    excess = left**2 * n / (n - 1) - sampling**2
    weights, _ = nnls(np.stack([np.ones(n), burst**2], axis=1), excess)
    sd, burst_sd = np.sqrt(weights)
    return float(sd), float(min(burst_sd, _BURST_SD_MAX))


def _tail_fit(x: np.ndarray, y: np.ndarray, burst: np.ndarray) -> tuple[float, float]:
    """``(scale, window)`` within :data:`TAIL_SCALES` and :data:`BURST_WINDOWS` that bring
    ``log(exp(scale * x) + window * burst)`` closest to ``y`` (least squares): ``x`` the
    model's log ratios of a percentile to the mean, ``y`` the measured ones, ``burst`` a
    second's :func:`~sdbayes.tails.burst_delay` over the mean (0 on closed loops).
    Without a burst it is least squares through 0 of ``y`` on ``x``."""
    through_zero = float(np.clip((x @ y) / (x @ x), *TAIL_SCALES)) if x @ x > 1e-12 else 1.0
    if not np.any(burst > 0):
        return through_zero, 0.0
    bounds = tuple(zip(TAIL_SCALES, BURST_WINDOWS, strict=True))
    fit = least_squares(lambda p: np.log(np.exp(p[0] * x) + p[1] * burst) - y,
                        [through_zero, 0.0], bounds=bounds)
    return float(fit.x[0]), float(fit.x[1])


def _fitted_rows(posterior: Posterior, points: pd.DataFrame, validated: bool):
    """The fitted points' coefficient draws (their groups' and configurations'; fields
    [D, R]), arrays and grid (:func:`tail_errors`)."""
    grid = posterior._grid(points)
    arrays, _ = to_points(grid, posterior.groups, posterior.configs, validated=validated)
    resolved = posterior._new_group_rows(grid, arrays)
    key = jax.random.key(0)  # the fitted points' groups and configurations draw nothing
    _, rows, _ = posterior._row_draws(resolved, arrays.config, (key, key, key))
    return rows, arrays, grid


def _arrival_excess(posterior: Posterior, points: pd.DataFrame,
                    percentiles: list[tuple[int, str]], rows: Coefficients, arrays,
                    grid) -> float:
    """The :data:`sdbayes.tails.EXCESS_GRID` value that fits the open loops' measured e2e
    ``percentiles`` (index into :data:`sdbayes.tails.QUANTILES`, name: (2, "e2e_p99")...)
    best (:func:`tail_errors`), by the draws' median ratios of the tail model alone (no
    noise enters them); 0 with too few open loops."""
    open_loop = points["request_rate"].notna().to_numpy()
    if not percentiles or open_loop.sum() < tails.CALIBRATION_POINTS:
        return 0.0
    which, names = zip(*percentiles, strict=True)
    measured = np.stack([np.log(points[f"{name}_s"] / points["e2e_mean_s"]).to_numpy(float)
                         for name in names])[:, open_loop]  # [N, open rows]
    losses = []
    for excess in tails.EXCESS_GRID:
        ratio = np.asarray(predictive.tail_shapes(
            rows, arrays, *predictive.row_spreads(grid), posterior.variant,
            excess)["e2e"][0])[list(which)]  # [N, D, R]
        error = measured - np.log(np.median(ratio, axis=1))[:, open_loop]
        losses.append(np.sum(error[np.isfinite(error)] ** 2))
    return float(tails.EXCESS_GRID[int(np.argmin(losses))])


def diagnose(posterior: Posterior, n_points: int) -> Diagnostics:
    """Convergence (R-hat, bulk and tail ESS, divergences) and identification of a fit."""
    idata = posterior.idata
    problems = []
    coefficients = posterior.coefficient_names
    names = [n for n in idata.posterior.data_vars
             if n in coefficients or n.startswith("sigma_") or n == "tau_q"]
    method = idata.attrs.get("sdbayes_method", "nuts")
    max_rhat = min_bulk = min_tail = math.nan
    divergences = 0
    if method == "nuts":
        stats = _convergence(idata, names)
        max_rhat = float(stats["r_hat"].max())
        min_bulk, min_tail = float(stats["ess_bulk"].min()), float(stats["ess_tail"].min())
        want = _ESS_PER_CHAIN * max(idata.posterior.sizes["chain"], 2)
        if not max_rhat <= _RHAT_LIMIT:
            problems.append(f"R-hat up to {max_rhat:.3f} (above {_RHAT_LIMIT}): the chains "
                            "disagree; run more warm-up and draws, or check the traces")
        if not min(min_bulk, min_tail) >= want:
            problems.append(f"effective sample size as low as {min(min_bulk, min_tail):.0f} "
                            f"(want {want}): intervals are unreliable; run more draws")
    if "sample_stats" in idata and "diverging" in idata.sample_stats:
        divergences = int(idata.sample_stats["diverging"].values.sum())
        if divergences:
            problems.append(f"{divergences} divergent transitions: the posterior may be biased")
    if n_points < len(coefficients):
        problems.append(f"only {n_points} operating points for {len(coefficients)} "
                        "coefficients per group")
    prior_scale = np.asarray(json.loads(idata.attrs["sdbayes_prior_scale"]))
    for g, label in enumerate(posterior.groups):
        loose = []
        for j, name in enumerate(coefficients):
            sd = np.log(posterior._draws(name)[:, g]).std()
            if sd > _IDENTIFIED_SD_RATIO * prior_scale[j]:
                loose.append(name)
        if loose:
            problems.append(f"group {label!r}: {', '.join(loose)} not identified by the traces "
                            "(posterior about as wide as the prior); measure more loads, k or "
                            "acceptance rates, or give an informative prior")
    return Diagnostics(max_rhat, min_bulk, min_tail, divergences, tuple(problems), method)


def _convergence(idata: az.InferenceData, names: list[str]) -> pd.DataFrame:
    """ArviZ's R-hat and ESS of ``names``; one chain is split in halves, as R-hat needs two
    (ArviZ would give NaN)."""
    draws = idata.posterior[names]
    if draws.sizes["chain"] == 1 and draws.sizes["draw"] >= 8:
        half = draws.sizes["draw"] // 2
        draws = {n: draws[n].values[0, :2 * half].reshape(2, half, *draws[n].shape[2:])
                 for n in names}
    return az.summary(draws, kind="diagnostics")


def compare(posteriors: dict[str, Posterior], metric: str | None = None) -> pd.DataFrame:
    """Rank fits of the same traces (e.g. forms, or dense and MoE variants) by PSIS-LOO,
    via ArviZ.

    Args:
      posteriors: name -> a fit; all fitted to the same operating points and metrics.
      metric: whose pointwise log-likelihood to compare (``"e2e"``, ``"ttft"``,
        ``"tpot"``); by default all the fitted metrics together, one term per operating
        point (leaving a point out leaves out all it measured).

    Returns:
      ``arviz.compare``'s table, best first: ``elpd_loo`` (higher is better), ``p_loo``,
      ``elpd_diff`` from the best and its standard error ``dse``, ``weight``, and
      ``warning`` (true where Pareto k is high and the estimate unreliable).

    Raises:
      ValueError: fewer than two fits, one without pointwise log-likelihood, or fits of
        different traces.
    """
    if len(posteriors) < 2:
        raise ValueError("compare needs at least two posteriors")
    counts = {name: post.idata.attrs["sdbayes_n_points"] for name, post in posteriors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the fits saw different traces ({counts} operating points)")
    pointwise = {name: _pointwise(name, post, metric) for name, post in posteriors.items()}
    with warnings.catch_warnings():
        # A high Pareto k is reported in the table's `warning` column instead.
        warnings.filterwarnings("ignore", message=".*[Pp]areto", category=UserWarning)
        # ArviZ 0.2x sorts with pandas' `inplace=`, which pandas >= 3.1 deprecates.
        warnings.filterwarnings("ignore", message="The inplace keyword")
        return az.compare(pointwise, ic="loo", var_name="obs")


def _pointwise(name: str, posterior: Posterior, metric: str | None) -> az.InferenceData:
    """A fit's pointwise log-likelihood of one metric or of all together, as ``obs``."""
    fitted = posterior.metrics if metric is None else [metric]
    have = posterior.idata.get("log_likelihood")
    missing = [m for m in fitted if have is None or f"obs_{m}" not in have]
    if missing:
        raise ValueError(f"posterior {name!r} has no pointwise log-likelihood of "
                         f"{', '.join(missing)}")
    total = sum(have[f"obs_{m}"].values for m in fitted)  # [chain, draw, point]
    return az.from_dict(posterior={"tau_q": posterior.idata.posterior["tau_q"].values},
                        log_likelihood={"obs": total})


def load_posterior(path: str | Path) -> Posterior:
    """Read a posterior written by :meth:`Posterior.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such posterior file")
    idata = az.from_netcdf(str(path))
    if "sdbayes_groups" not in idata.attrs:
        raise ValueError(f"{path}: not an sdbayes posterior (no sdbayes attributes)")
    return Posterior(idata)
