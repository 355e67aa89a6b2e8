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
    seed = str(int.from_bytes(os.urandom(2), "little"))
    r = subprocess.run([sys.executable, "-c", code, seed], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "interpret-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"


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
