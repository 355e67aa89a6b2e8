"""Every family loads from a checkpoint in its released HF layout, and every broken checkpoint gets a named
error."""
import json
import os
import subprocess
import sys

import pytest
import torch
from hf_layouts import (EOS, FAMILY_OF, HF_CONFIGS, HF_NAMES, MASK, direct_model, random_tensors,
                        write_checkpoint)

from dlc.models import config_from_hf
from dlc.models.loading import CheckpointError, load_model

ATOL = 1e-5     # fp32: the loaded and the directly built model run the same ops on the same weights


def _ckpt(tmp_path, family, shards=1, **overrides):
    d = dict(HF_CONFIGS[family], **overrides)
    tensors = random_tensors(HF_NAMES[family](d), seed=1)
    return write_checkpoint(tmp_path / family, d, tensors, shards), tensors


def _logits(model, ids):
    with torch.no_grad():
        return model.full_logits(ids)


@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_loads_and_matches_direct_model(tmp_path, family, shards):
    path, tensors = _ckpt(tmp_path, family, shards)
    lm = load_model(str(path), dtype="fp32", progress=False)
    assert lm.config.family == FAMILY_OF.get(family, family)
    assert set(lm.model.state_dict()) == set(tensors)          # exactly the released names, nothing else
    ids = torch.randint(0, 280, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = _logits(direct_model(family, tensors), ids)
    torch.testing.assert_close(_logits(lm.model, ids), ref, rtol=0, atol=ATOL)
    assert lm.tokenizer is None and lm.chat is False


def test_bf16_load_casts_every_tensor(tmp_path, family):
    path, _ = _ckpt(tmp_path, family)
    lm = load_model(str(path), dtype="bf16", progress=False)
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_config_fields_from_released_keys():
    dream = config_from_hf(HF_CONFIGS["dream"])
    assert (dream.family, dream.n_kv_heads, dream.qkv_bias, dream.logit_shift) == ("dream", 2, True, 1)
    assert (dream.mask_id, dream.eos_id, dream.pad_id, dream.rope_theta, dream.rms_eps) == \
        (MASK, EOS, EOS, 1e6, 1e-6)
    moe = config_from_hf(HF_CONFIGS["llada_moe"])        # model_type "llada", told apart by its MoE keys
    assert (moe.family, moe.n_experts, moe.n_experts_per_tok, moe.expert_hidden) == ("llada_moe", 6, 2, 16)
    assert (moe.qk_norm, moe.norm_topk_prob, moe.rope_theta, moe.logit_shift) == (True, False, 50000.0, 0)
    assert config_from_hf(HF_CONFIGS["llada"]).family == "llada"
    for alias in ("lladamoe", "llada_moe"):
        assert config_from_hf(dict(HF_CONFIGS["llada_moe"], model_type=alias)).family == "llada_moe"
    assert config_from_hf(dict(HF_CONFIGS["dream"], model_type="dream")).family == "dream"


def test_released_defaults_for_missing_special_ids():
    d = {k: v for k, v in HF_CONFIGS["dream"].items()
         if k not in ("mask_token_id", "eos_token_id", "pad_token_id")}
    c = config_from_hf(dict(d, vocab_size=152064))
    assert (c.mask_id, c.eos_id, c.pad_id, c.stop_ids) == (151666, 151643, 151643, [151643, 151645])
    d = {k: v for k, v in HF_CONFIGS["llada_moe"].items()
         if k not in ("mask_token_id", "eos_token_id", "pad_token_id")}
    c = config_from_hf(dict(d, vocab_size=157184))
    assert (c.mask_id, c.eos_id, c.pad_id) == (156895, 156892, 156892)


def test_roundtrip_through_dlc_saver(tmp_path, family):
    """dlc's own saver writes the same family keys back: save -> load gives the same logits."""
    from dlc.models.loading import save_checkpoint
    path, tensors = _ckpt(tmp_path, family)
    m = load_model(str(path), dtype="fp32", progress=False).model
    out = save_checkpoint(m, tmp_path / "again")
    assert json.loads((out / "config.json").read_text())["model_type"] == HF_CONFIGS[family]["model_type"]
    m2 = load_model(str(out), dtype="fp32", progress=False).model
    ids = torch.arange(2, 14)[None]
    torch.testing.assert_close(_logits(m2, ids), _logits(m, ids), rtol=0, atol=0)


# --- broken checkpoints -------------------------------------------------------------------------------------

def test_missing_tensor(tmp_path, family):
    d = HF_CONFIGS[family]
    tensors = random_tensors(HF_NAMES[family](d))
    victim = sorted(tensors)[len(tensors) // 2]
    del tensors[victim]
    path = write_checkpoint(tmp_path / "c", d, tensors)
    with pytest.raises(CheckpointError, match=f"missing tensor '{victim}'"):
        load_model(str(path), progress=False)


def test_unexpected_tensor(tmp_path, family):
    d = HF_CONFIGS[family]
    tensors = random_tensors(HF_NAMES[family](d))
    tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"] = torch.zeros(4, 4)
    path = write_checkpoint(tmp_path / "c", d, tensors)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.shared_expert"):
        load_model(str(path), progress=False)


def test_wrong_shape_names_tensor_and_file(tmp_path, family):
    d = HF_CONFIGS[family]
    tensors = random_tensors(HF_NAMES[family](d))
    victim = [n for n in sorted(tensors) if tensors[n].ndim == 2][3]
    tensors[victim] = torch.zeros(tensors[victim].shape[0] + 1, tensors[victim].shape[1])
    path = write_checkpoint(tmp_path / "c", d, tensors, shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(CheckpointError) as e:
        load_model(str(path), progress=False)
    assert victim in str(e.value) and index[victim] in str(e.value) and "shape" in str(e.value)


def test_missing_shard_listed_in_index(tmp_path, family):
    path, _ = _ckpt(tmp_path, family, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError,
                       match="lists shard model-00002-of-00003.safetensors, which is missing"):
        load_model(str(path), progress=False)


def test_bad_json(tmp_path, family):
    path, _ = _ckpt(tmp_path, family)
    (path / "config.json").write_text('{"model_type": "llada", "d_model": 32,')
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_model(str(path), progress=False)


def test_unknown_model_type(tmp_path, family):
    path, _ = _ckpt(tmp_path, family, model_type="qwen3_next")
    with pytest.raises(CheckpointError, match=r"unsupported model_type 'qwen3_next'.*Dream.*llada"):
        load_model(str(path), progress=False)


def test_no_model_type(tmp_path):
    d = {k: v for k, v in HF_CONFIGS["dream"].items() if k != "model_type"}
    path = write_checkpoint(tmp_path / "c", d, random_tensors(HF_NAMES["dream"](HF_CONFIGS["dream"])))
    with pytest.raises(CheckpointError, match="no 'model_type' key"):
        load_model(str(path), progress=False)


def test_only_pytorch_bin(tmp_path, family):
    path, tensors = _ckpt(tmp_path, family)
    (path / "model.safetensors").unlink()
    torch.save(tensors, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"neither model.safetensors.*pytorch_model.bin.*safetensors"):
        load_model(str(path), progress=False)


@pytest.mark.parametrize("family,key", [("dream", "hidden_size"), ("dream", "intermediate_size"),
                                        ("llada_moe", "num_experts_per_tok"),
                                        ("llada_moe", "expert_intermediate_size"),
                                        ("llada_moe", "rope_theta"), ("llada", "d_model"),
                                        ("llada2_moe", "moe_intermediate_size"),
                                        ("llada2_moe", "intermediate_size"), ("sdar", "intermediate_size"),
                                        ("sdar_moe", "num_experts_per_tok")])
def test_missing_config_key(tmp_path, family, key):
    path, _ = _ckpt(tmp_path, family)
    d = {k: v for k, v in HF_CONFIGS[family].items() if k != key}
    (path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=f"config.json.*missing the key '{key}'"):
        load_model(str(path), progress=False)


@pytest.mark.parametrize("family,key,value", [
    ("llada_moe", "shared_expert_intermediate_size", 64),
    ("llada_moe", "moe_router_enable_expert_bias", True), ("llada_moe", "moe_layer_freq", [0, 1]),
    ("llada_moe", "moe_router_score_function", "sigmoid"),
    ("dream", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("llada2_moe", "score_function", "softmax"), ("llada2_moe", "tie_word_embeddings", True),
    ("llada2_moe", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}), ("sdar", "attention_bias", True),
    ("sdar", "use_sliding_window", True), ("sdar_moe", "decoder_sparse_step", 2),
])
def test_unsupported_option_is_refused_by_name(tmp_path, family, key, value):
    path, _ = _ckpt(tmp_path, family, **{key: value})
    with pytest.raises(CheckpointError, match=key):
        load_model(str(path), progress=False)


@pytest.mark.parametrize("preset,repo", [("dream-7b", "Dream-org/Dream-v0-Instruct-7B"),
                                         ("dream-7b-base", "Dream-org/Dream-v0-Base-7B"),
                                         ("llada-moe-7b", "inclusionAI/LLaDA-MoE-7B-A1B-Instruct")])
def test_preset_with_empty_hf_cache_names_repo_and_weights(tmp_path, monkeypatch, preset, repo):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = ("from dlc.models.loading import load_model\n"
            f"load_model({preset!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                       timeout=120)
    assert p.returncode != 0
    assert repo in p.stderr and "--weights" in p.stderr and "CheckpointError" in p.stderr


def test_weights_option_overrides_preset(tmp_path):
    path, tensors = _ckpt(tmp_path, "dream")
    lm = load_model("dream-7b", weights=str(path), dtype="fp32", progress=False)
    assert lm.config.d_model == 32 and lm.chat is True       # preset's chat flag, checkpoint's architecture
    ids = torch.arange(3, 12)[None]
    torch.testing.assert_close(_logits(lm.model, ids), _logits(direct_model("dream", tensors), ids), rtol=0,
                               atol=ATOL)


def _dream_tokenizer_files(path):
    """Dream's tokenizer as released: vocab.json + merges.txt for the remote DreamTokenizer (no
    tokenizer.json), special tokens at fixed ids through added_tokens_decoder, chat template in
    tokenizer_config.json."""
    from dlc.models.tokenizer import _bytes_to_unicode
    byte = _bytes_to_unicode()
    vocab = {byte[b]: b for b in range(256)}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    specials = {EOS: "<|endoftext|>", 281: "<|im_start|>", 282: "<|im_end|>", MASK: "<|mask|>"}
    cfg = {
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True}
                                 for i, s in specials.items()},
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "tokenizer_class": "DreamTokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "unk_token": None, "errors": "replace",
        "clean_up_tokenization_spaces": False, "model_max_length": 131072, "split_special_tokens": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_dream_tokenizer_without_remote_code(tmp_path):
    from dlc.runtime.session import encode_prompt, open_model
    path, _ = _ckpt(tmp_path, "dream")
    _dream_tokenizer_files(path)
    lm = load_model(str(path), dtype="fp32", progress=False)
    tok = lm.tokenizer
    assert lm.chat is True
    assert (tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (EOS, EOS, MASK)
    ids = tok("the the<|mask|>", add_special_tokens=False)["input_ids"]
    # "the", " the" by the merges, the mask as one token
    assert ids == [ord("t"), 257, 258, MASK]
    assert tok.decode(ids, skip_special_tokens=True) == "the the"
    session = open_model(str(path), dtype="fp32", progress=False)
    chat = encode_prompt(session, "the")
    assert chat[0] == 281 and chat.count(282) == 1 and ord("t") in chat


@pytest.mark.parametrize("family", ["dream", "llada_moe"])
def test_tied_embeddings_checkpoint_has_no_lm_head(tmp_path, family):
    d = dict(HF_CONFIGS[family], tie_word_embeddings=True)
    tensors = random_tensors(HF_NAMES[family](d), seed=2)
    del tensors["lm_head.weight"]
    lm = load_model(str(write_checkpoint(tmp_path / "c", d, tensors)), dtype="fp32", progress=False)
    assert lm.config.tie_embeddings and "lm_head.weight" not in lm.model.state_dict()
    ids = torch.arange(4, 10)[None]
    with torch.no_grad():
        h = lm.model(ids)
        torch.testing.assert_close(lm.model.logits(h), h @ tensors["model.embed_tokens.weight"].T, rtol=0,
                                   atol=ATOL)


def test_block_family_config_fields_from_released_keys():
    c = config_from_hf(HF_CONFIGS["llada2_moe"])
    assert (c.family, c.block_diffusion, c.head_dim, c.rope_dim, c.n_kv_heads) == \
        ("llada2_moe", True, 16, 8, 2)
    assert (c.n_experts, c.n_experts_per_tok, c.expert_hidden, c.n_shared_experts, c.first_dense_layers) == \
        (8, 2, 24, 1, 1)
    assert (c.router, c.n_expert_groups, c.topk_groups, c.routed_scaling, c.rope_theta) == \
        ("sigmoid_group", 4, 2, 2.5, 600000.0)
    s = config_from_hf(HF_CONFIGS["sdar"])
    assert (s.family, s.block_diffusion, s.head_dim, s.d_model, s.tie_embeddings, s.is_moe) == \
        ("sdar", True, 24, 64, True, False)
    m = config_from_hf(HF_CONFIGS["sdar_moe"])
    assert (m.family, m.is_moe, m.norm_topk_prob, m.expert_hidden) == ("sdar", True, True, 16)
    # released special ids when the config leaves them out (LLaDA2's generate defaults, SDAR's tokenizer)
    big = dict(HF_CONFIGS["llada2_moe"], vocab_size=157184)
    del big["mask_token_id"], big["eos_token_id"], big["pad_token_id"]
    c = config_from_hf(big)
    assert (c.mask_id, c.eos_id, c.stop_ids) == (156895, 156892, [156892, 156900])


def test_block_presets_parameter_counts():
    """Totals of the released checkpoints (model cards: LLaDA2.0-mini 16B, flash 100B; SDAR = its Qwen3
    base)."""
    from dlc.models.presets import preset_config
    expect = {"llada2-mini": (16.0e9, 16.5e9), "llada2-flash": (100e9, 104e9), "sdar-1.7b": (1.7e9, 1.75e9),
              "sdar-4b": (4.0e9, 4.05e9), "sdar-8b": (8.1e9, 8.25e9), "sdar-30b-a3b": (30.4e9, 30.6e9)}
    for name, (lo, hi) in expect.items():
        assert lo <= preset_config(name).num_parameters() <= hi, name
    active = preset_config("llada2-mini").num_active_parameters()
    assert 1.2e9 < active < 1.7e9                     # "16B total, ~1.4B active"
