"""Attention of a block's queries over the serving KV slot pool, read in place (no gather of the rows).

The runtime keeps K/V in a slot pool ``[n_slots, Hkv, S_max, D]`` and batch row b lives in pool row
``rows[b]`` with its valid keys at columns ``[0, kv_len[b])`` (the block's fresh K/V already written there).
SDPA needs the batch's rows as one tensor, so the eager path gathers them (``pool[rows]``): at batch 32 and
768 columns that copies 0.4 GB per layer, 13 GB per LLaDA-8B Reuse step, more than the attention reads.
This kernel indexes the pool by ``rows`` instead and masks by ``kv_len`` (no [B, S] mask tensor, so no
slow masked SDPA path either):

    out[b, h] = softmax(q[b, h] @ K[rows[b], g, :kv_len[b]]^T / sqrt(D)) @ V[rows[b], g, :kv_len[b]]

with g = h // (H / Hkv). Split-KV (flash-decoding): with few (batch x head x query-tile) programs the key
range is split over ``splits`` programs that write partial (sum, max, denominator), and a second kernel
combines them, so a batch-1 step still fills the GPU. In the batch-invariant mode the split count and the
query tile are those of a batch of one whatever B is (``n_splits(..., invariant=True)``), so a row's result
does not depend on its neighbours.

Head-sparse Reuse (``cols`` [B, Hkv, K] int64 with ``n_cols`` [B]): each KV head g of row b attends over its
own kept columns ``cols[b, g, :n_cols[b]]`` only (entries < 0 or >= kv_len[b] are masked), read from the pool
by index: the kernel loads just those K/V rows (bytes proportional to the kept count, never a gathered
[B, Hkv, K, D] copy); the split-KV runs over the kept list. The reference gathers (the CPU path).

The op is opaque to torch.compile (a plain custom op): compiled transformer blocks call it as an extern
kernel, so capturing a block with it compiles nothing extra. It is a runtime op; exported engines do not use
it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._registry import (HAS_TRITON, check, check_shape, define_op, invariant, require_triton, tl, triton,
                        use_triton)


def pool_attention_reference(q, k_pool, v_pool, rows, kv_len, cols=None, n_cols=None):
    """q [B, H, T, D]; k_pool/v_pool [N, Hkv, S, D]; rows, kv_len [B] int64; optional kept columns cols
    [B, Hkv, K] with n_cols [B] -> [B, H, T, D]."""
    B, H, T, D = q.shape
    if cols is not None:
        return _cols_reference(q, k_pool, v_pool, rows, kv_len, cols, n_cols)
    k, v = k_pool[rows], v_pool[rows]                                   # [B, Hkv, S, D]
    rep = H // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    keep = torch.arange(k.shape[2], device=q.device)[None] < kv_len[:, None]    # [B, S]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def _cols_reference(q, k_pool, v_pool, rows, kv_len, cols, n_cols):
    """Head-sparse: gather each head's kept columns (the CPU implementation) and attend over them."""
    H, Hkv, S = q.shape[1], k_pool.shape[1], k_pool.shape[2]
    heads = torch.arange(Hkv, device=q.device)[None, :, None]                     # [1, Hkv, 1]
    c = cols.clamp(0, S - 1)
    k, v = k_pool[rows[:, None, None], heads, c], v_pool[rows[:, None, None], heads, c]   # [B, Hkv, K, D]
    used = torch.arange(cols.shape[2], device=q.device)[None, None, :] < n_cols[:, None, None]
    keep = used & (cols >= 0) & (cols < kv_len[:, None, None])                    # [B, Hkv, K]
    rep = H // Hkv
    if rep > 1:
        k, v, keep = (t.repeat_interleave(rep, dim=1) for t in (k, v, keep))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, :, None, :])


def n_splits(B: int, H: int, t_tiles: int, S: int, sms: int, BK: int, invariant: bool = False) -> int:
    """Key-range splits so that about two programs per SM run, each with at least 2 key tiles.
    ``invariant`` (the batch-invariant mode): sized as for one row (B = 1), so a row's key chunks, and the
    order the combine sums them in, do not depend on the batch (S is the pool's width, fixed per server)."""
    programs = (1 if invariant else B) * H * t_tiles
    return max(1, min(-(-2 * sms // programs), max(1, S // (2 * BK)), 16))


if HAS_TRITON:
    from .attention import _attend_tile          # one online-softmax step over a key tile (shared)

    @triton.jit
    def _pool_attn_kernel(Q, K, V, ROWS, LENS, COLS, NCOLS, O, PO, PM, PL,
                          H, HKV, T, CHUNK, D, scale,
                          sq_b, sq_h, sq_t, sk_n, sk_h, sk_s, sc_b, sc_h, so_b, so_h, so_t,
                          SPLIT: tl.constexpr, IEEE: tl.constexpr, HAS_COLS: tl.constexpr,
                          BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        g = h // (H // HKV)
        tt = tl.program_id(1)
        sp = tl.program_id(2)
        t = tt * BT + tl.arange(0, BT)
        tmask = t < T
        dk = tl.arange(0, BD)
        dmask = dk < D
        q = tl.load(Q + b * sq_b + h * sq_h + t[:, None] * sq_t + dk[None, :],
                    mask=tmask[:, None] & dmask[None, :], other=0.0)
        row = tl.load(ROWS + b)
        n = tl.load(LENS + b)
        Kp = K + row * sk_n + g * sk_h
        Vp = V + row * sk_n + g * sk_h
        acc = tl.zeros([BT, BD], tl.float32)
        m = tl.full([BT], float("-inf"), tl.float32)
        l = tl.zeros([BT], tl.float32)
        s0 = sp * CHUNK
        if HAS_COLS:                      # this split's share of the head's kept-column list
            s1 = tl.minimum(s0 + CHUNK, tl.load(NCOLS + b))
            for j0 in range(s0, s1, BK):
                j = j0 + tl.arange(0, BK)
                jm = j < s1
                pos = tl.load(COLS + b * sc_b + g * sc_h + j, mask=jm, other=0)
                valid = jm & (pos >= 0) & (pos < n)
                pos = tl.where(valid, pos, 0)
                acc, m, l = _attend_tile(q, acc, m, l, Kp, Vp, pos, valid, sk_s, dk, dmask, scale, IEEE)
        else:
            s1 = tl.minimum(s0 + CHUNK, n)
            for j0 in range(s0, s1, BK):
                j = j0 + tl.arange(0, BK)
                acc, m, l = _attend_tile(q, acc, m, l, Kp, Vp, j, j < s1, sk_s, dk, dmask, scale, IEEE)
        if SPLIT == 1:
            out = acc / l[:, None]
            tl.store(O + b * so_b + h * so_h + t[:, None] * so_t + dk[None, :], out.to(O.dtype.element_ty),
                     mask=tmask[:, None] & dmask[None, :])
        else:
            base = (pid_bh * SPLIT + sp) * T                                  # partials [B*H, SPLIT, T(, D)]
            tl.store(PO + (base + t[:, None]) * BD + dk[None, :], acc, mask=tmask[:, None])
            tl.store(PM + base + t, m, mask=tmask)
            tl.store(PL + base + t, l, mask=tmask)

    @triton.jit
    def _pool_attn_combine(O, PO, PM, PL, H, T, D, so_b, so_h, so_t,
                           SPLIT: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        tmask = t < T
        dk = tl.arange(0, BD)
        M = tl.full([BT], float("-inf"), tl.float32)
        for sp in range(SPLIT):
            M = tl.maximum(M, tl.load(PM + (pid_bh * SPLIT + sp) * T + t, mask=tmask, other=float("-inf")))
        M = tl.where(M == float("-inf"), 0.0, M)
        acc = tl.zeros([BT, BD], tl.float32)
        den = tl.zeros([BT], tl.float32)
        for sp in range(SPLIT):
            base = (pid_bh * SPLIT + sp) * T
            w = tl.exp(tl.load(PM + base + t, mask=tmask, other=float("-inf")) - M)
            den += w * tl.load(PL + base + t, mask=tmask, other=0.0)
            acc += w[:, None] * tl.load(PO + (base + t[:, None]) * BD + dk[None, :], mask=tmask[:, None],
                                        other=0.0)
        out = acc / den[:, None]
        tl.store(O + b * so_b + h * so_h + t[:, None] * so_t + dk[None, :], out.to(O.dtype.element_ty),
                 mask=tmask[:, None] & (dk[None, :] < D))


def _sm_count(dev) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 8


def pool_attention_triton(q, k_pool, v_pool, rows, kv_len, cols=None, n_cols=None, BT=None, BK=64,
                          num_warps=4, num_stages=2, splits=None):
    B, H, T, D = q.shape
    check_same_strides(k_pool, v_pool)                                   # one stride set for both (below)
    Hkv = k_pool.shape[1]
    S = k_pool.shape[2] if cols is None else cols.shape[2]               # the key range the splits share
    o = torch.empty_like(q)
    inv = invariant()
    BT = BT or (32 if inv else max(16, min(64, triton.next_power_of_2(T))))      # invariant: one tile shape
    BD = max(16, triton.next_power_of_2(D))
    tiles = -(-T // BT)
    split = splits or n_splits(B, H, tiles, S, _sm_count(q.device), BK, inv)
    chunk = -(-S // split)
    chunk = -(-chunk // BK) * BK                                         # whole key tiles per split
    split = -(-S // chunk)
    if split > 1:
        po = torch.empty(B * H * split * T * BD, dtype=torch.float32, device=q.device)
        pm = torch.empty(B * H * split * T, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = o
    has_cols = cols is not None
    cs = (cols.stride(0), cols.stride(1)) if has_cols else (0, 0)
    _pool_attn_kernel[(B * H, tiles, split)](
        q, k_pool, v_pool, rows, kv_len, cols if has_cols else rows, n_cols if has_cols else rows,
        o, po, pm, pl, H, Hkv, T, chunk, D, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        cs[0], cs[1], o.stride(0), o.stride(1), o.stride(2),
        SPLIT=split, IEEE=q.dtype == torch.float32, HAS_COLS=has_cols, BT=BT, BK=BK, BD=BD,
        num_warps=num_warps, num_stages=num_stages)
    if split > 1:
        _pool_attn_combine[(B * H, tiles)](o, po, pm, pl, H, T, D, o.stride(0), o.stride(1), o.stride(2),
                                                   SPLIT=split, BT=BT, BD=BD, num_warps=num_warps)
    return o


def check_same_strides(k_pool, v_pool) -> None:
    """The kernel reads K and V with K's strides: both must share one layout (launcher and ``validate``)."""
    check(v_pool.stride() == k_pool.stride(), f"v_pool strides {v_pool.stride()} != k_pool "
                                              f"{k_pool.stride()} (the kernel reads both with k's)")


def validate(q, k_pool, v_pool, rows, kv_len, cols=None, n_cols=None) -> None:
    check_shape("q", q, 4, "[B, H, T, D]")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        check_shape(name, t, 4, "[n_slots, Hkv, S, D]")
        check(t.dtype == q.dtype, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        check(t.stride(3) == 1, f"{name} needs a contiguous last dim")
    check(q.stride(3) == 1, "q needs a contiguous last dim")
    check(tuple(v_pool.shape) == tuple(k_pool.shape), f"v_pool shape {tuple(v_pool.shape)} != k_pool "
                                                      f"{tuple(k_pool.shape)}")
    check_same_strides(k_pool, v_pool)
    B, H, T, D = q.shape
    check(k_pool.shape[3] == D, f"head dim: q has {D}, the pool {k_pool.shape[3]}")
    check(H % k_pool.shape[1] == 0, f"query heads {H} not divisible by kv heads {k_pool.shape[1]}")
    for name, t in (("rows", rows), ("kv_len", kv_len)):
        # the message is formatted only on failure: under torch.compile, formatting the traced batch size
        # pins it (compiled blocks then recompiled once per batch bucket)
        if t.dim() != 1 or t.shape[0] != B:
            raise ValueError(f"{name} must be [B={B}], got {tuple(t.shape)}")
        check(t.dtype == torch.int64, f"{name} must be int64, got {t.dtype}")
    if (cols is None) != (n_cols is None):
        raise ValueError("cols and n_cols go together (head-sparse: kept columns and their count per row)")
    if cols is not None:
        check_shape("cols", cols, 3, "[B, Hkv, K]")
        if cols.shape[0] != B or cols.shape[1] != k_pool.shape[1]:
            raise ValueError(f"cols must be [B={B}, Hkv={k_pool.shape[1]}, K], got {tuple(cols.shape)}")
        check(cols.dtype == torch.int64 and cols.stride(2) == 1,
              "cols must be int64 with a contiguous last dim")
        if n_cols.dim() != 1 or n_cols.shape[0] != B:
            raise ValueError(f"n_cols must be [B={B}], got {tuple(n_cols.shape)}")
        check(n_cols.dtype == torch.int64, f"n_cols must be int64, got {n_cols.dtype}")


@define_op("pool_attention", opaque=True)
def pool_attention_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor,
                      kv_len: torch.Tensor, cols: torch.Tensor | None = None,
                      n_cols: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        require_triton("pool_attention")
        return pool_attention_triton(q, k_pool, v_pool, rows, kv_len, cols, n_cols)
    return pool_attention_reference(q, k_pool, v_pool, rows, kv_len, cols, n_cols)


@pool_attention_op.register_fake
def _(q, k_pool, v_pool, rows, kv_len, cols=None, n_cols=None):
    return torch.empty_like(q)
