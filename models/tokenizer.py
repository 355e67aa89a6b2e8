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
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists() \
        or (path / "vocab.json").exists()


def load_tokenizer(path: str | Path):
    """AutoTokenizer without remote code; checkpoints whose tokenizer class is remote code (Dream's
    DreamTokenizer) fall back to their tokenizer.json, or to vocab.json + merges.txt as a Qwen2 byte-level
    BPE, with the chat template from tokenizer_config.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    path = Path(path)
    hf_logging.set_verbosity_error()   # config.json's model_type is unknown to transformers: that is expected
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except Exception as first:  # remote tokenizer class, or an unknown tokenizer_class name
        bpe_files = (path / "vocab.json").exists() and (path / "merges.txt").exists()
        if not (path / "tokenizer.json").exists() and not bpe_files:
            raise ValueError(f"cannot load the tokenizer in {path}: {first}") from first
        cfg = {}
        if (path / "tokenizer_config.json").exists():
            cfg = json.loads((path / "tokenizer_config.json").read_text())
        kwargs = {k: cfg[k] for k in ("eos_token", "pad_token", "mask_token", "bos_token", "unk_token")
                  if isinstance(cfg.get(k), str)}
        if (path / "tokenizer.json").exists():
            try:
                tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **kwargs)
            except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
                raise ValueError(f"{path / 'tokenizer.json'} is not a valid tokenizer file ({e})") from None
        else:
            tok = _qwen2_bpe_tokenizer(path, cfg, kwargs)
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        tok.chat_template = template
        return tok


def _qwen2_bpe_tokenizer(path: Path, cfg: dict, special_kwargs: dict):
    """Dream ships only vocab.json + merges.txt for its remote ``DreamTokenizer``, which is Qwen2's byte-level
    BPE (same pre-tokenizer regex, NFC): build transformers' Qwen2Tokenizer from them, with the added tokens
    at the ids tokenizer_config.json's ``added_tokens_decoder`` gives (<|endoftext|>, <|mask|>, <|im_end|>,
    ...)."""
    from transformers import AddedToken, Qwen2Tokenizer

    added = {int(i): AddedToken(t["content"], special=t.get("special", True),
                                normalized=t.get("normalized", False), lstrip=t.get("lstrip", False),
                                rstrip=t.get("rstrip", False), single_word=t.get("single_word", False))
             for i, t in (cfg.get("added_tokens_decoder") or {}).items()}
    vocab = json.loads((path / "vocab.json").read_text())
    for i, t in added.items():      # pin each added token to its id (the BPE model then owns that id)
        vocab.setdefault(t.content, i)
    lines = (path / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(m.split()) for m in lines if m.strip() and not m.startswith("#version")]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, added_tokens_decoder=added, **special_kwargs)
