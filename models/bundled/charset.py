"""Character-level tokenizer for the bundled model, built with the `tokenizers` library (no mlx)."""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIALS)

# Chat template: <bos> followed by the concatenated message contents (system/user/assistant),
# so [{"role": "user", "content": "17+25="}] gives "<bos>17+25=", the same tokens as the
# completion prompt "17+25=" (which gets <bos> from the post-processor). The generation
# prompt adds nothing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
)


def encode_text(text: str) -> list[int]:
    """Fast pure-Python encoding of plain text (no special tokens), identical to tokenizer.json."""
    return [VOCAB.get(ch, UNK_ID) for ch in text]


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tok = Tokenizer(models.BPE(vocab=dict(VOCAB), merges=[], unk_token=UNK))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    # Fuse concatenates the characters: no spaces are inserted between tokens on decode.
    tok.decoder = decoders.Fuse()
    return tok


def save_tokenizer(out: Path, model_max_length: int) -> None:
    out = Path(out)
    build_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
