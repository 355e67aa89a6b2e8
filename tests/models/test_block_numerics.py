"""Numerics of the block-diffusion families (LLaDA2 MoE, SDAR dense and MoE) against reference forwards
written here from the public modeling code (modeling_llada2_moe.py of the LLaDA2.0 release; modeling_sdar.py
of JetAstra/SDAR, i.e. Qwen3), in fp64 straight from the checkpoint tensors by name, under the block-causal
mask of the references' generate (``tril(n_blocks) `` expanded by the block size)."""
import functools

import pytest
import torch
from hf_layouts import HF_CONFIGS, HF_NAMES, direct_model, random_tensors

from dlc.runtime.step import block_key_mask

REF_TOL = dict(rtol=1e-4, atol=1e-4)     # fp32 model vs fp64 reference
BLOCK = 4


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


def _rope(x, pos, theta, rot):
    """HF rotary with partial_rotary_factor: inv_freq over the rotated width, rotate-half inside it."""
    inv = 1.0 / theta ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    f = pos.double()[:, None, :, None] * inv                            # [B, 1, T, rot/2]
    emb = torch.cat([f, f], -1)
    xr, xp = x[..., :rot], x[..., rot:]
    return torch.cat([xr * emb.cos() + _rotate_half(xr) * emb.sin(), xp], -1)


def _attention(q, k, v, allowed):
    """Eager attention of the HF code: repeat_kv, q k^T / sqrt(d) + additive mask (-inf where not allowed)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    s = s + torch.where(allowed, 0.0, float("-inf")).double()[:, None]
    return torch.softmax(s, -1) @ v


def _mlp(x, t, p):
    F = torch.nn.functional
    return F.linear(F.silu(x @ t[p + "gate_proj.weight"].T) * (x @ t[p + "up_proj.weight"].T),
                    t[p + "down_proj.weight"])


def _llada2_moe(h, t, p, d):
    """LLaDA2MoeGate.group_limited_topk + moe_infer token by token, plus the shared experts."""
    N = h.shape[0]
    logits = h @ t[p + "gate.weight"].T
    scores = torch.sigmoid(logits)
    biased = scores + t[p + "gate.expert_bias"]
    G = d["n_group"]
    gs = biased.view(N, G, -1).topk(2, dim=-1)[0].sum(-1)
    gm = torch.zeros_like(gs).scatter_(1, torch.topk(gs, k=d["topk_group"], dim=-1, sorted=False)[1], 1)
    sm = gm.unsqueeze(-1).expand(N, G, d["num_experts"] // G).reshape(N, -1)
    idx = torch.topk(biased.masked_fill(~sm.bool(), float("-inf")), k=d["num_experts_per_tok"], dim=-1)[1]
    w = scores.gather(1, idx)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * d["routed_scaling_factor"]
    out = torch.zeros_like(h)
    for n in range(N):
        for wj, j in zip(w[n].tolist(), idx[n].tolist()):
            out[n] += wj * _mlp(h[n], t, f"{p}experts.{j}.")
    return out + _mlp(h, t, p + "shared_experts.")


def _qwen3_moe(h, t, p, d):
    out = torch.zeros_like(h)
    for n in range(h.shape[0]):
        w, idx = torch.softmax(h[n] @ t[p + "gate.weight"].T, -1).topk(d["num_experts_per_tok"])
        w = w / w.sum()
        for wj, j in zip(w.tolist(), idx.tolist()):
            out[n] += wj * _mlp(h[n], t, f"{p}experts.{j}.")
    return out


def reference_logits(name, d, t, ids, allowed):
    """[B, T] ids (positions arange) -> [B, T, V] logits under ``allowed`` [B, T, T]."""
    t = {k: v.double() for k, v in t.items()}
    B, T = ids.shape
    D, H, Hkv, hd, eps = (d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"],
                          d["rms_norm_eps"])
    pos = torch.arange(T)[None].expand(B, T)
    llada2 = name == "llada2_moe"
    x = t["model.word_embeddings.weight" if llada2 else "model.embed_tokens.weight"][ids]
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)
        if llada2:
            qkv = (h @ t[p + "attention.query_key_value.weight"].T).view(B, T, H + 2 * Hkv, hd)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=-2)
            q, k = _rms(q, t[p + "attention.query_layernorm.weight"], eps), \
                _rms(k, t[p + "attention.key_layernorm.weight"], eps)
            rot = int(hd * d["partial_rotary_factor"])
        else:
            q = _rms((h @ t[p + "self_attn.q_proj.weight"].T).view(B, T, H, hd),
                     t[p + "self_attn.q_norm.weight"], eps)
            k = _rms((h @ t[p + "self_attn.k_proj.weight"].T).view(B, T, Hkv, hd),
                     t[p + "self_attn.k_norm.weight"], eps)
            v = (h @ t[p + "self_attn.v_proj.weight"].T).view(B, T, Hkv, hd)
            rot = hd
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        q, k = _rope(q, pos, d["rope_theta"], rot), _rope(k, pos, d["rope_theta"], rot)
        a = _attention(q, k, v, allowed).transpose(1, 2).reshape(B, T, H * hd)
        x = x + a @ t[p + ("attention.dense.weight" if llada2 else "self_attn.o_proj.weight")].T
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if llada2 and i >= d["first_k_dense_replace"]:
            x = x + _llada2_moe(h.reshape(B * T, D), t, p + "mlp.", d).view(B, T, D)
        elif "num_experts" in d and not llada2:
            x = x + _qwen3_moe(h.reshape(B * T, D), t, p + "mlp.", d).view(B, T, D)
        else:
            x = x + _mlp(h, t, p + "mlp.")
    head = t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]
    return _rms(x, t["model.norm.weight"], eps) @ head.T


def reference_block_mask(T, block):
    """The references' mask: tril(n_blocks, n_blocks) repeat_interleaved by the block size, [1, T, T] bool."""
    nb = (T + block - 1) // block
    m = torch.tril(torch.ones(nb, nb)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return m[:T, :T].bool()[None]


@functools.cache
def _family(name):
    d = HF_CONFIGS[name]
    t = random_tensors(HF_NAMES[name](d), seed=7)
    return name, d, t, direct_model(name, t)


@pytest.fixture(params=["llada2_moe", "sdar", "sdar_moe"])
def block_family(request):
    return _family(request.param)


def _ids(B=2, T=11, seed=3):
    return torch.randint(0, 280, (B, T), generator=torch.Generator().manual_seed(seed))


def test_block_key_mask_is_the_references_mask():
    km = torch.ones(1, 11, dtype=torch.bool)
    got = block_key_mask(km, torch.arange(11)[None], BLOCK)                # [1, T, S]
    assert torch.equal(got, reference_block_mask(11, BLOCK))
    km[0, 9:] = False                                                      # padding keys stay masked
    assert not block_key_mask(km, torch.arange(11)[None], BLOCK)[0, :, 9:].any()


def test_forward_matches_reference(block_family):
    name, d, t, model = block_family
    ids = _ids()
    allowed = reference_block_mask(ids.shape[1], BLOCK).expand(2, -1, -1)
    pos = torch.arange(ids.shape[1])[None].expand(2, -1)
    with torch.no_grad():
        got = model.logits(model(ids, pos,
                                 block_key_mask(torch.ones_like(ids, dtype=torch.bool), pos, BLOCK)))
    ref = reference_logits(name, d, t, ids, allowed)
    torch.testing.assert_close(got.double(), ref, **REF_TOL)
    # decisive: the mask matters, and logits vary over positions
    with torch.no_grad():
        bidir = model.logits(model(ids, pos, torch.ones_like(ids, dtype=torch.bool)))
    assert (bidir - got).abs().max() > 1e-2
    assert (got[0, 0] - got[0, 5]).abs().max() > 1e-2


def test_earlier_blocks_do_not_see_later_ones(block_family):
    """Block-causal: changing tokens of block 2 changes nothing in blocks 0 and 1, and changes block 2."""
    _, _, _, model = block_family
    ids = _ids(1, 12)
    ids2 = ids.clone()
    ids2[0, 9] = (ids[0, 9] + 1) % 280
    pos = torch.arange(12)[None]
    km = block_key_mask(torch.ones_like(ids, dtype=torch.bool), pos, BLOCK)
    with torch.no_grad():
        a, b = model(ids, pos, km), model(ids2, pos, km)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-6)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_route_sigmoid_group_limits_groups():
    """Experts only come from the topk_group best groups, weights sum to routed_scaling_factor."""
    from dlc.models.llada2_moe import route_sigmoid_group
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 8, generator=g)
    bias = torch.randn(8, generator=g)
    w, idx = route_sigmoid_group(logits, bias, 2, 4, 1, 2.5)
    assert torch.equal(idx // 2, idx[:, :1].expand(-1, 2) // 2)           # one group kept: both experts in it
    torch.testing.assert_close(w.sum(-1), torch.full((50,), 2.5), rtol=0, atol=1e-6)
    _, idx_all = route_sigmoid_group(logits, bias, 2, 4, 4, 2.5)
    assert not torch.equal(idx // 2, idx_all // 2)                         # the group limit changed routing
