"""Write a benchmark llama (mlx-lm layout) as GGUF for llama.cpp, the same weights: F32 or F16, and Q8_0 or
Q4_0 through llama.cpp's own llama-quantize (scripts/install-llama-cpp.sh builds it).

    python -m bench.gguf bench/models/llama-25m-float32-vocab32000 --types F32 Q8_0 Q4_0
    python -m bench.gguf bench/models/llama-25m-float32-vocab32000 --check F32

Writes <folder>/model-<TYPE>.gguf; `--check` compares llama-server's greedy tokens on it with dtype-serve's
at float32 (bench/results/gguf-agreement-<TYPE>.json). The tokenizer goes in as its token list (a BPE with
no merges that apply); the benchmark sends token ids, so llama.cpp's own text tokenization never decides
what a prompt is. q and k projections are permuted as llama.cpp's converter does (its llama RoPE rotates
adjacent pairs, mlx-lm's and Hugging Face's the two halves), so greedy tokens agree at float32 (`--check`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

LLAMA_CPP = Path(__file__).resolve().parent / ".llama-cpp" / "build" / "bin"
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, _, layer, rest = name.split(".", 3)  # model.layers.<i>.<rest>
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def pairs_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection reordered from rotating halves to rotating adjacent pairs, per head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(folder: Path, out: Path, float_type: str = "F32") -> Path:
    """The checkpoint in `folder` as a GGUF file of F32 or F16 tensors (norms stay F32, as llama.cpp's)."""
    import gguf
    import mlx.core as mx

    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] != "llama" or config.get("rope_traditional"):
        raise SystemExit("bench.gguf writes the benchmark's llamas only")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if float_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    special = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    # llama.cpp's BPE needs a merges list; one of two control tokens never applies to text
    writer.add_token_merges([f"{vocab[0][0]} {vocab[1][0]}"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_add_bos_token(False)
    for name, value in mx.load(str(folder / "model.safetensors")).items():
        array = np.array(value.astype(mx.float32))
        if name.endswith("q_proj.weight"):
            array = pairs_rope(array, heads)
        elif name.endswith("k_proj.weight"):
            array = pairs_rope(array, kv_heads)
        if float_type == "F16" and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def ensure_gguf(folder: Path, gguf_type: str) -> Path:
    """<folder>/model-<type>.gguf, written (F32, F16) or quantized from F32 by llama-quantize once."""
    out = folder / f"model-{gguf_type}.gguf"
    if out.exists():
        return out
    if gguf_type in ("F32", "F16"):
        return write_gguf(folder, out, gguf_type)
    source = ensure_gguf(folder, "F32")
    quantize = LLAMA_CPP / "llama-quantize"
    if not quantize.exists():
        raise SystemExit(f"{quantize} missing: run scripts/install-llama-cpp.sh first")
    subprocess.run([str(quantize), str(source), str(out), gguf_type], check=True, capture_output=True)
    return out


def check_agreement(folder: Path, gguf_type: str, tokens: int = 48) -> dict:
    """Greedy tokens of dtype-serve (float32) and llama-server (the GGUF) for the same prompt ids."""
    from contextlib import ExitStack

    import httpx

    from bench.common import PROMPT, free_port, numbered_prompt
    from bench.serving import llama_cpp_server, ours, prompt_ids

    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    prompts = [PROMPT] + [numbered_prompt(i) for i in range(3)]
    rows = []
    with ExitStack() as stack:
        mine, theirs = free_port(), free_port()
        stack.enter_context(ours(folder, "float32", mine, "auto", 4)[0])
        stack.enter_context(llama_cpp_server(folder, theirs, gguf_type, 1)[0])
        for prompt in prompts:
            served = httpx.post(f"http://127.0.0.1:{mine}/v1/completions", timeout=300, json={
                "model": folder.name, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"]
            ours_ids = [vocab[t] for t in served]
            ids = prompt_ids(folder, prompt)
            reply = httpx.post(f"http://127.0.0.1:{theirs}/completion", timeout=300, json={
                "prompt": ids, "n_predict": tokens, "temperature": 0, "return_tokens": True}).json()
            same = next((i for i, (a, b) in enumerate(zip(ours_ids, reply["tokens"], strict=False)) if a != b),
                        min(len(ours_ids), len(reply["tokens"])))
            rows.append({"prompt": prompt, "agree_first": same, "of": len(ours_ids)})
    return {"gguf": gguf_type, "tokens": tokens, "prompts": rows,
            "all_equal": all(r["agree_first"] == r["of"] == tokens for r in rows)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--types", nargs="+", default=["F32"], choices=["F32", "F16", "Q8_0", "Q4_0"])
    p.add_argument("--check", metavar="TYPE", choices=["F32", "F16", "Q8_0", "Q4_0"],
                   help="compare llama-server's greedy tokens on this GGUF with dtype-serve's at float32")
    a = p.parse_args(argv)
    if a.check:
        from bench.common import write_result

        result = check_agreement(a.folder, a.check)
        print(json.dumps(result, indent=1))
        print("wrote", write_result(f"gguf-agreement-{a.check}", result))
        return
    for gguf_type in a.types:
        print(ensure_gguf(a.folder, gguf_type))


if __name__ == "__main__":
    main()
