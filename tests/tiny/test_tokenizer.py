"""The bundled character tokenizer: a real HF tokenizer.json whose chat template works through
encode_prompt."""
import json
from pathlib import Path

import pytest

from dlc.models.loading import read_config
from dlc.models.presets import PRESETS
from dlc.models.tokenizer import load_tokenizer
from dlc.runtime.session import Session, decode_tokens, encode_prompt
from dlc.tiny.tokenizer import (ALPHABET, EOS_ID, EOT_ID, MASK_ID, SPECIALS, UNK_ID, VOCAB_SIZE,
                                build_tokenizer, decode_ids, encode_chat, encode_text)

ASSET = Path(PRESETS["dlc-tiny"]["path"])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSET)


def test_files_and_ids_match_the_model_config(tok):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert json.loads((ASSET / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert "chat_template" in json.loads((ASSET / "tokenizer_config.json").read_text())
    cfg = read_config(ASSET)
    assert len(tok) == VOCAB_SIZE == cfg.vocab_size
    assert tok.mask_token_id == cfg.mask_id == MASK_ID
    assert tok.eos_token_id == cfg.eos_id == cfg.pad_id == EOS_ID
    assert tok.convert_tokens_to_ids("<|eot|>") == EOT_ID and set(cfg.stop_ids) == {EOS_ID, EOT_ID}
    assert [tok.convert_tokens_to_ids(s) for s in SPECIALS] == list(range(len(SPECIALS)))


def test_one_token_per_character_round_trip(tok):
    text = "".join(ALPHABET)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == encode_text(text) and len(ids) == len(text)
    assert tok.decode(ids) == text == decode_ids(ids)
    assert tok("a\u00e9b", add_special_tokens=False)["input_ids"] == [encode_text("a")[0], UNK_ID,
                                                                      encode_text("b")[0]]


def test_chat_template_through_encode_prompt(tok):
    session = Session(runner=None, tokenizer=tok, config=read_config(ASSET), chat=True, source=str(ASSET))
    ids = encode_prompt(session, "rev hello")
    assert ids == encode_chat("rev hello")
    assert tok.convert_ids_to_tokens(ids[:1] + ids[-2:]) == ["<|user|>", "<|eot|>", "<|assistant|>"]
    assert encode_prompt(session, "rev hello", chat=False) == encode_text("rev hello")
    assert decode_tokens(session, ids) == "rev hello"          # specials are skipped


def test_build_tokenizer_matches_the_bundled_files(tok):
    fresh = build_tokenizer()
    assert fresh.get_vocab() == tok.get_vocab() and fresh.chat_template == tok.chat_template
