"""The alternative a CUDA user would pick: PyTorch + transformers `generate`, same llama shape.

    python -m bench.torch_generate CONFIG_JSON DTYPE BATCH TOKENS
Random weights (speed only); greedy; prints {"tok_s", "tokens", "batch"}.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_path, dtype, batch, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    c = json.loads(open(config_path).read())
    config = LlamaConfig(hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
                         intermediate_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
                         num_key_value_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"],
                         max_position_embeddings=c["max_position_embeddings"], rms_norm_eps=c["rms_norm_eps"],
                         tie_word_embeddings=c.get("tie_word_embeddings", False))
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch_dtype).eval()
    prompt = torch.randint(3, c["vocab_size"], (batch, 32), device="cuda")

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()
        assert out.shape[1] == 32 + tokens
        return time.perf_counter() - start

    run()
    seconds = run()
    print(json.dumps({"tok_s": batch * tokens / seconds, "tokens": batch * tokens, "batch": batch}))


if __name__ == "__main__":
    main()
