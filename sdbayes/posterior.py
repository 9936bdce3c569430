"""The fitted posterior: coefficient draws, diagnostics, prediction, and the netCDF file."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from sdbayes.calibrate import coefficient_names, predicted_means, scale_demands
from sdbayes.finite_run import finite_run
from sdbayes.model import Coefficients, Variant, saturation_rate, speedup
from sdbayes.traces import TraceError, group_labels, to_points

_RHAT_LIMIT = 1.01
_ESS_PER_CHAIN = 100
_IDENTIFIED_SD_RATIO = 0.5  # posterior sd of log c over prior sd above this: not learned


UNITS = {"fill": "1", "fill_half": "requests"}
"""Units of the fitted terms that are not seconds."""


def in_milliseconds(summary: pd.DataFrame) -> pd.DataFrame:
    """A :meth:`Posterior.summary` table for people: the rows in seconds shown in ms (their
    ``mean, sd, lower, upper`` times 1000, ``unit`` ``"ms"``), the others as they are."""
    shown = summary.copy()
    seconds = shown["unit"] == "s"
    for column in ("mean", "sd", "lower", "upper"):
        shown[column] = np.where(seconds, 1e3 * shown[column], shown[column])
    shown["unit"] = np.where(seconds, "ms", shown["unit"])
    return shown


_predicted_means = jax.jit(predicted_means, static_argnames="variant")


class FitWarning(UserWarning):
    """A fit whose numbers should not be trusted as they are."""


class Diagnostics(NamedTuple):
    """Convergence and identification of a fit; ``problems`` lists what is wrong, if anything."""

    max_rhat: float  # NaN for SVI
    min_ess_bulk: float
    min_ess_tail: float
    divergences: int
    problems: tuple[str, ...]

    @property
    def trustworthy(self) -> bool:
        return not self.problems


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
        self.groups: list[str] = json.loads(idata.attrs["sdbayes_groups"])
        self.group_columns: list[dict] = json.loads(idata.attrs["sdbayes_group_columns"])
        if diagnostics is None and "sdbayes_diagnostics" in idata.attrs:
            stored = json.loads(idata.attrs["sdbayes_diagnostics"])
            diagnostics = Diagnostics(**{**stored, "problems": tuple(stored["problems"])})
        self.diagnostics = diagnostics

    @property
    def variant(self) -> str | Variant:
        """The model variant fitted: a form's name, or a :class:`~sdbayes.model.Variant`
        carrying an MoE verifier's ``experts`` and ``top_m``."""
        attrs = self.idata.attrs
        if "sdbayes_experts" in attrs:
            return Variant(attrs["sdbayes_variant"], int(attrs["sdbayes_experts"]),
                           int(attrs["sdbayes_top_m"]))
        return attrs["sdbayes_variant"]

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
        """Coefficient draws of one group, each field of shape [n_draws] (seconds)."""
        index = group if isinstance(group, int) else self.groups.index(group)
        return Coefficients(**{name: self._draws(name)[:, index]
                               for name in self.coefficient_names})

    def summary(self, ci: float = 0.9) -> pd.DataFrame:
        """One row per group and coefficient: mean, sd, equal-tailed interval (``lower``,
        ``upper``), R-hat, ESS, and the ``unit`` of the values: seconds (``"s"``) for the
        cost coefficients, ``"1"`` for ``fill``, ``"requests"`` for ``fill_half``.
        """
        stats = az.summary(self.idata, var_names=list(self.coefficient_names),
                           kind="diagnostics")
        rows = []
        tail = (1 - ci) / 2
        for g, label in enumerate(self.groups):
            for name in self.coefficient_names:
                x = self._draws(name)[:, g]
                key = f"{name}[{g}]"
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
        """Write the posterior (with diagnostics and provenance) as netCDF."""
        if self.diagnostics is not None:
            self.idata.attrs["sdbayes_diagnostics"] = json.dumps(
                {**self.diagnostics._asdict(), "problems": list(self.diagnostics.problems)})
        self.idata.to_netcdf(str(path))

    def predict(self, points: pd.DataFrame, ci: float = 0.9, seed: int = 0) -> pd.DataFrame:
        """Posterior prediction for a grid of operating points.

        Each row needs ``k, acceptance, output_len`` and ``request_rate`` or
        ``concurrency``; ``hardware, verifier, drafter, method`` pick its group (they may
        be left out when the posterior has one group). A group the fit has not seen gets
        coefficients drawn from the pooled population when the fit had several groups.
        An open-loop row with ``duration_s`` is a benchmark run of that length, started
        empty: its means are those of the requests it completes
        (:func:`sdbayes.finite_run.finite_run`), finite even past saturation, and lower
        than the steady ones near it (below half the saturation rate, where a 90 s run's
        differ by under 1%, the steady means stand). Without ``duration_s`` the means are steady.

        Args:
          points: the operating points, a table of shape [n rows].
          ci: mass of the central intervals.
          seed: for the predictive noise and for new groups' draws.

        Returns:
          The input columns plus, for metric m in e2e, ttft, tpot: ``m_pred_s`` (posterior
          mean of the mean), ``m_median_s`` (its posterior median: the better point
          prediction near saturation, where a few draws make the mean huge or infinite),
          ``m_lower_s, m_upper_s`` (credible interval: coefficients only),
          ``m_pi_lower_s, m_pi_upper_s`` (predictive interval of a measured mean: with a
          fresh configuration discrepancy and the fitted relative error);
          ``speedup_pred, speedup_lower, speedup_upper`` over k = 0 at the same load;
          ``saturation_rate_pred, _lower, _upper`` [req/s];
          ``p_saturated``, the posterior probability that the load is past saturation.
          Means are +inf where some draws are saturated.
        """
        if not 0 < ci < 1:
            raise ValueError(f"ci must lie in (0, 1), got {ci}")
        grid = self._grid(points)
        arrays, _ = to_points(grid, self.groups)
        key_new, key_noise = jax.random.split(jax.random.key(seed))
        coef = self._coefficients_for(arrays.group, self._new_group_rows(grid, arrays),
                                      key_new)
        point = dict(k=arrays.k, alpha=arrays.alpha, output_len=arrays.output_len,
                     variant=self.variant)

        # Predictive: a fresh configuration discrepancy on C1 and C2, then the relative error.
        spread_c = self._draws("discrepancy")  # [D, 2]
        delta = np.asarray(jax.random.normal(key_noise, (2,) + spread_c.shape + (len(grid),)))
        c1_scale = np.exp(delta[0, :, 0] * spread_c[:, :1])  # [D, R]
        c2_scale = np.exp(delta[0, :, 1] * spread_c[:, 1:])
        shifted = scale_demands(coef, c1_scale, c2_scale)
        values, _ = _predicted_means(coef, arrays, self.variant)
        shifted_values, inflation = _predicted_means(shifted, arrays, self.variant)
        sat = np.asarray(saturation_rate(coef, **point))  # [D, R]
        # Below half the saturation rate a 90 s run reports the steady mean within 1% (its
        # ramp from empty is short and light; a 30 s run within 2.5%), and the fluid model
        # costs a scan.
        runs = np.flatnonzero(~arrays.closed & np.isfinite(arrays.duration)
                              & (arrays.rate >= 0.5 * np.median(sat, axis=0)))
        if runs.size:
            values, shifted_values, inflation = _finite_runs(
                coef, shifted, arrays, runs, self.variant, values, shifted_values, inflation)
        # Intervals are per metric, so one standard normal per draw and row serves them all.
        noise = delta[1, :, 0]  # [D, R]
        tau_q = self._draws("tau_q")[:, None]
        lo, hi = (1 - ci) / 2, 1 - (1 - ci) / 2
        out = points.reset_index(drop=True).copy()
        for metric in ("e2e", "ttft", "tpot"):
            x, x_shifted = np.asarray(values[metric]), np.asarray(shifted_values[metric])
            name = f"sigma_{metric}" if f"sigma_{metric}" in self.idata.posterior else "sigma_e2e"
            spread = np.sqrt(self._draws(name)[:, None] ** 2 + (tau_q * inflation) ** 2)
            finite = np.isfinite(x_shifted)
            with np.errstate(over="ignore"):  # near saturation a draw's noise may reach +inf
                noisy = (np.where(finite, x_shifted, 1.0)
                         * np.exp(np.where(finite, spread, 0.0) * noise))
            measured = np.where(finite, noisy, np.inf)
            out[f"{metric}_pred_s"] = x.mean(axis=0)
            out[f"{metric}_median_s"] = _quantiles(x, 0.5, 0.5)[0]
            out[f"{metric}_lower_s"], out[f"{metric}_upper_s"] = _quantiles(x, lo, hi)
            out[f"{metric}_pi_lower_s"], out[f"{metric}_pi_upper_s"] = _quantiles(measured, lo, hi)
        closed = arrays.closed
        gain = np.where(
            closed,
            np.asarray(speedup(coef, concurrency=np.where(closed, arrays.concurrency, 1.0),
                               **point)),
            np.asarray(speedup(coef, rate=np.where(closed, 0.0, arrays.rate), **point)),
        )
        compared = ~np.isnan(gain)  # NaN where both are saturated: no speedup to speak of
        count = compared.sum(axis=0)
        total = np.where(compared, gain, 0.0).sum(axis=0)
        out["speedup_pred"] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        out["speedup_lower"], out["speedup_upper"] = _quantiles(gain, lo, hi)
        out["saturation_rate_pred"] = sat.mean(axis=0)
        out["saturation_rate_lower"], out["saturation_rate_upper"] = _quantiles(sat, lo, hi)
        out["p_saturated"] = (~np.isfinite(np.asarray(values["e2e"]))).mean(axis=0)
        return out

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

    def _coefficients_for(self, group: np.ndarray, resolved: np.ndarray, key) -> Coefficients:
        """Coefficient draws for each row, fields of shape [n_draws, n_rows]."""
        names = self.coefficient_names
        c = np.stack([self._draws(name) for name in names], axis=-1)  # [D, G, n_coefficients]
        fitted = c[:, np.maximum(resolved, 0), :]
        if (resolved < 0).any():
            mu, tau = self._draws("mu"), self._draws("tau")  # [D, n_coefficients]
            z = np.asarray(jax.random.normal(key, mu.shape))
            population = np.exp(mu + tau * z)[:, None, :]
            fitted = np.where((resolved < 0)[None, :, None], population, fitted)
        return Coefficients(**{name: jnp.asarray(fitted[..., j])
                               for j, name in enumerate(names)})


def _finite_runs(coef, shifted, arrays, rows, variant, values, shifted_values, inflation):
    """The predicted means and their sensitivity to C2 with the steady means of ``rows``
    (open-loop points of a given run length) replaced by those of a finite run
    (:func:`sdbayes.finite_run.finite_run`). Coefficient fields [D, R]; returns the three
    arguments updated, arrays [D, R]."""
    def pick(c):
        return Coefficients(*(f if jnp.ndim(f) == 0 else jnp.asarray(f)[..., rows] for f in c))

    point = dict(k=arrays.k[rows], alpha=arrays.alpha[rows],
                 output_len=arrays.output_len[rows], rate=arrays.rate[rows],
                 duration=arrays.duration[rows], variant=variant)
    plain = finite_run(pick(coef), **point)

    def log_latency(log_c2):  # d log L / d log C2: what the queueing error tau_q scales
        run = finite_run(scale_demands(pick(shifted), 1.0, jnp.exp(log_c2)), **point)
        return jnp.log(run.latency), run

    zero = jnp.zeros(np.shape(plain.latency), plain.latency.dtype)
    _, slope, run = jax.jvp(log_latency, (zero,), (jnp.ones_like(zero),), has_aux=True)
    sensitivity = np.asarray(inflation, float).copy()
    sensitivity[..., rows] = np.where(np.isfinite(slope), slope, 0.0)

    def replace(means, run):
        out = {}
        for metric, x in means.items():
            x = np.array(np.broadcast_to(x, sensitivity.shape), float)
            x[..., rows] = getattr(run, "latency" if metric == "e2e" else metric)
            out[metric] = x
        return out

    return replace(values, plain), replace(shifted_values, run), sensitivity


def _quantiles(x: np.ndarray, lo: float, hi: float):
    """Equal-tailed interval over draws (axis 0); +inf draws stay +inf, never NaN."""
    q = np.quantile(x, [lo, hi], axis=0, method="inverted_cdf")
    return q[0], q[1]


def diagnose(posterior: Posterior, n_points: int) -> Diagnostics:
    """Convergence (R-hat, bulk and tail ESS, divergences) and identification of a fit."""
    idata = posterior.idata
    problems = []
    coefficients = posterior.coefficient_names
    names = [n for n in idata.posterior.data_vars
             if n in coefficients or n.startswith("sigma_") or n == "tau_q"]
    n_chains = idata.posterior.sizes["chain"]
    max_rhat = min_bulk = min_tail = math.nan
    divergences = 0
    if n_chains > 1:
        stats = az.summary(idata, var_names=names, kind="diagnostics")
        max_rhat = float(stats["r_hat"].max())
        min_bulk, min_tail = float(stats["ess_bulk"].min()), float(stats["ess_tail"].min())
        if not max_rhat <= _RHAT_LIMIT:
            problems.append(f"R-hat up to {max_rhat:.3f} (above {_RHAT_LIMIT}): the chains "
                            "disagree; run longer or check the traces")
        if not min_bulk >= _ESS_PER_CHAIN * n_chains or not min_tail >= _ESS_PER_CHAIN * n_chains:
            problems.append(f"effective sample size as low as {min(min_bulk, min_tail):.0f} "
                            f"(want {_ESS_PER_CHAIN * n_chains}): intervals are unreliable")
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
    return Diagnostics(max_rhat, min_bulk, min_tail, divergences, tuple(problems))


def compare(posteriors: dict[str, Posterior], metric: str = "e2e") -> pd.DataFrame:
    """Rank fits of the same traces (e.g. dense and MoE variants) by PSIS-LOO, via ArviZ.

    Args:
      posteriors: name -> a NUTS fit; all fitted to the same operating points.
      metric: whose pointwise log-likelihood to compare (``"e2e"``, ``"ttft"``, ``"tpot"``).

    Returns:
      ``arviz.compare``'s table, best first: ``elpd_loo`` (higher is better), ``p_loo``,
      ``elpd_diff`` from the best and its standard error ``dse``, ``weight``, and
      ``warning`` (true where Pareto k is high and the estimate unreliable).

    Raises:
      ValueError: fewer than two fits, one without pointwise log-likelihood (SVI), or
        fits of different traces.
    """
    if len(posteriors) < 2:
        raise ValueError("compare needs at least two posteriors")
    site = f"obs_{metric}"
    for name, post in posteriors.items():
        if "log_likelihood" not in post.idata or site not in post.idata.log_likelihood:
            raise ValueError(f"posterior {name!r} has no pointwise log-likelihood of {metric} "
                             "(fit it with method='nuts')")
    counts = {name: post.idata.attrs["sdbayes_n_points"] for name, post in posteriors.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the fits saw different traces ({counts} operating points)")
    with warnings.catch_warnings():
        # A high Pareto k is reported in the table's `warning` column instead.
        warnings.filterwarnings("ignore", message=".*[Pp]areto", category=UserWarning)
        # ArviZ 0.2x sorts with pandas' `inplace=`, which pandas >= 3.1 deprecates.
        warnings.filterwarnings("ignore", message="The inplace keyword")
        return az.compare({name: post.idata for name, post in posteriors.items()},
                          ic="loo", var_name=site)


def load_posterior(path: str | Path) -> Posterior:
    """Read a posterior written by :meth:`Posterior.save`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such posterior file")
    idata = az.from_netcdf(str(path))
    if "sdbayes_groups" not in idata.attrs:
        raise ValueError(f"{path}: not an sdbayes posterior (no sdbayes attributes)")
    return Posterior(idata)
