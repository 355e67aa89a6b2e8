"""Model-level numerics of every family: against plain reference forwards written here from the released
modeling code (fp64, straight from the checkpoint tensors by name), and cached forwards against full
forwards."""
import functools

import pytest
import torch
from hf_layouts import HF_CONFIGS, HF_NAMES, direct_model, random_tensors

from dlc.models import KVCache, config_from_hf
from dlc.models.llada_moe import MOE_IMPLS, route
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.step import build_batch

REF_TOL = dict(rtol=1e-4, atol=1e-4)     # fp32 model vs fp64 reference
CACHE_TOL = dict(rtol=1e-5, atol=1e-5)   # fp32 cached vs fp32 full forward (same ops, other shapes)


# --- plain references (fp64) --------------------------------------------------------------------------------

def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):
    """x [B, H, T, D], pos [B, T]; rotate-half convention of the HF Llama/Qwen2/OLMoE code."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None, :, None] * inv                      # [B, 1, T, D/2]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1)


def _attention(q, k, v, key_mask):
    """q [B, H, T, D], k/v [B, Hkv, T, D]: query head h reads KV head h // (H / Hkv), one head at a time."""
    H, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    out = []
    for h in range(H):
        g = h // (H // Hkv)
        s = q[:, h] @ k[:, g].transpose(-1, -2) / D ** 0.5          # [B, T, S]
        s = s.masked_fill(~key_mask[:, None, :], float("-inf"))
        out.append(torch.softmax(s, -1) @ v[:, g])
    return torch.stack(out, 1)                                       # [B, H, T, D]


def _swiglu(x, t, p):
    return torch.nn.functional.linear(
        torch.nn.functional.silu(x @ t[p + "gate_proj.weight"].T) * (x @ t[p + "up_proj.weight"].T),
        t[p + "down_proj.weight"])


def _moe_per_token(x, t, p, k, norm_topk=False):
    """The released MoE block token by token: softmax over all experts, top-k, weighted sum of those
    experts."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        probs = torch.softmax(x[n] @ t[p + "gate.weight"].T, -1)
        w, idx = probs.topk(k)
        if norm_topk:
            w = w / w.sum()
        for wj, j in zip(w.tolist(), idx.tolist()):
            out[n] += wj * _swiglu(x[n], t, f"{p}experts.{j}.")
    return out


def reference_logits(family, d, t, ids, pos, key_mask):
    """[B, T] ids -> [B, T, V] unshifted logits, following the released Dream / LLaDA-MoE modeling code."""
    t = {k: v.double() for k, v in t.items()}
    D, H = d["hidden_size"], d["num_attention_heads"]
    Hkv, hd, eps = d["num_key_value_heads"], D // H, d["rms_norm_eps"]
    B, T = ids.shape
    x = t["model.embed_tokens.weight"][ids]
    for i in range(d["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, t[p + "input_layernorm.weight"], eps)

        def proj(n, h=h, p=p):
            w = h @ t[f"{p}self_attn.{n}_proj.weight"].T
            return w + t[f"{p}self_attn.{n}_proj.bias"] if f"{p}self_attn.{n}_proj.bias" in t else w
        q, k, v = proj("q").view(B, T, H, hd), proj("k").view(B, T, Hkv, hd), proj("v").view(B, T, Hkv, hd)
        if family == "llada_moe":                                    # per-head QK RMSNorm before RoPE
            q, k = (_rms(q, t[p + "self_attn.q_norm.weight"], eps),
                    _rms(k, t[p + "self_attn.k_norm.weight"], eps))
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        q, k = _rope(q, pos, d["rope_theta"]), _rope(k, pos, d["rope_theta"])
        a = _attention(q, k, v, key_mask).transpose(1, 2).reshape(B, T, D)
        x = x + a @ t[p + "self_attn.o_proj.weight"].T
        h = _rms(x, t[p + "post_attention_layernorm.weight"], eps)
        if family == "llada_moe":
            x = x + _moe_per_token(h.reshape(B * T, D), t, p + "mlp.", d["num_experts_per_tok"]).view(B, T, D)
        else:
            x = x + _swiglu(h, t, p + "mlp.")
    return _rms(x, t["model.norm.weight"], eps) @ t["lm_head.weight"].T


def _batch():
    """Two rows, the second left-padded by 3 (excluded by the key mask, positions count real tokens)."""
    ids = torch.randint(0, 280, (2, 13), generator=torch.Generator().manual_seed(3))
    key_mask = torch.ones(2, 13, dtype=torch.bool)
    key_mask[1, :3] = False
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, pos, key_mask


@functools.cache
def _family(name):
    d = HF_CONFIGS[name]
    t = random_tensors(HF_NAMES[name](d), seed=5)
    return name, d, t, direct_model(name, t)


@pytest.fixture(params=["dream", "llada_moe"])
def hf_family(request):
    return _family(request.param)


def test_forward_matches_reference(hf_family):
    family, d, t, model = hf_family
    ids, pos, km = _batch()
    with torch.no_grad():
        ours = model.logits(model(ids, pos, km))
    ref = reference_logits(family, d, t, ids, pos, km)
    # padded rows attend to nothing meaningful
    real = km[:, :, None].expand_as(ours)
    torch.testing.assert_close(ours.double()[real], ref[real], **REF_TOL)


def test_dream_gqa_reads_the_right_kv_head():
    """Permuting Dream's KV heads (with their query groups kept) changes the output: the grouping is real."""
    family, d, t, model = _family("dream")
    assert model.config.n_heads // model.config.n_kv_heads == 2
    ids, pos, km = _batch()
    ref = reference_logits(family, d, t, ids, pos, km)
    hd = d["hidden_size"] // d["num_attention_heads"]
    t2 = dict(t)
    for n in ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias"):     # swap KV heads 0 and 1
        key = f"model.layers.0.self_attn.{n}"
        t2[key] = torch.cat([t[key][hd:2 * hd],
                             t[key][:hd]] + ([t[key][2 * hd:]] if t[key].shape[0] > 2 * hd else []))
    assert not torch.allclose(reference_logits(family, d, t2, ids, pos, km), ref, **REF_TOL)
    with torch.no_grad():
        cache = KVCache.empty(model.config, 2, 13, torch.float32, "cpu")
        model(ids, pos, km, cache=cache)
    assert cache.k[0].shape == (2, d["num_key_value_heads"], 13, hd)     # only KV heads are cached


def test_refresh_then_reuse_equals_full_rows(hf_family):
    family, d, t, model = hf_family
    ids, pos, km = _batch()
    with torch.no_grad():
        full, kvs = model(ids, pos, km, return_kv=True)
        cache = KVCache.empty(model.config, 2, 13, torch.float32, "cpu")
        refreshed = model(ids, pos, km, cache=cache, start=0)
        torch.testing.assert_close(refreshed, full, **CACHE_TOL)
        for layer, (k, v) in enumerate(kvs):                          # the cache holds post-RoPE K/V
            torch.testing.assert_close(cache.k[layer], k, **CACHE_TOL)
            torch.testing.assert_close(cache.v[layer], v, **CACHE_TOL)
        # dual (block) and prefix (block..end) reuse
        for a, b in [(5, 9), (9, 13), (5, 13)]:
            h = model(ids[:, a:b], pos[:, a:b], km, cache=cache, start=a)
            torch.testing.assert_close(h, full[:, a:b], **CACHE_TOL)
        starts = torch.tensor([4, 7])                                 # per-row start, same width
        rows = torch.arange(2)[:, None] + starts[:, None] * 0
        cols = starts[:, None] + torch.arange(4)
        h = model(ids[rows, cols], pos[rows, cols], km, cache=cache, start=starts)
        torch.testing.assert_close(h, full[rows, cols], **CACHE_TOL)


def test_slot_pool_longer_than_the_sequence(hf_family):
    """The serving layout: batch rows are rows 3 and 1 of a 6-row pool of 20 columns (13 used), the key mask
    padded to the slot. Refresh and Reuse equal the full forward; the stale columns past the sequence and the
    other slots are neither attended nor written."""
    family, d, t, model = hf_family
    ids, pos, km = _batch()
    with torch.no_grad():
        full, kvs = model(ids, pos, km, return_kv=True)
        pool = KVCache.empty(model.config, 6, 20, torch.float32, "cpu")
        for k in pool.k + pool.v:
            k.fill_(1e4)                                              # stale junk
        rows = torch.tensor([3, 1])
        cache = KVCache(pool.k, pool.v, rows)
        wide = torch.cat([km, km.new_zeros(2, 7)], 1)                 # [2, 20]: the whole slot, tail masked
        torch.testing.assert_close(model(ids, pos, wide, cache=cache, start=0), full, **CACHE_TOL)
        for layer, (k, v) in enumerate(kvs):
            torch.testing.assert_close(pool.k[layer][rows, :, :13], k, **CACHE_TOL)
            torch.testing.assert_close(pool.v[layer][rows, :, :13], v, **CACHE_TOL)
        assert (pool.k[0][rows, :, 13:] == 1e4).all() and (pool.k[0][[0, 2, 4, 5]] == 1e4).all()
        h = model(ids[:, 5:9], pos[:, 5:9], wide, cache=cache, start=5)
        torch.testing.assert_close(h, full[:, 5:9], **CACHE_TOL)


def test_reuse_over_stale_cache_writes_only_the_block(hf_family):
    """Dual reuse after the block changed: the block rows change; the K/V written for the block at layer 0
    (a function of the token alone) equal a fresh forward's; K/V outside the block are left untouched."""
    family, d, t, model = hf_family
    ids, pos, km = _batch()
    with torch.no_grad():
        cache = KVCache.empty(model.config, 2, 13, torch.float32, "cpu")
        old = model(ids, pos, km, cache=cache)
        before = [k.clone() for k in cache.k]
        new_ids = ids.clone()
        new_ids[:, 6:9] = 7
        h = model(new_ids[:, 6:9], pos[:, 6:9], km, cache=cache, start=6)
        assert not torch.allclose(h, old[:, 6:9], **CACHE_TOL)
        _, kvs = model(new_ids, pos, km, return_kv=True)
        torch.testing.assert_close(cache.k[0][:, :, 6:9], kvs[0][0][:, :, 6:9], **CACHE_TOL)
        for k, k0 in zip(cache.k, before):
            assert torch.equal(k[:, :, :6], k0[:, :, :6]) and torch.equal(k[:, :, 9:], k0[:, :, 9:])


def test_dream_logits_are_shifted(hf_family):
    family, d, t, model = hf_family
    ids, pos, km = _batch()
    with torch.no_grad():
        raw = model.logits(model(ids, pos, km))
        shifted = model.full_logits(ids, pos, km)
    if family == "dream":
        assert model.config.logit_shift == 1
        torch.testing.assert_close(shifted[:, 1:], raw[:, :-1], rtol=0, atol=0)   # position i <- output i - 1
        torch.testing.assert_close(shifted[:, :1], raw[:, :1], rtol=0, atol=0)
        assert not torch.allclose(shifted, raw)
    else:
        torch.testing.assert_close(shifted, raw, rtol=0, atol=0)
    # the runner decodes positions [a, b) from the same aligned rows, full and over a cache (reuse widens by
    # one); its batches lay rows out from column 0, right-padded: row 1's real tokens start at column 0 there
    r = EagerRunner(model)
    a, b = 8, 12
    seqs, starts = [ids[0], ids[1, 3:]], [a, a - 3]
    x0, conf = r.full(build_batch(r, "full", seqs, [4, 4], starts, b - a))
    assert torch.equal(x0, shifted[:, a:b].argmax(-1))
    torch.testing.assert_close(conf, torch.softmax(shifted[:, a:b].double(), -1).max(-1).values, rtol=1e-6,
                               atol=1e-6)
    pool = KVCacheManager(model.config, 13, 1 << 40, torch.float32, "cpu", max_slots=2)
    slots = [(1,), (0,)]
    r.refresh(build_batch(r, "refresh", seqs, [4, 4], starts, b - a, slots=slots, pool=pool))
    spans = [(s, s + b - a) for s in starts]
    xr, cr = r.reuse(build_batch(r, "reuse", seqs, [4, 4], starts, b - a, spans, slots, pool))
    assert torch.equal(xr, x0)
    torch.testing.assert_close(cr, conf, rtol=1e-5, atol=1e-6)


# --- MoE routing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", sorted(MOE_IMPLS))
@pytest.mark.parametrize("norm_topk", [False, True])
def test_moe_block_matches_per_token_loop(impl, norm_topk):
    family, d, t, model = _family("llada_moe")
    block = model.model.layers[1].mlp
    x = torch.randn(3, 5, d["hidden_size"], generator=torch.Generator().manual_seed(9))
    ref = _moe_per_token(x.reshape(15, -1).double(), {k: v.double() for k, v in t.items()},
                         "model.layers.1.mlp.", d["num_experts_per_tok"], norm_topk).view(3, 5, -1)
    block.impl, block.norm_topk = impl, norm_topk
    try:
        with torch.no_grad():
            out = block(x)
    finally:
        del block.impl                                               # back to the class default
        block.norm_topk = False
    torch.testing.assert_close(out.double(), ref, **REF_TOL)
    other = _moe_per_token(x.reshape(15, -1).double(), {k: v.double() for k, v in t.items()},
                           "model.layers.1.mlp.", d["num_experts_per_tok"], not norm_topk).view(3, 5, -1)
    assert not torch.allclose(out.double(), other, **REF_TOL)        # renormalising or not is visible


def test_route_picks_top_k_of_softmax():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 5.5, 0.0]])
    w, idx = route(logits, 2, norm_topk=False)
    p = torch.softmax(logits, -1)
    assert idx.tolist() == [[1, 3], [2, 0]]
    torch.testing.assert_close(w, torch.stack([p[0, [1, 3]], p[1, [2, 0]]]))
    assert (w.sum(-1) < 1).all()                                    # released LLaDA-MoE: no renormalisation
    w2, _ = route(logits, 2, norm_topk=True)
    torch.testing.assert_close(w2.sum(-1), torch.ones(2))


def test_unknown_moe_impl_is_a_clear_error():
    model = _family("llada_moe")[3]
    with pytest.raises(ValueError, match="unknown MoE implementation 'sparse'"):
        model.set_moe_impl("sparse")


def test_config_rejects_moe_family_without_experts():
    from dlc.models import build_model
    c = config_from_hf(HF_CONFIGS["llada_moe"])
    c.n_experts = 0
    with pytest.raises(ValueError, match="n_experts must be > 0"):
        build_model(c)


def test_expert_packing_keeps_names_values_and_follows_dtype_changes():
    """The stacked / fused paths re-point expert weights into shared tensors: same state dict, no copy per
    forward, and a dtype change (new storage) is noticed and repacked."""
    from dlc.models.llada_moe import _packed
    family, d, t, _ = _family("llada_moe")
    model = direct_model(family, t)
    ids, pos, km = _batch()
    with torch.no_grad():
        before = model(ids, pos, km)
        experts = model.model.layers[0].mlp.experts
        w_gu, w_down = _packed(experts)
        H = d["expert_intermediate_size"]
        assert experts[3].gate_proj.weight.data_ptr() == w_gu[3].data_ptr()
        assert experts[3].up_proj.weight.data_ptr() == w_gu[3, H].data_ptr()
        assert experts[3].down_proj.weight.data_ptr() == w_down[3].data_ptr()
        sd = model.state_dict()
        assert set(sd) == set(t) and all(torch.equal(sd[k], t[k]) for k in t)
        torch.testing.assert_close(model(ids, pos, km), before, rtol=0, atol=0)
        model.to(torch.float64)
        assert _packed(experts)[0].dtype == torch.float64
        torch.testing.assert_close(model(ids, pos, km), before.double(), **CACHE_TOL)


def test_default_moe_exports_without_graph_breaks():
    """The default MoE path has no data-dependent control flow: torch.export traces the whole model."""
    from dlc.models.loading import load_model
    m = load_model("tiny-llada-moe", seed=2).model
    ids = torch.randint(0, 256, (2, 9))
    ep = torch.export.export(m, (ids,), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), m(ids), **CACHE_TOL)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten.nonzero.default", "aten.item.default", "aten._local_scalar_dense.default"}
    assert "aten.topk.default" in ops and "aten.scatter.src" in ops   # routing is in the graph
