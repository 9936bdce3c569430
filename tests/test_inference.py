"""Fitting and predicting: the machinery, on traces drawn from the model itself.

These fits are small (2 chains of 300 draws) so the suite stays fast; coverage over many
seeds and recovery from simulator traces are the calibration issue's acceptance checks.
"""

import io
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pytest

import sdbayes as sb
from sdbayes.posterior import Diagnostics, FitWarning, Posterior, diagnose

USES_NUMPYRO = True  # conftest: NumPyro needs implicit rank promotion
TRUE = sb.Coefficients(c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)
CONFIGS = [(0, 0.0), (2, 0.6), (4, 0.8), (6, 0.9), (3, 0.5), (8, 0.95)]
LOADS = (0.1, 0.3, 0.5, 0.7)
NOISE = 0.02  # relative sd of each measured mean
SMALL = dict(num_warmup=300, num_samples=300, num_chains=2, progress=False)


def model_traces(seed=0, group=("H100", "Qwen3-8B", "eagle", "eagle3"), coef=TRUE):
    """Operating points from the analytic model with log-normal measurement noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, alpha in CONFIGS:
        point = dict(k=k, alpha=alpha, output_len=128)
        saturation = float(sb.saturation_rate(coef, **point))
        for load in LOADS:
            rate = load * saturation
            e2e = float(sb.latency(coef, rate=rate, **point)) * np.exp(NOISE * rng.normal())
            rows.append(dict(zip(("hardware", "verifier", "drafter", "method"), group,
                                 strict=True),
                             k=k, acceptance=alpha, request_rate=rate, prompt_len=512,
                             output_len=128, e2e_mean_s=e2e, e2e_se_s=NOISE * e2e))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def fitted():
    with pytest.warns() as caught:  # small fits may report low ESS; nothing else
        posterior = sb.fit(model_traces(), seed=1, **SMALL)
    assert all(issubclass(w.category, FitWarning) for w in caught)
    return posterior


def test_well_identified_coefficients_recovered(fitted):
    summary = fitted.summary(ci=0.9).set_index("coefficient")
    for name in ("c1v", "c1d", "c2v"):
        row = summary.loc[name]
        assert row["lower"] <= getattr(TRUE, name) <= row["upper"], name


def test_predictive_intervals_cover_the_measurements(fitted):
    traces = model_traces()
    prediction = fitted.predict(traces, ci=0.9)
    inside = ((prediction["e2e_pi_lower_s"] <= traces["e2e_mean_s"])
              & (traces["e2e_mean_s"] <= prediction["e2e_pi_upper_s"]))
    # 24 points at 90%: fewer than 19 inside has probability < 2% if calibrated.
    assert inside.sum() >= 19
    for m in ("e2e", "ttft", "tpot"):
        assert (prediction[f"{m}_lower_s"] <= prediction[f"{m}_pred_s"]).all()
        assert (prediction[f"{m}_pred_s"] <= prediction[f"{m}_upper_s"]).all()
    # The fitted metric's measurement noise (2%) makes predictive intervals the wider ones.
    assert (prediction["e2e_pi_lower_s"] < prediction["e2e_lower_s"]).all()
    assert (prediction["e2e_upper_s"] < prediction["e2e_pi_upper_s"]).all()


def test_prediction_grid_without_names_and_past_saturation(fitted):
    grid = pd.DataFrame({"k": [4, 4], "acceptance": [0.8, 0.8], "output_len": [128, 128],
                         "request_rate": [1.0, 1000.0]})
    out = fitted.predict(grid)
    assert np.isfinite(out.loc[0, "e2e_pred_s"]) and out.loc[0, "p_saturated"] == 0
    assert out.loc[1, "p_saturated"] == 1 and out.loc[1, "e2e_lower_s"] == np.inf
    truth = float(sb.saturation_rate(TRUE, k=4, alpha=0.8, output_len=128))
    assert out.loc[0, "saturation_rate_lower"] < truth < out.loc[0, "saturation_rate_upper"]


def test_unknown_group_is_named(fitted):
    grid = model_traces(group=("A100", "Llama", "draft", "draft_model")).iloc[:1]
    with pytest.raises(sb.TraceError, match="'A100 | Llama | draft (draft_model)' was not fitted"):
        fitted.predict(grid)


def test_save_and_load(fitted, tmp_path):
    path = tmp_path / "posterior.nc"
    fitted.save(path)
    loaded = sb.load_posterior(path)
    assert loaded.groups == fitted.groups and loaded.variant == "paper"
    assert loaded.diagnostics == fitted.diagnostics
    assert loaded.idata.attrs["sdbayes_schema_version"] == 1
    assert "<DataFrame>" in loaded.idata.attrs["sdbayes_provenance"]
    grid = model_traces().iloc[:5]
    pd.testing.assert_frame_equal(loaded.predict(grid), fitted.predict(grid))


def test_the_draws_keep_no_padding(fitted):
    """The sampler runs on data padded to size buckets (here 6 configurations to 8); the
    posterior keeps the data's configurations and rows alone."""
    assert fitted.idata.posterior["delta"].sizes["config"] == len(fitted.configs) == 6
    assert fitted.idata.log_likelihood["obs_e2e"].shape[-1] == len(model_traces())
    assert fitted.idata.observed_data["obs_e2e"].shape == (len(model_traces()),)


def test_one_point_is_flagged_not_trusted():
    with pytest.warns(FitWarning) as caught:
        posterior = sb.fit(model_traces().iloc[[5]], seed=0, **SMALL)
    assert not posterior.diagnostics.trustworthy
    messages = [str(w.message) for w in caught]
    assert any("only 1 operating points" in m for m in messages)
    assert any("not identified by the traces" in m for m in messages)


def test_a_single_chain_is_split_in_halves_for_r_hat(fitted):
    one = fitted.idata.isel(chain=[0])
    assert np.isfinite(diagnose(Posterior(one), 24).max_rhat)  # ArviZ alone gives NaN
    # A chain that moves halfway (c1v 50% higher in its second half) has not converged.
    c1v = one.posterior["c1v"].values.copy()
    c1v[:, c1v.shape[1] // 2:] *= 1.5
    one.posterior["c1v"] = (one.posterior["c1v"].dims, c1v)
    moved = diagnose(Posterior(one), 24)
    assert moved.max_rhat > 1.5 and moved.verdict.startswith("NOT TRUSTWORTHY: R-hat up to")


def test_verdict_says_how_the_fit_stands():
    nan = float("nan")
    assert (Diagnostics(1.004, 812.0, 655.0, 0, ()).verdict
            == "converged: R-hat at most 1.004, ESS at least 655, no divergent transitions")
    assert Diagnostics(nan, nan, nan, 0, (), "svi").verdict.startswith("approximate (SVI)")
    assert (Diagnostics(1.2, 9.0, 8.0, 5, ("a", "b")).verdict == "NOT TRUSTWORTHY: a; b")


def test_planning_on_an_untrusted_fit_warns(fitted):
    untrusted = Posterior(fitted.idata, fitted.diagnostics._replace(problems=("3 divergent",)))
    for plan, args in ((sb.max_rate, dict(slo=2.0, k=4)), (sb.tune_k, dict(rate=1.0))):
        with pytest.warns(FitWarning, match="planning on a fit that is NOT TRUSTWORTHY: "
                                            "3 diverg") as caught:
            plan(untrusted, alpha=0.8, output_len=128, **args)
        assert caught[0].filename == __file__  # it points at the call, not inside sdbayes


@pytest.mark.parametrize("argument, message", [
    (dict(method="mh"), "method must be"), (dict(variant="x"), "variant must be"),
    (dict(likelihood="cauchy"), "likelihood must be"), (dict(metrics=("ttft",)), "'e2e'"),
    (dict(chain_method="threads"), "chain_method must be"),
])
def test_bad_arguments(argument, message):
    with pytest.raises(ValueError, match=message):
        sb.fit(model_traces(), **SMALL, **argument)


def test_parallel_chains_on_cpu_devices(tmp_path):
    """use_cpu_cores splits the CPU into devices (only before JAX starts, hence a fresh
    process) and fit then runs one chain per device, to the same coefficients. The fit
    keeps its compiled programs in sdbayes's cache (the program set up none)."""
    script = tmp_path / "parallel.py"
    traces = tmp_path / "points.csv"
    model_traces().to_csv(traces, index=False)
    script.write_text(textwrap.dedent(f"""
        import warnings
        import sdbayes as sb
        print("devices", sb.use_cpu_cores(3))
        warnings.simplefilter("ignore")
        posterior = sb.fit({str(traces)!r}, seed=1, num_warmup=300, num_samples=300,
                           num_chains=3, progress=False)
        print(posterior.idata.attrs["sdbayes_chain_method"],
              posterior.idata.posterior.sizes["chain"])
        print(posterior.summary(ci=0.9).to_json(orient="records"))
    """))
    env = dict(os.environ, SDBAYES_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR")  # the test run's own (conftest)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, env=env)
    devices, chains, summary = run.stdout.splitlines()[-3:]
    assert (devices, chains) == ("devices 3", "parallel 3")
    assert len(list((tmp_path / "cache").iterdir())) > 0
    summary = pd.read_json(io.StringIO(summary)).set_index("coefficient")
    for name in ("c1v", "c1d", "c2v"):
        assert summary.loc[name, "lower"] <= getattr(TRUE, name) <= summary.loc[name, "upper"]


def test_the_compilation_cache_is_the_programs_own_or_sdbayess_unless_off(monkeypatch,
                                                                           tmp_path):
    import jax

    from sdbayes.cache import use_compilation_cache

    own = jax.config.jax_compilation_cache_dir  # the test run's (conftest)
    monkeypatch.setenv("SDBAYES_CACHE_DIR", str(tmp_path))
    assert use_compilation_cache() == own and jax.config.jax_compilation_cache_dir == own
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("SDBAYES_CACHE_DIR", "off")
        assert use_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("SDBAYES_CACHE_DIR", str(tmp_path))
        assert use_compilation_cache() == str(tmp_path)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    finally:
        jax.config.update("jax_compilation_cache_dir", own)


def test_finite_runs_fit_with_chains_in_lockstep():
    """Finite runs take a pilot run before the draws; with chains in lockstep (one device:
    a GPU, or a CPU without use_cpu_cores) the draws' run once failed on the kernel the
    pilot had used. Both runs now end, with the chains asked for."""
    traces = model_traces().assign(duration_s=3600.0)  # long runs: near the steady means
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # 40 draws a chain
        posterior = sb.fit(traces, seed=1, num_warmup=40, num_samples=40, num_chains=2,
                           chain_method="vectorized", progress=False)
    assert posterior.idata.attrs["sdbayes_chain_method"] == "vectorized"
    assert posterior.idata.posterior.sizes["chain"] == 2
    assert np.isfinite(posterior.summary()["mean"]).all()


def test_chains_in_lockstep_on_a_multicore_cpu_say_how_to_run_them_in_parallel(monkeypatch):
    """Without sb.use_cpu_cores a CPU is one JAX device: a fit's chains would run in
    lockstep on one core, and the fit says how to use the others before it starts."""
    import jax

    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with pytest.warns(UserWarning, match="use_cpu_cores"), pytest.raises(sb.TraceError):
        sb.fit(pd.DataFrame(), num_chains=2)
    with warnings.catch_warnings():  # asked for by name, or on one core: no advice
        warnings.simplefilter("error")
        with pytest.raises(sb.TraceError):
            sb.fit(pd.DataFrame(), num_chains=2, chain_method="vectorized")
        monkeypatch.setattr("os.cpu_count", lambda: 1)
        with pytest.raises(sb.TraceError):
            sb.fit(pd.DataFrame(), num_chains=2)


def test_use_cpu_cores_after_jax_started_says_so(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # restored afterwards, for subprocesses
    sb.latency(TRUE, rate=1.0, k=2, alpha=0.7, output_len=128)  # JAX has started
    with pytest.warns(UserWarning, match="already started"):
        assert sb.use_cpu_cores(64) < 64


@pytest.mark.filterwarnings("ignore::sdbayes.posterior.FitWarning")
def test_a_fit_validates_its_table_once(monkeypatch):
    """Validated where it enters fit, the table is trusted by every later step (arrays,
    the tail model's calibration): no row is checked twice."""
    from sdbayes import inference, traces

    original, calls = traces.validate, []

    def counted(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    for module in (traces, inference):
        monkeypatch.setattr(module, "validate", counted)
    table = model_traces()
    sb.fit(table, num_warmup=20, num_samples=20, num_chains=1, progress=False)
    assert calls == [len(table)]


def test_no_steady_points():
    with pytest.raises(sb.TraceError, match="no steady operating points"):
        sb.fit(model_traces().assign(steady=False), **SMALL)


@pytest.mark.filterwarnings("ignore::sdbayes.posterior.FitWarning")
@pytest.mark.parametrize("full_size, guide", [(500, "full"), (0, "low-rank")])
def test_svi_with_groups_predicts_a_new_group(monkeypatch, full_size, guide):
    # A fleet past _FULL_COVARIANCE_SIZE latents gets the low-rank guide; forced here.
    monkeypatch.setattr(sb.inference, "_FULL_COVARIANCE_SIZE", full_size)
    scaled = sb.Coefficients(*(1.2 * c for c in TRUE))
    traces = pd.concat([model_traces(0), model_traces(1, ("A100", "Qwen3-8B", "eagle", "eagle3"),
                                                      scaled)], ignore_index=True)
    posterior = sb.fit(traces, method="svi", svi_steps=1500, num_samples=200, seed=0,
                       progress=False)
    assert len(posterior.groups) == 2 and "mu" in posterior.idata.posterior
    assert posterior.idata.attrs["sdbayes_svi_guide"].startswith(guide)
    summary = posterior.summary(ci=0.9)
    well_identified = summary[summary["coefficient"].isin(["c1v", "c1d", "c2v"])]
    truth = np.array([getattr(TRUE if group.startswith("H100") else scaled, name) for group, name
                      in zip(well_identified["group"], well_identified["coefficient"],
                             strict=True)])
    # Variational intervals run narrow, so no coverage is asked of them; the means are
    # where the data put them (NUTS's sds of these are 3-5% at 2% noise a point).
    assert np.all(np.abs(well_identified["mean"] / truth - 1) < 0.1)
    # Low loads: an unseen group's draws, spread by the between-group sd, may saturate higher.
    new = model_traces(2, ("L40S", "Qwen3-8B", "eagle", "eagle3")).iloc[:2]
    out = posterior.predict(new)
    assert np.isfinite(out["e2e_pred_s"]).all()
    # A group never seen is less certain than a fitted one at the same point.
    seen = posterior.predict(model_traces(0).iloc[:2])
    width = lambda df: (df["e2e_upper_s"] / df["e2e_lower_s"]).to_numpy()  # noqa: E731
    assert (width(out) > width(seen)).all()


def test_choice_of_form_leaves_out_fits_that_did_not_converge(fitted):
    """LOO of chains that did not converge is not to be trusted: such a form is not kept
    while another converged, and the reason says it was left out."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # a small fit may report low ESS
        stepped = sb.fit(model_traces(), variant="stepped", seed=1, **SMALL)
    fits = {"paper": fitted, "stepped": stepped}
    preferred = sb.choose_variant(fits).variant  # what would be kept, had both converged
    other = ({"paper", "stepped"} - {preferred}).pop()
    # Short chains: what this checks is the choice, so the other is taken as converged.
    kept = {form: fit.diagnostics for form, fit in fits.items()}
    fits[preferred].diagnostics = kept[preferred]._replace(divergences=12)
    fits[other].diagnostics = kept[other]._replace(divergences=0, max_rhat=1.0)
    try:
        chosen = sb.choose_variant(fits)
    finally:
        for form, diagnostics in kept.items():
            fits[form].diagnostics = diagnostics
    reason, table = chosen.variant_choice
    assert chosen.variant == other
    assert reason.endswith(f"left out as not converged: {preferred}")
    assert set(table.index) == {"paper", "stepped"}  # the table still shows both


def test_converged_is_mixed_chains_trustworthy_asks_more():
    """auto leaves out forms whose chains plainly did not mix (divergences, R-hat > 1.05),
    not those a short fit's R-hat noise puts a little above 1.01; the verdict flags both."""
    from sdbayes.posterior import Diagnostics

    def fit(max_rhat, divergences=0):
        problems = (("R-hat up to ...",) if max_rhat > 1.01 else ()) + (
            ("divergent ...",) if divergences else ())
        return Diagnostics(max_rhat, 800.0, 800.0, divergences, problems)

    assert fit(1.03).converged and not fit(1.03).trustworthy
    assert not fit(1.06).converged and not fit(1.0, divergences=1).converged
    assert fit(1.0).converged and fit(1.0).trustworthy
