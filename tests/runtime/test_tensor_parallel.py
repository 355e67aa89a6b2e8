"""Tensor parallelism on CPU (2 processes, gloo): tokens identical to one process, checkpoints loaded by
slice.

Models are tiny checkpoints written here (LLaDA MHA; Dream GQA with KV heads = ranks and with one KV head
replicated over both ranks, tied head) at a std large enough that the outputs vary with the prompt and the
temperature (asserted). Each TP session spawns its worker once per module; every decoding case runs on it.
fp32 everywhere: the row-parallel all-reduce sums partial products in another order than one GEMM, so logits
agree to ~1e-6 and the argmax / top-k selections (the tokens) are identical on these decisive models."""
import pytest
import torch

from dlc.models import build_model
from dlc.models.all_reduce import AllReduce
from dlc.models.config import ModelConfig
from dlc.models.loading import init_weights, load_model, save_checkpoint
from dlc.models.presets import preset_config
from dlc.models.tensor_parallel import head_layout, shard_config, shard_modules_, vocab_range
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model

TINY = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden=128, vocab_size=262, embedding_size=262,
            mask_id=257, eos_id=256, pad_id=256, stop_ids=[256], max_seq_len=256)
MODELS = {
    "llada": dict(family="llada", n_kv_heads=4, rope_theta=10000.0, **TINY),
    "dream_gqa": dict(family="dream", n_kv_heads=2, qkv_bias=True, logit_shift=1, rope_theta=1e6, **TINY),
    "dream_mqa_tied": dict(family="dream", n_kv_heads=1, qkv_bias=True, logit_shift=1, rope_theta=1e6,
                           tie_embeddings=True, **TINY),
    "sdar": dict(family="sdar", n_kv_heads=2, attn_head_dim=24, qk_norm=True, block_diffusion=True,
                 rope_theta=1e6, **TINY),       # block-causal, per-head QK-norm, head_dim != d_model / heads
}
# MoE checkpoints: attention tensor parallel, experts split over the ranks (models/expert_parallel.py;
# LLaDA2's shared expert sliced), each rank reading only its tensors
MODELS.update({name: {**preset_config(preset).__dict__} for name, preset in
               (("llada_moe", "tiny-llada-moe"), ("llada2_moe", "tiny-llada2"))})
PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 64]]
LOGIT_TOL = 1e-5          # logprobs of the chosen tokens, TP vs one process (fp32 model, float64 decoding)


def assert_same_logprobs(a, b, alternatives: bool = True) -> None:
    """Two generate() results' logprobs: same positions, chosen logprob and top ids within LOGIT_TOL (and the
    alternatives' logprobs)."""
    for ra, rb in zip(a.logprobs, b.logprobs):
        for ea, eb in zip(ra, rb):
            assert (ea is None) == (eb is None)
            if ea is not None:
                assert abs(ea[0] - eb[0]) < LOGIT_TOL and list(ea[1]) == list(eb[1])
                if alternatives:
                    assert max(abs(x - y) for x, y in zip(ea[2], eb[2])) < LOGIT_TOL


def write_tiny(path, spec: dict, seed: int = 0):
    m = build_model(ModelConfig(**spec))
    init_weights(m, seed, std=0.25)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                     # init_weights zeroes biases: make them count (sliced per rank)
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_checkpoint(m, path)
    return path


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """(one-process session, TP=2 session) of one tiny checkpoint."""
    path = write_tiny(tmp_path_factory.mktemp(request.param), MODELS[request.param])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2)
    yield one, tp
    tp.runner.close()


CASES = [(kv, t) for kv in ("none", "prefix", "dual") for t in (0.0, 0.9)]
FEW = {("dual", 0.0), ("none", 0.9)}          # the tied-MQA model: its layout, not every cache again


@pytest.mark.parametrize("kv,temperature", CASES)
def test_tp2_tokens_equal_one_process(pair, kv, temperature):
    one, tp = pair
    if one.config.block_diffusion:
        pytest.skip("block diffusion decodes with its exact block cache (test_tp2_block_diffusion)")
    if one.config.tie_embeddings and (kv, temperature) not in FEW:
        pytest.skip("covered on the other models")
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache=kv, temperature=temperature,
                           seed=11)
    want = generate(one.runner, PROMPTS, cfg).token_ids
    got = generate(tp.runner, PROMPTS, cfg).token_ids
    assert got == want
    assert want[0] != want[1]                                  # decisive: the prompt changes the tokens
    assert len(set(want[0])) > 2


def test_outputs_vary_with_temperature(pair):
    one, _ = pair
    if one.config.block_diffusion:
        pytest.skip("full-attention decoding only")
    base = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")
    greedy = generate(one.runner, PROMPTS, GenerationConfig(**base)).token_ids
    sampled = generate(one.runner, PROMPTS, GenerationConfig(**base, temperature=0.9, seed=11)).token_ids
    assert greedy != sampled


def test_tp2_logprobs_threshold_and_entropy_rules(pair):
    one, tp = pair
    if one.config.family != "dream" or one.config.tie_embeddings:
        pytest.skip("one model is enough (Dream GQA: shifted rows, biases)")
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache="dual", threshold=0.3, logprobs=3)
    a, b = generate(one.runner, PROMPTS, cfg), generate(tp.runner, PROMPTS, cfg)
    assert a.token_ids == b.token_ids and a.nfe == b.nfe
    assert_same_logprobs(a, b)
    eb_cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache="prefix", entropy_bound=2.0)
    a, b = generate(one.runner, PROMPTS, eb_cfg), generate(tp.runner, PROMPTS, eb_cfg)   # entropy, combined
    assert a.token_ids == b.token_ids and a.nfe == b.nfe
    guided = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache="none", cfg_scale=1.5)
    assert generate(tp.runner, PROMPTS, guided).token_ids == generate(one.runner, PROMPTS, guided).token_ids


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_tp2_block_diffusion(pair, temperature):
    """SDAR layout (block-causal attention, the exact block cache, the llada2 threshold decoder)."""
    one, tp = pair
    if not one.config.block_diffusion:
        pytest.skip("block-diffusion model only")
    cfg = GenerationConfig(gen_length=16, block_length=4, steps_per_block=4, threshold=0.3, kv_cache="block",
                           temperature=temperature, seed=2)
    want = generate(one.runner, PROMPTS, cfg)
    got = generate(tp.runner, PROMPTS, cfg)
    assert got.token_ids == want.token_ids and got.nfe == want.nfe
    assert want.token_ids[0] != want.token_ids[1] and len(set(want.token_ids[0])) > 2


# -- the layout and the loader, in one process (no collectives: group None) ----------------------------------
def test_head_layout_splits_and_replicates():
    mqa = ModelConfig(**MODELS["dream_mqa_tied"])
    assert [head_layout(mqa, r, 2) for r in (0, 1)] == [((0, 2), (0, 1)), ((2, 4), (0, 1))]
    gqa = ModelConfig(**MODELS["dream_gqa"])
    assert [head_layout(gqa, r, 4).kv for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert shard_config(gqa, 2).n_kv_heads == 1 and shard_config(gqa, 2).head_dim == gqa.head_dim
    with pytest.raises(ValueError, match="3 .*heads|heads .*3|split"):
        head_layout(gqa, 0, 3)
    assert vocab_range(262, 1, 2) == (131, 262) and vocab_range(262, 2, 3) == (176, 262)


@pytest.mark.parametrize("name", ["llada", "dream_gqa"])
def test_each_rank_loads_its_slices(tmp_path, name):
    path = write_tiny(tmp_path, MODELS[name])
    full = dict(load_model(str(path), dtype="fp32", progress=False).model.state_dict())
    for rank in (0, 1):
        plans, red = {}, AllReduce(None)                    # no group: each layer returns its partial sum
        lm = load_model(str(path), dtype="fp32", progress=False,
                        shard=lambda m, f: plans.setdefault("p", shard_modules_(m, rank, 2, red, f)))
        plan, sd = plans["p"], lm.model.state_dict()
        assert len(plan) > 0 and sd.keys() == full.keys()
        for k, t in sd.items():
            want = full[k]
            if k in plan:
                s = plan[k]
                want = want.narrow(s.dim, s.start, s.stop - s.start)
                assert t.numel() < full[k].numel()
            assert torch.equal(t, want), k


def test_cli_generate_tp2_matches_one_process():
    """`dlc generate --tp 2` (the command starts its worker, then stops it at exit) = TP=1 generate."""
    import json
    import subprocess
    import sys

    from dlc.runtime.session import encode_prompt
    args = ["--gen-length", "16", "--block-length", "8", "--steps", "8", "--kv-cache", "prefix", "--dtype",
            "fp32", "--temperature", "0.7", "--seed", "4", "--no-chat", "--json"]
    r = subprocess.run([sys.executable, "-m", "dlc.cli", "generate", "tiny-dream", "split me", "--tp", "2",
                        *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    one = open_model("tiny-dream", dtype="fp32", progress=False)
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache="prefix", temperature=0.7, seed=4,
                           stop_at_eos=False)
    assert out["engine"] == "eager-tp2"
    assert out["token_ids"] == generate(one.runner, [encode_prompt(one, "split me", False)], cfg).token_ids[0]


def test_torchrun_launched_ranks():
    """Ranks started by torchrun (RANK / WORLD_SIZE env): rank 0 is the command, rank 1 a worker."""
    import json
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "dlc.cli", "generate", "tiny-llada", "ranks", "--tp", "2", "--gen-length", "8",
           "--block-length", "8", "--steps", "4", "--dtype", "fp32", "--no-chat", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    one = open_model("tiny-llada", dtype="fp32", progress=False)
    from dlc.runtime.session import encode_prompt
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=4, stop_at_eos=False)
    assert out["engine"] == "eager-tp2" and "launched by torchrun" in r.stderr
    assert out["token_ids"] == generate(one.runner, [encode_prompt(one, "ranks", False)], cfg).token_ids[0]


@pytest.mark.parametrize("model,size,match", [("tiny-llada", 3, "4 attention heads"),
                                              ("tiny-sdar", 8, "4 attention heads")])
def test_layouts_that_cannot_shard_are_refused_before_starting(model, size, match):
    with pytest.raises(ValueError, match=match):
        open_model(model, progress=False, tensor_parallel_size=size)


@pytest.mark.parametrize("preset,world", [("tiny-llada", 2), ("tiny-dream", 2), ("tiny-dream", 4),
                                          ("tiny-llada2", 2), ("tiny-sdar", 2)])
def test_attention_shards_sum_to_the_full_output(preset, world):
    """Column-parallel q/k/v (separate, or LLaDA2's fused query_key_value) and the row-parallel output:
    without a group (``AllReduce(None)``) each rank returns its partial sum; the partials add up to the full
    layer, and each rank's K/V are its heads of the full K/V (replicated when KV heads < ranks)."""
    import copy

    from dlc.models.common import rope_cos_sin, self_attention
    from dlc.models.loading import init_weights
    from dlc.models.presets import preset_config
    from dlc.models.tensor_parallel import _attention, head_layout, shard_attention_
    c = preset_config(preset)
    m = build_model(c)
    init_weights(m, 0, std=0.25)
    _, attn = _attention(m.blocks[0])
    x = torch.randn(2, 5, c.d_model, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(torch.arange(5)[None].expand(2, 5), c.rope_dim, c.rope_theta)

    def run(a):                               # a LLaDA block owns its projections: its attention alone
        if hasattr(a, "attn_out"):
            return self_attention(x, a.q_proj, a.k_proj, a.v_proj, a.attn_out, cos, sin, None, a.n_heads,
                                  a.n_kv)
        return a(x, cos, sin, None)
    with torch.no_grad():
        y, (k, v) = run(attn)
        total = torch.zeros_like(y)
        for r in range(world):
            part = copy.deepcopy(attn)
            lay = head_layout(c, r, world)
            shard_attention_(part, "", lay, c, AllReduce(None), True, {})
            yr, (kr, vr) = run(part)
            total += yr
            assert torch.allclose(kr, k[:, lay.kv[0]:lay.kv[1]], atol=1e-5)
            assert torch.allclose(vr, v[:, lay.kv[0]:lay.kv[1]], atol=1e-5)
    assert torch.allclose(total, y, atol=1e-4, rtol=1e-4) and y.abs().max() > 0.1
