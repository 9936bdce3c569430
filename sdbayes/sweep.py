"""The sweep runner: profile a vLLM server over draft lengths and loads (docs/model.md section 2).

A TOML config (:func:`read_sweep_config`; ``profiling/`` has an example) names the served
model, the speculative method, and the grid: draft lengths ``k``, prompt and output lengths,
and loads (Poisson ``request_rates`` and closed-loop ``concurrency``). :func:`run_sweep`
then, for each k, starts ``vllm serve`` (``--speculative-config`` for k > 0, none for
k = 0), waits for ``GET /health``, sends one warm-up request, and measures each point: it
scrapes ``/metrics``, drives the load with an asyncio streaming client of the
OpenAI-compatible ``/v1/completions`` (random token-id prompts, or a dataset's text where
``[sweep] dataset`` names one, as real text gives the acceptance a service sees; either way a
fresh set per point so that vLLM's prefix cache never serves one point's prompts from
another's, :func:`_prompt_note`; ``ignore_eos`` so every request emits the asked number of
tokens), and scrapes ``/metrics`` again; acceptance comes from the spec-decode counters'
difference.

With ``[sweep] client = "vllm"``, ``vllm bench serve`` drives each point in place of the
runner's client (:func:`vllm_bench_command`: vLLM's random dataset seeded by the point, every
latency statistic, the per-request arrays); its own JSON is kept in ``vllm/<point>.json``,
and the point is measured from it.

Resumable and robust: each point is written to ``raw/<point>.json`` as soon as it ends,
finished or failed. A rerun skips finished points and retries failed ones. A server that
exits or stops answering (no answer within ``request_timeout_s``) fails the point with the
reason, is killed and restarted for the next point; the sweep goes on.

Output folder::

    raw/<point>.json   settings, server version, how prompts were chosen, per-request
                       timings, both /metrics scrapes, status, reason
    logs/k<k>-<time>.log   the server's output, one file per start
    vllm/<point>.json      vllm bench serve's own result, with client = "vllm"
    logs/<point>.vllm-bench.log   its output
    requests.csv       per-request canonical traces of the finished points
    points.csv         their operating points (:func:`sdbayes.aggregate`), one per point
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import groupby, product
from pathlib import Path
from typing import NamedTuple

import aiohttp
import numpy as np
import pandas as pd
from pydantic import ValidationError

from sdbayes import schemas
from sdbayes.importers import acceptance_between, read_spec_decode_metrics, read_vllm_bench
from sdbayes.prompts import PromptError, read_prompts
from sdbayes.schemas import VllmResult
from sdbayes.traces import TraceError, aggregate, write_traces

# Random prompts are token ids drawn from this range: inside every modern vocabulary and
# clear of the special tokens most tokenizers put first.
_TOKEN_IDS = (1000, 20000)
_HEALTH_POLL_S = 0.5


VLLM_BENCH = ("vllm", "bench", "serve")
CLIENTS = ("sdbayes", "vllm")
"""The load generators: the runner's own asyncio client, or ``vllm bench serve``."""


class SweepError(ValueError):
    """A sweep config or output folder that cannot be used; the message names the key."""


@dataclass(frozen=True)
class Point:
    """One operating point of a sweep: a load on one server configuration."""

    k: int
    prompt_len: int
    output_len: int
    request_rate: float | None  # Poisson arrivals [req/s]; or
    concurrency: int | None  # requests kept in flight (closed loop)
    n_prompts: int
    seed: int
    dataset: str = ""  # "<file name>@<digest>" of its prompts; "" for random ones
    run: int = 1  # which repeat of the point ([sweep] repeats)

    @property
    def name(self) -> str:
        load = (f"rate{self.request_rate:g}" if self.request_rate is not None
                else f"conc{self.concurrency}")
        prompts = "pdata" if self.dataset else f"p{self.prompt_len}"
        repeat = f"_run{self.run}" if self.run > 1 else ""
        return f"k{self.k}_{prompts}_g{self.output_len}_{load}{repeat}"


@dataclass(frozen=True)
class SweepConfig:
    """A parsed sweep config (see :func:`read_sweep_config` for the TOML keys)."""

    model: str
    hardware: str
    verifier: str
    drafter: str
    method: str
    points: tuple[Point, ...]
    speculative: dict = field(default_factory=dict)  # --speculative-config but for k
    command: tuple[str, ...] = ("vllm", "serve")
    args: tuple[str, ...] = ()
    port: int = 8000
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 600.0
    acceptance: float | None = None  # forced acceptance; default: from /metrics
    gpus: int = 1  # GPUs one server uses (its tensor-parallel size): what a Ray task asks
    gpu_kind: str = ""  # a Ray custom resource, "gpu_kind:<this>", the task asks for too
    prompts: tuple[str, ...] = ()  # the dataset's, where [sweep] dataset names one
    client: str = "sdbayes"  # the load generator: "sdbayes" or "vllm" (vllm bench serve)
    client_command: tuple[str, ...] = VLLM_BENCH

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_command(self, k: int) -> list[str]:
        """The command line that serves draft length ``k``."""
        command = [*self.command, self.model, "--port", str(self.port)]
        if k > 0:
            spec = {**self.speculative, "num_speculative_tokens": k}
            command += ["--speculative-config", json.dumps(spec)]
        return command + list(self.args)


# --- config ----------------------------------------------------------------------------

_KEYS = {
    "server": {"model", "command", "args", "port", "startup_timeout_s", "gpus", "gpu_kind"},
    "speculative": None,  # method, model, and anything vLLM's --speculative-config takes
    "sweep": {"k", "request_rates", "concurrency", "prompt_len", "output_len", "n_prompts",
              "seed", "request_timeout_s", "acceptance", "dataset", "repeats", "client",
              "client_command"},
    "trace": {"hardware", "verifier", "drafter"},
}


def read_sweep_config(path: str | Path) -> SweepConfig:
    """Read and check a sweep config (TOML).

    Tables and keys (defaults in brackets)::

        [server]       model (required), command [["vllm", "serve"]], args [[]],
                       port [8000], startup_timeout_s [900], and for a Ray fleet
                       (:mod:`sdbayes.fleet`) gpus [1] and gpu_kind ["": any]
        [speculative]  method (required when some k > 0), model (the drafter, if any),
                       and any other --speculative-config keys, passed as they are
        [sweep]        k (list, required), request_rates (list [req/s]) and/or
                       concurrency (list), prompt_len [512], output_len [128] (a number or
                       a list each), n_prompts [200], seed [0], request_timeout_s [600],
                       acceptance (forced; default: measured from /metrics), dataset
                       (prompts from a file, :func:`sdbayes.prompts.read_prompts`, its
                       path relative to the config's; in place of prompt_len), repeats
                       [1] (runs of each point, each with its own prompts),
                       client ["sdbayes": the runner's own; "vllm": ``vllm bench serve``,
                       random prompts only], client_command [["vllm", "bench", "serve"]]
        [trace]        hardware (required), verifier [server.model],
                       drafter [speculative.model]

    Points are every k x prompt_len x output_len x load, rates low to high; with
    repeats, each k's loads are run once, then again, so that a drift of the server over
    time shows as a spread between runs rather than as a trend along the loads.

    Raises:
      SweepError: naming the file and key for anything missing, unknown or of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such file")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise SweepError(f"{path}: not valid TOML ({err})") from None
    for table, value in data.items():
        if table not in _KEYS or not isinstance(value, dict):
            raise SweepError(f"{path}: unknown table [{table}] (expected "
                             f"{', '.join(f'[{t}]' for t in _KEYS)})")
        unknown = set(value) - _KEYS[table] if _KEYS[table] is not None else set()
        if unknown:
            raise SweepError(f"{path}: [{table}] has unknown key(s) {sorted(unknown)}")

    def get(table, key, valid, default=..., what=""):
        value = data.get(table, {}).get(key, default)
        if value is ...:
            raise SweepError(f"{path}: [{table}] {key} is required")
        if value is not default and not valid(value):
            raise SweepError(f"{path}: [{table}] {key} = {value!r}: expected {what}")
        return value

    spec = data.get("speculative", {})
    ks = get("sweep", "k", _each(_whole(0)), what="whole numbers >= 0")
    if any(k > 0 for k in _as_list(ks)) and "method" not in spec:
        raise SweepError(f"{path}: [speculative] method is required for k > 0")
    rates = get("sweep", "request_rates", _each(_positive), [], "numbers > 0 [req/s]")
    conc = get("sweep", "concurrency", _each(_whole(1)), [], "whole numbers >= 1")
    if not rates and not conc:
        raise SweepError(f"{path}: [sweep] needs request_rates and/or concurrency")
    loads = [(float(r), None) for r in sorted(_as_list(rates))] + \
        [(None, c) for c in sorted(_as_list(conc))]
    lengths = [_as_list(get("sweep", key, _each(_whole(1)), default, "whole numbers >= 1"))
               for key, default in (("prompt_len", 512), ("output_len", 128))]
    n_prompts = get("sweep", "n_prompts", _whole(1), 200, "a whole number >= 1")
    seed = get("sweep", "seed", _whole(0), 0, "a whole number >= 0")
    client = get("sweep", "client", lambda c: c in CLIENTS, "sdbayes", " or ".join(CLIENTS))
    prompts, dataset = (), ""
    if "dataset" in data.get("sweep", {}) and client == "vllm":
        raise SweepError(f"{path}: [sweep] client = \"vllm\" sends vLLM's random prompts; "
                         "a dataset's go with the runner's own client (client = \"sdbayes\")")
    if "dataset" in data.get("sweep", {}):
        if "prompt_len" in data["sweep"]:
            raise SweepError(f"{path}: [sweep] prompt_len and dataset: a dataset's prompts "
                             "have their own lengths; give one of them")
        file = path.parent / get("sweep", "dataset", _text, what="a file name")
        try:
            prompts, digest = read_prompts(file)
        except PromptError as err:
            raise SweepError(f"{path}: [sweep] dataset: {err}") from None
        dataset, lengths[0] = f"{file.name}@{digest}", [0]
    repeats = get("sweep", "repeats", _whole(1), 1, "a whole number >= 1")
    points = tuple(Point(k=k, prompt_len=p, output_len=g, request_rate=r, concurrency=c,
                         n_prompts=n_prompts, seed=seed, dataset=dataset, run=run)
                   for k, p, g, run, (r, c) in product(_as_list(ks), *lengths,
                                                       range(1, repeats + 1), loads))
    acceptance = get("sweep", "acceptance", lambda a: _positive(a) and a <= 1, None,
                     "a number in (0, 1]")
    model = get("server", "model", _text, what="a model name")
    return SweepConfig(
        model=model,
        hardware=get("trace", "hardware", _text, what="a name"),
        verifier=get("trace", "verifier", _text, model, "a name"),
        drafter=get("trace", "drafter", _text, str(spec.get("model", "")), "a name"),
        method=str(spec.get("method", "")),
        points=points,
        speculative=spec,
        command=tuple(get("server", "command", _each(_text), ["vllm", "serve"],
                          "a list of strings")),
        args=tuple(str(a) for a in get("server", "args", lambda a: isinstance(a, list), [],
                                       "a list")),
        port=get("server", "port", _whole(1), 8000, "a port number"),
        startup_timeout_s=float(get("server", "startup_timeout_s", _positive, 900.0,
                                    "seconds > 0")),
        request_timeout_s=float(get("sweep", "request_timeout_s", _positive, 600.0,
                                    "seconds > 0")),
        acceptance=None if acceptance is None else float(acceptance),
        gpus=get("server", "gpus", _whole(1), 1, "a whole number >= 1"),
        gpu_kind=get("server", "gpu_kind", _text, "", "a name"),
        prompts=prompts,
        client=client,
        client_command=tuple(get("sweep", "client_command", _each(_text), list(VLLM_BENCH),
                                 "a list of strings")),
    )


def _text(value) -> bool:
    return isinstance(value, str) and bool(value)


def _positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _whole(low: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _each(valid):
    """A value or a non-empty list of values each of which is valid."""
    return lambda v: (all(map(valid, v)) and bool(v)) if isinstance(v, list) else valid(v)


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]
# --- running ---------------------------------------------------------------------------

class PointFailed(Exception):
    """A point could not be measured; the message is the reason stored with it."""


class SweepReport(NamedTuple):
    """What :func:`run_sweep` did and what the folder now holds."""

    points: pd.DataFrame  # operating points of every finished point of the config
    ran: list[str]  # point names measured in this run (finished or failed)
    skipped: list[str]  # already finished before this run
    failed: dict[str, str]  # point name -> reason, for points not finished


def run_sweep(config: SweepConfig, out: str | Path, *, progress: bool = True,
              on_point: Callable[[list[Path]], None] | None = None) -> SweepReport:
    """Run (or resume) a sweep; write raw results and canonical traces under ``out``.

    Args:
      config: from :func:`read_sweep_config`.
      out: the output folder (created); rerunning with the same folder resumes.
      progress: show a progress bar on stderr.
      on_point: called with the files a point wrote (its raw record, vLLM's result) as
        soon as they are complete, finished or failed (a fleet sends them on,
        :mod:`sdbayes.results`).

    Returns:
      A :class:`SweepReport`. ``requests.csv`` and ``points.csv`` in ``out`` hold every
      finished point of the config, from this run and earlier ones.

    Raises:
      SweepError: a finished point in ``out`` was measured with other settings (the config
        changed: use a new folder).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    out = Path(out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    done = {p.name for p in config.points if finished_record(out, p) is not None}
    todo = [p for p in config.points if p.name not in done]
    commands = [("server", config.command)] + (
        [("sweep", config.client_command)] if config.client == "vllm" else [])
    for table, command in commands:
        if todo and shutil.which(command[0]) is None:
            # One line now rather than one failed point for each of them.
            raise SweepError(f"{table} command {command[0]!r} not found: install vLLM on "
                             "this GPU host (pip install 'sdbayes[vllm]'), or set "
                             f"[{table}] {'command' if table == 'server' else 'client_command'}"
                             " in the sweep config")
    failed: dict[str, str] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("sweep", total=sum(p.n_prompts for p in todo))
        for k, group in groupby(todo, key=lambda p: p.k):
            with _ServerSlot(config, k, out / "logs") as slot:
                for point in group:
                    bar.update(task, description=point.name)
                    try:
                        record = _measure(config, slot.server(), point, out,
                                          lambda: bar.advance(task))  # once per request
                    except PointFailed as why:
                        failed[point.name] = str(why)
                        record = dict(status="failed", reason=str(why),
                                      **getattr(why, "record", {}))
                        slot.discard()  # the next point gets a fresh server
                    _write_json(out / "raw" / f"{point.name}.json",
                                dict(point=asdict(point), **record))
                    if on_point is not None:
                        vllm = [out / record["vllm_result"]] if "vllm_result" in record else []
                        on_point([out / "raw" / f"{point.name}.json", *vllm])
    points = collect(config, out)
    return SweepReport(points=points, ran=[p.name for p in todo], skipped=sorted(done),
                       failed=failed)


def finished_record(out: str | Path, point: Point) -> dict | None:
    """The raw record of ``point`` in ``out`` if it finished there, else None."""
    path = out / "raw" / f"{point.name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written atomically, so only a hand-edited file gets here
    if record.get("status") != "ok":
        return None
    if {"dataset": "", "run": 1, **record.get("point", {})} != asdict(point):  # older
        raise SweepError(f"{path}: measured with other settings {record.get('point')}, the "
                         f"config now says {asdict(point)}: use a new output folder")
    return record


def _write_json(path: Path, record: dict) -> None:
    """Write so that a crash of the runner itself never leaves half a file behind."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record))
    partial.replace(path)


class _ServerSlot:
    """The server of one k: started on first use, discarded after a failed point (and so
    restarted for the next), stopped on leaving, also on Ctrl-C (the server runs in its
    own session and would linger). A start that fails fails every point of that k."""

    def __init__(self, config: SweepConfig, k: int, logs: Path):
        self.config, self.k, self.logs = config, k, logs
        self._server: _Server | None = None
        self._cannot_start: str | None = None

    def server(self) -> _Server:
        if self._cannot_start:
            raise PointFailed(self._cannot_start)
        if self._server is None:
            try:
                self._server = _Server.start(self.config, self.k, self.logs)
            except PointFailed as why:
                self._cannot_start = str(why)
                raise
        return self._server

    def discard(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> _ServerSlot:
        return self

    def __exit__(self, *_) -> None:
        self.discard()


class _Server:
    """``vllm serve`` (or a stand-in) as a child process in its own process group."""

    def __init__(self, config: SweepConfig, k: int, logs: Path):
        self.config = config
        self.version = ""  # the server's own, read once it is up
        self.log_path = logs / f"k{k}-{time.strftime('%Y%m%dT%H%M%S')}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(config.server_command(k), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    @classmethod
    def start(cls, config: SweepConfig, k: int, logs: Path) -> _Server:
        """Start, wait until healthy and send a warm-up request; PointFailed if not."""
        try:
            server = cls(config, k, logs)
        except OSError as err:
            raise PointFailed(f"cannot start {config.command[0]!r}: {err}") from None
        try:
            server._wait_healthy()
            warm_up = Point(k=k, prompt_len=16, output_len=4, request_rate=None,
                            concurrency=1, n_prompts=1, seed=0)
            record = asyncio.run(_drive(config, warm_up, lambda: None))
            if record["error"][0]:
                raise PointFailed(f"warm-up request failed: {record['error'][0]}")
            server.version = server._version()
        except PointFailed:
            server.stop()
            raise
        return server

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PointFailed(f"server exited with code {self.process.returncode} while "
                                  f"starting; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.config.url + "/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(_HEALTH_POLL_S)
        raise PointFailed(f"server not healthy after {self.config.startup_timeout_s:g} s; "
                          f"see {self.log_path}")

    def scrape(self) -> str:
        try:
            with urllib.request.urlopen(self.config.url + "/metrics", timeout=30) as answer:
                return answer.read().decode()
        except (urllib.error.URLError, OSError) as err:
            raise PointFailed(f"cannot read /metrics ({err}){self._exit_note()}") from None

    def _version(self) -> str:
        """The server's ``GET /version`` (vLLM's version), or "" where it has none."""
        try:
            with urllib.request.urlopen(self.config.url + "/version", timeout=10) as answer:
                return str(json.loads(answer.read()).get("version", ""))
        except (urllib.error.URLError, OSError, json.JSONDecodeError, AttributeError):
            return ""  # provenance only: a server without it is still measured

    def _exit_note(self) -> str:
        code = self.process.poll()
        return "" if code is None else f"; server exited with code {code}, see {self.log_path}"

    def stop(self) -> None:
        """Terminate the whole process group (vLLM runs workers), kill if it lingers."""
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


def _measure(config: SweepConfig, server: _Server, point: Point, out: Path,
             on_request: Callable[[], None]) -> dict:
    """Measure one point; its record (per-request timings, scrapes), or PointFailed."""
    started = time.time()
    before = server.scrape()
    record = dict(started=started, server_version=server.version,
                  prompts=_prompt_note(config, point), metrics_before=before)
    try:
        if config.client == "vllm":
            record.update(_run_vllm_bench(config, point, out))
            for _ in range(point.n_prompts):
                on_request()
        else:
            record["requests"] = asyncio.run(_drive(config, point, on_request))
        requests = record["requests"] or dict(error=[], transport=[])
        lost = [e for e, t in zip(requests["error"], requests["transport"], strict=True) if t]
        note = server._exit_note()
        if lost or note:
            raise PointFailed(f"{len(lost)} of {point.n_prompts} requests lost "
                              f"({lost[0] if lost else 'no error'}){note}")
        if requests["error"] and all(requests["error"]):
            raise PointFailed(f"all {point.n_prompts} requests failed ({requests['error'][0]})")
        record["metrics_after"] = server.scrape()
        record["acceptance"] = _acceptance(config, point, before, record["metrics_after"])
    except PointFailed as why:
        why.record = record  # kept in the failed point's file for a post-mortem
        raise
    return dict(status="ok", **record)


def _acceptance(config: SweepConfig, point: Point, before: str, after: str) -> float:
    if point.k == 0:
        return 0.0
    if config.acceptance is not None:
        return config.acceptance
    try:
        counts = [read_spec_decode_metrics(text, "/metrics") for text in (before, after)]
        return acceptance_between(*counts, point.k)
    except TraceError as err:
        raise PointFailed(f"no acceptance rate: {err} (or set [sweep] acceptance)") from None


PROMPTS = ("random token ids, a fresh set for each point: no point shares a prompt or a "
           "prefix with another, so vLLM's prefix cache cannot shorten a later point's prefill")
"""How the runner chooses prompts; written into each point's raw record."""


def _prompt_note(config: SweepConfig, point: Point) -> str:
    """How the runner chose a point's prompts (:data:`PROMPTS` for random ones)."""
    if config.client == "vllm":
        return (f"vLLM's random dataset, seeded by the point ({_vllm_seed(point)}): a fresh "
                "prompt set for each point, as with the runner's own client")
    if not point.dataset:
        return PROMPTS
    needed, have = point.n_prompts * len(config.points), len(config.prompts)
    spread = ("each point its own: no prompt repeats in the sweep" if needed <= have else
              f"the sweep needs {needed}, so prompts repeat across points: vLLM's prefix "
              "cache may serve the repeats (run the server with --no-enable-prefix-caching, "
              "or give a larger dataset)")
    return (f"dataset {point.dataset} ({have} prompts), {point.n_prompts} a point, "
            f"shuffled once by the seed; {spread}")


def _dataset_prompts(config: SweepConfig, point: Point) -> list[str]:
    """A point's prompts from the dataset: consecutive blocks of one shuffle of it (by the
    seed and the file's digest), the point's block by its place in the sweep, so that no
    two points share a prompt while the dataset lasts."""
    have = len(config.prompts)
    order = np.random.default_rng([point.seed, zlib.crc32(point.dataset.encode())]
                                  ).permutation(have)
    first = config.points.index(point) * point.n_prompts
    return [config.prompts[order[i % have]] for i in range(first, first + point.n_prompts)]


def _generator(point: Point) -> np.random.Generator:
    """The random stream of one point's prompts and arrivals, seeded by the whole point (its
    load included): the same on a rerun, different from every other point's."""
    return np.random.default_rng([point.seed, zlib.crc32(point.name.encode())])


async def _drive(config: SweepConfig, point: Point, on_request: Callable[[], None]) -> dict:
    """Send a point's requests (Poisson arrivals or a closed loop) and time each one.

    Returns per-request lists, shape [n_prompts] each: ``arrival_s`` (since the first send),
    ``prompt_len, output_len`` (tokens, from the server's usage report), ``ttft_s, e2e_s``,
    ``error`` (empty when fine) and ``transport`` (the error was a lost connection or a
    timeout, not an answer).
    """
    rng = _generator(point)
    prompts = (_dataset_prompts(config, point) if point.dataset else
               rng.integers(*_TOKEN_IDS, size=(point.n_prompts, point.prompt_len)).tolist())
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=config.request_timeout_s)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        start = loop.time()

        async def one(i: int) -> dict:
            body = dict(model=config.model, prompt=prompts[i],
                        max_tokens=point.output_len, ignore_eos=True, temperature=0.0,
                        stream=True, stream_options=dict(include_usage=True))
            result = await _stream(session, config.url + "/v1/completions", body, start,
                                   config.request_timeout_s)
            on_request()
            return result

        if point.request_rate is not None:
            gaps = rng.exponential(1.0 / point.request_rate, point.n_prompts)
            sends = np.cumsum(gaps) - gaps[0]  # the first request at time 0

            async def at(i: int) -> dict:
                await asyncio.sleep(max(0.0, start + sends[i] - loop.time()))
                return await one(i)

            results = await asyncio.gather(*(at(i) for i in range(point.n_prompts)))
        else:
            queue = iter(range(point.n_prompts))
            results = [None] * point.n_prompts

            async def worker():
                for i in queue:
                    results[i] = await one(i)

            await asyncio.gather(*(worker() for _ in range(point.concurrency)))
    return {key: [r[key] for r in results] for key in results[0]}


async def _stream(session, url: str, body: dict, start: float, timeout_s: float) -> dict:
    """One streaming completion, timed."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    prompt = body["prompt"]  # token ids, or a dataset's text: its length the server says
    record = dict(arrival_s=sent - start,
                  prompt_len=len(prompt) if isinstance(prompt, list) else math.nan, output_len=0,
                  ttft_s=math.nan, e2e_s=math.nan, error="", transport=False)
    try:
        async with session.post(url, json=body) as answer:
            if answer.status != 200:
                text = " ".join((await answer.text()).split())[:200]
                record["error"] = f"HTTP {answer.status}: {text}"
                return record
            async for line in answer.content:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if math.isnan(record["ttft_s"]) and any(
                        c.get("text") for c in chunk.get("choices") or []):
                    record["ttft_s"] = loop.time() - sent
                if chunk.get("usage"):
                    record["output_len"] = int(chunk["usage"]["completion_tokens"])
                    record["prompt_len"] = chunk["usage"].get("prompt_tokens",
                                                              record["prompt_len"])
        record["e2e_s"] = loop.time() - sent
    except TimeoutError:
        record.update(error=f"no answer within {timeout_s:g} s (server hung?)", transport=True)
    except (aiohttp.ClientError, ConnectionError) as err:
        record.update(error=f"connection lost ({type(err).__name__}: {err})", transport=True)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        record["error"] = f"malformed stream ({err})"
    else:
        if math.isnan(record["ttft_s"]) or record["output_len"] < 1:
            record["error"] = ("no tokens streamed" if math.isnan(record["ttft_s"])
                               else "no usage report at the end of the stream")
    return record


# --- vllm bench serve as the load generator ([sweep] client = "vllm") -----------------

def _vllm_seed(point: Point) -> int:
    """The seed ``vllm bench serve`` draws a point's random prompts from: the point's own,
    since one seed for every point would send the same prompts and let vLLM's prefix cache
    serve them."""
    return int(_generator(point).integers(2**31))


def vllm_bench_command(config: SweepConfig, point: Point, result: Path) -> list[str]:
    """The ``vllm bench serve`` command line that measures ``point`` and writes its result
    JSON to ``result``: vLLM's random dataset at the point's lengths, every latency
    statistic, the per-request arrays."""
    load = (["--request-rate", f"{point.request_rate:g}"] if point.request_rate is not None
            else ["--request-rate", "inf", "--max-concurrency", str(point.concurrency)])
    # --random-range-ratio is left at its default, which gives every prompt the asked
    # length in every version; 0 would not in the older ones, where it set a lower bound.
    return [*config.client_command, "--backend", "vllm", "--base-url", config.url,
            "--endpoint", "/v1/completions", "--model", config.model,
            "--dataset-name", "random", "--random-input-len", str(point.prompt_len),
            "--random-output-len", str(point.output_len), "--ignore-eos",
            "--num-prompts", str(point.n_prompts), "--seed", str(_vllm_seed(point)), *load,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed", "--result-dir", str(result.parent),
            "--result-filename", result.name]


def _run_vllm_bench(config: SweepConfig, point: Point, out: Path) -> dict:
    """Measure a point with ``vllm bench serve``; the record's ``vllm_result`` (vLLM's own
    JSON, under ``out/vllm/``) and ``requests`` (per-request timings, or None where the
    result has no ``start_times`` to place the requests in time), or PointFailed."""
    result = out / "vllm" / f"{point.name}.json"
    result.parent.mkdir(exist_ok=True)
    result.unlink(missing_ok=True)
    command = vllm_bench_command(config, point, result)
    log = out / "logs" / f"{point.name}.vllm-bench.log"
    # An upper bound on an honest run: the arrivals' span (or the closed loop's rounds),
    # each round at most a request's timeout, and a minute to load the tokenizer.
    rounds = (1 if point.request_rate is not None
              else math.ceil(point.n_prompts / point.concurrency))
    span = point.n_prompts / point.request_rate if point.request_rate is not None else 0.0
    limit = span + rounds * config.request_timeout_s + 60.0
    try:
        with log.open("w") as sink:
            code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT,
                                  timeout=limit).returncode
    except subprocess.TimeoutExpired:
        raise PointFailed(f"vllm bench serve did not finish within {limit:g} s (server "
                          f"hung?); its output is in {log}") from None
    if code != 0 or not result.is_file():
        last = next((line for line in reversed(log.read_text().splitlines()) if line.strip()),
                    "no output")
        raise PointFailed(f"vllm bench serve exited with {code} ({last.strip()[:200]}); its "
                          f"output is in {log}")
    try:
        parsed = VllmResult.model_validate_json(result.read_text())
    except ValidationError as error:
        raise PointFailed("; ".join(schemas.problems(error, str(result)))) from None
    return dict(client=command, vllm_result=str(result.relative_to(out)),
                requests=_vllm_requests(parsed))


def _vllm_requests(result: VllmResult) -> dict | None:
    """Per-request timings from a result's ``--save-detailed`` arrays, in the form
    :func:`_drive` gives them; None without ``start_times`` (older vLLM)."""
    if result.start_times is None or result.ttfts is None or result.itls is None:
        return None
    n = len(result.ttfts)
    errors = [error or "" for error in (result.errors or [""] * n)]
    first = min(result.start_times)
    return dict(arrival_s=[t - first for t in result.start_times],
                prompt_len=result.input_lens or [math.nan] * n,
                output_len=result.output_lens or [math.nan] * n,
                ttft_s=result.ttfts,
                e2e_s=[ttft + sum(itl) for ttft, itl in zip(result.ttfts, result.itls,
                                                            strict=True)],
                error=errors, transport=[False] * n)


# --- traces ----------------------------------------------------------------------------

def collect(config: SweepConfig, out: str | Path) -> pd.DataFrame:
    """Canonical traces of every finished point of ``config`` in ``out``.

    Writes ``requests.csv`` (per request, answered requests only) and ``points.csv`` (one
    operating point per finished point, with ``errored_requests`` counting the requests the
    server answered with an error) and returns the points. A point ``vllm bench serve``
    measured without per-request start times (vLLM before them) is read from vLLM's own
    summary (:func:`sdbayes.importers.read_vllm_bench`) and has no rows in ``requests.csv``.
    """
    out = Path(out)
    rows, points = [], []
    repeated = any(point.run > 1 for point in config.points)
    for point in config.points:
        record = finished_record(out, point)
        if record is None:
            continue
        sd = point.k > 0
        if record.get("requests") is None:  # vLLM's result without start times
            measured = read_vllm_bench(
                out / record["vllm_result"], hardware=config.hardware,
                verifier=config.verifier, drafter=config.drafter if sd else "",
                method=config.method if sd else "none", k=point.k,
                acceptance=record["acceptance"]).assign(point=point.name)
            points.append(measured.assign(run=point.run) if repeated else measured)
            continue
        requests = pd.DataFrame(record["requests"])
        good = requests[requests["error"] == ""]  # a finished point has some
        frame = pd.DataFrame(dict(
            hardware=config.hardware, verifier=config.verifier,
            drafter=config.drafter if sd else "", method=config.method if sd else "none",
            k=point.k, request_rate=point.request_rate or math.nan,
            concurrency=pd.array([point.concurrency] * len(good), dtype="Int64"),
            acceptance=record["acceptance"],
            arrival_s=good["arrival_s"], prompt_len=good["prompt_len"],
            output_len=good["output_len"], ttft_s=good["ttft_s"], e2e_s=good["e2e_s"],
            point=point.name, errored_requests=len(requests) - len(good),
            server_version=record.get("server_version", "")))
        rows.append(frame)
        measured = aggregate(frame, source=f"{out}/raw/{point.name}.json")
        if repeated:  # repeats of a point must differ in run (sdbayes.traces)
            measured["run"] = point.run
        points.append(measured)
    columns = ["point", "k", "request_rate", "concurrency", "e2e_mean_s"]
    if not points:
        return pd.DataFrame(columns=columns)
    if rows:
        write_traces(pd.concat(rows, ignore_index=True), out / "requests.csv")
    table = pd.concat(points, ignore_index=True)
    write_traces(table, out / "points.csv")
    return table
