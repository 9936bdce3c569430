"""Profiling a fleet of GPUs on Ray: one task per server configuration, resumable.

A *unit* is one sweep config's server at one draft length k (model pair, k, TP size, GPU
kind): its points are measured by one Ray task, which asks for the GPUs the server needs
(``[server] gpus``, 1 by default) and, where the config names one, ``gpu_kind`` as a
custom resource (``gpu_kind:H100``: start each node with ``ray start --resources
'{"gpu_kind:H100": 8}'``). The task picks a free port, runs :func:`sdbayes.sweep.run_sweep`
on its points into its own folder of the results, ``<out>/<sweep>/k<k>/``, and fails if
any point failed, so that Ray retries it (``retries`` times; also when its worker or node
is lost). A retry, like a rerun, skips the points already finished: each is written once,
atomically, as soon as it ends, so no finished point is lost or measured twice. Each
attempt is logged in the unit's ``attempts.log``.

The results (``out``) are a folder every node writes to (a shared file system) or a URI of
object storage (``s3://bucket/prefix``; :mod:`sdbayes.results`). The driver gathers every
finished point into ``<out>/points.csv`` and ``<out>/requests.csv``, with a ``sweep``
column naming the config. A rerun submits only the units with points left.

Ray is an optional dependency (``pip install 'sdbayes[cluster]'``), imported on use.
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from sdbayes.results import Results
from sdbayes.sweep import SweepConfig, SweepError, collect, finished_record, run_sweep


class Unit(NamedTuple):
    """One sweep config's server at one k: the points one Ray task measures."""

    name: str  # "<sweep>/k<k>", also its folder in the results
    sweep: str  # the sweep config's name
    config: SweepConfig  # holding only this k's points


class FleetReport(NamedTuple):
    """What :func:`run_fleet` did and what the results folder now holds."""

    points: pd.DataFrame  # every finished point of every unit, with its sweep's name
    done: list[str]  # units finished in this run
    skipped: list[str]  # units finished before it
    failed: dict[str, str]  # unit -> why, once its retries were spent


class UnitFailed(RuntimeError):
    """Some points of a unit failed; raised inside its task so that Ray retries it."""


def units(sweeps: dict[str, SweepConfig]) -> list[Unit]:
    """Every (sweep config, k) of ``sweeps`` (name -> config)."""
    found = []
    for name, config in sweeps.items():
        for k in dict.fromkeys(p.k for p in config.points):
            points = tuple(p for p in config.points if p.k == k)
            found.append(Unit(f"{name}/k{k}", name, replace(config, points=points)))
    return found


def _left(unit: Unit, results: Results) -> bool:
    """Whether some point of the unit is not finished in the results."""
    with results.working(unit.name) as folder:
        return any(finished_record(folder, point) is None for point in unit.config.points)


def run_fleet(sweeps: dict[str, SweepConfig], out: str | Path, *, address: str | None = None,
              retries: int = 2, progress: bool = True) -> FleetReport:
    """Profile every unit of ``sweeps`` as a Ray task; resume what an earlier run left.

    Args:
      sweeps: sweep configs (:func:`sdbayes.read_sweep_config`) by name; the names become
        folders of ``out``.
      out: the results: a folder every node writes to, or a URI (:mod:`sdbayes.results`).
      address: the Ray cluster (``"ray://head:10001"``, ``"auto"``); None joins the one
        this process already started, or starts a local one.
      retries: how many times a failed unit is run again before it is reported.
      progress: show the units done, running and failed on stderr.

    Returns:
      A :class:`FleetReport`.

    Raises:
      SweepError: a finished point measured with other settings (:func:`run_sweep`).
      ImportError: Ray is not installed.
    """
    import ray

    results = Results(out)
    _check_distinct(sweeps)
    every = units(sweeps)
    todo = [u for u in every if _left(u, results)]
    skipped = [u.name for u in every if u not in todo]
    done: list[str] = []
    failed: dict[str, str] = {}
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        pending = {}
        for unit in todo:
            resources = ({f"gpu_kind:{unit.config.gpu_kind}": unit.config.gpus}
                         if unit.config.gpu_kind else {})
            task = ray.remote(_profile_unit).options(
                num_gpus=unit.config.gpus, resources=resources, max_retries=retries,
                retry_exceptions=[UnitFailed], name=unit.name)
            pending[task.remote(unit.config, results.location, unit.name)] = unit
        done, failed = _wait(ray, pending, progress)
    points = _gather(every, results)
    return FleetReport(points=points, done=done, skipped=skipped, failed=failed)


def _wait(ray, pending: dict, progress: bool) -> tuple[list[str], dict[str, str]]:
    """Wait for every task, showing units done and failed; their names, and why."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    done, failed = [], {}
    total = len(pending)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("units", total=total)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(ready[0])
            try:
                ray.get(ready[0])
                done.append(unit.name)
            except Exception as err:  # the task's own error, or Ray's for a lost node
                failed[unit.name] = str(getattr(err, "cause", None) or err).strip()
            bar.update(task, advance=1, description=(
                f"units: {len(done)} done, {len(pending)} running or queued, "
                f"{len(failed)} failed"))
    return done, failed


def _profile_unit(config: SweepConfig, location: str, unit: str) -> list[str]:
    """The body of one Ray task: measure the unit's points that are not finished."""
    results = Results(location)
    with results.working(unit) as folder:
        log = folder / "attempts.log"
        with open(log, "a") as attempts:
            attempts.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()}\n")
        results.send(unit, folder, log)
        try:
            report = run_sweep(replace(config, port=_free_port()), folder, progress=False,
                               on_point=lambda files: [results.send(unit, folder, file)
                                                       for file in files])
        finally:
            for file in sorted((folder / "logs").glob("*")):
                results.send(unit, folder, file)
    if report.failed:
        raise UnitFailed("; ".join(f"{name}: {why}" for name, why in report.failed.items()))
    return report.ran


def _free_port() -> int:
    """A port free on this node now: each unit's server gets its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather(every: list[Unit], results: Results) -> pd.DataFrame:
    """Every finished point of every unit into the results' points.csv and requests.csv."""
    points, requests = [], []
    for unit in every:
        with results.working(unit.name) as folder:
            found = collect(unit.config, folder)
            if found.empty:
                continue
            points.append(found.assign(sweep=unit.sweep))
            if (folder / "requests.csv").exists():
                requests.append(pd.read_csv(folder / "requests.csv").assign(sweep=unit.sweep))
    if not points:
        return pd.DataFrame(columns=["sweep", "point", "k", "e2e_mean_s"])
    table = pd.concat(points, ignore_index=True)
    if requests:
        results.write_traces(pd.concat(requests, ignore_index=True), "requests.csv")
    results.write_traces(table, "points.csv")
    return table


def _check_distinct(sweeps: dict[str, SweepConfig]) -> None:
    """SweepError, before anything runs, if two configs would measure the same operating
    point (same names, k, lengths and load): the gathered table could not tell them apart."""
    seen: dict[tuple, str] = {}
    for name, config in sweeps.items():
        names = (config.hardware, config.verifier, config.drafter, config.method)
        for point in config.points:
            key = (*names, point.k, point.prompt_len, point.output_len, point.request_rate,
                   point.concurrency)
            if seen.setdefault(key, name) != name:
                raise SweepError(f"sweep configs {seen[key]!r} and {name!r} both measure "
                                 f"{point.name} on hardware {config.hardware!r}: give each "
                                 "its own [trace] hardware (the GPU kind and count)")


def check_names(names: list[str]) -> None:
    """SweepError if two sweep configs would share a results folder."""
    seen = set()
    for name in names:
        if name in seen:
            raise SweepError(f"two sweep configs are named {name!r}: their results would share "
                             "a folder; rename one file")
        seen.add(name)
