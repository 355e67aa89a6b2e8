"""Tokenizer loading without remote code, plus the byte-level tokenizer of the tiny test presets."""
from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")

# Chat template for tokenizers that ship none (the tiny presets): user/assistant turns, end-of-turn token.
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
BYTE_SPECIALS = ["<|eos|>", "<|mask|>", "<|eot|>", "<|user|>", "<|assistant|>", "<|system|>"]


def byte_tokenizer():
    """A 256-byte vocabulary plus BYTE_SPECIALS (ids 256..261): lossless on any text, no training needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(BYTE_SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>",
                                   mask_token="<|mask|>")
    fast.chat_template = SIMPLE_CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists() or (path / "vocab.json").exists()


def load_tokenizer(path: str | Path):
    """AutoTokenizer without remote code; checkpoints whose tokenizer class is remote code (Dream's
    DreamTokenizer) fall back to their tokenizer.json with the chat template from tokenizer_config.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.set_verbosity_error()   # config.json's model_type is unknown to transformers: that is expected
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as first:  # remote tokenizer class, or an unknown tokenizer_class name
        if not (path / "tokenizer.json").exists():
            raise ValueError(f"cannot load the tokenizer in {path}: {first}") from first
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        kwargs = {k: cfg[k] for k in ("eos_token", "pad_token", "mask_token", "bos_token", "unk_token")
                  if isinstance(cfg.get(k), str)}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        tok.chat_template = template
        return tok
