"""Train the bundled tiny-arith model (mlx-lm llama, character vocabulary) from scratch.

    python -m models.bundled.train --out models/bundled/tiny-arith

Deterministic (fixed seeds), CPU float32, a few minutes on 2 cores with OpenBLAS.
Weights are saved in bfloat16 in the mlx-lm layout.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from models.bundled import charset, tasks

# The BLAS must be chosen before anything imports mlx.
from models.platform.blas import configure_blas

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "rms_norm_eps": 1e-5,
    "vocab_size": len(charset.VOCAB),
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
    "rope_traditional": False,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": charset.BOS_ID,
    "eos_token_id": charset.EOS_ID,
    "pad_token_id": charset.PAD_ID,
    "torch_dtype": "bfloat16",
}

ARITH_LEN = 11  # "<bos>99+99=198<eos>" is 11 tokens: inputs/targets are 10 long
ENGLISH_WINDOW = 64


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/bundled/tiny-arith")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=256, help="arithmetic samples per step")
    p.add_argument("--english-batch", type=int, default=16, help="64-token English windows per English step")
    p.add_argument("--english-every", type=int, default=4, help="add an English batch every N steps")
    p.add_argument("--english-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=250)
    return p.parse_args(argv)


def arithmetic_batch(arith, batch: int):
    """Token rows (padded to ARITH_LEN) and a loss mask covering the answer and <eos>."""
    rows, masks = [], []
    for _ in range(batch):
        prompt, answer = next(arith)
        p = [charset.BOS_ID] + charset.encode_text(prompt)
        a = charset.encode_text(answer) + [charset.EOS_ID]
        ids = p + a
        pad = ARITH_LEN - len(ids)
        rows.append(ids + [charset.PAD_ID] * pad)
        # mask over targets (ids[1:]): answer tokens and <eos>
        masks.append([0] * (len(p) - 1) + [1] * len(a) + [0] * pad)
    return rows, masks


class EnglishStream:
    """Packed English text: <bos>sentence(s)<eos><bos>... cut into fixed windows."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.buf: list[int] = []

    def window(self, n: int) -> list[int]:
        while len(self.buf) < n + 1:
            self.buf += [charset.BOS_ID] + charset.encode_text(tasks.english_text(self.rng)) + [charset.EOS_ID]
        out, self.buf = self.buf[: n + 1], self.buf[n:]
        return out

    def batch(self, batch: int, n: int) -> list[list[int]]:
        return [self.window(n) for _ in range(batch)]


def main(argv=None) -> None:
    args = parse_args(argv)
    blas = configure_blas("auto")

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    from models.bundled.evaluate import batched_greedy_accuracy

    print(f"blas: {blas.as_dict()}", flush=True)
    mx.random.seed(args.seed)
    arith = tasks.arithmetic_samples(random.Random(args.seed + 1))
    english = EnglishStream(random.Random(args.seed + 2))

    model = llama.Model(llama.ModelArgs.from_dict(MODEL_CONFIG))
    model.set_dtype(mx.float32)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"parameters: {n_params:,}", flush=True)

    def schedule(step):
        warm = step / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        cos = 0.5 * (1 + mx.cos(math.pi * mx.clip(progress, 0.0, 1.0)))
        return args.lr * mx.where(step < args.warmup, warm, 0.05 + 0.95 * cos)

    opt = optim.AdamW(learning_rate=schedule, betas=[0.9, 0.98], weight_decay=args.weight_decay)

    def arith_loss_fn(model, ids, mask):
        ce = nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="none")
        return (ce * mask).sum() / mask.sum()

    def english_loss_fn(model, ids):
        return nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:], reduction="mean")

    def combined_loss_fn(model, ids, mask, eng_ids):
        return arith_loss_fn(model, ids, mask) + args.english_weight * english_loss_fn(model, eng_ids)

    arith_grad = nn.value_and_grad(model, arith_loss_fn)
    combined_grad = nn.value_and_grad(model, combined_loss_fn)

    eval_prompts = tasks.heldout_prompts(200)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows, masks = arithmetic_batch(arith, args.batch)
        ids, mask = mx.array(rows), mx.array(masks, dtype=mx.float32)
        if step % args.english_every == 0:
            eng = mx.array(english.batch(args.english_batch, ENGLISH_WINDOW))
            loss, grads = combined_grad(model, ids, mask, eng)
        else:
            loss, grads = arith_grad(model, ids, mask)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if step % 50 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {opt.learning_rate.item():.2e}  "
                  f"{time.perf_counter() - t0:6.1f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            acc = batched_greedy_accuracy(model, eval_prompts)
            print(f"step {step:5d}  heldout-200 greedy acc {acc:.3f}", flush=True)
    train_time = time.perf_counter() - t0

    acc = batched_greedy_accuracy(model, tasks.heldout_prompts())
    print(f"final float32 held-out greedy acc (training weights): {acc:.4f}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.bfloat16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(MODEL_CONFIG, indent=2) + "\n")
    charset.save_tokenizer(out, MODEL_CONFIG["max_position_embeddings"])
    info = {
        "parameters": n_params,
        "steps": args.steps,
        "batch": args.batch,
        "english_batch": args.english_batch,
        "english_every": args.english_every,
        "lr": args.lr,
        "seed": args.seed,
        "train_seconds": round(train_time, 1),
        "heldout_acc_float32_training_weights": round(acc, 4),
        "blas": blas.vendor,
    }
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
