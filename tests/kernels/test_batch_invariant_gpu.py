"""The batch-invariant mode on a CUDA GPU in bf16 at real-ish shapes (skipped on CPU).

The property is bitwise identity: a row computed inside batches of 1, 7, 32 or 200 rows gives the very same
bits (that is what batch invariance means; closeness to torch is checked separately with a tolerance).
torch's own kernels (cuBLAS, its reductions) are allowed to differ across batch sizes: nothing here compares
the default path across batches."""
import dataclasses
import importlib.util
import math
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dlc.kernels import logits as L
from dlc.kernels import pool_attn as PA
from dlc.kernels.matmul import matmul
from dlc.runtime.batch_invariant import batch_invariant_mode

pytestmark = pytest.mark.gpu

REL = 1e-2                     # bf16 output of a float32-accumulated GEMM vs float64 on the same bf16 values
M_ALL = 200


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("N,K", [(4096, 4096), (12288, 4096), (4096, 12288), (126464, 4096)])
def test_matmul_rows_identical_in_any_batch(N, K):
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    x = torch.randn(M_ALL, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)).bfloat16()      # nn.Linear [N, K]
    full = matmul(x[None], w.t()[None])[0]                                               # [200, N]
    assert _rel(full, x.double() @ w.double().t()) < REL
    for M in (1, 7, 32):
        for r0 in (0, 101):
            part = matmul(x[None, r0:r0 + M], w.t()[None])[0]
            assert torch.equal(part, full[r0:r0 + M]), (N, K, M, r0)
    with batch_invariant_mode():                            # nn.Linear through the aten override
        lin = F.linear(x[:, None], w)[:, 0]                 # [200, 1, K] input: aten mm on [200, K]
        one = F.linear(x[57:58], w)
    assert torch.equal(lin, full) and torch.equal(one, full[57:58])


def test_norm_and_sums_identical_in_any_batch():
    """RMSNorm's mean (aten mean.dim) and a float64 softmax sum (aten sum.dim_IntList) in the mode."""
    from dlc.models.common import RMSNorm
    norm = RMSNorm(4096, 1e-5).cuda().bfloat16()
    x = torch.randn(64, 32, 4096, device="cuda").bfloat16()
    z = torch.randn(300, 32768, device="cuda", dtype=torch.float64)
    with batch_invariant_mode():
        y64, y1 = norm(x), norm(x[5:6])
        s300, s1 = torch.exp(z).sum(-1), torch.exp(z[123:124]).sum(-1)
    assert torch.equal(y64[5:6], y1) and torch.equal(s300[123:124], s1)
    ref = RMSNorm(4096, 1e-5).cuda()(x.float())                                         # float32, weight 1
    torch.testing.assert_close(y64.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(s300, torch.exp(z).sum(-1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("T", [0.0, 0.8])
def test_fused_logits_rows_identical_for_1_and_40_rows(T):
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    h = torch.randn(40, 4096, device="cuda", generator=g).bfloat16()
    w = (torch.randn(126464, 4096, device="cuda", generator=g) / 64 * 4).bfloat16()
    keys = L.row_key(11, torch.arange(40, device="cuda"))
    t = torch.tensor([T], device="cuda")
    with batch_invariant_mode():
        tok, conf = L.select_logits_triton(h, w, temperature_t=t, row_keys=keys)
        for r in (0, 21, 39):
            t1, c1 = L.select_logits_triton(h[r:r + 1], w, temperature_t=t, row_keys=keys[r:r + 1])
            assert torch.equal(t1, tok[r:r + 1]) and torch.equal(c1, conf[r:r + 1]), (T, r)
    rt, rc = L.select_logits_reference(h, w, temperature_t=t, row_keys=keys)
    assert (tok == rt).float().mean() >= 0.95


def test_pool_attention_rows_identical_alone_and_in_a_batch():
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    B, H, T, D, S = 24, 16, 32, 128, 1024
    q = torch.randn(B, H, T, D, device="cuda", generator=g).bfloat16()
    k = torch.randn(B + 2, H, S, D, device="cuda", generator=g).bfloat16()
    v = torch.randn(B + 2, H, S, D, device="cuda", generator=g).bfloat16()
    rows = torch.randperm(B + 2, device="cuda", generator=g)[:B]
    lens = torch.randint(T, S + 1, (B,), device="cuda", generator=g)
    with batch_invariant_mode():
        full = PA.pool_attention_triton(q, k, v, rows, lens)
        for b in (0, 9, 23):
            one = PA.pool_attention_triton(q[b:b + 1], k, v, rows[b:b + 1], lens[b:b + 1])
            assert torch.equal(one, full[b:b + 1]), b
    assert _rel(full, PA.pool_attention_reference(q.float(), k.float(), v.float(), rows, lens)) < REL


def test_invariant_attention_reads_v_views_of_a_fused_projection():
    """Refresh attention in the mode takes k fresh from RoPE and v as a view of the fused q|k|v projection
    (other strides): it equals SDPA, and the last row of a batch of 3 equals that row alone (the kernel reads
    k and v with one stride set: v was read with k's strides, and a row's values depended on its index)."""
    from dlc.runtime.batch_invariant import invariant_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    B, H, T, D = 3, 8, 120, 64
    qkv = torch.randn(B, T, 3 * H, D, device="cuda", generator=g).bfloat16()   # [B, T, 3H, D]
    q, k, v = (x.transpose(1, 2) for x in qkv.split(H, dim=2))                # views [B, H, T, D]
    k = k.contiguous()                                                         # as after RoPE
    lens = torch.tensor([101, 42, 120], device="cuda")
    mask = (torch.arange(T, device="cuda")[None] < lens[:, None])[:, None, None, :]
    with batch_invariant_mode():
        out = invariant_attention(q, k, v, attn_mask=mask)
        alone = invariant_attention(q[2:], k[2:], v[2:], attn_mask=None)
    assert torch.equal(out[2:], alone)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    for b in range(B):                                        # a row's queries past its length attend anyway
        assert _rel(out[b, :, :lens[b]], ref[b, :, :lens[b]]) < REL, b


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "batch_invariance.py"
    spec = importlib.util.spec_from_file_location("batch_invariance_gpu_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("mode", ["greedy-1", "sampled"])
def test_engine_solo_vs_mixed_identical_tokens(mode):
    """A small random LLaDA-shaped model (bf16, vocab 126464, decisive head) served by the Engine with
    batch_invariant on (CUDA graphs, fused logits, pool attention, lookahead: the serving defaults otherwise):
    probes alone, then among background requests of other lengths, KV modes and rules: identical tokens."""
    bi = _bench()
    from dlc.models.presets import preset_config
    cfg = dataclasses.replace(preset_config("llada-8b"), d_model=512, n_layers=4, n_heads=8, n_kv_heads=8,
                              mlp_hidden=1408, max_seq_len=512)
    model = bi.build(cfg, "cuda", torch.bfloat16)
    scale = (8, 96, 32, 16, (16, 32, 64))
    eng = bi.make_engine(model, "cuda", 2 * scale[1] + max(scale[4]), 16, None, batch_invariant=True)
    assert eng.runner.compiled is False
    args = Namespace(probes=12, background=12, seed=0)
    row = bi.run_mode(eng, cfg, mode, bi.MODES[mode], args, scale)
    assert row["max_batch"] > 4 and row["mixed_iterations"] > 0
    assert row["differing"] == 0, row["diffs"]
