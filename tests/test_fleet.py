"""Profiling a fleet on Ray: a local Ray instance with fake GPUs, loopback servers."""

import json

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from sdbayes.fleet import run_fleet, units  # noqa: E402
from sdbayes.sweep import read_sweep_config  # noqa: E402
from tests.test_sweep import write_config  # noqa: E402

# Ray starts its daemons by fork and exec; JAX, imported by the test session, warns at
# every fork (from a hook, so it surfaces as an unraisable-exception warning). The
# children exec at once and never touch JAX.
pytestmark = [pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

KS = (0, 1, 2, 3)
RATES = (20, 40)


@pytest.fixture(scope="module")
def cluster():
    """Four fake GPUs of one kind; the loopback servers need none."""
    ray.init(num_cpus=4, num_gpus=4, resources={"gpu_kind:loopback": 4},
             include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sweep_config(tmp_path, hardware="loopback", **options):
    path = write_config(tmp_path, ks=KS, rates=RATES, n_prompts=20, **options)
    text = path.read_text().replace('[server]\n', '[server]\ngpus = 1\ngpu_kind = "loopback"\n')
    path.write_text(text.replace('hardware = "loopback"', f'hardware = "{hardware}"'))
    return read_sweep_config(path)


def test_four_configurations_in_parallel_a_crash_retried_a_rerun_idle(tmp_path, cluster):
    """4 units (k = 0..3) run as Ray tasks at once; one server is SIGKILLed at its 30th
    request (the first to get there, once: the marker), its task fails and Ray runs it
    again, which measures only what was left. Every point ends up measured once, as a clean
    run would have it; a second run submits nothing."""
    marker = tmp_path / "crashed"
    config = sweep_config(tmp_path, server_args=["--crash-after", "30",
                                                 "--fault-marker", str(marker)])
    out = tmp_path / "fleet"
    report = run_fleet({"loop": config}, out, retries=2, progress=False)

    assert marker.exists()
    assert not report.failed and sorted(report.done) == [f"loop/k{k}" for k in KS]
    attempts = {u.name: len((u.folder / "attempts.log").read_text().splitlines())
                for u in units({"loop": config}, out)}
    assert sorted(attempts.values()) == [1, 1, 1, 2]  # the crashed one ran twice
    points = report.points
    assert len(points) == len(KS) * len(RATES)  # each once
    assert sorted(zip(points["k"], points["request_rate"], strict=True)) == \
        [(k, float(r)) for k in KS for r in RATES]
    assert (points["n_requests"] == 20).all() and (points["errored_requests"] == 0).all()
    assert (points["sweep"] == "loop").all()
    gathered = pd.read_csv(out / "points.csv")
    assert len(gathered) == len(points)
    assert len(pd.read_csv(out / "requests.csv")) == 20 * len(points)
    raw = {p: p.read_bytes() for p in sorted(out.glob("loop/k*/raw/*.json"))}
    assert all(json.loads(b)["status"] == "ok" for b in raw.values())

    again = run_fleet({"loop": config}, out, progress=False)
    assert again.done == [] and sorted(again.skipped) == sorted(attempts)
    assert {p: p.read_bytes() for p in sorted(out.glob("loop/k*/raw/*.json"))} == raw
    assert len(again.points) == len(points)


def test_a_unit_that_keeps_failing_is_reported_and_the_others_finish(tmp_path, cluster):
    """A server command that cannot start fails its unit on every try; Ray gives up after
    the retries and the report says why; a config that works is unaffected."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    good = sweep_config(tmp_path / "a")
    bad = sweep_config(tmp_path / "b", hardware="broken", command=["false"])
    report = run_fleet({"good": good, "bad": bad}, tmp_path / "fleet", retries=1,
                       progress=False)
    assert sorted(report.done) == [f"good/k{k}" for k in KS]
    assert sorted(report.failed) == [f"bad/k{k}" for k in KS]
    assert all("server exited" in why for why in report.failed.values())
    assert set(report.points["sweep"]) == {"good"}


def test_the_command_profiles_several_configs_on_ray(tmp_path, cluster):
    """`sdbayes profile a.toml b.toml --executor ray` gathers both; without Ray's executor
    several configs are refused in one line."""
    from typer.testing import CliRunner

    from sdbayes.cli import EXIT_BAD_INPUT, app

    paths = []
    for name in ("h100", "a100"):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, ks=(0, 2), rates=(20,), n_prompts=10)
        config.write_text(config.read_text().replace('hardware = "loopback"',
                                                     f'hardware = "{name}"'))
        paths.append(config.rename(tmp_path / f"{name}.toml"))
    out = tmp_path / "fleet"
    result = CliRunner().invoke(app, ["profile", *map(str, paths), "--executor", "ray",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 configurations run, 0 already finished, 4 points" in result.output
    points = pd.read_csv(out / "points.csv")
    assert sorted(points["sweep"]) == ["a100", "a100", "h100", "h100"]
    result = CliRunner().invoke(app, ["profile", *map(str, paths), "--out", str(out)])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "the local executor takes one; give --executor ray" in result.output
    twin = tmp_path / "twin.toml"
    twin.write_text(paths[0].read_text())
    result = CliRunner().invoke(app, ["profile", str(paths[0]), str(twin), "--executor",
                                      "ray", "--out", str(tmp_path / "other")])
    assert result.exit_code == EXIT_BAD_INPUT
    assert "sweep configs 'h100' and 'twin' both measure" in result.output
