"""A report folder for a fitted posterior: PNG plots and a Markdown summary embedding them."""

from __future__ import annotations

import warnings
from pathlib import Path

import arviz as az
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from sdbayes.model import Coefficients, Variant, as_variant, saturation_rate, speedup
from sdbayes.posterior import Posterior
from sdbayes.tuning import tune_k

_CI = 0.9


def _configs(points: pd.DataFrame) -> pd.DataFrame:
    return (points[["k", "acceptance", "output_len"]].drop_duplicates()
            .sort_values(["output_len", "acceptance", "k"]).reset_index(drop=True))


def _load_grid(posterior: Posterior, config, n=40, top=0.9) -> pd.DataFrame:
    """Rates up to ``top`` of the configuration's mean saturation rate, with predictions."""
    saturation = _saturation(posterior, config)
    grid = pd.DataFrame({"request_rate": np.linspace(0.01, top, n) * saturation})
    for name, value in config.items():
        grid[name] = value
    return posterior.predict(grid, ci=_CI)


def _saturation(posterior: Posterior, config) -> float:
    probe = pd.DataFrame([{**config, "request_rate": 1e-3}])  # any positive rate will do
    return float(posterior.predict(probe)["saturation_rate_pred"].iloc[0])


def plot_latency_vs_rate(posterior: Posterior, points: pd.DataFrame, path: Path) -> None:
    """Measured mean latency per configuration over predicted median and 90% bands."""
    configs = _configs(points)
    fig, ax = plt.subplots(figsize=(8, 5))
    highest = 0.0
    for i, config in configs.iterrows():
        color = f"C{i % 10}"
        pred = _load_grid(posterior, config.to_dict())
        highest = max(highest, float(pred["e2e_median_s"].max()))
        label = (f"k={int(config.k)}, alpha={config.acceptance:.2f}, "
                 f"{int(config.output_len)} tokens")
        ax.plot(pred["request_rate"], 1e3 * pred["e2e_median_s"], color=color, label=label)
        ax.fill_between(pred["request_rate"], 1e3 * pred["e2e_pi_lower_s"],
                        1e3 * pred["e2e_pi_upper_s"], color=color, alpha=0.2)
        measured = points[(points["k"] == config.k) & (points["acceptance"] == config.acceptance)
                          & (points["output_len"] == config.output_len)
                          & points["request_rate"].notna()]
        ax.errorbar(measured["request_rate"], 1e3 * measured["e2e_mean_s"],
                    yerr=1e3 * 1.645 * measured.get("e2e_se_s", 0), fmt="o", color=color, ms=4)
    ax.set(xlabel="request rate [req/s]", ylabel="mean end-to-end latency [ms]",
           title=f"Latency against load: measured (dots), predicted median and "
                 f"{_CI:.0%} predictive band")
    ax.legend(fontsize=7)
    ax.set_ylim(0, 1.3e3 * highest)  # bands near saturation would flatten everything else
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_speedup_vs_rate(posterior: Posterior, alpha: float, output_len: float,
                         path: Path) -> None:
    """Speedup over no SD against load, for several draft lengths, with credible bands."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate((1, 2, 4, 6, 8)):
        pred = _load_grid(posterior, {"k": k, "acceptance": alpha, "output_len": output_len})
        ax.plot(pred["request_rate"], pred["speedup_pred"], color=f"C{i}", label=f"k={k}")
        ax.fill_between(pred["request_rate"], pred["speedup_lower"], pred["speedup_upper"],
                        color=f"C{i}", alpha=0.2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="request rate [req/s]", ylabel="speedup over k = 0",
           title=f"Speedup against load, alpha = {alpha:.2f} ({_CI:.0%} credible bands)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_k_schedule(posterior: Posterior, output_len: float, path: Path) -> None:
    """The tuned draft length against load for several acceptance rates (risk: mean)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, alpha in enumerate((0.6, 0.7, 0.8, 0.9)):
        saturation = _saturation(posterior, {"k": 0, "acceptance": alpha,
                                             "output_len": output_len})
        rates = np.linspace(0.0, 1.5 * saturation, 40)
        choice = tune_k(posterior, rate=rates, alpha=alpha, output_len=output_len)
        stable = choice.feasible
        ax.step(rates[stable], choice.k[stable], where="mid", color=f"C{i}",
                label=f"alpha={alpha:.1f}")
    ax.set(xlabel="request rate [req/s]", ylabel="best draft length k*",
           title="Tuned draft length against load (posterior mean latency)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_predictive_check(posterior: Posterior, points: pd.DataFrame, path: Path) -> None:
    """Measured against predicted mean latency, with 90% predictive intervals."""
    steady = points[points.get("steady", True).astype(bool)]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(posterior: Posterior, points: pd.DataFrame, folder: str | Path) -> Path:
    """Write plots and ``report.md`` for a posterior and the operating points it was fitted to.

    Args:
      posterior: the fit (one group is plotted: the first).
      points: its operating points (validated table).
      folder: created if missing.

    Returns:
      The path of ``report.md``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    points = points.reset_index(drop=True)
    sd = points[points["k"] > 0]
    alpha = float(sd["acceptance"].median()) if len(sd) else 0.8
    output_len = float(points["output_len"].median())
    plot_latency_vs_rate(posterior, points, folder / "latency_vs_rate.png")
    plot_speedup_vs_rate(posterior, alpha, output_len, folder / "speedup_vs_rate.png")
    plot_k_schedule(posterior, output_len, folder / "k_schedule.png")
    plot_predictive_check(posterior, points, folder / "predictive_check.png")
    variant = as_variant(posterior.variant)
    moe_section = []
    if variant.moe:
        median = Coefficients(**{name: float(np.median(values)) for name, values
                                 in posterior.coefficients(0)._asdict().items()})
        plot_moe_vs_dense(median, variant, alpha, output_len, folder / "moe_vs_dense.png")
        moe_section = ["## MoE against dense", "", "Posterior-median coefficients, and the "
                       "same without the expert terms.", "", "![moe vs dense](moe_vs_dense.png)",
                       ""]
    names = list(posterior.coefficient_names)
    with warnings.catch_warnings():
        # ArviZ 0.2x calls matplotlib APIs that matplotlib >= 3.11 deprecates.
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        az.plot_pair(posterior.idata, var_names=names, kind="kde",
                     marginals=True, figsize=(10, 10))
        plt.gcf().tight_layout()
        plt.gcf().savefig(folder / "pair.png", dpi=80)
        plt.close("all")
        az.plot_trace(posterior.idata, var_names=names, compact=True)
        plt.gcf().tight_layout()
        plt.gcf().savefig(folder / "trace.png", dpi=80)
        plt.close("all")

    summary = posterior.summary(ci=_CI)
    table = ["| group | coefficient | mean [ms] | 90% interval [ms] | R-hat | bulk ESS |",
             "|---|---|---|---|---|---|"]
    for row in summary.itertuples():
        group = row.group.replace("|", "\\|")  # labels hold "|", a Markdown column bar
        table.append(f"| {group} | {row.coefficient} | {1e3 * row.mean_s:.4g} | "
                     f"{1e3 * row.lower_s:.4g} - {1e3 * row.upper_s:.4g} | {row.r_hat:.3f} | "
                     f"{row.ess_bulk:.0f} |")
    diagnostics = posterior.diagnostics
    verdict = ("no problems found" if diagnostics is None or diagnostics.trustworthy
               else "; ".join(diagnostics.problems))
    text = "\n".join([
        "# sdbayes report", "",
        f"Model variant `{posterior.variant}`, groups: {', '.join(posterior.groups)}; "
        f"{len(points)} operating points. Diagnostics: {verdict}.", "",
        "## Cost coefficients", "", *table, "",
        "## Latency against load", "", "![latency vs rate](latency_vs_rate.png)", "",
        "## Speedup against load", "", "![speedup vs rate](speedup_vs_rate.png)", "",
        *moe_section,
        "## Tuned draft length", "", "![k schedule](k_schedule.png)", "",
        "## Posterior predictive check", "", "![predictive check](predictive_check.png)", "",
        "## Posterior: pairs and traces", "", "![pair plot](pair.png)", "",
        "![trace plot](trace.png)", "",
    ])
    report = folder / "report.md"
    report.write_text(text)
    return report
