"""A stand-in for ``vllm bench serve``, used only by the sweep runner's tests.

It takes the arguments the runner gives vLLM's benchmark (``sweep.vllm_bench_command``),
sends the requests to the server at ``--base-url`` (the loopback stand-in for ``vllm
serve``) with random token-id prompts drawn from ``--seed``, and writes a result JSON with
vLLM's fields: counts, ``*_ms`` statistics, the ``--save-detailed`` arrays, and the command
line it was given under ``argv``. Its own option ``--no-start-times`` leaves ``start_times``
out, as vLLM before them did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import aiohttp
import numpy as np

from sdbayes.sweep import _stream


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--backend", "--base-url", "--endpoint", "--model", "--dataset-name",
                 "--request-rate", "--percentile-metrics", "--metric-percentiles",
                 "--result-dir", "--result-filename"):
        parser.add_argument(name, required=True)
    for name in ("--random-input-len", "--random-output-len", "--num-prompts", "--seed"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--max-concurrency", type=int)
    for flag in ("--ignore-eos", "--save-result", "--save-detailed", "--no-start-times"):
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(1000, 20000, size=(args.num_prompts, args.random_input_len))
    results = asyncio.run(drive(args, prompts.tolist(), rng))
    write(args, results)


async def drive(args, prompts: list[list[int]], rng) -> list[dict]:
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        start = loop.time()

        async def one(i: int) -> dict:
            body = dict(model=args.model, prompt=prompts[i], max_tokens=args.random_output_len,
                        ignore_eos=args.ignore_eos, stream=True,
                        stream_options=dict(include_usage=True))
            return await _stream(session, args.base_url + args.endpoint, body, start, 60.0)

        if args.request_rate != "inf":
            sends = np.cumsum(rng.exponential(1 / float(args.request_rate), len(prompts)))

            async def at(i: int) -> dict:
                await asyncio.sleep(max(0.0, start + sends[i] - loop.time()))
                return await one(i)

            return await asyncio.gather(*(at(i) for i in range(len(prompts))))
        gate = asyncio.Semaphore(args.max_concurrency or len(prompts))

        async def gated(i: int) -> dict:
            async with gate:
                return await one(i)

        return await asyncio.gather(*(gated(i) for i in range(len(prompts))))


def write(args, results: list[dict]) -> None:
    ok = [r for r in results if not r["error"]]
    ms = {name: np.array([r[name] for r in ok]) * 1e3 for name in ("ttft_s", "e2e_s")}
    duration = max(r["arrival_s"] + r["e2e_s"] for r in ok)
    document = dict(
        argv=sys.argv[1:], backend=args.backend, model_id=args.model,
        num_prompts=args.num_prompts, request_rate=args.request_rate, burstiness=1.0,
        max_concurrency=args.max_concurrency, duration=duration, completed=len(ok),
        failed=len(results) - len(ok),
        total_input_tokens=sum(r["prompt_len"] for r in ok),
        total_output_tokens=sum(r["output_len"] for r in ok),
        request_throughput=len(ok) / duration,
        mean_ttft_ms=ms["ttft_s"].mean(), mean_e2el_ms=ms["e2e_s"].mean(),
        std_e2el_ms=ms["e2e_s"].std(),
        **{f"p{q}_e2el_ms": np.percentile(ms["e2e_s"], q) for q in (50, 90, 99)},
        input_lens=[r["prompt_len"] for r in results],
        output_lens=[r["output_len"] for r in results],
        ttfts=[r["ttft_s"] if not r["error"] else 0.0 for r in results],
        itls=[[r["e2e_s"] - r["ttft_s"]] if not r["error"] else [] for r in results],
        errors=[r["error"] for r in results],
    )
    if not args.no_start_times:
        document["start_times"] = [1.7e9 + r["arrival_s"] for r in results]
    Path(args.result_dir, args.result_filename).write_text(json.dumps(document))


if __name__ == "__main__":
    main()
