"""Where the first request after start-up spends its extra time, in the engine (no HTTP):

    python -m bench.first_request --shape llama-1b --dtypes bfloat16 float32 [--variants as_is twice]

Per dtype and variant, in a fresh process each (first-use costs are per process): the engine starts
with its warm-up, then serves six requests one after the other (prompts that differ from their
first character, as in bench.hardware); per request the engine's time to first token and its parts:
encode/admit, prefill (evaluated), the first decode step. Variants: `as_is`; `twice` (the warm-up
runs a second time, so whatever the first warm-up leaves cold shows as a gap between the two).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, ensure_model, gpu_model_parser, numbered_prompt, write_result


def measure(folder: str, dtype: str, variant: str, tokens: int) -> dict:
    import models.decode.single_stream as single_stream
    from models.api import Finished, GenerationParams
    from models.engine.config import EngineConfig
    from models.engine.engine import MLXEngine
    from models.weights.catalog import ModelCatalog

    parts: dict[str, float] = {}
    prefill, step = single_stream.prefill, single_stream.SingleStream.step

    def timed_prefill(*args, **kwargs):
        start = time.perf_counter()
        prefill(*args, **kwargs)
        parts["prefill_s"] = time.perf_counter() - start

    def timed_step(self, *args, **kwargs):
        start = time.perf_counter()
        out = step(self, *args, **kwargs)
        parts.setdefault("first_step_s", time.perf_counter() - start)
        return out

    single_stream.prefill, single_stream.SingleStream.step = timed_prefill, timed_step
    path = Path(folder)
    engine = MLXEngine(ModelCatalog({path.name: path}),
                       EngineConfig(path.name, dtype, max_batch_size=32, prompt_cache_bytes="0.05"))

    async def run() -> list[dict]:
        start = time.perf_counter()
        await engine.start()
        if variant == "twice":
            await engine._warm_up()
        started = time.perf_counter() - start
        rows = []
        try:
            for i in range(6):
                parts.clear()
                params = GenerationParams(prompt=numbered_prompt(i), max_tokens=tokens, ignore_eos=True)
                async for event in engine.generate(params):
                    if isinstance(event, Finished):
                        rows.append({"ttft_s": event.time_to_first_token_s, **parts})
        finally:
            await engine.stop()
        rows[0]["start_s"] = started
        return rows

    rows = asyncio.run(run())
    steady = {key: statistics.median(r[key] for r in rows[1:]) for key in ("ttft_s", "prefill_s", "first_step_s")}
    return {"dtype": dtype, "variant": variant, "first": {k: round(v, 5) for k, v in rows[0].items()},
            "steady": {k: round(v, 5) for k, v in steady.items()},
            "first_over_steady": round(rows[0]["ttft_s"] / steady["ttft_s"], 3)}


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "first-request")
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--variants", nargs="+", default=["as_is", "twice"])
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per dtype and variant")
    p.add_argument("--child", nargs=3, metavar=("FOLDER", "DTYPE", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(measure(*a.child, a.tokens)), flush=True)
        os._exit(0)  # MLX's CUDA teardown at interpreter exit can abort after the result is out
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    results = []
    for _ in range(a.repeats):
        for dtype in a.dtypes:
            for variant in a.variants:
                out = subprocess.run([sys.executable, "-m", "bench.first_request", "--child", str(folder), dtype,
                                      variant, "--tokens", str(a.tokens)], cwd=ROOT, capture_output=True, text=True)
                line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
                result = json.loads(line) if line.startswith("{") else \
                    {"dtype": dtype, "variant": variant, "error": out.stderr.strip()[-500:]}
                print(json.dumps(result), flush=True)
                results.append(result)
    write_result(a.name, {"shape": a.shape, "results": results})
    return {"results": results}


if __name__ == "__main__":
    main()
