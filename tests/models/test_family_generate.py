"""The decoding loop on the tiny Dream and LLaDA-MoE presets: every KV mode, against a plain reference
loop."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dlc.models.loading import load_model
from dlc.runtime.generate import GenerationConfig, generate

PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]
FAMILIES = ["tiny-dream", "tiny-llada-moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return load_model(request.param, seed=4).model


def reference_generate(model, prompt, gen_length, block_length, steps):
    """LLaDA's generate.py, greedy low-confidence remasking, on the model's aligned logits (Dream: shifted);
    one prompt (batch 1, no padding) -> its final token state [1, P + gen_length]."""
    mask_id = model.config.mask_id
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    pos, km = torch.arange(x.shape[1])[None], torch.ones_like(x, dtype=torch.bool)
    per_block = steps // (gen_length // block_length)
    for nb in range(gen_length // block_length):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        n = int((x[0, lo:hi] == mask_id).sum())
        sched = [n // per_block + (1 if i < n % per_block else 0) for i in range(per_block)]
        for k in sched:
            with torch.no_grad():
                logits = model.full_logits(x, pos, km).double()
            x0 = logits.argmax(-1)
            conf = F.softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
            conf[:, hi:] = float("-inf")
            conf = torch.where(x == mask_id, conf, torch.tensor(float("-inf"), dtype=conf.dtype))
            for r in range(x.shape[0]):
                sel = conf[r].topk(k).indices
                x[r, sel] = x0[r, sel]
    return x


def test_no_cache_matches_reference(model):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8)
    ours = generate(model, PROMPTS, cfg)
    for p, seq in zip(PROMPTS, ours.sequences):
        assert torch.equal(seq, reference_generate(model, p, 16, 8, 8)[0])
    assert len({t for ids in ours.token_ids for t in ids}) > 3          # a decisive model: outputs vary


@pytest.mark.parametrize("kv", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_no_cache(model, kv):
    base = generate(model, PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16))
    forced = generate(model, PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache=kv,
                                                       refresh_every=1))
    assert forced.token_ids == base.token_ids and forced.nfe == base.nfe


@pytest.mark.parametrize("kv", ["none", "prefix", "dual"])
def test_every_kv_mode_decodes_every_position(model, kv):
    res = generate(model, PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache=kv))
    assert res.nfe == 16
    assert all(len(t) == 16 and model.config.mask_id not in t for t in res.token_ids)
    assert all(torch.equal(seq[:len(p)], torch.tensor(p)) for p, seq in zip(PROMPTS, res.sequences))


def test_batch_equals_single(model):
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8, kv_cache="dual")
    batched = generate(model, PROMPTS, cfg).token_ids
    assert batched == [generate(model, [p], cfg).token_ids[0] for p in PROMPTS]


def test_threshold_decoding(model):
    res = generate(model, PROMPTS[:1],
                   GenerationConfig(gen_length=16, block_length=8, steps=16, threshold=1e-9))
    assert res.nfe == 2 and model.config.mask_id not in res.token_ids[0]


def _dlc(*args):
    p = subprocess.run([sys.executable, "-m", "dlc.cli", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("preset", FAMILIES)
def test_cli_generate_matches_library(preset):
    out = json.loads(_dlc("generate", preset, "hello", "--gen-length", "16", "--block-length", "8", "--steps",
                          "16", "--no-chat", "--kv-cache", "dual", "--json").strip().splitlines()[-1])
    lm = load_model(preset)
    ids = lm.tokenizer("hello", add_special_tokens=False)["input_ids"]
    ref = generate(lm.model, [ids],
                   GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual"))
    assert out["token_ids"] == ref.token_ids[0] and out["nfe"] == 16


def test_cli_models_lists_new_presets():
    rows = {r["name"]: r for r in json.loads(_dlc("models", "--json"))}
    assert rows["dream-7b"]["repo"] == "Dream-org/Dream-v0-Instruct-7B"
    assert rows["dream-7b-base"]["repo"] == "Dream-org/Dream-v0-Base-7B"
    assert rows["llada-moe-7b"]["repo"] == "inclusionAI/LLaDA-MoE-7B-A1B-Instruct"
    assert 7.5e9 < rows["dream-7b"]["parameters"] < 7.7e9          # Qwen2.5-7B layout: 7.62B
    assert 7.2e9 < rows["llada-moe-7b"]["parameters"] < 7.5e9      # 7.36B total (1.4B active)
    for tiny in FAMILIES:
        m = load_model(tiny).model
        assert rows[tiny]["parameters"] == sum(p.numel() for p in m.parameters())
