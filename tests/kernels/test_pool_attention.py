"""dlc.kernels.pool_attention: attention over slot-pool rows read in place, keys [0, kv_len[b]).

CPU: the reference against a per-row loop written out (softmax of q.k over the row's valid keys); the Triton
kernel in the interpreter (subprocess, TRITON_INTERPRET=1) with and without key splits. GPU: bf16 against the
reference with outputs poisoned, fresh inputs each run."""
import math
import os
import subprocess
import sys

import pytest
import torch

import dlc.kernels as K
from dlc.kernels import pool_attn as P

REL_FP32 = 1e-5
REL_BF16 = 1e-2            # bf16 P@V, fp32 accumulation vs float32 reference on the same values


def _run_interpreted(code: str) -> None:
    """Run ``code`` (which prints interpret-ok) in a subprocess under TRITON_INTERPRET=1 with a random
    seed."""
    seed = str(int.from_bytes(os.urandom(2), "little"))
    r = subprocess.run([sys.executable, "-c", code, seed], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "interpret-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"


def _loop(q, kp, vp, rows, lens):
    B, H, T, D = q.shape
    rep = H // kp.shape[1]
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            k = kp[rows[b], h // rep, :lens[b]].double()
            v = vp[rows[b], h // rep, :lens[b]].double()
            out[b, h] = torch.softmax(q[b, h].double() @ k.T / math.sqrt(D), -1) @ v
    return out


def _case(B=3, H=4, Hkv=2, T=5, S=37, N=6, D=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, device=device).to(dtype)
    kp = torch.randn(N, Hkv, S, D, generator=g, device=device).to(dtype)
    vp = torch.randn(N, Hkv, S, D, generator=g, device=device).to(dtype)
    rows = torch.randperm(N, generator=g, device=device)[:B]
    lens = torch.randint(T, S + 1, (B,), generator=g, device=device)
    return q, kp, vp, rows, lens


def test_reference_equals_a_loop_over_rows():
    q, kp, vp, rows, lens = _case()
    out = K.pool_attention(q, kp, vp, rows, lens)
    ref = _loop(q, kp, vp, rows, lens)
    assert ((out.double() - ref).norm() / ref.norm()).item() < REL_FP32


def test_bad_inputs_are_named():
    q, kp, vp, rows, lens = _case()
    with pytest.raises(ValueError, match="rows"):
        K.pool_attention(q, kp, vp, rows[:2], lens)
    with pytest.raises(ValueError, match="kv_len must be int64"):
        K.pool_attention(q, kp, vp, rows, lens.int())
    with pytest.raises(ValueError, match="head dim"):
        K.pool_attention(q[..., :8].contiguous(), kp, vp, rows, lens)
    vt = vp.transpose(1, 2).contiguous().transpose(1, 2)           # same values and shape, other strides
    with pytest.raises(ValueError, match="v_pool strides"):            # the kernel reads v with k's strides
        K.pool_attention(q, kp, vt, rows, lens)


@pytest.mark.slow
def test_triton_kernel_in_interpreter():
    # triton 3.6's interpreter (the H200 image) cannot use a loop bound computed from program_id / a loaded
    # length (`range(s0, s1, BK)`: "only 0-dimensional arrays can be converted"); 3.9's can, and compiled
    # kernels can on every version (the GPU tests below run them).
    pytest.importorskip("triton", minversion="3.9")
    code = r'''
import sys, torch
from dlc.kernels import pool_attn as P
torch.manual_seed(int(sys.argv[1]))
for dt, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
    for (B, H, Hkv, T, S, splits) in ((2, 4, 2, 5, 40, 1), (3, 2, 2, 7, 70, 3), (1, 2, 1, 16, 33, 2)):
        q = torch.randn(B, H, T, 16).to(dt)
        kp, vp = torch.randn(5, Hkv, S, 16).to(dt), torch.randn(5, Hkv, S, 16).to(dt)
        rows, lens = torch.randperm(5)[:B], torch.randint(T, S + 1, (B,))
        out = P.pool_attention_triton(q, kp, vp, rows, lens, BK=16, splits=splits)
        ref = P.pool_attention_reference(q.float(), kp.float(), vp.float(), rows, lens)
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < tol, (dt, B, splits, rel)
print("interpret-ok")
'''
    _run_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,T,S,splits", [(1, 32, 800, None), (8, 32, 800, None), (32, 32, 800, 1),
                                          (3, 40, 517, 4)])
def test_triton_vs_reference_on_gpu(B, T, S, splits):
    q, kp, vp, rows, lens = _case(B=B, H=32, Hkv=32, T=T, S=S, N=B + 3, D=128, dtype=torch.bfloat16,
                                  device="cuda", seed=int(torch.seed() % 2**31))
    torch.cuda.synchronize()
    junk = torch.empty(1 << 28, device="cuda").fill_(float("nan"))                 # poison freed blocks
    del junk
    out = P.pool_attention_triton(q, kp, vp, rows, lens, splits=splits)
    ref = P.pool_attention_reference(q.float(), kp.float(), vp.float(), rows, lens)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < REL_BF16


# -- head-sparse: each KV head attends over its own kept columns cols[b, g, :n_cols[b]] --------------------
def _cols_case(B=3, Hkv=2, S=37, K=15, T=5, seed=0, device="cpu"):
    """Kept columns per (row, kv head): ascending, distinct, one past the row's kv_len (masked), counts
    between T and K."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.stack([torch.stack([torch.randperm(S, generator=g)[:K].sort().values for _ in range(Hkv)])
                        for _ in range(B)])
    n_cols = torch.randint(T, K + 1, (B,), generator=g)
    return cols.to(device), n_cols.to(device)


def _cols_loop(q, kp, vp, rows, lens, cols, n_cols):
    B, H, T, D = q.shape
    rep = H // kp.shape[1]
    out = torch.empty(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            js = [j for j in cols[b, h // rep, :n_cols[b]].tolist() if j < lens[b]]
            k = kp[rows[b], h // rep, js].double()
            v = vp[rows[b], h // rep, js].double()
            out[b, h] = torch.softmax(q[b, h].double() @ k.T / math.sqrt(D), -1) @ v
    return out


def test_kept_columns_reference_equals_a_loop():
    q, kp, vp, rows, lens = _case()
    cols, n_cols = _cols_case()
    lens[0] = int(cols[0, 0, n_cols[0] - 1])                   # row 0's last used column is a padding key
    out = K.pool_attention(q, kp, vp, rows, lens, cols, n_cols)
    ref = _cols_loop(q, kp, vp, rows, lens, cols, n_cols)
    assert ((out.double() - ref).norm() / ref.norm()).item() < REL_FP32
    dense = _loop(q, kp, vp, rows, lens)
    assert ((dense - ref).norm() / ref.norm()).item() > 1e-2  # the kept subset attends differently
    every = torch.arange(37).expand(3, 2, 37).contiguous()     # every column: the dense op
    allc = K.pool_attention(q, kp, vp, rows, lens, every, torch.full((3,), 37))
    assert ((allc.double() - dense).norm() / dense.norm()).item() < REL_FP32


def test_kept_columns_bad_inputs_are_named():
    q, kp, vp, rows, lens = _case()
    cols, n_cols = _cols_case()
    with pytest.raises(ValueError, match="n_cols"):
        K.pool_attention(q, kp, vp, rows, lens, cols)
    with pytest.raises(ValueError, match="cols must be"):
        K.pool_attention(q, kp, vp, rows, lens, cols[:, :1].contiguous(), n_cols)
    with pytest.raises(ValueError, match="cols must be int64"):
        K.pool_attention(q, kp, vp, rows, lens, cols.int(), n_cols)


@pytest.mark.slow
def test_kept_columns_triton_kernel_in_interpreter():
    pytest.importorskip("triton", minversion="3.9")          # see test_triton_kernel_in_interpreter
    code = r'''
import sys, torch
from dlc.kernels import pool_attn as P
torch.manual_seed(int(sys.argv[1]))
for dt, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
    for (B, H, Hkv, T, S, K, splits) in ((2, 4, 2, 5, 40, 20, 1), (3, 2, 2, 7, 70, 33, 3),
                                         (1, 2, 1, 16, 33, 30, 2)):
        q = torch.randn(B, H, T, 16).to(dt)
        kp, vp = torch.randn(5, Hkv, S, 16).to(dt), torch.randn(5, Hkv, S, 16).to(dt)
        rows, lens = torch.randperm(5)[:B], torch.randint(K, S + 1, (B,))
        cols = torch.stack([torch.stack([torch.randperm(S)[:K].sort().values for _ in range(Hkv)])
                            for _ in range(B)])
        cols[0, 0, -1], lens[0] = S - 1, S - 1                                # a masked (padding) column
        n_cols = torch.randint(T, K + 1, (B,))
        out = P.pool_attention_triton(q, kp, vp, rows, lens, cols, n_cols, BK=16, splits=splits)
        ref = P.pool_attention_reference(q.float(), kp.float(), vp.float(), rows, lens, cols, n_cols)
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < tol, (dt, B, splits, rel)
print("interpret-ok")
'''
    _run_interpreted(code)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,S,K,splits", [(1, 2048, 528, None), (32, 2048, 1040, None), (3, 517, 200, 4)])
def test_kept_columns_triton_vs_reference_on_gpu(B, S, K, splits):
    seed = int(torch.seed() % 2**31)
    q, kp, vp, rows, lens = _case(B=B, H=32, Hkv=32, T=32, S=S, N=B + 3, D=128, dtype=torch.bfloat16,
                                  device="cuda", seed=seed)
    cols, n_cols = _cols_case(B=B, Hkv=32, S=S, K=K, T=32, seed=seed, device="cuda")
    torch.cuda.synchronize()
    junk = torch.empty(1 << 28, device="cuda").fill_(float("nan"))                 # poison freed blocks
    del junk
    out = P.pool_attention_triton(q, kp, vp, rows, lens, cols, n_cols, splits=splits)
    ref = P.pool_attention_reference(q.float(), kp.float(), vp.float(), rows, lens, cols, n_cols)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < REL_BF16
