"""The command line: each command's happy path, and bad input as one line with exit code 2."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import sdbayes as sb
from sdbayes.cli import EXIT_BAD_INPUT, EXIT_UNTRUSTED, app

USES_NUMPYRO = True  # conftest: the fit command runs NumPyro
EXAMPLE_POSTERIOR = Path(__file__).resolve().parents[1] / "calibration" / "example_posterior.nc"

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Simulated operating points (3 configurations x 3 rates) and a small fit of them."""
    path = tmp_path_factory.mktemp("cli")
    files = []
    for i, (k, alpha) in enumerate([(0, 0.0), (4, 0.7), (8, 0.9)]):
        for j, rate in enumerate((1, 3, 5)):
            out = path / f"p{i}{j}.csv"
            result = run("simulate", "--out", out, "--k", k, "--alpha", alpha, "--rate", rate,
                         "--requests", 300, "--aggregate", "--seed", 10 * i + j)
            assert result.exit_code == 0, result.output
            files.append(out)
    result = run("fit", *files, "--out", path / "post.nc", "--chains", 1, "--warmup", 200,
                 "--samples", 200)
    assert result.exit_code == 0, result.output
    assert "c1v" in result.output and "Posterior written" in result.output
    return path


def test_simulate_writes_a_trace(tmp_path):
    result = run("simulate", "--out", tmp_path / "t.parquet", "--k", 2, "--alpha", 0.8,
                 "--concurrency", 4, "--requests", 50, "--coefficients-ms", "70,14,1.4,35,.4,.12")
    assert result.exit_code == 0, result.output
    assert len(pd.read_parquet(tmp_path / "t.parquet")) == 50


@pytest.mark.parametrize("rate, steady", [(2.0, True), (100.0, False)])
def test_simulate_aggregate_marks_an_overloaded_run(tmp_path, rate, steady):
    """The example replica's capacity at k = 4, alpha 0.7 is 13.2 req/s (stepped form)."""
    result = run("simulate", "--out", tmp_path / "p.csv", "--k", 4, "--alpha", 0.7,
                 "--rate", rate, "--requests", 100, "--aggregate")
    assert result.exit_code == 0, result.output
    assert pd.read_csv(tmp_path / "p.csv")["steady"].tolist() == [steady]
    assert ("past this replica's capacity (13.2 req/s)" in result.stderr) == (not steady)


def test_simulate_charges_the_filling_form_when_asked(tmp_path):
    """A batch that fills the GPU costs more per request: the same load is slower."""
    common = ("--k", 4, "--alpha", 0.7, "--concurrency", 32, "--requests", 400, "--aggregate")
    for name, extra in (("paper", ()), ("filling", ("--variant", "filling", "--fill", 2.0,
                                                    "--fill-half", 8))):
        result = run("simulate", "--out", tmp_path / f"{name}.csv", *common, *extra)
        assert result.exit_code == 0, result.output
    slower = pd.read_csv(tmp_path / "filling.csv")["e2e_mean_s"].iloc[0]
    assert slower > 1.3 * pd.read_csv(tmp_path / "paper.csv")["e2e_mean_s"].iloc[0]
    refused = run("simulate", "--out", tmp_path / "x.csv", *common, "--fill", 2.0)
    assert refused.exit_code == 2 and "give --variant filling" in refused.stderr
    assert not (tmp_path / "x.csv").exists()


def test_predict_writes_intervals(workdir):
    grid = workdir / "grid.csv"
    grid.write_text("k,acceptance,output_len,request_rate\n4,0.7,128,3\n8,0.9,128,2\n")
    result = run("predict", workdir / "post.nc", grid, "--out", workdir / "pred.csv")
    assert result.exit_code == 0, result.output
    pred = pd.read_csv(workdir / "pred.csv")
    assert (pred["e2e_lower_s"] < pred["e2e_upper_s"]).all()


def test_plan_prints_rates_and_replicas(workdir):
    result = run("plan", workdir / "post.nc", "--slo-ms", 2000, "--alpha", 0.7,
                 "--output-len", 128, "--k", "0,4", "--traffic", 20)
    assert result.exit_code == 0, result.output
    assert "replicas" in result.output and "Best: k = 4" in result.output


@pytest.fixture(scope="module")
def fleet_posterior(tmp_path_factory):
    """A posterior of two GPUs (SVI: the fit is not what these tests judge)."""
    frames = []
    for hardware, scale in (("H100", 1.0), ("A100", 1.6)):
        coef = sb.Coefficients(*(scale * c for c in sb.Coefficients(
            c1p=0.07, c1v=0.014, c1d=0.0014, c2p=0.035, c2v=0.0004, c2d=0.00012)))
        for i, (k, alpha) in enumerate([(0, 0.0), (4, 0.7), (8, 0.9)]):
            for j, rate in enumerate((1, 3, 5)):
                trace = sb.simulate(coef, k=k, alpha=alpha, prompt_len=512, output_len=128,
                                    rate=rate / scale, n_requests=300, seed=10 * i + j,
                                    hardware=hardware, verifier="Qwen3-8B", drafter="eagle",
                                    method="eagle3")
                frames.append(sb.aggregate(trace.iloc[50:]))
    posterior = sb.fit(pd.concat(frames, ignore_index=True), method="svi", svi_steps=1500,
                       num_samples=200, seed=0, progress=False)
    path = tmp_path_factory.mktemp("fleet") / "fleet.nc"
    posterior.save(path)
    return path


def test_plan_each_group_of_a_fleet(fleet_posterior, tmp_path):
    import json

    from sdbayes.planning import max_rate

    plan = tmp_path / "plan.json"
    result = run("plan", fleet_posterior, "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128,
                 "--k", "0,4", "--group", "all", "--output", plan)
    assert result.exit_code == 0, result.output
    posterior = sb.load_posterior(fleet_posterior)
    assert all(label in result.output for label in posterior.groups)
    rows = pd.DataFrame(json.loads(plan.read_text()))
    assert list(rows["group"].unique()) == posterior.groups
    for group, planned in rows.groupby("group", sort=False):
        capacity = max_rate(posterior, slo=2.0, k=np.array([0, 4]), alpha=0.7, output_len=128,
                            group=group)
        assert list(planned["max_rate_rps"]) == pytest.approx(list(capacity.rate))
    # The slower GPU holds less; a part of a label names its group.
    rate = rows.groupby("group")["max_rate_rps"].max()
    assert rate[posterior.groups[1]] < rate[posterior.groups[0]]
    one = run("plan", fleet_posterior, "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128,
              "--k", "0,4", "--group", "a100")
    assert one.exit_code == 0 and "H100" not in one.output, one.output


def test_a_group_named_ambiguously_is_refused(fleet_posterior):
    result = run("tune", fleet_posterior, "--rates", "1,2", "--alpha", 0.7, "--output-len", 128,
                 "--group", "Qwen3")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--group 'Qwen3' matches several groups" in result.output
    assert "0: H100" in result.output and "1: A100" in result.output


def test_plan_and_tune_write_their_tables(workdir):
    """--output writes what the table shows, with the settings it was computed for, as CSV
    or JSON; the numbers are those of the library's max_rate. (The SLO leaves k = 0 room:
    its latency alone is about 1.9 s here, so at 2 s its plan hung on the fit's draws.)"""
    import json

    from sdbayes.planning import max_rate

    plan = workdir / "plan.json"
    result = run("plan", workdir / "post.nc", "--slo-ms", 3000, "--alpha", 0.7,
                 "--output-len", 128, "--k", "0,4", "--traffic", 20, "--output", plan)
    assert result.exit_code == 0, result.output
    rows = json.loads(plan.read_text())
    capacity = max_rate(sb.load_posterior(workdir / "post.nc"), slo=3.0, k=np.array([0, 4]),
                        alpha=0.7, output_len=128)
    assert [row["k"] for row in rows] == [0, 4]
    assert [row["max_rate_rps"] for row in rows] == pytest.approx(list(capacity.rate))
    assert all(row["alpha"] == 0.7 and row["slo_ms"] == 3000 and row["feasible"]
               and row["replicas"] >= 1 for row in rows)
    schedule = workdir / "schedule.csv"
    result = run("tune", workdir / "post.nc", "--rates", "1,4", "--alpha", 0.8,
                 "--output-len", 128, "--output", schedule)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(schedule)
    assert list(table["rate_rps"]) == [1, 4] and set(table["k"]) <= set(range(17))
    missing = run("tune", workdir / "post.nc", "--rates", "1", "--alpha", 0.8,
                  "--output-len", 128, "--output", workdir / "no" / "such.csv")
    assert missing.exit_code == EXIT_BAD_INPUT and "--output" in missing.stderr


def test_tune_by_batch_size_prints_vllms_speculative_config(workdir):
    """The schedule k*(batch size) and the --speculative-config that deploys it, whose
    ranges give each tuned batch size the k of the table."""
    import json

    result = run("tune", workdir / "post.nc", "--batch-sizes", "1,8,64", "--alpha", 0.8,
                 "--output-len", 128, "--output", workdir / "by_batch.csv")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(workdir / "by_batch.csv")
    assert list(table["batch_size"]) == [1, 8, 64]
    line = next(x for x in result.output.splitlines() if x.startswith("--speculative-config"))
    config = json.loads(line.split("'")[1])
    columns = sb.load_posterior(workdir / "post.nc").group_columns[0]
    assert (config["method"], config["model"]) == (columns["method"], columns["drafter"])
    assert config["num_speculative_tokens"] == table["k"].max()
    k_of = {b: k for first, last, k in config["num_speculative_tokens_per_batch_size"]
            for b in range(first, last + 1)}
    assert [k_of[b] for b in table["batch_size"]] == list(table["k"])
    both = run("tune", workdir / "post.nc", "--batch-sizes", "1", "--rates", "1", "--alpha",
               0.8, "--output-len", 128)
    assert both.exit_code == EXIT_BAD_INPUT and "one of --rates or --batch-sizes" in both.stderr


def test_commands_keep_their_compiled_programs_in_a_cache(tmp_path):
    """The sdbayes command (not CliRunner's app) keeps JAX's compiled programs in
    $SDBAYES_CACHE_DIR for the next run; SDBAYES_CACHE_DIR=off keeps none."""
    import os
    import subprocess
    import sys

    script = ("import sys; from sdbayes.cli import main; sys.argv = ['sdbayes', 'tune', "
              f"{str(EXAMPLE_POSTERIOR)!r}, '--rates', '1,2', '--alpha', '0.8', "
              "'--output-len', '128']; main()")
    for folder in (tmp_path / "cache", "off"):
        env = dict(os.environ, SDBAYES_CACHE_DIR=str(folder))
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "cache").iterdir())) > 0
    assert not (tmp_path / "off").exists()


def test_a_new_data_set_of_a_similar_size_reuses_the_compiled_sampler(tmp_path):
    """The sampler takes the points as arguments, not as constants baked into it, padded
    to size buckets: a fit of other measurements, one row fewer, in a new process, reads
    the compiled NUTS programs (pilot and main, 8 s each to compile here) from the cache
    instead of compiling them again."""
    import os
    import subprocess
    import sys

    example = pd.read_csv(Path(sb.__file__).parent / "data" / "example_points.csv")
    first = example[example["k"] <= 4]  # 24 rows: a bucket of its own (23 and 24)
    first.to_csv(tmp_path / "a.csv", index=False)
    second = first.iloc[:-1]
    second.assign(e2e_mean_s=second["e2e_mean_s"] * 1.05).to_csv(tmp_path / "b.csv",
                                                                   index=False)
    env = dict(os.environ, SDBAYES_CACHE_DIR=str(tmp_path / "cache"), JAX_LOG_COMPILES="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    logs = []
    for data in ("a.csv", "b.csv"):
        script = ("import sys; from sdbayes.cli import main; sys.argv = ['sdbayes', 'fit', "
                  f"{data!r}, '--out', 'x.nc', '--chains', '2', '--warmup', '20', "
                  "'--samples', '20', '--variant', 'paper']; main()")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert done.returncode in (0, 3), done.stderr[-3000:]
        logs.append(done.stderr)
    hits = "Persistent compilation cache hit for 'jit__fun'"
    assert logs[0].count(hits) == 0 and logs[1].count(hits) >= 1, logs[1][-3000:]


def test_tune_prints_a_schedule(workdir):
    result = run("tune", workdir / "post.nc", "--rates", "1,4", "--alpha", 0.8,
                 "--output-len", 128, "--risk", "quantile")
    assert result.exit_code == 0, result.output
    assert "Schedule" in result.output


def test_plan_and_tune_on_a_percentile(workdir):
    """--quantile plans on the p99 over requests: the library's rate, below the mean's."""
    import json

    from sdbayes.planning import max_rate

    plan = workdir / "p99.json"
    result = run("plan", workdir / "post.nc", "--slo-ms", 3000, "--alpha", 0.7,
                 "--output-len", 128, "--k", "0,4", "--quantile", 0.99, "--arrival-cv2", 0,
                 "--output", plan)
    assert result.exit_code == 0, result.output
    assert "p99 e2e <= 3000 ms" in result.output
    rows = json.loads(plan.read_text())
    posterior = sb.load_posterior(workdir / "post.nc")
    tail = max_rate(posterior, slo=3.0, k=np.array([0, 4]), alpha=0.7, output_len=128,
                    quantile=0.99, arrival_cv2=0.0)
    mean = max_rate(posterior, slo=3.0, k=np.array([0, 4]), alpha=0.7, output_len=128)
    assert [row["max_rate_rps"] for row in rows] == pytest.approx(list(tail.rate))
    assert all(row["metric"] == "p99 e2e" for row in rows) and np.all(tail.rate < mean.rate)
    result = run("tune", workdir / "post.nc", "--rates", "1,4", "--alpha", 0.8,
                 "--output-len", 128, "--quantile", 0.99)
    assert result.exit_code == 0, result.output
    assert "mean_p99_e2e_ms" in result.output


@pytest.mark.parametrize("args, message", [
    (("plan", "{post}", "--slo-ms", 100, "--alpha", 0.7, "--output-len", 128),
     "infeasible at any rate"),
    (("predict", "{dir}/missing.nc", "{dir}/grid.csv"), "missing.nc: no such file"),
    (("predict", "{dir}/p00.csv", "{dir}/p00.csv"), "not an sdbayes posterior file"),
    (("fit", "{dir}/bad.csv"), "bad.csv: row 1, column 'acceptance'"),
    (("tune", "{post}", "--rates", "1,x", "--alpha", 0.8, "--output-len", 128),
     "--rates: expected comma-separated numbers"),
    (("tune", "{post}", "--rates", "1", "--alpha", 0.8, "--output-len", 128, "--risk", "max"),
     "risk must be one of"),
    (("import", "{dir}/p00.csv", "--out", "{dir}/x.csv", "--hardware", "A",
      "--verifier", "B"), "p00.csv"),
    # Outputs are checked before the work: here, before any sampling.
    (("fit", "{dir}/p00.csv", "--out", "{dir}/no-such-folder/p.nc"), "does not exist"),
    (("fit", "{dir}/p00.csv", "--out", "{dir}"), "is a folder"),
    (("fit", "{dir}/p00.csv", "--chains", 0), "'--chains'"),  # a usage error, one line too
    (("fit", "{dir}/p00.csv", "--bogus"), "No such option"),
    (("fit", "{dir}/p00.csv", "{dir}/../{dir.name}/p00.csv"), "given twice (as "),
    (("report", "{post}", "{dir}/p00.csv", "{dir}/p00.csv"), "p00.csv: given twice"),
    (("fit", "{dir}"), "is a folder, give a file"),
    (("plan", "{post}", "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128, "--k", "2.5"),
     "--k: expected comma-separated whole numbers"),
    (("plan", "{post}", "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128, "--group", 3),
     "--group '3' names no group; the posterior has 1 group(s)"),
    (("tune", "{post}", "--rates", "", "--alpha", 0.8, "--output-len", 128), "--rates"),
    # Finite but absurd: each once reached NumPyro and ended in its traceback.
    (("plan", "{post}", "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 1e308),
     "'--output-len'"),
    (("tune", "{post}", "--rates", "1,1e308", "--alpha", 0.8, "--output-len", 128),
     "--rates: expected comma-separated numbers from 0 to 1e+06"),
    (("simulate", "--out", "{dir}/s.csv", "--k", 2, "--alpha", 0.7, "--rate", 1e308),
     "'--rate'"),
    # The library's checks, named by the flag the user typed.
    (("simulate", "--out", "{dir}/s.csv", "--k", 2, "--alpha", 0.7, "--rate", 0),
     "--rate must be a finite number > 0"),
    (("plan", "{post}", "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128,
      "--confidence", 2), "--confidence must lie in (0, 1)"),
    (("tune", "{post}", "--rates", "1", "--alpha", 0.8, "--output-len", 128, "--k-max", 0),
     "--k-max must be a whole number"),
    (("plan", "{post}", "--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128,
      "--quantile", 99), "--quantile must lie in (0, 1)"),
])
def test_bad_input_is_one_line_and_exit_code_2(workdir, args, message):
    bad = pd.read_csv(workdir / "p00.csv")
    bad.loc[0, "acceptance"] = 2.0
    bad.to_csv(workdir / "bad.csv", index=False)
    (workdir / "grid.csv").write_text("k,acceptance,output_len,request_rate\n4,0.7,128,3\n")
    args = [str(a).format(dir=workdir, post=workdir / "post.nc") for a in args]
    result = run(*args)
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def judged(workdir):
    """The workdir fit saved twice: once judged trustworthy, once not."""
    posterior = sb.load_posterior(workdir / "post.nc")
    paths = {}
    for name, problems in (("good", ()), ("bad", ("12 divergent transitions: biased",))):
        posterior.diagnostics = posterior.diagnostics._replace(problems=problems)
        paths[name] = workdir / f"{name}.nc"
        posterior.save(paths[name])
    return paths


PLAN = ("--slo-ms", 2000, "--alpha", 0.7, "--output-len", 128, "--k", "0,4")


def test_the_verdict_ends_every_command_that_reads_a_posterior(judged):
    good = run("plan", judged["good"], *PLAN, "--strict")
    assert good.exit_code == 0, good.output
    assert good.stderr.splitlines() == [f"{judged['good']}: fit converged: R-hat at most "
                                        + good.stderr.split("at most ")[1].strip()]
    bad = run("plan", judged["bad"], *PLAN)
    assert bad.exit_code == 0 and "Best: k" in bad.stdout
    assert bad.stderr.splitlines() == [f"warning: {judged['bad']}: fit NOT TRUSTWORTHY: "
                                       "12 divergent transitions: biased"]


@pytest.mark.parametrize("command", [
    ("plan", "{bad}", *PLAN), ("predict", "{bad}", "{dir}/grid.csv"),
    ("tune", "{bad}", "--rates", "1,4", "--alpha", 0.8, "--output-len", 128),
    ("report", "{bad}", "{dir}/p00.csv", "--out", "{dir}/strict-report"),
])
def test_strict_refuses_an_untrustworthy_fit_before_any_work(workdir, judged, command):
    (workdir / "grid.csv").write_text("k,acceptance,output_len,request_rate\n4,0.7,128,3\n")
    args = [str(a).format(dir=workdir, bad=judged["bad"]) for a in command]
    result = run(*args, "--strict")
    assert result.exit_code == EXIT_UNTRUSTED and result.stdout == ""
    assert "NOT TRUSTWORTHY: 12 divergent" in result.stderr
    assert not (workdir / "strict-report").exists()


def test_fit_strict_writes_the_posterior_and_exits_3(workdir, tmp_path):
    out = tmp_path / "one.nc"
    result = run("fit", workdir / "p10.csv", "--out", out, "--variant", "paper", "--chains", 1,
                 "--warmup", 100, "--samples", 100, "--strict")
    assert result.exit_code == EXIT_UNTRUSTED and out.is_file()
    assert "NOT TRUSTWORTHY: " in result.stderr and "only 1 operating points" in result.stderr
    assert not sb.load_posterior(out).diagnostics.trustworthy  # the verdict travels with it


def test_a_failed_write_keeps_the_previous_output(workdir, monkeypatch):
    out = workdir / "kept.csv"
    out.write_text("previous predictions\n")
    (workdir / "grid.csv").write_text("k,acceptance,output_len,request_rate\n4,0.7,128,3\n")

    def disk_full(self, path, *args, **kwargs):
        with open(path, "w") as cut_short:
            cut_short.write("k,acc")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    result = run("predict", workdir / "post.nc", workdir / "grid.csv", "--out", out)
    assert result.exit_code == EXIT_BAD_INPUT and "No space left" in result.stderr
    assert out.read_text() == "previous predictions\n"


def test_import_reads_a_real_guidellm_sweep(tmp_path):
    from .test_importers import FILES

    if not FILES:
        pytest.skip("no study files in ../shared/data")
    result = run("import", FILES[0], "--out", tmp_path / "points.csv", "--hardware", "GPU-80GB",
                 "--verifier", "Qwen3-8B", "--drafter", "eagle3-qwen3-8b", "--method", "eagle3")
    assert result.exit_code == 0, result.output
    points = pd.read_csv(tmp_path / "points.csv")
    assert len(points) == 10 and (~points["steady"]).sum() == 1  # the throughput run


def test_report_writes_plots_and_a_summary(workdir):
    out = workdir / "report"
    result = run("report", workdir / "post.nc", *sorted(workdir.glob("p[0-9]*.csv")), "--out", out)
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    for name in ("latency_vs_rate", "collapse", "speedup_vs_rate", "k_schedule",
                 "predictive_check", "pair", "trace"):
        assert (out / f"{name}.png").stat().st_size > 10_000 and f"({name}.png)" in text
    # `fit` chose its variant (auto, the default): the report says which and why, with
    # one row per form of the LOO table.
    choice, coefficients = text.split("## Choice of model variant")[1].split(
        "## Cost coefficients")
    assert "PSIS-LOO" in choice
    assert sum(line.startswith(f"| {v} |") for line in choice.splitlines()
               for v in sb.model.VARIANTS) == 3
    # The header and one row per coefficient, each of 7 columns (group labels hold "|").
    names = sb.load_posterior(workdir / "post.nc").coefficient_names
    rows = [line for line in coefficients.split("##")[0].splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(names)
    assert all(line.replace("\\|", "").count("|") == 8 for line in rows)
    assert "| c1v | " in text and " | ms | " in text


def test_demo_fits_plans_tunes_and_reports(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--draws", 150)
    assert result.exit_code == 0, result.output
    for expected in ("c2d", "confidence", "Schedule", "Report written"):
        assert expected in result.output
    assert (tmp_path / "demo" / "report.md").is_file()


def test_import_reads_a_vllm_bench_result(tmp_path):
    from .test_vllm_importers import result, write

    path = write(tmp_path, result())
    args = ("import", path, "--out", tmp_path / "points.csv", "--hardware", "H100",
            "--verifier", "Qwen3-8B")
    missing_k = run(*args)
    assert missing_k.exit_code == EXIT_BAD_INPUT and "give --k" in missing_k.stderr
    done = run(*args, "--k", 4, "--acceptance", 0.7, "--method", "eagle3")
    assert done.exit_code == 0, done.output
    assert len(pd.read_csv(tmp_path / "points.csv")) == 1


def test_import_converts_vllms_acceptance_and_notes_a_derived_latency(tmp_path):
    """vLLM's acceptance rate at --k is converted to alpha as plan's is; a latency derived
    rather than read is said in one note on stderr, and the point still imports."""
    from .test_vllm_importers import result, write

    data = {k: v for k, v in result().items() if "e2el" not in k and k not in ("ttfts", "itls")}
    path = write(tmp_path, data)
    done = run("import", path, "--out", tmp_path / "points.csv", "--hardware", "H100",
               "--verifier", "Qwen3-8B", "--method", "eagle3", "--k", 4,
               "--acceptance-rate", "59%")
    assert done.exit_code == 0, done.output
    assert done.stderr.count("note: ") == 1 and "TTFT + TPOT" in done.stderr
    point = pd.read_csv(tmp_path / "points.csv").iloc[0]
    assert point["acceptance"] == pytest.approx(sb.traces.acceptance_from_rate(4, 0.59))
    no_k = run("import", path, "--out", tmp_path / "other.csv", "--hardware", "H100",
               "--verifier", "Qwen3-8B", "--acceptance-rate", "59%")
    assert no_k.exit_code == EXIT_BAD_INPUT and "need --k" in no_k.stderr


def test_profile_runs_a_sweep_against_the_loopback_server(tmp_path):
    from .test_sweep import write_config

    config = write_config(tmp_path, ks=[0, 2], rates=[20], n_prompts=8)
    dry = run("profile", config, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "--speculative-config" in dry.output and "k2_p32_g24_rate20: 8 requests" in dry.output
    assert not (tmp_path / "sweep").exists()
    result = run("profile", config, "--out", tmp_path / "sweep")
    assert result.exit_code == 0, result.output
    assert "2 points run, 0 already finished" in result.output
    points = pd.read_csv(tmp_path / "sweep" / "points.csv")
    assert sorted(points["k"]) == [0, 2] and (points["n_requests"] == 8).all()
    again = run("profile", config, "--out", tmp_path / "sweep")
    assert again.exit_code == 0 and "0 points run, 2 already finished" in again.output


def test_a_dry_run_prints_each_vllm_bench_serve_command(tmp_path):
    from .test_sweep import write_config

    config = write_config(tmp_path, ks=[2], rates=[20, 40], n_prompts=8,
                          sweep_extra='client = "vllm"')
    dry = run("profile", config, "--dry-run", "--out", tmp_path / "sweep")
    assert dry.exit_code == 0, dry.output
    commands = [line.strip() for line in dry.output.splitlines()
                if line.strip().startswith("vllm bench serve")]
    assert len(commands) == 2 and all("--save-detailed" in c for c in commands)
    assert len({c.split("--seed ")[1].split()[0] for c in commands}) == 2
    assert str(tmp_path / "sweep" / "vllm" / "k2_p32_g24_rate40.json").endswith(
        commands[1].split("--result-filename ")[1].split()[0])
    assert not (tmp_path / "sweep").exists()


def test_profile_failed_points_exit_1_and_say_how_to_retry(tmp_path):
    import sys

    from .test_sweep import write_config

    config = write_config(tmp_path, ks=[1], rates=[5],
                          command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    result = run("profile", config, "--out", tmp_path / "sweep")
    assert result.exit_code == 1
    assert "failed: k1_p32_g24_rate5: server exited with code 3" in result.stderr
    assert "rerun the same command to retry" in result.stderr


def test_profile_without_vllm_says_so_once_before_any_point(tmp_path):
    from .test_sweep import write_config

    config = write_config(tmp_path, command=["no-such-vllm-here", "serve"])
    result = run("profile", config, "--out", tmp_path / "sweep")
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.strip().splitlines() == [
        "error: server command 'no-such-vllm-here' not found: install vLLM on this GPU host "
        "(pip install 'sdbayes[vllm]'), or set [server] command in the sweep config"]
    assert not list((tmp_path / "sweep" / "raw").glob("*.json"))


def test_profile_bad_config_is_one_line_and_exit_code_2(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmodel = 'm'\n[sweep]\nk = [0]\n")
    result = run("profile", config)
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr.strip() == f"error: {config}: [sweep] needs request_rates and/or " \
        "concurrency"


OPTION_VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1e308", "-1e308", "nan", "inf", "", "abc", "0.5", "1,2",
                     "2.5", "1e-300", "999999999", ",", "1,,2"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**12, 10**12).map(str),
)
PLANNING = {  # command -> its options and valid values, one of which a draw replaces
    "plan": {"--slo-ms": "2000", "--alpha": "0.7", "--output-len": "128", "--k": "2,4",
             "--confidence": "0.9", "--traffic": "10", "--group": "0"},
    "tune": {"--rates": "1,3", "--alpha": "0.7", "--output-len": "128", "--level": "0.9",
             "--risk": "quantile", "--k-max": "6", "--group": "0"},
}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_planning_options(workdir, data):
    """Any one option of plan or tune replaced by junk: the command works or ends with one
    line and exit code 2, never a traceback."""
    command = data.draw(st.sampled_from(sorted(PLANNING)))
    options = dict(PLANNING[command])
    options[data.draw(st.sampled_from(sorted(options)))] = data.draw(OPTION_VALUES)
    result = run(command, workdir / "post.nc", *(x for pair in options.items() for x in pair))
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert result.exit_code == EXIT_BAD_INPUT, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines


def _vllm_rate(k, alpha):
    """vLLM's draft acceptance rate (accepted / drafted) of a per-token alpha at k."""
    return (float(sb.tokens_per_step(k, alpha)) - 1.0) / k


@pytest.mark.parametrize("flags", [
    lambda rate: ["--acceptance-rate", f"{100 * rate:.6f}%"],
    lambda rate: ["--acceptance-rate", f"{rate:.8f}", "--measured-k", 4],
    lambda rate: ["--mean-acceptance-length", f"{1 + 4 * rate:.8f}"]])
def test_vllms_acceptance_rate_is_converted_to_alpha(tmp_path, flags):
    """vLLM's rate at k = 4 for alpha = 0.8 is 0.59: read as alpha it would plan for a
    worse drafter. Given as vLLM states it, the command runs with alpha = 0.8."""
    rate = _vllm_rate(4, 0.8)
    assert rate == pytest.approx(0.59, abs=0.005)
    outs = []
    for i, acceptance in enumerate((["--alpha", 0.8], flags(rate))):
        outs.append(tmp_path / f"p{i}.csv")
        result = run("simulate", "--out", outs[-1], "--k", 4, *acceptance, "--rate", 2,
                     "--requests", 100, "--aggregate")
        assert result.exit_code == 0, result.output
    assert "alpha = 0.800" in result.output
    first, second = (pd.read_csv(p) for p in outs)
    assert second["acceptance"].iloc[0] == pytest.approx(0.8, abs=1e-6)
    assert second["e2e_mean_s"].iloc[0] == pytest.approx(first["e2e_mean_s"].iloc[0], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--alpha", 0.7, "--acceptance-rate", 0.5], "give one of --alpha, --acceptance-rate"),
    ([], "give one of --alpha, --acceptance-rate"),
    (["--acceptance-rate", 0.5], "give --measured-k"),
    (["--acceptance-rate", "fast", "--measured-k", 3], "--acceptance-rate 'fast': not a number"),
    (["--mean-acceptance-length", 5, "--measured-k", 3], "impossible at k = 3"),
    (["--acceptance-rate", "120%", "--measured-k", 3], "must lie in [0, 1]")])
def test_acceptance_flags_refuse_what_cannot_be_converted(workdir, args, message):
    result = run("tune", workdir / "post.nc", "--rates", "1,2", "--output-len", 128, *args)
    assert result.exit_code == EXIT_BAD_INPUT
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
