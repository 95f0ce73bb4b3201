"""MLX on the CPU under glibc's malloc vs a thread-caching allocator (models/platform/allocator.py), each in
processes of its own taking turns:

    python -m bench.allocator --shape llama-25m --vocab 32000 --rounds 3

Per allocator (glibc, then those installed: tcmalloc, jemalloc; or --libraries PATH...): the cost of one MLX
graph node (a chain of 400 `+ 1` on 512 floats, evaluated: microseconds a node) and a lone float32 decode step of
the generated model as the server loads it (the median of a stream of 63 steps, 41-token prompts, repeated for
--seconds). Ratios are glibc's time over the allocator's, the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from bench.common import ROOT, SHAPES, ensure_model, write_result
from models.platform.allocator import installed_allocators

CHILD = """
import json, statistics, sys, time
from pathlib import Path
from models.platform.compat import prepare_mlx
prepare_mlx("auto")
import mlx.core as mx
from models.decode.single_stream import SingleStream
from models.weights.loader import load_variant

folder, seconds = Path(sys.argv[1]), float(sys.argv[2])
x, one = mx.ones((1, 512)), mx.array(1.0)
mx.eval(x, one)
chain = []
for _ in range(200):
    y = x
    for _ in range(400):
        y = y + one
    start = time.perf_counter()
    mx.eval(y)
    chain.append((time.perf_counter() - start) / 400)
model = load_variant("m", folder, "float32").model
prompt = [(7 * i) % 31000 + 5 for i in range(41)]
steps, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    stream = SingleStream(model, prompt, 64, None, [], set(), 0)
    for _ in range(63):
        start = time.perf_counter()
        stream.step()
        steps.append(time.perf_counter() - start)
print(json.dumps({"node_us": statistics.median(chain) * 1e6, "step_ms": statistics.median(steps) * 1e3,
                  "steps": len(steps)}))
"""


def measure(folder, library: str | None, seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if library:
        env["LD_PRELOAD"] = library
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(seconds)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-25m", choices=sorted(SHAPES))
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=6.0, help="decode steps measured per process")
    p.add_argument("--libraries", nargs="*", help="allocator libraries to compare (default: those installed)")
    p.add_argument("--name", default=None, help="results file: bench/results/NAME.json")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "float32", vocab=a.vocab)
    libraries = {os.path.basename(x): x for x in (a.libraries or installed_allocators())}
    if not libraries:
        raise SystemExit("no thread-caching allocator installed (libtcmalloc-minimal4, libjemalloc2)")
    runs: dict[str, list[dict]] = {"glibc": [], **{name: [] for name in libraries}}
    for r in range(a.rounds):
        for name in runs:
            runs[name].append(measure(folder, libraries.get(name), a.seconds))
            print(f"round {r + 1} {name}: {runs[name][-1]}", flush=True)
    base = runs["glibc"]
    result = {"shape": a.shape, "vocab": a.vocab, "rounds": a.rounds, "runs": runs, "ratios": {
        name: {"node": statistics.median(b["node_us"] / m["node_us"] for b, m in zip(base, mine, strict=True)),
               "step": statistics.median(b["step_ms"] / m["step_ms"] for b, m in zip(base, mine, strict=True))}
        for name, mine in runs.items() if name != "glibc"}}
    print(json.dumps(result["ratios"], indent=1))
    print(f"wrote {write_result(a.name or f'allocator-{a.shape}-v{a.vocab}', result)}")
    return result


if __name__ == "__main__":
    main()
