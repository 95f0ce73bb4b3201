"""Structured output's cost when serving: aggregate tokens/s at N clients with every request under a JSON
schema vs the same requests unconstrained, on one server, side by side in one run.

    python -m bench.structured --shape llama-25m --vocab 32000 --clients 8 --trials 3

The two loads take turns, trial after trial (in a rotating order), on the same server and prompt; the
unconstrained requests generate max_tokens (ignore_eos), the constrained ones until their document is
complete or max_tokens. Ratio: the medians' aggregate tokens/s, constrained / unconstrained; paired: the
median of each trial's own ratio.
Results: bench/results/structured-<shape>[-vocab<n>].json (or --name).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys

from bench.common import PROMPT, ensure_model, free_port, load_run, server, write_result

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["rows"], "properties": {
    "rows": {"type": "array", "minItems": 3, "maxItems": 3, "items": {
        "type": "object", "additionalProperties": False, "required": ["id", "name", "ok"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "name": {"type": "string", "maxLength": 24}, "ok": {"type": "boolean"}}}}}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-25m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--name", help="results file: bench/results/NAME.json")
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, a.dtype, vocab=a.vocab)
    port = free_port()
    cmd = [sys.executable, "-m", "server", "--model", str(folder), "--dtype", a.dtype, "--port", str(port),
           "--max-batch-size", str(max(8, a.clients)), "--max-queue", "256", "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}/v1/completions"
    plain = {"model": folder.name, "prompt": PROMPT, "max_tokens": a.max_tokens, "temperature": 0.0,
             "ignore_eos": True}
    loads = {"unconstrained": plain,
             "json_schema": {**plain, "ignore_eos": False,
                             "response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}}
    runs: dict[str, list[dict]] = {k: [] for k in loads}
    with server(cmd, f"http://127.0.0.1:{port}/health/ready"):
        for body in loads.values():  # warm-up
            asyncio.run(load_run(url, body, a.clients, 1))
        for trial in range(a.trials):
            order = list(loads) if trial % 2 == 0 else list(reversed(loads))
            for label in order:
                run = asyncio.run(load_run(url, loads[label], a.clients, a.requests_per_client))
                runs[label].append(run)
                print(trial, label, run["aggregate_tok_s"], "tok/s", run["tokens"], "tokens", flush=True)
    medians = {k: statistics.median(r["aggregate_tok_s"] for r in v) for k, v in runs.items()}
    result = {"shape": a.shape, "dtype": a.dtype, "vocab": a.vocab, "clients": a.clients, "max_tokens": a.max_tokens,
              "schema": SCHEMA, "trials": runs, "median_aggregate_tok_s": medians,
              "ratio_json_schema_vs_unconstrained": round(medians["json_schema"] / medians["unconstrained"], 3),
              "paired_ratio": round(statistics.median(
                  c["aggregate_tok_s"] / u["aggregate_tok_s"]
                  for c, u in zip(runs["json_schema"], runs["unconstrained"], strict=True)), 3),
              "note": "2 CPU cores shared with other developers' jobs while it ran"}
    vocab = f"-v{a.vocab // 1000}k" if a.vocab != 100 else ""
    name = a.name or f"structured-{a.shape.removeprefix('llama-')}{vocab}"
    path = write_result(name, result)
    print(f"ratio {result['ratio_json_schema_vs_unconstrained']} (paired {result['paired_ratio']}) -> {path}")
    return result


if __name__ == "__main__":
    main()
