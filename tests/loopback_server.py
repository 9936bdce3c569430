"""A stand-in for ``vllm serve`` on loopback, used only by the sweep runner's tests.

Run as ``python loopback_server.py MODEL --port P [--speculative-config JSON] [options]``,
the command line the runner gives vLLM, plus its own options: ``--coefficients`` (JSON of
the six costs [s]), ``--acceptance`` (per-token alpha), ``--max-num-seqs``, ``--seed``; two
of vLLM's own, ``--served-model-name`` and ``--max-model-len`` (longer requests get HTTP 400);
``--prompt-log FILE`` (each prompt received, a JSON line); and faults for the robustness
tests: ``--crash-after N`` (SIGKILL itself when the N-th
completion request arrives) and ``--hang-after N`` (stop stepping the engine from then on),
each only when the ``--fault-marker`` file does not exist yet (it is created), so that the
restarted server behaves.

It serves ``GET /health``, ``GET /version``, ``GET /metrics`` (vLLM's spec-decode counters,
exposed with prometheus-client as vLLM does) and streaming ``POST /v1/completions`` (SSE
chunks, a usage chunk when ``stream_options.include_usage``, then ``[DONE]``).

Token timings follow the simulator's rules (:mod:`sdbayes.simulator`), played in real time
by an asyncio engine loop: admitting requests stalls the engine ``c2p`` each; a request's
first token comes ``c1p`` after its admission; a step with ``n`` requests decoding lasts
``(c1v + k*c1d) + (n - 1)*(c2v + k*c2d)`` and gives each ``1 + G`` tokens, ``G`` the drafts
accepted before the first rejection (``P(G >= j) = alpha**j``, at most k). Unlike the
simulator the prefill's token counts as the first output token, as in vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from collections import deque
from pathlib import Path

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

COSTS = ("c1p", "c1v", "c1d", "c2p", "c2v", "c2d")


class Request:
    def __init__(self, tokens: int):
        self.remaining = tokens
        self.ready_at = 0.0
        self.chunks: asyncio.Queue[int | None] = asyncio.Queue()

    def emit(self, tokens: int) -> None:
        tokens = min(tokens, self.remaining)
        self.remaining -= tokens
        self.chunks.put_nowait(tokens)
        if self.remaining == 0:
            self.chunks.put_nowait(None)


class Engine:
    """Continuous batching with speculative decoding, in real time."""

    def __init__(self, costs: dict, k: int, alpha: float, max_seqs: int, seed: int,
                 counters: dict | None):
        self.c, self.k, self.max_seqs, self.counters = costs, k, max_seqs, counters
        self.survival = alpha ** np.arange(1, k + 1)
        self.rng = np.random.default_rng(seed)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[Request] = []
        self.wake = asyncio.Event()
        self.hung = False

    def submit(self, request: Request) -> None:
        self.waiting.append(request)
        self.wake.set()

    async def run(self) -> None:
        c, loop = self.c, asyncio.get_running_loop()
        while True:
            self.wake.clear()
            if self.hung:
                await asyncio.Event().wait()  # never set
            admitted = 0
            while self.waiting and len(self.prefilling) + len(self.decoding) < self.max_seqs:
                request = self.waiting.popleft()
                request.ready_at = loop.time() + c["c1p"]
                self.prefilling.append(request)
                admitted += 1
            if admitted:
                await asyncio.sleep(admitted * c["c2p"])
            now = loop.time()
            for request in [r for r in self.prefilling if r.ready_at <= now]:
                self.prefilling.remove(request)
                request.emit(1)
                if request.remaining:
                    self.decoding.append(request)
            if not self.decoding:
                wait = min((r.ready_at for r in self.prefilling), default=now + 3600) - now
                try:
                    await asyncio.wait_for(self.wake.wait(), max(wait, 0.0))
                except TimeoutError:
                    pass
                continue
            n = len(self.decoding)
            await asyncio.sleep((c["c1v"] + self.k * c["c1d"])
                                + (n - 1) * (c["c2v"] + self.k * c["c2d"]))
            accepted = (self.rng.random((n, 1)) < self.survival).sum(axis=1)
            for request, g in zip(list(self.decoding), accepted, strict=True):
                self._count(int(g))
                request.emit(1 + int(g))
                if not request.remaining:
                    self.decoding.remove(request)

    def _count(self, accepted: int) -> None:
        if self.counters is None:
            return
        self.counters["drafts"].inc()
        self.counters["draft_tokens"].inc(self.k)
        self.counters["accepted"].inc(accepted)
        for position in range(accepted):
            self.counters["per_pos"](position).inc()


def spec_decode_counters(registry: CollectorRegistry, model: str) -> dict:
    labels = dict(model_name=model, engine="0")

    def counter(name, doc, *extra):
        return Counter(f"vllm:spec_decode_{name}", doc, [*labels, *extra], registry=registry)

    per_pos = counter("num_accepted_tokens_per_pos", "Accepted tokens per position.",
                      "position")
    return dict(
        drafts=counter("num_drafts", "Number of drafts.").labels(**labels),
        draft_tokens=counter("num_draft_tokens", "Number of draft tokens.").labels(**labels),
        accepted=counter("num_accepted_tokens", "Accepted tokens.").labels(**labels),
        per_pos=lambda position: per_pos.labels(**labels, position=str(position)))


def make_app(args) -> web.Application:
    spec = json.loads(args.speculative_config) if args.speculative_config else {}
    k = int(spec.get("num_speculative_tokens", 0))
    registry = CollectorRegistry()
    counters = spec_decode_counters(registry, args.model) if k > 0 else None
    costs = json.loads(args.coefficients)
    engine = Engine({name: float(costs[name]) for name in COSTS}, k, args.acceptance,
                    args.max_num_seqs, args.seed, counters)
    marker = Path(args.fault_marker) if args.fault_marker else None
    arrived = 0

    def fault_due(after: int | None) -> bool:
        if after is None or arrived != after or (marker is not None and marker.exists()):
            return False
        if marker is not None:
            marker.touch()
        return True

    async def health(_):
        return web.Response(text="")

    async def version(_):
        return web.json_response({"version": "loopback"})

    async def metrics(_):
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    async def completions(http: web.Request):
        nonlocal arrived
        body = await http.json()
        if body.get("model") != args.model:
            return web.json_response({"error": {"message": f"The model `{body.get('model')}` "
                                                "does not exist."}}, status=404)
        tokens = int(body["max_tokens"])
        if args.prompt_log:
            with open(args.prompt_log, "a") as log:
                log.write(json.dumps(body["prompt"]) + "\n")
        if len(body["prompt"]) + tokens > args.max_model_len:
            return web.json_response({"error": {"message": "This model's maximum context "
                                                f"length is {args.max_model_len} tokens."}},
                                     status=400)
        arrived += 1
        if fault_due(args.crash_after):
            os.kill(os.getpid(), signal.SIGKILL)
        if fault_due(args.hang_after):
            engine.hung = True
        request = Request(tokens)
        engine.submit(request)
        answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await answer.prepare(http)
        while (n := await request.chunks.get()) is not None:
            chunk = {"object": "text_completion", "model": args.model,
                     "choices": [{"index": 0, "text": " tok" * n, "finish_reason": None}]}
            await answer.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": tokens,
                     "total_tokens": len(body["prompt"]) + tokens}
            await answer.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                               .encode())
        await answer.write(b"data: [DONE]\n\n")
        return answer

    async def start_engine(app):
        app["engine"] = asyncio.create_task(engine.run())

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    app.router.add_post("/v1/completions", completions)
    app.on_startup.append(start_engine)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--served-model-name", help="the name the API answers to")
    parser.add_argument("--max-model-len", type=int, default=1 << 20,
                        help="longest prompt + output; longer requests get HTTP 400")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--speculative-config")
    parser.add_argument("--coefficients", required=True, help="JSON of the six costs [s]")
    parser.add_argument("--acceptance", type=float, default=0.7)
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crash-after", type=int)
    parser.add_argument("--hang-after", type=int)
    parser.add_argument("--fault-marker")
    parser.add_argument("--prompt-log", help="append each request's prompt to this file")
    args = parser.parse_args()
    args.model = args.served_model_name or args.model
    # A short grace period on SIGTERM: a hung engine's requests would hold it for a minute.
    web.run_app(make_app(args), host="127.0.0.1", port=args.port, print=None,
                shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
