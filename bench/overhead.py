"""Where the server's decode time goes, layer by layer, in one process and one run:

    python -m bench.overhead --shape llama-1b --dtype bfloat16 --clients 1 32 [--profile]

stream_generate on the main thread and on a worker thread; the engine (no HTTP) at each client
count with its defaults, without the non-finite check, with no stream interval and without the
prefix cache (trials repeat the prompt, so by default each request copies a cached prefix);
BatchGenerator driven directly. All are loaded at once and take turns, trial after trial, so drift
of a shared machine hits each alike; medians of tokens/s over the same prompt and greedy settings,
with ratios. `--timeline` then runs each path once more step by step (bench.timeline). `--profile`
adds an engine whose worker thread is profiled (cProfile). The HTTP layer
on top is `bench.hardware`'s server figures.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import json
import pstats
import statistics
import threading
import time

from bench.baselines import batchgen_run, direct_run, load
from bench.common import PROMPT, ensure_model, gpu_model_parser, write_result
from bench.timeline import StepRecorder


def in_thread(fn, *args, own_stream: bool = False) -> dict:
    """`fn(*args)` on a new thread; `own_stream`: with a generation stream made on that thread."""
    out: list = []

    def run() -> None:
        import importlib

        import mlx.core as mx

        module = importlib.import_module("mlx_lm.generate")  # the module, not the function it exports
        saved = module.generation_stream
        if own_stream:
            module.generation_stream = mx.new_stream(mx.default_device())
        try:
            out.append(fn(*args))
        finally:
            module.generation_stream = saved

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return out[0]


async def engine_rate(engine, clients: int, tokens: int) -> dict:
    """`clients` concurrent generations, timed as a client would."""
    from models.api import Finished, GenerationParams

    params = GenerationParams(prompt=PROMPT, max_tokens=tokens, ignore_eos=True)
    per_request: list[float] = []
    produced = 0

    async def client() -> None:
        nonlocal produced
        start = time.perf_counter()
        async for event in engine.generate(params):
            if isinstance(event, Finished):
                produced += event.usage.completion_tokens
                per_request.append(event.usage.completion_tokens / (time.perf_counter() - start))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"aggregate_tok_s": produced / (time.perf_counter() - start),
            "single_stream_tok_s": statistics.median(per_request)}


def make_engine(folder, dtype: str, batch: int, interval: float, check: bool = True,
                profiler: cProfile.Profile | None = None, prompt_cache: str = "0.05"):
    from models.engine.config import EngineConfig
    from models.engine.engine import MLXEngine
    from models.weights.catalog import ModelCatalog

    engine = MLXEngine(ModelCatalog({folder.name: folder}),
                       EngineConfig(folder.name, dtype, max_batch_size=batch, max_queue=512,
                                    prompt_cache_bytes=prompt_cache, stream_interval_s=interval))
    if not check:
        engine.serving._check_finite = lambda variant, scheduler, responses: None
    if profiler is not None:  # the worker thread's own time, not the event loop's
        run = engine.worker.run
        engine.worker.run = lambda: profiler.runcall(run)
    return engine


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "overhead")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--timeline", action="store_true", help="after the trials, one run of each path step by step")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    model, tokenizer = load(str(folder), a.dtype)
    profiler = cProfile.Profile() if a.profile else None
    batch = max(a.clients)
    engines = {"engine": make_engine(folder, a.dtype, batch, 0.02),
               "engine_no_interval": make_engine(folder, a.dtype, batch, 0.0),
               "engine_no_check": make_engine(folder, a.dtype, batch, 0.02, check=False),
               "engine_no_prefix_cache": make_engine(folder, a.dtype, batch, 0.02, prompt_cache="0")}
    if profiler is not None:  # its own engine: the profiler slows the code it watches
        engines["engine_profiled"] = make_engine(folder, a.dtype, batch, 0.02, profiler=profiler)
    rows: dict[str, list[float]] = {}
    recorder = StepRecorder() if a.timeline else None
    timelines: dict[str, dict] = {}
    if recorder is not None:
        recorder.install()

    def add(label: str, value: float) -> None:
        rows.setdefault(label, []).append(value)

    async def run() -> None:
        for engine in engines.values():
            await engine.start()
        try:
            for trial in range(a.trials + 1):  # trial 0 warms every path up; all paths take turns
                keep = add if trial else (lambda label, value: None)
                keep("direct_main_thread", direct_run(model, tokenizer, PROMPT, a.tokens)["tok_s"])
                keep("direct_worker_thread", in_thread(direct_run, model, tokenizer, PROMPT, a.tokens)["tok_s"])
                keep("direct_worker_own_stream", in_thread(direct_run, model, tokenizer, PROMPT, a.tokens,
                                                           own_stream=True)["tok_s"])
                for n in a.clients:
                    keep(f"batchgen_at_{n}", batchgen_run(model, tokenizer, PROMPT, n, a.tokens)["tok_s"])
                    for label, engine in engines.items():
                        rate = await engine_rate(engine, n, a.tokens)
                        keep(f"{label}_at_{n}", rate["aggregate_tok_s"])
                        if n == 1:
                            keep(f"{label}_single_stream", rate["single_stream_tok_s"])
            for n in (a.clients if recorder is not None else []):
                with recorder.recording():
                    batchgen_run(model, tokenizer, PROMPT, n, a.tokens)
                timelines[f"batchgen_at_{n}"] = recorder.summary(n)
                for label, engine in engines.items():
                    with recorder.recording():
                        await engine_rate(engine, n, a.tokens)
                    timelines[f"{label}_at_{n}"] = recorder.summary(n)
        finally:
            for engine in engines.values():
                await engine.stop()

    asyncio.run(run())
    median = {label: round(statistics.median(values), 2) for label, values in rows.items()}
    base = median["direct_main_thread"]
    ratios = {"worker_thread_vs_main": round(median["direct_worker_thread"] / base, 3),
              "worker_own_stream_vs_main": round(median["direct_worker_own_stream"] / base, 3)}
    for label in engines:
        if 1 in a.clients:
            ratios[f"{label}_batch1_vs_direct"] = round(median[f"{label}_single_stream"] / base, 3)
        for n in a.clients:
            ratios[f"{label}_at_{n}_vs_batchgen"] = round(median[f"{label}_at_{n}"] / median[f"batchgen_at_{n}"], 3)
    out = {"shape": a.shape, "dtype": a.dtype, "tokens": a.tokens, "trials": a.trials, "median_tok_s": median,
           "ratios": ratios, "trials_tok_s": {k: [round(v, 1) for v in vs] for k, vs in rows.items()}}
    if timelines:
        out["timelines"] = timelines
        print(json.dumps(timelines, indent=1))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
        out["profile"] = text.getvalue().splitlines()
    print(json.dumps(ratios, indent=1))
    write_result(a.name, out)
    return out


if __name__ == "__main__":
    main()
