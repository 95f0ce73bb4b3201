"""Sequences with reused KV caches joining a batch: mlx-lm's BatchGenerator vs dtype-serve's
LeanBatchGenerator (models/mlx_lm_ext/batch_cache.py), in one process, taking turns:

    python -m bench.admission --shape llama-25m --dtype float32 --vocab 32000 --rows 8 --trials 7

Each trial prefills the shared prompt once, gives `rows` sequences a copy of that cache (all but the
prompt's last token, as the server's prefix cache does for a repeated prompt), inserts them into a fresh
generator of each kind and times the calls until every row has its first token, then a few more steps.
The ratio is mlx-lm's time to the first tokens over ours, per trial (median over trials). The tokens of
both must match.
"""

from __future__ import annotations

import copy
import statistics
import time

from bench.baselines import load
from bench.common import PROMPT, ensure_model, gpu_model_parser, write_result


def first_tokens(cls, model, caches: list, last: int, context: list[int], steps: int) -> tuple[float, list]:
    """Seconds until every row has its first token, and the tokens of `steps` calls after that."""
    gen = cls(model, completion_batch_size=len(caches), prefill_batch_size=len(caches))
    uids = gen.insert([[last]] * len(caches), max_tokens=[steps + 2] * len(caches), caches=caches,
                      all_tokens=[context] * len(caches))
    start, tokens = time.perf_counter(), {uid: [] for uid in uids}
    while any(not t for t in tokens.values()):
        for r in gen.next_generated():
            tokens[r.uid].append(r.token)
    elapsed = time.perf_counter() - start
    for _ in range(steps):
        for r in gen.next_generated():
            tokens[r.uid].append(r.token)
    return elapsed, [tokens[uid] for uid in uids]


def main(argv: list[str] | None = None) -> dict:
    p = gpu_model_parser(__doc__, "admission")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--trials", type=int, default=7)
    a = p.parse_args(argv)
    folder = ensure_model(a.shape, "bfloat16", vocab=a.vocab)
    model, tokenizer = load(str(folder), a.dtype)
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache

    from models.mlx_lm_ext.batch_generator import LeanBatchGenerator

    prompt = tokenizer.encode(PROMPT)
    stored = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=stored)
    mx.eval([c.state for c in stored])

    def caches() -> list:
        return [copy.deepcopy(stored) for _ in range(a.rows)]

    for cls in (BatchGenerator, LeanBatchGenerator):  # warm both paths' shapes
        first_tokens(cls, model, caches(), prompt[-1], prompt[:-1], 2)
    base, ours, ratios = [], [], []
    for _ in range(a.trials):
        ref_s, ref_tokens = first_tokens(BatchGenerator, model, caches(), prompt[-1], prompt[:-1], 4)
        our_s, our_tokens = first_tokens(LeanBatchGenerator, model, caches(), prompt[-1], prompt[:-1], 4)
        if our_tokens != ref_tokens:
            raise SystemExit("the lean generator gave other tokens than mlx-lm's")
        base.append(ref_s * 1e3)
        ours.append(our_s * 1e3)
        ratios.append(ref_s / our_s)
    out = {"shape": a.shape, "dtype": a.dtype, "vocab": a.vocab, "rows": a.rows, "cached_tokens": len(prompt) - 1,
           "trials": a.trials, "mlx_lm_first_tokens_ms": round(statistics.median(base), 1),
           "lean_first_tokens_ms": round(statistics.median(ours), 1),
           "speedup": round(statistics.median(ratios), 3), "trials_speedup": [round(r, 3) for r in ratios]}
    print(out)
    print(f"wrote {write_result(a.name, out)}")
    return out


if __name__ == "__main__":
    main()
