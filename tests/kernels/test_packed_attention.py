"""dlc.kernels.packed_pool_attention: a packed mixed forward's attention over the slot pool in one launch.

CPU: the reference against each sequence's attention written out (a Refresh row: its K/V written into its slot
at columns [0, c), SDPA over keys [0, length) = the key mask of rows of different lengths; a Reuse row: its
block written at its column, SDPA over its slot's keys [0, kv_len)), padding tokens zero and never written;
the tile table's bounds. The Triton kernels in the interpreter (float32 / float16, subprocess,
TRITON_INTERPRET=1). GPU: bf16 against the reference, outputs poisoned, fresh inputs each run."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dlc.kernels as K
from dlc.kernels import packed_attn as P

REL_FP32 = 1e-5
REL_BF16 = 1e-2


def _mix(H=4, Hkv=2, D=16, N=7, S=48, BT=8, pad=11, dtype=torch.float32, device="cpu", seed=0):
    """A Refresh part of 2 rows of width 13 (lengths 13 and 9), a Reuse part of 3 rows of 4 fed columns at
    different columns and key counts, padding: (q, k, v, pools, seqs, tiles, dst)."""
    g = torch.Generator().manual_seed(seed)
    seqs, off = [], 0
    for slot, length in ((5, 13), (2, 9)):                                   # Refresh rows: width 13
        seqs.append(P.PackedSeq(off, 13, slot, 0, length))
        off += 13
    for slot, col0, n_keys in ((0, 20, 30), (6, 4, 40), (3, 30, 34)):        # Reuse rows: 4 columns
        seqs.append(P.PackedSeq(off, 4, slot, col0, n_keys))
        off += 4
    n_pad = off + pad
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)          # noqa: E731
    q, k, v = r(1, H, n_pad, D), r(1, Hkv, n_pad, D), r(1, Hkv, n_pad, D)
    kp, vp = r(N, Hkv, S, D), r(N, Hkv, S, D)
    tiles = P.tile_table(seqs, P.table_rows(n_pad, 8, BT), BT).to(device)
    dst = P.write_table(seqs, n_pad).to(device)
    return q, k, v, kp, vp, seqs, tiles, dst


def _by_sequence(q, k, v, kp, vp, seqs):
    """Each sequence as its own forward's attention (float64): write its K/V, SDPA over its keys."""
    kp, vp = kp.double().clone(), vp.double().clone()
    H, Hkv = q.shape[1], kp.shape[1]
    for off, n, slot, col0, _ in seqs:
        kp[slot, :, col0:col0 + n] = k[0, :, off:off + n].double()
        vp[slot, :, col0:col0 + n] = v[0, :, off:off + n].double()
    y = torch.zeros(q.shape, dtype=torch.float64)
    for off, n, slot, _, keys in seqs:
        ks = kp[slot, :, :keys].repeat_interleave(H // Hkv, 0)
        vs = vp[slot, :, :keys].repeat_interleave(H // Hkv, 0)
        y[0, :, off:off + n] = F.scaled_dot_product_attention(q[0, :, off:off + n].double(), ks, vs)
    return y, kp, vp


def test_reference_equals_each_sequence_attended_alone():
    q, k, v, kp, vp, seqs, tiles, dst = _mix()
    want, kw, vw = _by_sequence(q, k, v, kp, vp, seqs)
    untouched = kp.clone()
    y = K.packed_pool_attention(q, k, v, kp, vp, tiles, dst)
    assert ((y.double() - want).norm() / want.norm()).item() < REL_FP32
    assert (y[0, :, -11:] == 0).all()                                  # padding tokens: zero output
    assert torch.allclose(kp.double(), kw) and torch.allclose(vp.double(), vw)   # written in place
    assert not torch.equal(kp, untouched)                              # (the writes changed the pool)


def test_key_ranges_decide_the_output():
    """The masks are real: a Refresh row's length and a Reuse row's kv_len change its output."""
    q, k, v, kp, vp, seqs, tiles, dst = _mix()
    y = K.packed_pool_attention(q, k, v, kp.clone(), vp.clone(), tiles, dst)
    wider = list(seqs)
    wider[1] = P.PackedSeq(*seqs[1][:4], 13)                           # length 9 -> 13
    wider[3] = P.PackedSeq(*seqs[3][:4], 44)                           # kv_len 40 -> 44
    tiles2 = P.tile_table(wider, tiles.shape[0], 8)
    y2 = K.packed_pool_attention(q, k, v, kp.clone(), vp.clone(), tiles2, dst)
    for off, n, *_ in (seqs[1], seqs[3]):
        assert (y[0, :, off:off + n] - y2[0, :, off:off + n]).abs().max() > 1e-3
    for off, n, *_ in (seqs[0], seqs[2], seqs[4]):
        assert torch.allclose(y[0, :, off:off + n], y2[0, :, off:off + n])


def test_tables():
    seqs = [P.PackedSeq(0, 20, 3, 0, 20), P.PackedSeq(20, 5, 1, 7, 12)]
    t = P.tile_table(seqs, P.table_rows(32, 4, 8), 8)
    assert t[:5].tolist() == [[4, 0, 0, 0],                                          # header: 4 used
                              [0, 8, 3, 20], [8, 16, 3, 20], [16, 20, 3, 20], [20, 25, 1, 12]]
    assert (t[5:] == 0).all() and t.shape[0] == 1 + 4 + 4
    d = P.write_table(seqs, 32)
    assert d[19].tolist() == [3, 19] and d[20].tolist() == [1, 7] and d[24].tolist() == [1, 11]
    assert (d[25:] == -1).all()
    with pytest.raises(ValueError, match="query tiles"):
        P.tile_table(seqs, 4, 8)


def test_bad_inputs_are_named():
    q, k, v, kp, vp, seqs, tiles, dst = _mix()
    with pytest.raises(ValueError, match="tiles"):
        K.packed_pool_attention(q, k, v, kp, vp, tiles.int(), dst)
    with pytest.raises(ValueError, match="dst"):
        K.packed_pool_attention(q, k, v, kp, vp, tiles, dst[:-1])
    with pytest.raises(ValueError, match="k_pool dtype"):
        K.packed_pool_attention(q, k, v, kp.double(), vp.double(), tiles, dst)


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    code = r'''
import sys, torch
from dlc.kernels import packed_attn as P
sys.path.insert(0, sys.argv[2])
from test_packed_attention import _mix
seed = int(sys.argv[1])
for dt, tol in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
    for H, Hkv in ((4, 2), (2, 2), (6, 3)):                 # 3 KV heads: a masked head block
        q, k, v, kp, vp, seqs, tiles, dst = _mix(H=H, Hkv=Hkv, dtype=dt, seed=seed)
        kr, vr = kp.float().clone(), vp.float().clone()
        ref = P.packed_attention_reference(q.float(), k.float(), v.float(), kr, vr, tiles, dst)
        out = P.packed_attention_triton(q, k, v, kp, vp, tiles, dst, BT=8, BK=16,
                                        programs=3 if Hkv == 3 else None)   # 3: each program loops
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        assert rel < tol, (dt, H, rel)
        assert (out[0, :, -11:] == 0).all()
        assert torch.equal(kp.float(), kr) and torch.equal(vp.float(), vr), "K/V writes"
print("interpret-ok")
'''
    seed = str(int.from_bytes(os.urandom(2), "little"))
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-c", code, seed, here], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "interpret-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("H,Hkv,BT,programs", [(32, 32, 64, None), (28, 4, 64, None), (32, 32, 32, 5)])
def test_triton_vs_reference_on_gpu(H, Hkv, BT, programs):
    """bf16, head dim 128, a realistic mix: 2 Refresh rows of 300 (lengths 300, 260), 9 Reuse rows of 32."""
    g = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    seqs, off = [], 0
    for slot, length in ((0, 300), (1, 260)):
        seqs.append(P.PackedSeq(off, 300, slot, 0, length))
        off += 300
    for i in range(9):
        col0 = int(torch.randint(0, 700, (1,), generator=g))
        keys = col0 + 32 + int(torch.randint(0, 60, (1,), generator=g))
        seqs.append(P.PackedSeq(off, 32, 2 + i, col0, keys))
        off += 32
    n_pad = off + 40
    r = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).cuda()       # noqa: E731
    q, k, v = r(1, H, n_pad, 128), r(1, Hkv, n_pad, 128), r(1, Hkv, n_pad, 128)
    kp, vp = r(12, Hkv, 800, 128), r(12, Hkv, 800, 128)
    tiles = P.tile_table(seqs, P.table_rows(n_pad, 32, BT), BT).cuda()
    dst = P.write_table(seqs, n_pad).cuda()
    kr, vr = kp.float().clone(), vp.float().clone()
    ref = P.packed_attention_reference(q.float(), k.float(), v.float(), kr, vr, tiles, dst)
    torch.cuda.synchronize()
    junk = torch.empty(1 << 28, device="cuda").fill_(float("nan"))                 # poison freed blocks
    del junk
    out = P.packed_attention_triton(q, k, v, kp, vp, tiles, dst, BT=BT, programs=programs)
    assert torch.isfinite(out).all() and (out[0, :, off:] == 0).all()
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < REL_BF16
    assert torch.equal(kp.float(), kr) and torch.equal(vp.float(), vr)
