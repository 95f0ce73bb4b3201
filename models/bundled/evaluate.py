"""Held-out greedy accuracy of the bundled model, per dtype, printed as JSON.

    python -m models.bundled.evaluate [--model PATH] [--dtypes float32 bfloat16 float16]

Importing this module does not import mlx; main() chooses the BLAS first.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from models.bundled import charset, tasks
from models.platform.blas import configure_blas

DEFAULT_MODEL = Path(__file__).resolve().parent / "tiny-arith"


def batched_greedy(model, prompts: list[str], max_new: int = 4) -> list[str]:
    """Greedy completions (text before <eos>) for plain prompts, batched by prompt length.

    Encodes like the bundled tokenizer with special tokens (<bos> + characters).
    """
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    groups: dict[int, list[int]] = defaultdict(list)
    encoded = [[charset.BOS_ID] + charset.encode_text(p) for p in prompts]
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    inv = {v: k for k, v in charset.VOCAB.items()}
    out = [""] * len(prompts)
    for idxs in groups.values():
        cache = make_prompt_cache(model)
        x = mx.array([encoded[i] for i in idxs])
        new = []
        for _ in range(max_new):
            nxt = mx.argmax(model(x, cache=cache)[:, -1, :], axis=-1)
            new.append(nxt)
            x = nxt[:, None]
        gen = mx.stack(new, axis=1).tolist()
        for i, row in zip(idxs, gen, strict=True):
            text = []
            for t in row:
                if t == charset.EOS_ID:
                    break
                text.append(inv.get(t, ""))
            out[i] = "".join(text)
    return out


def batched_greedy_accuracy(model, items: list[tuple[str, str]]) -> float:
    gens = batched_greedy(model, [p for p, _ in items])
    return sum(tasks.is_correct(e, g) for (_, e), g in zip(items, gens, strict=True)) / len(items)


def generate_accuracy(model, tokenizer, items: list[tuple[str, str]], max_tokens: int = 8) -> float:
    """Accuracy through the real serving path: mlx_lm.generate, greedy (default sampler)."""
    from mlx_lm import generate

    ok = 0
    for prompt, expected in items:
        ok += tasks.is_correct(expected, generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens))
    return ok / len(items)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    p.add_argument("--n", type=int, default=None, help="evaluate a deterministic subset of n prompts")
    p.add_argument("--generate", action="store_true",
                   help="decode each prompt with mlx_lm.generate (the serving path; ~2 min for 3 dtypes)"
                   " instead of the batched greedy decoder")
    args = p.parse_args(argv)
    configure_blas("auto")

    import mlx.core as mx
    from mlx_lm import load

    items = tasks.heldout_prompts(args.n)
    results = {"model": args.model, "n_prompts": len(items),
               "method": "mlx_lm.generate" if args.generate else "batched-greedy", "accuracy": {}}
    for name in args.dtypes:
        model, tokenizer = load(args.model)
        model.set_dtype(getattr(mx, name))
        t0 = time.perf_counter()
        if args.generate:
            acc = generate_accuracy(model, tokenizer, items)
        else:
            acc = batched_greedy_accuracy(model, items)
        results["accuracy"][name] = round(acc, 4)
        results.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
