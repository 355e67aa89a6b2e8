"""CPU tests of dlc.kernels: the references (= the ops' CPU implementations) against plain PyTorch math."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import dlc.kernels as K
from dlc.kernels import logits as L

CONF_RTOL = 1e-5          # float32 online softmax vs float64 softmax
ATTN_RTOL = 1e-5          # float32 reference attention vs float64 math
GEMM_SHAPE_RTOL, GEMM_SHAPE_ATOL = 1e-5, 1e-6   # one float32 op over GEMMs of different shapes


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _gap_ok(logits64: torch.Tensor, margin: float = 1e-4) -> torch.Tensor:
    """Rows whose top-2 scores are further apart than float32 rounding could flip."""
    top = logits64.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]) > margin


# ---------------------------------------------------------------------------------------- fused select logits
@pytest.mark.parametrize("N,d,V,chunk", [(7, 24, 1000, 128), (1, 16, 77, 10), (33, 8, 300, 300)])
def test_select_logits_argmax_and_confidence(N, d, V, chunk):
    h, w = _rand(N, d), _rand(V, d)
    tok, conf = L.select_logits_reference(h, w, chunk=chunk)
    l64 = h.double() @ w.double().T                                  # [N, V]
    ok = _gap_ok(l64)
    assert ok.any()
    assert torch.equal(tok[ok], l64.argmax(1)[ok])
    p = torch.softmax(l64, 1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(conf.double(), p, rtol=CONF_RTOL, atol=0)
    assert tok.dtype == torch.int64 and conf.dtype == torch.float32


def test_select_logits_gumbel_with_noise_matches_llada_formula():
    N, d, V, T = 9, 16, 500, 0.8
    h, w = _rand(N, d), _rand(V, d)
    u = torch.rand(N, V, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    tok, conf = K.fused_select_logits(h, w, temperature=T, noise=u)
    l64 = h.double() @ w.double().T
    score = l64.exp() / (-torch.log(u)) ** T                         # LLaDA's add_gumbel_noise, float64
    ok = _gap_ok(l64 - T * torch.log(-torch.log(u)))
    assert ok.sum() >= N - 1
    assert torch.equal(tok[ok], score.argmax(1)[ok])
    p = torch.softmax(l64, 1).gather(1, tok[:, None])[:, 0]          # confidence of the sampled token
    torch.testing.assert_close(conf.double(), p, rtol=CONF_RTOL, atol=0)


def test_hash_noise_is_seeded_uniform_and_samples_the_softmax():
    V, T = 5, 0.7
    w = _rand(V, 4)
    h = _rand(1, 4).expand(20000, 4).contiguous()                    # one distribution, many rows
    tok_a, _ = K.fused_select_logits(h, w, temperature=T, seed=11)
    tok_b, _ = K.fused_select_logits(h, w, temperature=T, seed=11)
    tok_c, _ = K.fused_select_logits(h, w, temperature=T, seed=12)
    assert torch.equal(tok_a, tok_b) and not torch.equal(tok_a, tok_c)
    freq = torch.bincount(tok_a, minlength=V).double() / h.shape[0]
    target = torch.softmax((h[0].double() @ w.double().T) / T, 0)
    assert (freq - target).abs().max() < 0.015                       # ~4 sigma at 20000 draws
    u = L.hash_uniform(3, torch.arange(64)[:, None], torch.arange(512)[None])
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("T", [0.0, 0.8])
def test_select_logits_graph_form_equals_one_call_per_request(T):
    """Tensor temperature + per-row keys (the compiled graphs' form) over a flattened batch of requests draws
    exactly what one scalar-form call per request with that request's seed draws; T = 0 is the plain
    argmax."""
    h, w = _rand(3 * 6, 16), _rand(400, 16)
    seeds = torch.tensor([2 ** 40 + 7, 5, 123456789])
    keys = L.row_key(seeds.repeat_interleave(6), torch.arange(6).repeat(3))
    tok, conf = K.fused_select_logits(h, w, temperature_t=torch.tensor([T], dtype=torch.float64),
                                      row_keys=keys)
    per = [K.fused_select_logits(h[6 * i:6 * (i + 1)], w, T, int(seeds[i])) for i in range(3)]
    assert torch.equal(tok, torch.cat([p[0] for p in per]))
    # One [18, d] @ [d, V] GEMM vs three [6, d] ones: BLAS may block the d-sum differently per shape,
    # so float32 logits and confidences can differ in the last bits (seen: 2.4e-7); the tokens may not.
    per_conf = torch.cat([p[1] for p in per])
    torch.testing.assert_close(conf, per_conf, rtol=GEMM_SHAPE_RTOL, atol=GEMM_SHAPE_ATOL)
    if T == 0:
        assert torch.equal(tok, K.fused_select_logits(h, w)[0])
    else:
        assert not torch.equal(tok, K.fused_select_logits(h, w)[0])


def test_select_logits_graph_form_validation():
    h, w = _rand(4, 8), _rand(50, 8)
    with pytest.raises(ValueError, match="row_keys"):
        K.fused_select_logits(h, w, row_keys=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature_t"):
        K.fused_select_logits(h, w, temperature_t=torch.zeros(2))
    with pytest.raises(ValueError, match="not both"):
        K.fused_select_logits(h, w, 0.5, temperature_t=torch.zeros(1))


class _ShapeLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_select_logits_never_materialises_n_by_v():
    N, d, V, chunk = 12, 16, 1031, 128
    h, w = _rand(N, d), _rand(V, d)
    for T in (0.0, 1.0):
        with _ShapeLog() as log:
            L.select_logits_reference(h, w, temperature=T, chunk=chunk)
        assert log.shapes, "dispatch mode saw no tensors"
        biggest = max(math.prod(s) for s in log.shapes)
        assert biggest <= max(N, d) * chunk < N * V                  # a logit chunk or a weight chunk
        assert all(V not in s for s in log.shapes)


def test_topk_logprobs_match_log_softmax():
    h, w = _rand(6, 16), _rand(900, 16)
    vals, ids = K.fused_topk_logprobs(h, w, 5)
    ref = torch.log_softmax(h.double() @ w.double().T, 1).topk(5, 1)
    assert torch.equal(ids, ref.indices)
    torch.testing.assert_close(vals.double(), ref.values, rtol=1e-5, atol=1e-5)


def test_select_logits_op_on_cpu_is_the_reference():
    h, w = _rand(5, 8), _rand(100, 8)
    a = torch.ops.dlc.fused_select_logits(h, w, 0.5, 7, None)
    b = L.select_logits_reference(h, w, 0.5, 7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert K.OPS["fused_select_logits"] is torch.ops.dlc.fused_select_logits


@pytest.mark.parametrize("args,msg", [
    ((_rand(4, 8, 2), _rand(10, 8)), "hidden must be"),
    ((_rand(4, 8), _rand(10, 6)), "d=8 but weight has d=6"),
    ((_rand(4, 8), _rand(10, 8, dtype=torch.float64)), "dtype"),
])
def test_select_logits_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg):
        K.fused_select_logits(*args)


def test_select_logits_bad_temperature_and_noise():
    h, w = _rand(4, 8), _rand(10, 8)
    with pytest.raises(ValueError, match="temperature"):
        K.fused_select_logits(h, w, temperature=-1.0)
    with pytest.raises(ValueError, match="noise must be"):
        K.fused_select_logits(h, w, temperature=1.0, noise=torch.rand(4, 9))
    with pytest.raises(ValueError, match="k must be"):
        K.fused_topk_logprobs(h, w, 11)


# ------------------------------------------------------------------------------------------- sparse attention
def _attn_math(q, k_all, v_all, keep):
    """float64 softmax attention; k_all/v_all [B, Hkv, n, D] per KV head, keep [B, Hkv, n]."""
    B, H, T, D = q.shape
    rep = H // k_all.shape[1]
    kk = k_all.double().repeat_interleave(rep, 1)
    vv = v_all.double().repeat_interleave(rep, 1)
    s = q.double() @ kk.transpose(-1, -2) / math.sqrt(D)              # [B, H, T, n]
    s = s.masked_fill(~keep.repeat_interleave(rep, 1)[:, :, None], -math.inf)
    return torch.softmax(s, -1) @ vv


def _attn_inputs(B=2, H=4, Hkv=2, T=5, S=19, D=8):
    return (_rand(B, H, T, D), _rand(B, Hkv, S, D), _rand(B, Hkv, S, D), _rand(B, Hkv, T, D),
            _rand(B, Hkv, T, D))


def test_sparse_attention_per_head_indices_gqa():
    q, k, v, kb, vb = _attn_inputs()
    idx = torch.stack([torch.randperm(19)[:7] for _ in range(4)]).view(2, 2, 7)
    idx[1, 0, 2] = -1                                                 # padding entry is skipped
    out = K.sparse_attention(q, k, v, kb, vb, idx)
    g = idx.clamp(min=0)[..., None].expand(-1, -1, -1, 8)
    keep = torch.cat([idx >= 0, torch.ones(2, 2, 5, dtype=torch.bool)], 2)
    ref = _attn_math(q, torch.cat([k.gather(2, g), kb], 2), torch.cat([v.gather(2, g), vb], 2), keep)
    torch.testing.assert_close(out.double(), ref, rtol=ATTN_RTOL, atol=1e-6)
    # each head really sees its own positions: head group 0 and 1 differ
    assert not torch.allclose(out[:, :2], K.sparse_attention(q, k, v, kb, vb, idx.flip(1))[:, :2])


def test_sparse_attention_dense_equals_sdpa_and_compacted_equals_indexed():
    q, k, v, kb, vb = _attn_inputs()
    all_idx = torch.arange(19).expand(2, 2, 19).contiguous()
    sdpa = F.scaled_dot_product_attention(q, torch.cat([k, kb], 2).repeat_interleave(2, 1),
                                          torch.cat([v, vb], 2).repeat_interleave(2, 1))
    torch.testing.assert_close(K.sparse_attention(q, k, v, kb, vb, all_idx), sdpa, rtol=ATTN_RTOL, atol=1e-6)
    torch.testing.assert_close(K.sparse_attention(q, k, v, kb, vb), sdpa, rtol=ATTN_RTOL, atol=1e-6)
    idx = torch.randint(0, 19, (2, 2, 6))
    g = idx[..., None].expand(-1, -1, -1, 8)
    compact = K.sparse_attention(q, k.gather(2, g).contiguous(), v.gather(2, g).contiguous(), kb, vb)
    torch.testing.assert_close(compact, K.sparse_attention(q, k, v, kb, vb, idx), rtol=ATTN_RTOL, atol=1e-6)


def test_select_positions_scores_per_head():
    q, k, _, _, _ = _attn_inputs()
    idx = K.select_positions(q, k, retention=0.5, pool=1)
    assert idx.shape == (2, 2, 10) and torch.equal(idx, idx.sort(2).values)
    qm = q.mean(2).view(2, 2, 2, 8)
    score = torch.einsum("bgrd,bgsd->bgrs", qm, k).amax(2)
    assert torch.equal(idx, score.topk(10, 2).indices.sort(2).values)
    assert torch.equal(K.select_positions(q, k, retention=1.0), torch.arange(19).expand(2, 2, 19))
    km = torch.ones(2, 19, dtype=torch.bool)
    km[:, :4] = False                                                 # left padding never selected
    assert (K.select_positions(q, k, 0.5, key_mask=km) >= 4).all()
    with pytest.raises(ValueError, match="retention"):
        K.select_positions(q, k, 0.0)


def test_sparse_attention_bad_input():
    q, k, v, kb, vb = _attn_inputs()
    with pytest.raises(ValueError, match="k_blk must be"):
        K.sparse_attention(q, k, v, kb[:, :, :3], vb)
    with pytest.raises(ValueError, match="not divisible"):
        K.sparse_attention(q[:, :3], k, v, kb, vb)
    with pytest.raises(ValueError, match="idx holds position 19"):
        K.sparse_attention(q, k, v, kb, vb, torch.full((2, 2, 3), 19))


# ------------------------------------------------------------------------------------------- kv write
def test_kv_write_per_row_offsets_and_slot_rows():
    kc, vc = _rand(4, 2, 12, 8), _rand(4, 2, 12, 8)
    kn, vn = _rand(2, 2, 3, 8), _rand(2, 2, 3, 8)
    ek, ev = kc.clone(), vc.clone()
    start, rows = torch.tensor([0, 9]), torch.tensor([3, 1])
    for b in range(2):
        ek[rows[b], :, start[b]:start[b] + 3] = kn[b]
        ev[rows[b], :, start[b]:start[b] + 3] = vn[b]
    K.kv_write_(kc, vc, kn, vn, start, rows)
    assert torch.equal(kc, ek) and torch.equal(vc, ev)
    kc2, vc2 = _rand(2, 2, 12, 8), _rand(2, 2, 12, 8)
    K.kv_write_(kc2, vc2, kn, vn, 4)                                  # int start, rows = batch rows
    assert torch.equal(kc2[:, :, 4:7], kn) and torch.equal(vc2[:, :, 4:7], vn)


def test_kv_write_bad_input():
    kc, vc, kn, vn = _rand(2, 2, 12, 8), _rand(2, 2, 12, 8), _rand(2, 2, 3, 8), _rand(2, 2, 3, 8)
    with pytest.raises(ValueError, match="within the cache length S=12"):
        K.kv_write_(kc, vc, kn, vn, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="rows must index"):
        K.kv_write_(kc, vc, kn, vn, 0, rows=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="start must be an integer"):
        K.kv_write_(kc, vc, kn, vn, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="does not match"):
        K.kv_write_(kc, vc, kn[..., :4].contiguous(), vn[..., :4].contiguous(), 0)


# ------------------------------------------------------------------------------ fused select logits + extras
EXTRAS_ATOL = 1e-4        # float32 online sweep (entropy, logprobs, credit-fused confidence) vs float64 math


def _credit_inputs(h, w, R, M=3):
    """Credit on each row's runner-up (large, so it flips many tokens) and random ids; every third row off."""
    l64 = h.double() @ w.double().T
    ids = torch.randint(0, w.shape[0], (R, M))
    ids[:, 0] = l64.topk(2, dim=-1).indices[:, 1]
    vals = torch.rand(R, M, dtype=torch.float64) * 3
    vals[:, 0] = 20.0
    alpha = torch.where(torch.arange(R) % 3 == 0, 0.0, 0.7).double()
    return ids, vals, alpha


def test_select_extras_reference_against_float64_math():
    """The op's CPU implementation (float32 sweep) vs full-vocabulary float64 math written here: entropy
    -sum p log p, the token's logprob, top-k logprobs, and credit's selection over l + alpha log(1 + credit),
    the step's own top-1 bonus p1 ** 0.2 included (dInfer's CreditThresholdParallelDecoder)."""
    from dlc.kernels.sampling import CREDIT_GAMMA
    torch.manual_seed(3)
    R, d, V, k = 30, 16, 500, 4
    h, w = _rand(R, d), _rand(V, d)
    ids, vals, alpha = _credit_inputs(h, w, R)
    l64 = h.double() @ w.double().T                                                      # [R, V]
    lsm = l64.log_softmax(-1)
    p1, r1 = lsm.exp().max(-1)
    cred = torch.zeros(R, V, dtype=torch.float64).scatter_add(1, ids, vals)
    cred[torch.arange(R), r1] += p1 ** CREDIT_GAMMA
    fused = l64 + alpha[:, None] * torch.log1p(cred)
    tok_ref = fused.argmax(-1)
    conf_ref = fused.softmax(-1).gather(1, tok_ref[:, None])[:, 0]
    out = K.fused_select_extras(h, w, entropy=True, topk=k, credit_ids=ids, credit_vals=vals,
                                credit_alpha=alpha)
    ok = _gap_ok(fused)
    assert ok.float().mean() > 0.9 and torch.equal(out["tokens"][ok], tok_ref[ok])
    assert (tok_ref != l64.argmax(-1)).sum() >= 5                    # credit decides: many tokens flip
    torch.testing.assert_close(out["confidence"].double()[ok], conf_ref[ok], rtol=0, atol=EXTRAS_ATOL)
    ent = -(lsm.exp() * lsm).sum(-1)
    torch.testing.assert_close(out["entropy"].double(), ent, rtol=0, atol=EXTRAS_ATOL)
    torch.testing.assert_close(out["logprob"].double()[ok], lsm.gather(1, tok_ref[:, None])[ok, 0], rtol=0,
                               atol=EXTRAS_ATOL)
    tv, ti = lsm.topk(k, dim=-1)
    assert torch.equal(out["topk_ids"], ti)
    torch.testing.assert_close(out["topk_logprobs"].double(), tv, rtol=0, atol=EXTRAS_ATOL)
    assert torch.equal(out["top1_ids"], r1)
    torch.testing.assert_close(out["top1_prob"].double(), p1, rtol=0, atol=EXTRAS_ATOL)
    plain = K.fused_select_extras(h, w)                             # no extras asked: (token, conf, logprob)
    assert set(plain) == {"tokens", "confidence", "logprob"}
    ok = _gap_ok(l64)
    assert torch.equal(plain["tokens"][ok], l64.argmax(-1)[ok])


SPARSE_ATOL = 1e-12       # float64 sparse credit correction vs float64 credit in every vocab chunk


def test_credit_sparse_correction_equals_dense_credit():
    """Credit as a correction of the plain sweep (``credit_correction`` over the credited ids' gathered
    logits: what the fused op does after its kernel) == credit added to every vocab chunk (the float64 path
    of decode_rows_ext), with duplicate ids (they add), the raw top-1 among the prior ids, padding entries
    (value 0) and rows with alpha 0: tokens identical, floats within SPARSE_ATOL."""
    from dlc.kernels import select_extras as X
    torch.manual_seed(5)
    R, d, V, k = 30, 16, 500, 3
    h, w = _rand(R, d, dtype=torch.float64), _rand(V, d, dtype=torch.float64)
    ids, vals, alpha = _credit_inputs(h, w, R, M=6)
    ids[:, 3] = ids[:, 0]                                           # a duplicate of the runner-up
    ids[:, 4] = (h @ w.T).argmax(-1)                                # the raw top-1 with prior credit
    vals[20:25, 1:] = 0.0                                           # padding entries (id, 0)
    dense = X.select_extras_reference(h, w, True, k, ids, vals, alpha, acc=torch.float64)
    sparse = X.select_extras_sparse(h, w, True, k, ids, vals, alpha)
    assert set(dense) == set(sparse)
    assert (dense["tokens"] != dense["top1_ids"]).sum() >= 5        # credit decides: tokens flip
    for key in dense:
        if dense[key].is_floating_point():
            torch.testing.assert_close(sparse[key], dense[key], rtol=0, atol=SPARSE_ATOL, msg=key)
        else:
            assert torch.equal(sparse[key], dense[key]), key
    off = alpha == 0                                                # neutral rows: the plain sweep's token
    assert torch.equal(sparse["tokens"][off], sparse["top1_ids"][off])


def test_select_extras_refuses_bad_inputs():
    h, w = _rand(4, 8), _rand(20, 8)
    with pytest.raises(ValueError, match="credit_ids"):
        K.fused_select_extras(h, w, credit_ids=torch.zeros(3, 2, dtype=torch.long),
                              credit_vals=torch.zeros(3, 2), credit_alpha=torch.zeros(3))
    with pytest.raises(ValueError, match="topk"):
        K.fused_select_extras(h, w, topk=21)


def test_select_sweep_hidden_step_by_tile_and_shared_memory(monkeypatch):
    """logits.block_d: 128 for row tiles of <= 32 rows where the stages fit shared memory (the B = 1 decode
    measured faster on an H200), 64 for wider or symbolic tiles and where shared memory is short."""
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)
    assert L.block_d(32, 128, 3, bf16) == 128 and L.block_d(16, 128, 3, fp32) == 128
    assert L.block_d(64, 128, 3, bf16) == 64                        # a 1024-row tile: 64 measured faster
    assert L.block_d(torch.SymInt, 128, 3, bf16) == 64              # not an int: a traced row count
    monkeypatch.setattr(L, "_smem_per_block", lambda device: 227 * 1024)   # an H100 / H200
    assert L.block_d(32, 128, 3, bf16) == 128
    assert L.block_d(32, 128, 3, fp32) == 64                        # fp32 tiles: 240 KB > 227 KB
    monkeypatch.setattr(L, "_smem_per_block", lambda device: 99 * 1024)    # an RTX 4090
    assert L.block_d(32, 128, 3, bf16) == 64
