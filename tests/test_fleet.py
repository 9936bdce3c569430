"""Profiling a fleet on Ray: a local Ray instance with fake GPUs, loopback servers.

Each test runs its scenario in a fresh Python process that starts its own Ray instance
(never one left over): the test session's workers never load Ray's native runtime beside
jaxlib's, and a crash or a hang becomes this test's failure, with Ray's output, instead of
taking the worker down.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sdbayes.fleet import run_fleet, units
from sdbayes.sweep import read_sweep_config
from tests.test_sweep import write_config

# Looked up, not imported: importing Ray loads its native runtime into the test worker.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="Ray is not installed (pip install 'sdbayes[cluster]')")

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_TIMEOUT_S = 300
"""A scenario takes 10-40 s; past this it hangs, and is killed with its Ray instance."""


def in_fresh_process(scenario, tmp_path: Path) -> None:
    """Run ``scenario(tmp_path)`` in a new Python process with a new local Ray instance (four
    fake GPUs of kind ``loopback``; the loopback servers need none); fail with its output if
    it fails, dies or outlives :data:`SCENARIO_TIMEOUT_S`."""
    code = ("import sys, ray; from pathlib import Path; "
            f"from tests.test_fleet import {scenario.__name__} as scenario; "
            "ray.init(address='local', num_cpus=4, num_gpus=4, "
            "resources={'gpu_kind:loopback': 4}, include_dashboard=False, "
            "log_to_driver=False); "
            "scenario(Path(sys.argv[1])); ray.shutdown()")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    try:
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path,
                              env=env, capture_output=True, text=True,
                              timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{scenario.__name__} hung past {SCENARIO_TIMEOUT_S} s:\n"
                    f"{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, f"{scenario.__name__}:\n{done.stdout}\n{done.stderr}"


KS = (0, 1, 2, 3)
RATES = (20, 40)


def sweep_config(tmp_path, hardware="loopback", **options):
    path = write_config(tmp_path, ks=KS, rates=RATES, n_prompts=20, **options)
    text = path.read_text().replace('[server]\n', '[server]\ngpus = 1\ngpu_kind = "loopback"\n')
    path.write_text(text.replace('hardware = "loopback"', f'hardware = "{hardware}"'))
    return read_sweep_config(path)


def four_configurations_in_parallel_a_crash_retried_a_rerun_idle(tmp_path):
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
    attempts = {u.name: len((out / u.name / "attempts.log").read_text().splitlines())
                for u in units({"loop": config})}
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


def results_in_object_storage_by_uri(tmp_path):
    """The results at a URI (file:// here, through fsspec as s3:// would be): each task works
    in a folder of its own node and sends each point there as it ends. A server killed mid
    sweep is retried and the results equal a clean run's; a rerun sends nothing again."""
    marker = tmp_path / "crashed"
    config = sweep_config(tmp_path, server_args=["--crash-after", "30",
                                                 "--fault-marker", str(marker)])
    store = tmp_path / "bucket"
    uri = f"file://{store}/fleet"
    report = run_fleet({"loop": config}, uri, retries=2, progress=False)
    assert marker.exists() and not report.failed
    assert len(report.points) == len(KS) * len(RATES)
    out = store / "fleet"
    assert len(pd.read_csv(out / "points.csv")) == len(report.points)
    assert len(pd.read_csv(out / "requests.csv")) == 20 * len(report.points)
    raw = {p: p.read_bytes() for p in sorted(out.glob("loop/k*/raw/*.json"))}
    assert len(raw) == len(report.points) and not list(out.rglob("*.partial"))
    assert sorted(len((out / f"loop/k{k}" / "attempts.log").read_text().splitlines())
                  for k in KS) == [1, 1, 1, 2]
    assert list(out.glob("loop/k*/logs/*.log"))  # the servers' logs, for a post-mortem
    again = run_fleet({"loop": config}, uri, progress=False)
    assert again.done == [] and len(again.points) == len(report.points)
    assert {p: p.read_bytes() for p in sorted(out.glob("loop/k*/raw/*.json"))} == raw


def a_unit_that_keeps_failing_is_reported_and_the_others_finish(tmp_path):
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


def the_command_profiles_several_configs_on_ray(tmp_path):
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


def test_four_configurations_in_parallel_a_crash_retried_a_rerun_idle(tmp_path):
    in_fresh_process(four_configurations_in_parallel_a_crash_retried_a_rerun_idle, tmp_path)


def test_results_in_object_storage_by_uri(tmp_path):
    in_fresh_process(results_in_object_storage_by_uri, tmp_path)


def test_a_unit_that_keeps_failing_is_reported_and_the_others_finish(tmp_path):
    in_fresh_process(a_unit_that_keeps_failing_is_reported_and_the_others_finish, tmp_path)


def test_the_command_profiles_several_configs_on_ray(tmp_path):
    in_fresh_process(the_command_profiles_several_configs_on_ray, tmp_path)


def test_the_test_workers_never_load_ray():
    """Every test module is collected by now; none imported Ray into this worker."""
    assert not [m for m in sys.modules if m == "ray" or m.startswith("ray.")]
