"""Varlen attention of a packed mixed forward over the serving slot pool: ONE launch per layer for every part.

A packed mixed iteration (models/packed.py) runs Refresh rows and Reuse rows as one row of ``n_pad`` tokens
(a token bucket; padding at the end). Each *sequence* (one row of one part) owns a contiguous run of packed
tokens ``[q_off, q_off + q_len)``, a pool slot, the first pool column its tokens are written at (``col0``:
0 for a Refresh, the block's column for a Reuse) and its valid keys ``[0, n_keys)`` of the slot (a prefix:
the runtime's layout, ``StepBatch.lengths``). Per layer:

1. ``_packed_kv_write``: every real token's new K/V into ``pool[slot, :, col0 + i]`` (``dst`` [n_pad, 2] =
   (slot, column) per token; slot -1: padding, nothing written). A Refresh row's keys are then its own tokens'
   K/V in its slot, a Reuse row's its slot's cache with the block written first: exactly what each part's own
   forward attends over (``common.attend``: Refresh bidirectional over keys [0, length) of its sequence, the
   key mask of rows of different lengths being that prefix; Reuse over [0, kv_len)).
2. ``_packed_attn_kernel``: every query tile attends over its sequence's keys read in place from the pool:

       out[t, h] = softmax(q[t, h] @ K[slot, g, :n_keys]^T / sqrt(D)) @ V[slot, g, :n_keys],  g = h // (H/Hkv)

The work is a flattened tile table ``tiles`` [n_rows, 4] int64: a header row (entries used, 0, 0, 0), then one
entry per query tile (first token, end token, slot, n_keys), at most ``BT`` query tokens of one sequence (the
(sequence, q-tile) pairs flattened on the host, with the sequence's slot and key count copied in so a program
needs one load). ``n_rows`` is fixed per token bucket (``table_rows``: every sequence's tiles fit whatever the
mix) and so is the grid ``(2 x ceil(n_pad / BT), H)``: program p takes the used entries p, p + grid, ... (the
count read from the header), so the launch can be captured in a CUDA graph and no program is spent on the
unused rows. Padding tokens are in no tile: their output is zero (the output is zero-filled first).

Not covered (callers keep the per-part path, ``common.attend_ragged``): block-causal masks (block diffusion),
head-sparse kept columns, parts without a cache (they attend over packed keys, not the pool). No split-KV:
a mixed iteration has (Refresh tiles + Reuse rows) x heads programs, enough to fill the GPU.

The op is opaque to torch.compile (a plain custom op, like ``pool_attention``): compiled blocks call it as an
extern kernel. It is a runtime op; exported engines do not use it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._registry import (HAS_TRITON, INTERPRET, check, check_shape, define_op, require_triton, tl, triton,
                        use_triton)

BT_DEFAULT = 64            # query tokens per tile (a Reuse block of 32 fills half a tile: its cost is keys)


class PackedSeq(tuple):
    """One sequence of a packed forward: (q_off, q_len, slot, col0, n_keys) as host ints."""
    __slots__ = ()

    def __new__(cls, q_off: int, q_len: int, slot: int, col0: int, n_keys: int):
        return super().__new__(cls, (int(q_off), int(q_len), int(slot), int(col0), int(n_keys)))


def table_rows(n_pad: int, max_seqs: int, BT: int = BT_DEFAULT) -> int:
    """The tile table's rows for a token bucket: a header row, then room for the tiles of any <= ``max_seqs``
    sequences of <= ``n_pad`` tokens in all (each sequence's last tile may be partial: one extra tile per
    sequence at most)."""
    return 1 + -(-n_pad // BT) + min(max_seqs, n_pad)


def tile_table(seqs: list, n_rows: int, BT: int = BT_DEFAULT) -> torch.Tensor:
    """Sequences (``PackedSeq``) -> tiles [n_rows, 4] int64: row 0 the header (entries used, 0, 0, 0), then
    one row per query tile (first token, end token, slot, n_keys); the rows past the used ones are empty
    (0, 0, 0, 0)."""
    rows = [(q0, min(q0 + BT, off + n), slot, keys)
            for off, n, slot, _, keys in seqs for q0 in range(off, off + n, BT)]
    if len(rows) > n_rows - 1:
        raise ValueError(f"packed attention: {len(rows)} query tiles do not fit a table of {n_rows - 1}")
    out = torch.zeros(n_rows, 4, dtype=torch.int64)
    out[0, 0] = len(rows)
    if rows:
        out[1:len(rows) + 1] = torch.tensor(rows, dtype=torch.int64)
    return out


def write_table(seqs: list, n_pad: int) -> torch.Tensor:
    """Sequences -> dst [n_pad, 2] int64: (pool slot, pool column) each packed token's K/V goes to; -1 for
    padding tokens (written nowhere)."""
    dst = torch.full((n_pad, 2), -1, dtype=torch.int64)
    if not seqs:
        return dst
    off, n, slot, col0, _ = torch.tensor(seqs, dtype=torch.int64).T                # [n_seqs] each
    seq = torch.repeat_interleave(torch.arange(len(seqs)), n)                       # [n_real] token -> seq
    tok = off[seq] + torch.arange(seq.shape[0]) - (n.cumsum(0) - n)[seq]            # packed token index
    dst[tok, 0] = slot[seq]
    dst[tok, 1] = col0[seq] + tok - off[seq]
    return dst


def packed_attention_reference(q, k, v, k_pool, v_pool, tiles, dst):
    """q [1, H, n_pad, D], k, v [1, Hkv, n_pad, D], pool [N, Hkv, S, D] (written in place), tiles [n, 4],
    dst [n_pad, 2] -> y [1, H, n_pad, D] (the CPU implementation: SDPA per tile)."""
    real = dst[:, 0] >= 0                                                         # [n_pad]
    slot, col = dst[real, 0], dst[real, 1]
    k_pool[slot, :, col] = k[0, :, real].transpose(0, 1)                          # [n_real, Hkv, D]
    v_pool[slot, :, col] = v[0, :, real].transpose(0, 1)
    H, Hkv = q.shape[1], k_pool.shape[1]
    y = torch.zeros_like(q, memory_format=torch.contiguous_format)           # as the fake declares
    used = tiles[1:int(tiles[0, 0]) + 1]                                          # [n_used, 4]
    for q0, q1, s, n in used.tolist():
        if q1 <= q0:
            continue
        ks, vs = k_pool[s, :, :n], v_pool[s, :, :n]                               # [Hkv, n, D]
        if H != Hkv:
            ks, vs = ks.repeat_interleave(H // Hkv, 0), vs.repeat_interleave(H // Hkv, 0)
        y[0, :, q0:q1] = F.scaled_dot_product_attention(q[0, :, q0:q1], ks, vs)  # [H, q1 - q0, D]
    return y


if HAS_TRITON:
    from .attention import _attend_tile          # one online-softmax step over a key tile (shared)

    @triton.jit
    def _packed_kv_write(K, V, KP, VP, DST, HKV, D, sk_h, sk_t, sv_h, sv_t, sp_n, sp_h, sp_s,
                         BH: tl.constexpr, BD: tl.constexpr):
        """One program per packed token: its K/V of every KV head [Hkv, D] into (slot, column)."""
        t = tl.program_id(0)
        slot = tl.load(DST + 2 * t)
        col = tl.load(DST + 2 * t + 1)
        if slot >= 0:
            g = tl.arange(0, BH)
            d = tl.arange(0, BD)
            m = (g[:, None] < HKV) & (d[None, :] < D)
            dst = slot * sp_n + g[:, None] * sp_h + col * sp_s + d[None, :]
            tl.store(KP + dst, tl.load(K + g[:, None] * sk_h + t * sk_t + d[None, :], mask=m), mask=m)
            tl.store(VP + dst, tl.load(V + g[:, None] * sv_h + t * sv_t + d[None, :], mask=m), mask=m)

    @triton.jit
    def _attend_entry(Q, K, V, TILES, O, e, h, g, D, scale, sq_h, sq_t, sk_n, sk_h, sk_s, so_h, so_t,
                      IEEE: tl.constexpr, BOUNDED: tl.constexpr, S: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BD: tl.constexpr):
        """Head h of table entry e (row e + 1): its query tokens over keys [0, n_keys) of its slot."""
        row = TILES + 4 * (e + 1)
        q0 = tl.load(row)
        q1 = tl.load(row + 1)
        slot = tl.load(row + 2)
        n = tl.load(row + 3)
        t = q0 + tl.arange(0, BT)
        tmask = t < q1                                    # an empty entry (q1 == q0) stores nothing
        dk = tl.arange(0, BD)
        dmask = dk < D
        q = tl.load(Q + h * sq_h + t[:, None] * sq_t + dk[None, :], mask=tmask[:, None] & dmask[None, :],
                    other=0.0)
        Kp = K + slot * sk_n + g * sk_h
        Vp = V + slot * sk_n + g * sk_h
        acc = tl.zeros([BT, BD], tl.float32)
        m = tl.full([BT], float("-inf"), tl.float32)
        l = tl.zeros([BT], tl.float32)
        if BOUNDED:      # triton 3.6's interpreter: loop bounds must be constants (S: the pool's width)
            for j0 in range(0, S, BK):
                j = j0 + tl.arange(0, BK)
                acc, m, l = _attend_tile(q, acc, m, l, Kp, Vp, j, j < n, sk_s, dk, dmask, scale, IEEE)
        else:
            for j0 in range(0, n, BK):
                j = j0 + tl.arange(0, BK)
                acc, m, l = _attend_tile(q, acc, m, l, Kp, Vp, j, j < n, sk_s, dk, dmask, scale, IEEE)
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        tl.store(O + h * so_h + t[:, None] * so_t + dk[None, :], out.to(O.dtype.element_ty),
                 mask=tmask[:, None] & dmask[None, :])

    @triton.jit
    def _packed_attn_kernel(Q, K, V, TILES, O, H, HKV, D, GRID, scale,
                            sq_h, sq_t, sk_n, sk_h, sk_s, so_h, so_t,
                            IEEE: tl.constexpr, BOUNDED: tl.constexpr, S: tl.constexpr, NT: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
        """Program (p, h) takes the table's used entries p, p + GRID, ... (the count: the header row), so
        the grid is fixed per bucket and no program is spent on the unused rest of the table."""
        p = tl.program_id(0)
        h = tl.program_id(1)
        g = h // (H // HKV)
        if BOUNDED:                       # the interpreter: constant bounds, the used entries by the header
            n_used = tl.load(TILES)
            for e in range(0, NT):
                if (e % GRID == p) & (e < n_used):
                    _attend_entry(Q, K, V, TILES, O, e, h, g, D, scale, sq_h, sq_t, sk_n, sk_h, sk_s, so_h,
                                  so_t, IEEE, BOUNDED, S, BT, BK, BD)
        else:
            for e in range(p, tl.load(TILES), GRID):
                _attend_entry(Q, K, V, TILES, O, e, h, g, D, scale, sq_h, sq_t, sk_n, sk_h, sk_s, so_h,
                              so_t, IEEE, BOUNDED, S, BT, BK, BD)


def packed_attention_triton(q, k, v, k_pool, v_pool, tiles, dst, BT=BT_DEFAULT, BK=64, num_warps=4,
                            num_stages=2, programs=None):
    """The two launches (K/V write, attention); ``BT`` must be the tile size ``tiles`` was built with;
    ``programs``: along the table (default 2 x ceil(n_pad / BT): fixed per bucket, each loops if more)."""
    H, n_pad, D = q.shape[1], q.shape[2], q.shape[3]
    Hkv = k_pool.shape[1]
    BD = max(16, triton.next_power_of_2(D))
    _packed_kv_write[(n_pad,)](k, v, k_pool, v_pool, dst, Hkv, D, k.stride(1), k.stride(2), v.stride(1),
                               v.stride(2), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
                               BH=triton.next_power_of_2(Hkv), BD=BD)
    o = torch.zeros_like(q, memory_format=torch.contiguous_format)                 # padding rows: zero
    grid = max(1, min(tiles.shape[0] - 1, programs or 2 * -(-n_pad // BT)))
    _packed_attn_kernel[(grid, H)](
        q, k_pool, v_pool, tiles, o, H, Hkv, D, grid, 1.0 / math.sqrt(D),
        q.stride(1), q.stride(2), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), o.stride(1),
        o.stride(2), IEEE=q.dtype == torch.float32, BOUNDED=INTERPRET,
        S=k_pool.shape[2] if INTERPRET else 0, NT=tiles.shape[0] - 1 if INTERPRET else 0, BT=BT, BK=BK,
        BD=BD, num_warps=num_warps, num_stages=num_stages)
    return o


def validate(q, k, v, k_pool, v_pool, tiles, dst) -> None:
    check_shape("q", q, 4, "[1, H, n_pad, D]")
    for name, t in (("k", k), ("v", v)):
        check_shape(name, t, 4, "[1, Hkv, n_pad, D]")
        check(t.stride(3) == 1, f"{name} needs a contiguous last dim")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        check_shape(name, t, 4, "[n_slots, Hkv, S, D]")
        check(t.dtype == q.dtype, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
        check(t.stride(3) == 1, f"{name} needs a contiguous last dim")
    check(q.shape[0] == 1 and q.stride(3) == 1, "q must be [1, H, n_pad, D] with a contiguous last dim")
    check(v_pool.stride() == k_pool.stride(), "v_pool strides != k_pool strides (the kernel reads both "
                                              "with k_pool's)")
    if k.shape[1:] != v.shape[1:] or k.shape[1] != k_pool.shape[1] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} must be [1, Hkv={k_pool.shape[1]}, "
                         f"n_pad={q.shape[2]}, D]")
    check(q.shape[1] % k_pool.shape[1] == 0, f"query heads {q.shape[1]} not divisible by kv heads "
                                             f"{k_pool.shape[1]}")
    check(k_pool.shape[3] == q.shape[3], f"head dim: q has {q.shape[3]}, the pool {k_pool.shape[3]}")
    if tiles.dim() != 2 or tiles.shape[1] != 4 or tiles.dtype != torch.int64 or not tiles.is_contiguous():
        raise ValueError(f"tiles must be a contiguous int64 [n_rows, 4] (header + entries), got "
                         f"{tuple(tiles.shape)} {tiles.dtype}")
    if dst.dim() != 2 or dst.shape[1] != 2 or dst.shape[0] != q.shape[2] or dst.dtype != torch.int64 \
            or not dst.is_contiguous():
        raise ValueError(f"dst must be a contiguous int64 [n_pad={q.shape[2]}, 2], got {tuple(dst.shape)} "
                         f"{dst.dtype}")


@define_op("packed_pool_attention", mutates_args=("k_pool", "v_pool"), opaque=True)
def packed_pool_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                             v_pool: torch.Tensor, tiles: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    if use_triton(q):
        require_triton("packed_pool_attention")
        return packed_attention_triton(q, k, v, k_pool, v_pool, tiles, dst)
    return packed_attention_reference(q, k, v, k_pool, v_pool, tiles, dst)


@packed_pool_attention_op.register_fake
def _(q, k, v, k_pool, v_pool, tiles, dst):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
