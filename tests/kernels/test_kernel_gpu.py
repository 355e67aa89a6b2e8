"""Triton kernels on a CUDA GPU against the references (bf16, LLaDA-like widths), fresh random inputs each
run.

Outputs are poisoned first: the caching allocator's free blocks are filled with NaN, so a kernel that leaves
an output element unwritten returns NaN and fails; cache writes land in NaN-filled caches."""
import math

import pytest
import torch

import dlc.kernels as K
from dlc.kernels import attention as A
from dlc.kernels import logits as L

pytestmark = pytest.mark.gpu

CONF_RTOL = 2e-3          # bf16 operands, fp32 accumulation, vs float32 reference on the same bf16 values
ATTN_REL = 1e-2           # ||out - ref|| / ||ref||, bf16 P@V vs float32 reference
TOKEN_AGREE = 0.99        # argmax may flip only on near-ties under a different summation order


def _poison_allocator(nbytes=1 << 30):
    torch.cuda.synchronize()
    junk = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(float("nan"))
    # NaN-filled block goes back to the cache
    del junk


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("N,V,T", [(32, 126464, 0.0), (1024, 50000, 0.0), (96, 32000, 0.7), (17, 4099, 1.3)])
def test_fused_select_logits_triton_vs_reference(N, V, T):
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    d = 4096 if V > 100000 else 1024
    h = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, d, device="cuda", generator=g) / math.sqrt(d) * 4).bfloat16()
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device="cuda"))
    _poison_allocator()
    tok, conf = K.fused_select_logits(h, w, temperature=T, seed=seed)
    torch.cuda.synchronize()
    rt, rc = L.select_logits_reference(h, w, T, seed)
    assert not torch.isnan(conf).any() and (tok >= 0).all() and (tok < V).all()
    same = tok == rt
    assert same.float().mean() >= TOKEN_AGREE
    torch.testing.assert_close(conf[same], rc[same], rtol=CONF_RTOL, atol=1e-6)


def test_fused_select_logits_with_noise_tensor():
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    h = torch.randn(40, 512, device="cuda", generator=g).bfloat16()
    w = (torch.randn(3000, 512, device="cuda", generator=g) / 8).bfloat16()
    u = torch.rand(40, 3000, device="cuda", generator=g, dtype=torch.float64)
    _poison_allocator()
    tok, conf = K.fused_select_logits(h, w, temperature=1.0, noise=u)
    rt, rc = L.select_logits_reference(h, w, 1.0, noise=u)
    assert (tok == rt).float().mean() >= TOKEN_AGREE
    assert not torch.isnan(conf).any()


@pytest.mark.parametrize("T", [0.0, 0.9])
def test_fused_select_logits_graph_form(T):
    """The form the GPU-lowered chunk_logits emits: temperature as a [1] float64 tensor, per-row hash keys
    (two requests with their own seeds); equal to one scalar-form call per request."""
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    h = torch.randn(64, 1024, device="cuda", generator=g).bfloat16()
    w = (torch.randn(32000, 1024, device="cuda", generator=g) / 8).bfloat16()
    seeds = torch.randint(0, 2**62, (2,), generator=g, device="cuda")
    keys = L.row_key(seeds.repeat_interleave(32), torch.arange(32, device="cuda").repeat(2))
    tt = torch.tensor([T], dtype=torch.float64, device="cuda")
    _poison_allocator()
    tok, conf = K.fused_select_logits(h, w, temperature_t=tt, row_keys=keys)
    per = [K.fused_select_logits(h[32 * i:32 * (i + 1)], w, T, int(seeds[i]) & 0x7FFFFFFF) for i in range(2)]
    assert torch.equal(tok, torch.cat([p[0] for p in per]))
    torch.testing.assert_close(conf, torch.cat([p[1] for p in per]), rtol=1e-6, atol=1e-7)
    rt, rc = L.select_logits_reference(h, w, temperature_t=tt, row_keys=keys)
    same = tok == rt
    assert not torch.isnan(conf).any() and same.float().mean() >= TOKEN_AGREE
    torch.testing.assert_close(conf[same], rc[same], rtol=CONF_RTOL, atol=1e-6)


@pytest.mark.parametrize("B,H,Hkv,T,S,n,D", [(1, 32, 32, 32, 768, 384, 128), (4, 28, 4, 32, 512, 200, 128),
                                             (3, 8, 2, 7, 100, 33, 64)])
def test_sparse_attention_triton_vs_reference(B, H, Hkv, T, S, n, D):
    dev = "cuda"
    q = torch.randn(B, H, T, D, device=dev).bfloat16()
    k, v = torch.randn(B, Hkv, S, D, device=dev).bfloat16(), torch.randn(B, Hkv, S, D, device=dev).bfloat16()
    kb, vb = torch.randn(B, Hkv, T, D, device=dev).bfloat16(), torch.randn(B, Hkv, T, D,
                                                                           device=dev).bfloat16()
    idx = torch.rand(B, Hkv, S, device=dev).argsort(-1)[..., :n].contiguous()
    idx[0, 0, :5] = -1
    f32 = [t.float() for t in (q, k, v, kb, vb)]
    for ix in (idx, None):
        _poison_allocator()
        out = K.sparse_attention(q, k, v, kb, vb, ix)
        ref = A.sparse_attention_reference(*f32, ix)
        assert not torch.isnan(out).any()
        assert _rel(out, ref) < ATTN_REL


def test_kv_write_triton_per_row_into_poisoned_pool():
    dev = "cuda"
    pool_k = torch.full((6, 32, 768, 128), float("nan"), device=dev, dtype=torch.bfloat16)
    pool_v = torch.full_like(pool_k, float("nan"))
    kn, vn = torch.randn(3, 32, 32, 128, device=dev).bfloat16(), torch.randn(3, 32, 32, 128,
                                                                             device=dev).bfloat16()
    start = torch.randint(0, 768 - 32, (3,), device=dev)
    rows = torch.randperm(6, device=dev)[:3]
    K.kv_write_(pool_k, pool_v, kn, vn, start, rows)
    written = torch.zeros(6, 768, dtype=torch.bool, device=dev)
    for b in range(3):
        r, s = int(rows[b]), int(start[b])
        assert torch.equal(pool_k[r, :, s:s + 32], kn[b]) and torch.equal(pool_v[r, :, s:s + 32], vn[b])
        written[r, s:s + 32] = True
    assert torch.isnan(pool_k.transpose(1, 2)[~written]).all()        # nothing else touched


def test_ops_compile_with_inductor_on_gpu():
    """torch.compile (Inductor) traces into the triton_op bodies and matches the eager op."""
    h = torch.randn(64, 1024, device="cuda").bfloat16()
    w = (torch.randn(8000, 1024, device="cuda") / 32).bfloat16()
    f = torch.compile(lambda h, w: K.fused_select_logits(h * 2, w), fullgraph=True)
    tok, conf = f(h, w)
    et, ec = K.fused_select_logits(h * 2, w)
    assert torch.equal(tok, et)
    torch.testing.assert_close(conf, ec)


EXTRAS_ATOL = 2e-3        # bf16 operands, fp32 sweep, vs the float64 sweep on the same bf16 values


@pytest.mark.parametrize("N,V,k,credit", [(32, 126464, 5, True), (1024, 50000, 0, False),
                                         (17, 4099, 20, True)])
def test_fused_select_extras_triton_vs_float64(N, V, k, credit):
    """The kernel with its extras on (entropy, top-k logprobs; credit: its sparse correction) against the
    float64 sweep (``select_extras_reference`` in float64, credit in every chunk) on the same bf16 values."""
    from dlc.kernels import select_extras as X
    _poison_allocator()
    h = (torch.randn(N, 4096, device="cuda") * 0.05).bfloat16()
    w = torch.randn(V, 4096, device="cuda").bfloat16()
    c = (None, None, None)
    if credit:
        ids = torch.randint(0, V, (N, 8), device="cuda")
        top2 = (h.float() @ w.float().T).topk(2, dim=-1).indices
        ids[:, 0], ids[:, 1], ids[:, 2] = top2[:, 1], top2[:, 1], top2[:, 0]   # a duplicate, the raw top-1
        vals = torch.rand(N, 8, device="cuda", dtype=torch.float64) * 3
        alpha = torch.where(torch.arange(N, device="cuda") % 3 == 0, 0.0, 0.7).double()
        c = (ids, vals, alpha)
    out = K.fused_select_extras(h, w, entropy=True, topk=k, credit_ids=c[0], credit_vals=c[1],
                                credit_alpha=c[2])
    ref = X.select_extras_reference(h.double(), w.double(), True, k, *c, acc=torch.float64)
    assert set(out) == set(ref)
    same = out["tokens"] == ref["tokens"]
    assert same.float().mean() >= TOKEN_AGREE
    for key in out:
        a, b = (out[key][same], ref[key][same]) if key in ("confidence", "logprob") else (out[key], ref[key])
        if a.is_floating_point():
            assert not a.isnan().any() and (a.double() - b).abs().max().item() < EXTRAS_ATOL, key
        else:
            assert (a == b).float().mean() >= TOKEN_AGREE, key


def test_credit_correction_kernel_equals_the_torch_reference_on_the_gpu():
    """``credit_correction``'s Triton kernel (one program a row, float64 in registers with CUDA's libdevice)
    vs the torch reference at a B = 32 step's shape (1024 rows, 32 credited ids each): tokens and top-1
    identical, confidences / logprobs within float32 rounding, credit flipping tokens."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from interpret_check import credit_case

    from dlc.kernels import select_extras as X
    torch.manual_seed(0)
    args = credit_case(1024, 32, 4096, "cuda")
    _poison_allocator()
    got = X.credit_correction(*args)                       # the kernel on CUDA
    ref = X.credit_correction_reference(*args)
    assert (ref["tokens"] != ref["top1_ids"]).sum() > 100
    assert torch.equal(got["tokens"], ref["tokens"]) and torch.equal(got["top1_ids"], ref["top1_ids"])
    for key in ("confidence", "logprob", "top1_prob"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-7, msg=key)
