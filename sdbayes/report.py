"""A report folder for a fitted posterior: PNG plots and a Markdown summary embedding them."""

from __future__ import annotations

import warnings
from pathlib import Path

import arviz as az
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sdbayes.files import replacing
from sdbayes.model import Coefficients, Variant, as_variant, demands, saturation_rate, speedup
from sdbayes.model import latency as latency_fn
from sdbayes.posterior import Posterior, in_milliseconds
from sdbayes.traces import group_labels
from sdbayes.tuning import tune_k

_CI = 0.9


def _save(fig, path: Path, dpi: int = 110) -> None:
    fig.tight_layout()
    with replacing(path) as temporary:
        fig.savefig(temporary, dpi=dpi)
    plt.close(fig)


def _steady(points: pd.DataFrame) -> pd.Series:
    """Which points are steady state (all where the table has no ``steady`` column)."""
    if "steady" not in points:
        return pd.Series(True, index=points.index)
    return points["steady"].astype(bool)


def _length_bucket(output_len) -> np.ndarray:
    """Output lengths within about 10% share a bucket: importers record the measured mean
    (127.6 for a 128-token request), which differs a little from point to point."""
    return np.round(np.log(np.asarray(output_len, float)) / np.log(1.1)).astype(int)


def _configs(points: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (k, acceptance, output-length bucket), with the bucket's
    median output length and a ``bucket`` column to select its points by."""
    keyed = points.assign(bucket=_length_bucket(points["output_len"]))
    return (keyed.groupby(["k", "acceptance", "bucket"], as_index=False)["output_len"].median()
            .sort_values(["output_len", "acceptance", "k"]).reset_index(drop=True))


def _in_group(posterior: Posterior, group: int, grid: pd.DataFrame) -> pd.DataFrame:
    """The grid with the hardware, model pair and method of the posterior's ``group``."""
    return grid.assign(**posterior.group_columns[group])


def _load_grid(posterior: Posterior, config, group: int = 0, n=40, top=0.9) -> pd.DataFrame:
    """Rates up to ``top`` of the configuration's mean saturation rate, with predictions."""
    saturation = _saturation(posterior, config, group)
    grid = pd.DataFrame({"request_rate": np.linspace(0.01, top, n) * saturation})
    for name, value in config.items():
        grid[name] = value
    return posterior.predict(_in_group(posterior, group, grid), ci=_CI)


def _saturation(posterior: Posterior, config, group: int = 0) -> float:
    probe = pd.DataFrame([{**config, "request_rate": 1e-3}])  # any positive rate will do
    return float(posterior.predict(_in_group(posterior, group, probe))
                 ["saturation_rate_pred"].iloc[0])


def plot_latency_vs_rate(posterior: Posterior, points: pd.DataFrame, path: Path,
                         group: int = 0) -> None:
    """Measured mean and p99 latency per configuration over their predictions with 90%
    bands; one panel per acceptance rate and output length, one colour per draft length. ``points``
    are those of the posterior's ``group`` (an index into ``posterior.groups``)."""
    configs = _configs(points)
    panels = list(configs.groupby(["bucket", "acceptance"], sort=True))
    buckets = _length_bucket(points["output_len"])
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    ks = sorted(configs["k"].unique())
    for ax, ((bucket, acceptance), panel) in zip(axes.flat, panels, strict=False):
        highest = 0.0
        for _, config in panel.sort_values("k").iterrows():
            color = f"C{ks.index(config.k) % 10}"
            pred = _load_grid(posterior, config.drop("bucket").to_dict(), group)
            highest = max(highest, float(pred["e2e_median_s"].max()))
            ax.plot(pred["request_rate"], 1e3 * pred["e2e_median_s"], color=color,
                    label=f"k={int(config.k)}")
            ax.fill_between(pred["request_rate"], 1e3 * pred["e2e_pi_lower_s"],
                            1e3 * pred["e2e_pi_upper_s"], color=color, alpha=0.2)
            measured = points[(points["k"] == config.k)
                              & (points["acceptance"] == config.acceptance)
                              & (buckets == bucket) & points["request_rate"].notna()]
            is_steady = _steady(measured)
            steady, saturated = measured[is_steady], measured[~is_steady]
            ax.errorbar(steady["request_rate"], 1e3 * steady["e2e_mean_s"],
                        yerr=1e3 * 1.645 * steady.get("e2e_se_s", 0), fmt="o", color=color,
                        ms=3)
            ax.plot(saturated["request_rate"], 1e3 * saturated["e2e_mean_s"], "x",
                    color=color, ms=5)
            # The p99 over requests beside the mean: dashed, its band fainter.
            ax.plot(pred["request_rate"], 1e3 * pred["e2e_p99_pred_s"], "--", color=color,
                    lw=0.8)
            ax.fill_between(pred["request_rate"], 1e3 * pred["e2e_p99_pi_lower_s"],
                            1e3 * pred["e2e_p99_pi_upper_s"], color=color, alpha=0.08)
            if "e2e_p99_s" in measured:
                ax.plot(measured["request_rate"], 1e3 * measured["e2e_p99_s"], "^",
                        color=color, ms=3, mfc="none")
                p99 = steady["e2e_p99_s"].dropna()
                highest = max(highest, float(p99.max()) if len(p99) else 0.0)
        ax.set(xlabel="request rate [req/s]", ylabel="end-to-end latency [ms]",
               title=f"alpha = {acceptance:.2f}, {panel['output_len'].median():.0f} "
                     "output tokens")
        ax.legend(fontsize=7, ncol=2)
        ax.set_ylim(0, 1.3e3 * highest)  # bands near saturation would flatten everything else
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"Latency against load: measured mean (dots; crosses: saturated, not "
                 f"fitted) and p99 (triangles), predicted with {_CI:.0%} predictive bands "
                 f"(mean solid, p99 dashed; {posterior.variant} form)")
    _save(fig, path, dpi=90)


def _median_coefficients(posterior: Posterior, group: int = 0) -> Coefficients:
    return Coefficients(**{name: float(np.median(values)) for name, values
                           in posterior.coefficients(group)._asdict().items()})


def plot_collapse(posterior: Posterior, points: pd.DataFrame, path: Path,
                  group: int = 0) -> bool:
    """The normalised collapse: measured ``L / C1`` against ``x = rate * C2`` for every
    open-loop point, with ``C1, C2`` of its configuration from the posterior-median
    coefficients. The paper's form puts every configuration on ``1 / (1 - x)``; points
    above the curve at high ``x`` are the load the form misses. False (and no file) when
    there are no open-loop points."""
    open_loop = points[points["request_rate"].notna() & _steady(points)]
    if open_loop.empty:
        return False
    d = demands(_median_coefficients(posterior, group), k=open_loop["k"].to_numpy(float),
                alpha=open_loop["acceptance"].to_numpy(float),
                output_len=open_loop["output_len"].to_numpy(float),
                variant=as_variant(posterior.variant).form)
    x = open_loop["request_rate"].to_numpy() * np.asarray(d.dependent.total)
    y = open_loop["e2e_mean_s"].to_numpy() / np.asarray(d.independent.total)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    scatter = ax.scatter(x, y, c=open_loop["k"], cmap="viridis", s=12)
    fig.colorbar(scatter, ax=ax, label="draft length k")
    curve = np.linspace(0.0, min(0.97, max(x.max(), 0.5)), 200)
    ax.plot(curve, 1.0 / (1.0 - curve), color="black", lw=1, label="1 / (1 - x)")
    ax.set(xlabel="x = rate * C2", ylabel="measured L / C1", yscale="log",
           title="Normalised latency: every configuration on one curve")
    ax.legend()
    _save(fig, path)
    return True


def plot_synchronous_optimum(posterior: Posterior, points: pd.DataFrame, path: Path,
                             group: int = 0) -> bool:
    """The draft length with the lowest synchronous latency (one request at a time) against
    acceptance: measured, and the posterior's (median and 90% interval of each draw's
    best k among the measured ones). False (and no file) without synchronous points at
    two or more draft lengths of one acceptance rate."""
    if "concurrency" not in points:
        return False
    sync = points[(points["concurrency"] == 1) & _steady(points)]
    sync = sync.groupby("acceptance").filter(lambda g: g["k"].nunique() >= 2)
    if sync.empty:
        return False
    coef = posterior.coefficients(group)
    rows = []
    for acceptance, curve in sync.groupby("acceptance"):
        ks = np.sort(curve["k"].unique()).astype(float)
        measured = curve.groupby("k")["e2e_mean_s"].mean()
        latency = np.asarray(latency_fn(
            Coefficients(*(np.asarray(f)[:, None] if np.ndim(f) else f for f in coef)),
            k=ks[None, :],
            alpha=acceptance, output_len=float(curve["output_len"].median()),
            concurrency=1.0, variant=posterior.variant))  # [D, K]
        best = ks[np.argmin(latency, axis=1)]
        rows.append((acceptance, float(measured.idxmin()), *np.quantile(best, [0.05, 0.5, 0.95])))
    alpha, measured_k, lo, mid, hi = map(np.array, zip(*rows, strict=True))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar(alpha, mid, yerr=[mid - lo, hi - mid], fmt="s", capsize=3,
                label=f"predicted (median, {_CI:.0%} interval)")
    ax.plot(alpha, measured_k, "o", ms=11, mfc="none", mew=2, color="C3", label="measured")
    ax.set(xlabel="acceptance rate alpha", ylabel="draft length k with the lowest latency",
           title="Synchronous latency: best draft length against acceptance")
    ax.legend()
    _save(fig, path)
    return True


def plot_speedup_vs_rate(posterior: Posterior, alpha: float, output_len: float,
                         path: Path, group: int = 0) -> None:
    """Speedup over no SD against load, for several draft lengths, with credible bands."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate((1, 2, 4, 6, 8)):
        pred = _load_grid(posterior, {"k": k, "acceptance": alpha, "output_len": output_len},
                          group)
        ax.plot(pred["request_rate"], pred["speedup_pred"], color=f"C{i}", label=f"k={k}")
        ax.fill_between(pred["request_rate"], pred["speedup_lower"], pred["speedup_upper"],
                        color=f"C{i}", alpha=0.2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="request rate [req/s]", ylabel="speedup over k = 0",
           title=f"Speedup against load, alpha = {alpha:.2f} ({_CI:.0%} credible bands)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_k_schedule(posterior: Posterior, output_len: float, path: Path,
                    group: int = 0) -> None:
    """The tuned draft length against load for several acceptance rates (risk: mean)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, alpha in enumerate((0.6, 0.7, 0.8, 0.9)):
        saturation = _saturation(posterior, {"k": 0, "acceptance": alpha,
                                             "output_len": output_len}, group)
        rates = np.linspace(0.0, 1.5 * saturation, 40)
        choice = tune_k(posterior, rate=rates, alpha=alpha, output_len=output_len, group=group)
        stable = choice.feasible
        ax.step(rates[stable], choice.k[stable], where="mid", color=f"C{i}",
                label=f"alpha={alpha:.1f}")
    ax.set(xlabel="request rate [req/s]", ylabel="best draft length k*",
           title="Tuned draft length against load (posterior mean latency)")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_moe_vs_dense(coef: Coefficients, variant: Variant, alpha: float, output_len: float,
                      path: Path, ks=(2, 4)) -> None:
    """Speedup against load of an MoE verifier and of a dense one with the same costs but
    no expert terms (``c1e = c2e = 0``), each up to 80% of its own no-SD saturation rate
    (the x axis is that fraction, so both curves span it).

    At low load SD's ``k + 1`` tokens a pass load more experts than one token does, which
    lowers the MoE zero-load speedup; at high load the batch loads every expert either way.
    """
    dense = coef._replace(c1e=0.0, c2e=0.0)
    load = np.linspace(0.0, 0.8, 60)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c, v, style in (("MoE", coef, variant, "-"), ("dense", dense, variant.form, "--")):
        no_sd = float(saturation_rate(c, k=0, alpha=0.0, output_len=output_len, variant=v))
        for i, k in enumerate(ks):
            gain = speedup(c, rate=load * no_sd, k=k, alpha=alpha, output_len=output_len,
                           variant=v)
            ax.plot(load, np.asarray(gain), style, color=f"C{i}", label=f"{name}, k={k}")
    ax.set(xlabel="request rate / no-SD saturation rate", ylabel="speedup over k = 0",
           title=f"MoE ({variant.experts} experts, top-{variant.top_m}) against dense with the "
                 f"same c1v, c2v; alpha = {alpha:.2f}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_predictive_check(posterior: Posterior, points: pd.DataFrame, path: Path) -> None:
    """Measured against predicted mean latency, with 90% predictive intervals."""
    steady = points[_steady(points)]
    pred = posterior.predict(steady, ci=_CI)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    x = 1e3 * pred["e2e_median_s"].to_numpy()
    y = 1e3 * steady["e2e_mean_s"].to_numpy()
    inside = ((pred["e2e_pi_lower_s"] <= steady["e2e_mean_s"].to_numpy())
              & (steady["e2e_mean_s"].to_numpy() <= pred["e2e_pi_upper_s"])).to_numpy()
    ax.errorbar(x, y, xerr=[x - 1e3 * pred["e2e_pi_lower_s"], 1e3 * pred["e2e_pi_upper_s"] - x],
                fmt="o", ms=4, alpha=0.7)
    lims = [min(x.min(), y.min()) * 0.9, max(x.max(), y.max()) * 1.1]
    ax.plot(lims, lims, color="grey", lw=0.8)
    ax.set(xlim=lims, ylim=lims, xscale="log", yscale="log",
           xlabel="predicted mean latency [ms]",
           ylabel="measured mean latency [ms]",
           title=f"Posterior predictive check: {inside.mean():.0%} inside {_CI:.0%} intervals")
    _save(fig, path)


def write_report(posterior: Posterior, points: pd.DataFrame, folder: str | Path) -> Path:
    """Write plots and ``report.md`` for a posterior and the operating points it was fitted to.

    Args:
      posterior: the fit; each of its groups that ``points`` hold gets its own plots.
      points: its operating points (validated table).
      folder: created if missing.

    Returns:
      The path of ``report.md``.

    Raises:
      ValueError: ``points`` hold a group the posterior was not fitted to (before anything
        is written).
    """
    points = points.reset_index(drop=True)
    labels = np.array(group_labels(points))
    unknown = sorted(set(labels) - set(posterior.groups))
    if unknown:
        raise ValueError(f"traces: group(s) {'; '.join(unknown)} not in the posterior, "
                         f"fitted to {'; '.join(posterior.groups)}; give the traces it was "
                         "fitted to")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    present = [g for g, label in enumerate(posterior.groups) if (labels == label).any()]
    suffixes = [""] if len(present) == 1 else [f"_group{g}" for g in present]
    sections = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Posterior.FitWarning)  # the report gives the verdict
        for g, suffix in zip(present, suffixes, strict=True):
            heading = [] if len(present) == 1 else [f"# Group {g}: {posterior.groups[g]}", ""]
            sections += heading + _group_section(
                posterior, points[labels == posterior.groups[g]], folder, g, suffix)
    plot_predictive_check(posterior, points, folder / "predictive_check.png")
    names = list(posterior.coefficient_names)
    with warnings.catch_warnings():
        # ArviZ 0.2x calls matplotlib APIs that matplotlib >= 3.11 deprecates.
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        for g, suffix in zip(present, suffixes, strict=True):
            az.plot_pair(posterior.idata, var_names=names, kind="kde", marginals=True,
                         coords={"group": [posterior.groups[g]]}, figsize=(10, 10))
            _save(plt.gcf(), folder / f"pair{suffix}.png", dpi=80)
        az.plot_trace(posterior.idata, var_names=names, compact=True)
        _save(plt.gcf(), folder / "trace.png", dpi=80)
        plt.close("all")

    summary = in_milliseconds(posterior.summary(ci=_CI))
    table = ["| group | coefficient | mean | 90% interval | unit | R-hat | bulk ESS |",
             "|---|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        label = row.group.replace("|", "\\|")  # labels hold "|", a Markdown column bar
        sampled = (f"{row.r_hat:.3f} | {row.ess_bulk:.0f}" if np.isfinite(row.r_hat)
                   else "- | -")  # SVI: no chains to compare
        table.append(f"| {label} | {row.coefficient} | {row.mean:.4g} | "
                     f"{row.lower:.4g} - {row.upper:.4g} | {row.unit} | {sampled} |")
    choice = []
    if posterior.variant_choice is not None:
        reason, loo = posterior.variant_choice
        choice = ["## Choice of model variant", "",
                  f"Fitted with `variant=\"auto\"`: each form fitted, the one PSIS-LOO prefers "
                  f"kept. {reason[0].upper() + reason[1:]}.", "",
                  "| variant | elpd_loo | p_loo | elpd_diff | standard error | Pareto-k warning |",
                  "|---|---|---|---|---|---|",
                  *(f"| {name} | {r.elpd_loo:.1f} | {r.p_loo:.1f} | {r.elpd_diff:.1f} | "
                    f"{r.dse:.1f} | {'yes' if r.warning else 'no'} |"
                    for name, r in loo.iterrows()), ""]
    diagnostics = posterior.diagnostics
    verdict = "none stored" if diagnostics is None else diagnostics.verdict
    text = "\n".join([
        "# sdbayes report", "",
        f"Model variant `{posterior.variant}`, groups: {', '.join(posterior.groups)}; "
        f"{len(points)} operating points. The fit: {verdict}.", "",
        *choice,
        "## Cost coefficients", "", *table, "",
        "## Posterior predictive check", "", "![predictive check](predictive_check.png)", "",
        *sections,
        "## Posterior: pairs and traces", "",
        *(f"![pair plot{suffix.replace('_', ' ')}](pair{suffix}.png)" for suffix in suffixes),
        "",
        "![trace plot](trace.png)", "",
    ])
    report = folder / "report.md"
    with replacing(report) as temporary:
        temporary.write_text(text)
    return report


def _group_section(posterior: Posterior, points: pd.DataFrame, folder: Path, group: int,
                   suffix: str) -> list[str]:
    """One group's plots, written to ``folder`` as ``<plot><suffix>.png``, and the lines of
    report.md that show them."""
    sd = points[points["k"] > 0]
    alpha = float(sd["acceptance"].median()) if len(sd) else 0.8
    output_len = float(points["output_len"].median())

    def image(name: str, title: str, alt: str) -> list[str]:
        return [f"## {title}", "", f"![{alt}]({name}{suffix}.png)", ""]

    plot_latency_vs_rate(posterior, points, folder / f"latency_vs_rate{suffix}.png", group)
    lines = image("latency_vs_rate", "Latency against load", "latency vs rate")
    if plot_collapse(posterior, points, folder / f"collapse{suffix}.png", group):
        lines += image("collapse", "Normalised collapse", "collapse")
    if plot_synchronous_optimum(posterior, points, folder / f"synchronous_optimum{suffix}.png",
                                group):
        lines += image("synchronous_optimum", "Best draft length alone", "synchronous optimum")
    plot_speedup_vs_rate(posterior, alpha, output_len, folder / f"speedup_vs_rate{suffix}.png",
                         group)
    lines += image("speedup_vs_rate", "Speedup against load", "speedup vs rate")
    variant = as_variant(posterior.variant)
    if variant.moe:
        plot_moe_vs_dense(_median_coefficients(posterior, group), variant, alpha, output_len,
                          folder / f"moe_vs_dense{suffix}.png")
        lines += ["## MoE against dense", "", "Posterior-median coefficients, and the same "
                  "without the expert terms.", "", f"![moe vs dense](moe_vs_dense{suffix}.png)",
                  ""]
    plot_k_schedule(posterior, output_len, folder / f"k_schedule{suffix}.png", group)
    return lines + image("k_schedule", "Tuned draft length", "k schedule")
