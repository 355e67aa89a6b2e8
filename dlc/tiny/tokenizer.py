"""The character-level tokenizer of dlc-tiny: specials + printable ASCII, one token per character.

Saved as a real Hugging Face ``tokenizer.json`` (a BPE model with no merges, so every character is its own
token and anything outside the alphabet becomes ``<|unk|>``) plus ``tokenizer_config.json`` with the chat
template, so ``dlc.models.tokenizer.load_tokenizer`` opens it as a ``PreTrainedTokenizerFast`` like any
checkpoint's tokenizer."""
from __future__ import annotations

# Special ids are fixed: the model config (mask/eos/pad/stop ids) and the training data refer to them.
SPECIALS = ["<|eos|>", "<|mask|>", "<|eot|>", "<|user|>", "<|assistant|>", "<|system|>", "<|unk|>"]
EOS_ID, MASK_ID, EOT_ID, USER_ID, ASSISTANT_ID, SYSTEM_ID, UNK_ID = range(len(SPECIALS))
ALPHABET = [chr(c) for c in range(32, 127)]          # space .. '~': digits, letters, punctuation
VOCAB_SIZE = len(SPECIALS) + len(ALPHABET)            # 102

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_ids() -> dict[str, int]:
    return {ch: len(SPECIALS) + i for i, ch in enumerate(ALPHABET)}


def build_tokenizer():
    """A fresh PreTrainedTokenizerFast with the fixed vocabulary above."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)} | char_ids()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|unk|>"))
    # concatenate characters (the default decoder would join with spaces)
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>",
                                   mask_token="<|mask|>", unk_token="<|unk|>",
                                   additional_special_tokens=SPECIALS[2:6])
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def encode_chat(content: str) -> list[int]:
    """The ids the chat template gives for one user turn plus the assistant marker, without transformers:
    the training loop builds millions of these."""
    ids = char_ids()
    return [USER_ID] + [ids.get(ch, UNK_ID) for ch in content] + [EOT_ID, ASSISTANT_ID]


def encode_text(text: str) -> list[int]:
    ids = char_ids()
    return [ids.get(ch, UNK_ID) for ch in text]


def decode_ids(ids: list[int]) -> str:
    """Characters of ids, specials dropped (what ``tokenizer.decode(..., skip_special_tokens=True)``
    gives)."""
    n = len(SPECIALS)
    return "".join(ALPHABET[i - n] for i in ids if n <= i < VOCAB_SIZE)
