"""Per-token cost of a JSON-schema token mask in two structured-output libraries that install without
torch (llguidance, outlines-core; xgrammar's wheel requires torch), on the bundled model's tokenizer
and on a 32K-vocabulary synthetic llama's (models.testing.synthetic pads the same tokenizer).

Each run walks one valid document: per token, advance the grammar by the chosen token and compute the
next mask (what a decode step adds per constrained row), picking a random allowed token (seeded).

    python -m bench.structured_libs [--out bench/results/structured-libs.json]
    (outlines-core measured from a side install: PYTHONPATH=/tmp/oc after `pip install --target /tmp/oc outlines-core`)
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from models.testing.synthetic import BUNDLED, TOKENIZER_FILES, pad_tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
TOKENS = 200  # at most, per walk


def _allowed(bits: np.ndarray, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab])


def walk_llguidance(tokenizer_json: Path, eos: int, vocab: int, seed: int) -> dict:
    import llguidance
    from transformers import AutoTokenizer

    from models.decode.constraints import grammar_tokenizer

    start = time.perf_counter()
    tok = grammar_tokenizer(AutoTokenizer.from_pretrained(tokenizer_json.parent))
    made = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matcher = llguidance.LLMatcher(tok, grammar)
    compiled = time.perf_counter()
    bits = np.zeros((vocab + 31) // 32, np.int32)
    rng, times, n = random.Random(seed), [], 0
    for n in range(TOKENS):  # noqa: B007
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        allowed = _allowed(bits, vocab)
        token = int(rng.choice(allowed))
        if token == eos:
            times.append(time.perf_counter() - t0)
            break
        assert matcher.consume_token(token), matcher.get_error()
        times.append(time.perf_counter() - t0)
    return {"tokenizer_s": made - start, "compile_s": compiled - made, "tokens": n + 1,
            "mask_us_mean": 1e6 * float(np.mean(times)), "mask_us_p99": 1e6 * float(np.percentile(times, 99))}


def walk_outlines(tokenizer_json: Path, eos: int, vocab: int, seed: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    data = json.loads(tokenizer_json.read_text())
    special = {t["content"] for t in data["added_tokens"]}
    pieces: dict[str, list[int]] = {}
    for text, i in data["model"]["vocab"].items():
        if text not in special and i < vocab:
            pieces.setdefault(text, []).append(i)
    vocabulary = Vocabulary(eos, pieces)
    made = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = Guide(index)
    compiled = time.perf_counter()
    bits = np.zeros((vocab + 31) // 32, np.int32)
    rng, times, n = random.Random(seed), [], 0
    for n in range(TOKENS):  # noqa: B007
        t0 = time.perf_counter()
        guide.write_mask_into(bits.ctypes.data, bits.size, bits.itemsize)
        allowed = _allowed(bits, vocab)
        token = int(rng.choice(allowed))
        if token == eos:
            times.append(time.perf_counter() - t0)
            break
        guide.advance(token)
        times.append(time.perf_counter() - t0)
    return {"tokenizer_s": made - start, "compile_s": compiled - made, "tokens": n + 1,
            "mask_us_mean": 1e6 * float(np.mean(times)), "mask_us_p99": 1e6 * float(np.percentile(times, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict = {"schema": SCHEMA, "note": "2 shared CPU cores (other developers' jobs running)"}
    with tempfile.TemporaryDirectory() as tmp:
        padded = Path(tmp)
        for name in TOKENIZER_FILES:
            if (BUNDLED / name).exists():
                (padded / name).write_bytes((BUNDLED / name).read_bytes())
        pad_tokenizer(padded, 32000)
        for label, folder, vocab in (("bundled-100", BUNDLED, 100), ("synthetic-32k", padded, 32000)):
            for lib, walk in (("llguidance", walk_llguidance), ("outlines-core", walk_outlines)):
                try:
                    runs = [walk(folder / "tokenizer.json", 2, vocab, seed) for seed in range(3)]
                except ImportError as e:
                    results[f"{lib}/{label}"] = {"error": str(e)}
                    continue
                mean = float(np.mean([r["mask_us_mean"] for r in runs]))
                results[f"{lib}/{label}"] = {**runs[0], "mask_us_mean": mean, "walks": [r["tokens"] for r in runs]}
                print(lib, label, json.dumps(results[f"{lib}/{label}"]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
