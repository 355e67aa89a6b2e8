"""`dlc generate` / `dlc eval` / `dlc models` on the block-diffusion families, and LLaDA2's chat template."""
import json
import subprocess
import sys

import pytest
import torch
from hf_layouts import HF_CONFIGS, HF_NAMES, random_tensors, write_checkpoint

from dlc.models.loading import load_model
from dlc.runtime.generate import GenerationConfig, generate


def _dlc(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "dlc.cli", *args], capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stderr
    return p


@pytest.mark.parametrize("preset,args,fields", [
    ("tiny-llada2", [], dict(block_length=32, steps_per_block=32, threshold=0.95, kv_cache="block")),
    ("tiny-llada2", ["--block-length", "4", "--steps-per-block", "2", "--threshold", "0.1", "--kv-cache",
                     "none", "--eos-early-stop"],
     dict(block_length=4, steps_per_block=2, threshold=0.1, kv_cache="none", eos_early_stop=True)),
    ("tiny-llada2", ["--decoder", "llada2.1-speed", "--block-length", "4", "--max-post-edit-steps", "2"],
     dict(block_length=4, decoder="llada2.1", threshold=0.5, edit_threshold=0.0, max_post_edit_steps=2,
          kv_cache="block")),
    ("tiny-sdar", [], dict(block_length=4, steps_per_block=4, threshold=0.9, kv_cache="block")),
])
def test_cli_generate_matches_library(preset, args, fields):
    out = json.loads(_dlc("generate", preset, "hello", "--gen-length", "10", "--no-chat", "--json",
                          *args).stdout.strip().splitlines()[-1])
    lm = load_model(preset)
    ids = lm.tokenizer("hello", add_special_tokens=False)["input_ids"]
    ref = generate(lm.model, [ids], GenerationConfig(gen_length=10, **fields))
    assert out["token_ids"] == ref.token_ids[0] and out["nfe"] == ref.nfe


def test_cli_refuses_block_flags_on_a_full_attention_model():
    p = _dlc("generate", "tiny-llada", "hi", "--gen-length", "8", "--steps-per-block", "4", ok=False)
    assert p.returncode != 0 and "steps_per_block" in p.stderr and "Traceback" not in p.stderr
    p = _dlc("generate", "tiny-llada2", "hi", "--decoder", "llada", ok=False)
    assert p.returncode != 0 and "decoder" in p.stderr and "Traceback" not in p.stderr


def test_cli_eval_block_decoder():
    p = _dlc("eval", "tiny-sdar", "--n", "4", "--decoder", "llada2", "--kv-cache", "block", "--block-length",
             "4", "--gen-length", "8", "--json")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["n"] == 4 and res["decoder"] == "llada2" and res["tpf"] > 0


def test_cli_models_lists_block_presets():
    rows = {r["name"]: r for r in json.loads(_dlc("models", "--json").stdout)}
    assert rows["llada2-mini"]["repo"] == "inclusionAI/LLaDA2.0-mini"
    assert rows["llada2.1-flash"]["repo"] == "inclusionAI/LLaDA2.1-flash"
    assert rows["sdar-30b-a3b"]["repo"] == "JetLM/SDAR-30B-A3B-Chat"
    assert 16.0e9 < rows["llada2-mini"]["parameters"] < 16.5e9
    for tiny in ("tiny-llada2", "tiny-sdar"):
        m = load_model(tiny).model
        assert rows[tiny]["parameters"] == sum(p.numel() for p in m.parameters())


def test_llada2_chat_template_when_the_tokenizer_ships_none(tmp_path):
    from dlc.models.tokenizer import byte_tokenizer
    from dlc.runtime.session import encode_prompt, open_model
    d = HF_CONFIGS["llada2_moe"]
    path = write_checkpoint(tmp_path / "l2", d, random_tensors(HF_NAMES["llada2_moe"](d)))
    tok = byte_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(str(path))
    session = open_model(str(path), progress=False)
    ids = encode_prompt(session, "hey", chat=True)
    text = session.tokenizer.decode(ids)
    assert text == "<role>HUMAN</role>hey<|role_end|><role>ASSISTANT</role>"
    assert torch.tensor(ids).numel() == len(text.encode())        # byte tokenizer: one id per byte
