"""In-place K/V write of a block into a static cache at per-row offsets.

``cache[rows[b], :, start[b] + t] = new[b, :, t]`` for K and V in one launch. With per-row ``start`` a batch
whose rows sit at different block offsets (or in scattered slots of a pool) writes without a Python loop, and
since ``start`` and ``rows`` are tensors, one CUDA graph serves every offset. Positions past the cache end are
dropped by the kernel (no out-of-bounds write); the eager wrapper ``dlc.kernels.kv_write_`` checks ranges
first and raises instead.
"""
from __future__ import annotations

import torch

from ._registry import (HAS_TRITON, check, check_shape, define_op, launch, require_triton, tl, triton,
                        use_triton)


def kv_write_reference(k_cache, v_cache, k_new, v_new, start, rows=None) -> None:
    """k_cache/v_cache [N, Hkv, S, D] (N = B, or a slot pool with ``rows`` [B]); k_new/v_new
    [B, Hkv, T, D]."""
    B, _, T, _ = k_new.shape
    S = k_cache.shape[2]
    r = torch.arange(B, device=k_new.device) if rows is None else rows.to(torch.int64)
    col = start.to(torch.int64)[:, None] + torch.arange(T, device=k_new.device)      # [B, T]
    ok = col < S
    rr = r[:, None].expand(B, T)[ok]                                                   # [n]
    cc = col[ok]
    k_cache[rr, :, cc] = k_new.transpose(1, 2)[ok].to(k_cache.dtype)                 # [n, Hkv, D]
    v_cache[rr, :, cc] = v_new.transpose(1, 2)[ok].to(v_cache.dtype)


if HAS_TRITON:
    @triton.jit
    def _kv_write_kernel(KC, VC, KN, VN, START, ROWS, HKV, T, S, D,
                         sc_n, sc_h, sc_s, sn_b, sn_h, sn_t,
                         HAS_ROWS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        b = pid // HKV
        h = pid % HKV
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        d = tl.arange(0, BD)
        st = tl.load(START + b)
        if HAS_ROWS:
            r = tl.load(ROWS + b)
        else:
            r = b
        col = st + t
        mask = ((t < T) & (col < S) & (col >= 0))[:, None] & (d < D)[None, :]
        src = b * sn_b + h * sn_h + t[:, None] * sn_t + d[None, :]
        dst = r.to(tl.int64) * sc_n + h * sc_h + col[:, None].to(tl.int64) * sc_s + d[None, :]
        tl.store(KC + dst, tl.load(KN + src, mask=mask), mask=mask)
        tl.store(VC + dst, tl.load(VN + src, mask=mask), mask=mask)


def kv_write_triton(k_cache, v_cache, k_new, v_new, start, rows=None, BT=16) -> None:
    B, Hkv, T, D = k_new.shape
    S = k_cache.shape[2]
    grid = (B * Hkv, -(-T // BT))
    launch(_kv_write_kernel)[grid](
        k_cache, v_cache, k_new, v_new, start, rows if rows is not None else start, Hkv, T, S, D,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_new.stride(0), k_new.stride(1),
        k_new.stride(2), HAS_ROWS=rows is not None, BT=BT, BD=triton.next_power_of_2(D), num_warps=4)


def validate(k_cache, v_cache, k_new, v_new, start, rows) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        check_shape(name, t, 4, "[rows, Hkv, len, D]")
        check(t.stride(3) == 1, f"{name} needs a contiguous last dim")
    check(k_cache.shape == v_cache.shape, f"v_cache {tuple(v_cache.shape)} != k_cache {tuple(k_cache.shape)}")
    check(k_new.shape == v_new.shape, f"v_new {tuple(v_new.shape)} != k_new {tuple(k_new.shape)}")
    check(k_cache.stride() == v_cache.stride(), "k_cache and v_cache need the same strides")
    check(k_new.stride() == v_new.stride(), "k_new and v_new need the same strides")
    B, Hkv, T, D = k_new.shape
    check(k_cache.shape[1] == Hkv and k_cache.shape[3] == D,
          f"cache [N, Hkv, S, D] = {tuple(k_cache.shape)} does not match new K/V {tuple(k_new.shape)}")
    check(k_cache.dtype == k_new.dtype, f"cache dtype {k_cache.dtype} != new K/V dtype {k_new.dtype}")
    check_shape("start", start, 1, "[B] int64 offsets")
    check(start.shape[0] == B and not start.is_floating_point(),
          f"start must be an integer tensor [B={B}], got {start.dtype} {tuple(start.shape)}")
    if rows is None:
        check(k_cache.shape[0] == B, f"without rows the cache needs B={B} rows, got {k_cache.shape[0]}")
    else:
        check_shape("rows", rows, 1, "[B] cache rows")
        check(rows.shape[0] == B and not rows.is_floating_point(),
              f"rows must be an integer tensor [B={B}], got {rows.dtype} {tuple(rows.shape)}")


def check_ranges(k_cache, k_new, start, rows) -> None:
    """Value checks (sync on GPU): eager callers only."""
    S, T = k_cache.shape[2], k_new.shape[2]
    lo, hi = int(start.min()), int(start.max())
    check(lo >= 0 and hi + T <= S, f"start must keep start + T (T={T}) within the cache length S={S}; "
                                   f"got start in [{lo}, {hi}]")
    if rows is not None:
        n = k_cache.shape[0]
        check(int(rows.min()) >= 0 and int(rows.max()) < n, f"rows must index the cache's {n} rows, got "
                                                            f"[{int(rows.min())}, {int(rows.max())}]")


@define_op("kv_write", mutates_args=("k_cache", "v_cache"))
def kv_write_op(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                start: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    if use_triton(k_cache):
        require_triton("kv_write")
        kv_write_triton(k_cache, v_cache, k_new, v_new, start, rows)
    else:
        kv_write_reference(k_cache, v_cache, k_new, v_new, start, rows)


@kv_write_op.register_fake
def _(k_cache, v_cache, k_new, v_new, start, rows=None):
    return None
