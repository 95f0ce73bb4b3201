"""Where the server's decode time goes, layer by layer, in one process and one run:

    python -m bench.overhead --shape llama-1b --dtype bfloat16 --clients 1 32 [--profile]

stream_generate on the main thread and on a worker thread; the engine (no HTTP) at each client
count with its defaults, without the non-finite check and with no stream interval; BatchGenerator
driven directly. Each as tokens/s over the same prompt and greedy settings, with ratios to the
direct baselines; `--profile` adds a run with the worker thread's top functions (cProfile).
The HTTP layer on top is `bench.hardware`'s server figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import statistics
import threading
import time

from bench.common import ensure_model, write_result

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


def direct(model, tokenizer, tokens: int, runs: int = 3) -> float:
    from mlx_lm import stream_generate

    rates = []
    for i in range(runs + 1):
        start, n = time.perf_counter(), 0
        for response in stream_generate(model, tokenizer, PROMPT, max_tokens=tokens):
            n = response.generation_tokens
        if i:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def in_thread(fn, *args) -> float:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    return out[0]


def batchgen(model, tokenizer, batch: int, tokens: int) -> float:
    from mlx_lm.generate import BatchGenerator

    prompt = tokenizer.encode(PROMPT)

    def run() -> float:
        gen = BatchGenerator(model, max_tokens=tokens, completion_batch_size=batch, prefill_batch_size=min(batch, 8))
        gen.insert([prompt] * batch, max_tokens=[tokens] * batch)
        done, produced, start = 0, 0, time.perf_counter()
        while done < batch:
            for r in gen.next_generated():
                produced += 1
                done += r.finish_reason is not None
        return produced / (time.perf_counter() - start)

    run()
    return run()


async def engine_rate(engine, clients: int, tokens: int, rounds: int) -> dict:
    """`clients` concurrent generations, `rounds` back to back each, timed as a client would."""
    from models.api import Finished, GenerationParams

    params = GenerationParams(prompt=PROMPT, max_tokens=tokens, ignore_eos=True)
    per_request: list[float] = []
    produced = 0

    async def client() -> None:
        nonlocal produced
        for _ in range(rounds):
            start = time.perf_counter()
            async for event in engine.generate(params):
                if isinstance(event, Finished):
                    produced += event.usage.completion_tokens
                    per_request.append(event.usage.completion_tokens / (time.perf_counter() - start))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"aggregate_tok_s": round(produced / (time.perf_counter() - start), 2),
            "single_stream_tok_s": round(statistics.median(per_request), 2)}


def measure_engine(folder, dtype: str, clients: list[int], tokens: int, profile: bool, **options) -> dict:
    from models.catalog import ModelCatalog
    from models.engine import MLXEngine

    engine = MLXEngine(ModelCatalog({folder.name: folder}), folder.name, dtype, max_batch_size=max(clients),
                       max_queue=512, prompt_cache_bytes=options.pop("prompt_cache_bytes", "0.05"), **options)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:  # the worker thread's own time, not the event loop's
        run = engine._run
        engine._run = lambda: profiler.runcall(run)

    async def main() -> dict:
        await engine.start()
        try:
            out = {}
            for n in clients:
                await engine_rate(engine, n, tokens, 1)  # warm this batch size
                out[n] = await engine_rate(engine, n, tokens, 2 if n > 1 else 3)
            return out
        finally:
            await engine.stop()

    result = asyncio.run(main())
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = text.getvalue().splitlines()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--name", default="overhead")
    a = p.parse_args(argv)
    from models.compat import prepare_mlx

    prepare_mlx("auto")
    import mlx.core as mx
    from mlx_lm import load

    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    model, tokenizer = load(str(folder))
    model.set_dtype(getattr(mx, a.dtype))
    mx.eval(model.parameters())
    out: dict = {"shape": a.shape, "dtype": a.dtype, "tokens": a.tokens}
    out["direct_main_thread"] = round(direct(model, tokenizer, a.tokens), 2)
    out["direct_worker_thread"] = round(in_thread(direct, model, tokenizer, a.tokens), 2)
    out["batchgen"] = {n: round(batchgen(model, tokenizer, n, a.tokens), 2) for n in a.clients}
    del model
    mx.clear_cache()
    engines = {
        "engine": {"stream_interval_s": 0.02},
        "engine_no_interval": {"stream_interval_s": 0.0},
        "engine_no_check": {"stream_interval_s": 0.02, "check": False},
    }
    if a.profile:  # its own run: the profiler slows the code it watches
        engines["engine_profiled"] = {"stream_interval_s": 0.02, "profile": True}
    for label, options in engines.items():
        options = dict(options)
        check, profile = options.pop("check", True), options.pop("profile", False)
        from models.engine import MLXEngine

        saved = MLXEngine._check_finite
        if not check:
            MLXEngine._check_finite = lambda self, variant, responses: None
        try:
            out[label] = measure_engine(folder, a.dtype, a.clients, a.tokens,
                                        profile=profile, **options)
        finally:
            MLXEngine._check_finite = saved
    base = out["direct_main_thread"]
    out["ratios"] = {
        "worker_thread_vs_main": round(out["direct_worker_thread"] / base, 3),
        **{f"{label}_batch1_vs_direct": round(out[label][1]["single_stream_tok_s"] / base, 3)
           for label in engines if 1 in out[label]},
        **{f"{label}_at_{n}_vs_batchgen": round(out[label][n]["aggregate_tok_s"] / out["batchgen"][n], 3)
           for label in engines for n in a.clients},
    }
    print(json.dumps(out["ratios"], indent=1))
    write_result(a.name, out)
    return out


if __name__ == "__main__":
    main()
