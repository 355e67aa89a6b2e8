"""Head-sparse attention for the Reuse phase (Sparse-dLLM / dLLM-Serve's head-centric sparsity).

At Refresh every KV head picks its own subset of cached positions (``select_positions``: the block's mean
query scores the cache, or with ``v`` the block's attention probabilities times ||v|| as the
``sparsify_heads`` pass does; max over the query heads of the group, 1-D max-pool, top ``retention``
fraction). At Reuse the block's queries attend to those positions plus the block's own fresh K/V:

    out[b, h] = softmax(q[b, h] @ [K_sel[b, g]; K_blk[b, g]]^T / sqrt(D)) @ [V_sel[b, g]; V_blk[b, g]]

with g = h // (H / Hkv) (GQA). The selection is either per-head index lists ``idx`` [B, Hkv, k] into the full
cache [B, Hkv, S, D] (entries < 0 are padding and are skipped), or already-compacted K/V [B, Hkv, k, D]
(``idx=None``). Keeping every position (idx = arange(S), or the full cache with idx=None) is dense attention
and equals SDPA over the concatenated keys.

The Triton kernel runs one program per (batch, query head, query tile) with an online softmax over tiles of
the gathered keys, then over the block's keys; it never materialises the gathered K/V.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._registry import (HAS_TRITON, check, check_shape, define_op, launch, require_triton, tl, triton,
                        use_triton)


# ----------------------------------------------------------------------------------------------- reference
def sparse_attention_reference(q, k, v, k_blk, v_blk, idx=None):
    """q [B, H, T, D]; k/v [B, Hkv, S, D] (full cache with idx, or compacted); k_blk/v_blk [B, Hkv, T, D]."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if idx is None:
        ks, vs = k, v                                                  # [B, Hkv, k, D]
        keep = torch.ones(ks.shape[:3], dtype=torch.bool, device=q.device)
    else:
        g = idx.clamp(min=0)[..., None].expand(-1, -1, -1, D)          # [B, Hkv, k, D]
        ks, vs = k.gather(2, g), v.gather(2, g)
        keep = idx >= 0                                                # [B, Hkv, k]
    kk = torch.cat([ks, k_blk], 2)                                     # [B, Hkv, k + T, D]
    vv = torch.cat([vs, v_blk], 2)
    keep = torch.cat([keep, torch.ones((B, Hkv, T), dtype=torch.bool, device=q.device)], 2)
    rep = H // Hkv
    if rep > 1:
        kk, vv, keep = (t.repeat_interleave(rep, dim=1) for t in (kk, vv, keep))
    return F.scaled_dot_product_attention(q, kk, vv, attn_mask=keep[:, :, None, :])   # [B, H, T, D]


def select_positions(q_blk: torch.Tensor, k: torch.Tensor, retention: float,
                     key_mask: torch.Tensor | None = None, pool: int = 3,
                     v: torch.Tensor | None = None) -> torch.Tensor:
    """Per-KV-head positions to keep: q_blk [B, H, T, D], k [B, Hkv, S, D] -> idx [B, Hkv, n] (sorted, int64).

    Without ``v`` (Sparse-dLLM's score): mean query of the block . k / sqrt(D). With ``v`` [B, Hkv, S, D] (the
    score of dlc's ``sparsify_heads`` pass, which keeps answers on trained models; docs/QUALITY.md): the
    block's attention probabilities averaged over its queries, times ||v||. Either score is maxed over the
    group's query heads and max-pooled along positions (kernel ``pool``, 1 = none); masked keys (key_mask
    [B, S] False) never win. n = ceil(retention * S)."""
    check(0 < retention <= 1, f"retention must be in (0, 1], got {retention}")
    B, H, T, D = q_blk.shape
    Hkv, S = k.shape[1], k.shape[2]
    if v is None:
        qm = q_blk.float().mean(2).view(B, Hkv, H // Hkv, D)           # [B, Hkv, rep, D]
        score = torch.einsum("bgrd,bgsd->bgrs", qm, k.float()).amax(2) / math.sqrt(D)   # [B, Hkv, S]
    else:
        qg = q_blk.float().view(B, Hkv, H // Hkv, T, D)
        logits = torch.einsum("bgrtd,bgsd->bgrts", qg, k.float()) / math.sqrt(D)      # [B, Hkv, rep, T, S]
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, None, :], -math.inf)
        score = (logits.softmax(-1).mean(3) * v.float().norm(dim=-1)[:, :, None, :]).amax(2)   # [B, Hkv, S]
    if pool > 1:
        score = F.max_pool1d(score, pool, stride=1, padding=pool // 2)
    if key_mask is not None:
        score = score.masked_fill(~key_mask[:, None, :], -math.inf)
    n = max(1, math.ceil(retention * S))
    return score.topk(n, dim=2).indices.sort(2).values


# ----------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    @triton.jit
    def _attend_tile(q, acc, m, l, Kp, Vp, pos, valid, stride_s, dk, dmask, scale, IEEE: tl.constexpr):
        """One online-softmax step over a tile of keys at positions ``pos`` [BK]."""
        kt = tl.load(Kp + pos[:, None] * stride_s + dk[None, :], mask=valid[:, None] & dmask[None, :],
                     other=0.0)
        vt = tl.load(Vp + pos[:, None] * stride_s + dk[None, :], mask=valid[:, None] & dmask[None, :],
                     other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(kt))
        sc = tl.where(valid[None, :], sc * scale, float("-inf"))        # [BT, BK]
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        return acc, m_new, l

    @triton.jit
    def _sparse_attn_kernel(Q, K, V, KB, VB, IDX, O,
                            H, HKV, T, NSEL, D, scale,
                            sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sb_b, sb_h, sb_t, si_b, si_h, so_b, so_h,
                            so_t, HAS_IDX: tl.constexpr, IEEE: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
        pid_bh = tl.program_id(0)
        b = pid_bh // H
        h = pid_bh % H
        g = h // (H // HKV)
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        tmask = t < T
        dk = tl.arange(0, BD)
        dmask = dk < D
        q = tl.load(Q + b * sq_b + h * sq_h + t[:, None] * sq_t + dk[None, :],
                    mask=tmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.zeros([BT, BD], tl.float32)
        m = tl.full([BT], float("-inf"), tl.float32)
        l = tl.zeros([BT], tl.float32)
        Kp = K + b * sk_b + g * sk_h
        Vp = V + b * sk_b + g * sk_h
        for j0 in range(0, NSEL, BK):
            j = j0 + tl.arange(0, BK)
            jm = j < NSEL
            if HAS_IDX:
                pos = tl.load(IDX + b * si_b + g * si_h + j, mask=jm, other=-1)
                valid = jm & (pos >= 0)
                pos = tl.where(valid, pos, 0)
            else:
                pos = j
                valid = jm
            acc, m, l = _attend_tile(q, acc, m, l, Kp, Vp, pos, valid, sk_s, dk, dmask, scale, IEEE)
        KBp = KB + b * sb_b + g * sb_h
        VBp = VB + b * sb_b + g * sb_h
        for j0 in range(0, T, BK):
            j = j0 + tl.arange(0, BK)
            acc, m, l = _attend_tile(q, acc, m, l, KBp, VBp, j, j < T, sb_t, dk, dmask, scale, IEEE)
        out = acc / l[:, None]
        tl.store(O + b * so_b + h * so_h + t[:, None] * so_t + dk[None, :], out.to(O.dtype.element_ty),
                 mask=tmask[:, None] & dmask[None, :])


def sparse_attention_triton(q, k, v, k_blk, v_blk, idx=None, BT=None, BK=32, num_warps=4, num_stages=2):
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    o = torch.empty_like(q)
    BT = BT or max(16, min(64, triton.next_power_of_2(T)))
    nsel = idx.shape[2] if idx is not None else k.shape[2]
    ix = idx if idx is not None else q                                 # placeholder pointer when no idx
    si = (idx.stride(0), idx.stride(1)) if idx is not None else (0, 0)
    grid = (B * H, -(-T // BT))
    launch(_sparse_attn_kernel)[grid](
        q, k, v, k_blk, v_blk, ix, o, H, Hkv, T, nsel, D, 1.0 / math.sqrt(D),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        k_blk.stride(0), k_blk.stride(1), k_blk.stride(2), si[0], si[1], o.stride(0), o.stride(1),
        o.stride(2), HAS_IDX=idx is not None, IEEE=q.dtype == torch.float32,
        BT=BT, BK=BK, BD=max(16, triton.next_power_of_2(D)), num_warps=num_warps, num_stages=num_stages)
    return o


# ----------------------------------------------------------------------------------------------- the op
def validate(q, k, v, k_blk, v_blk, idx) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("k_blk", k_blk), ("v_blk", v_blk)):
        check_shape(name, t, 4, "[B, heads, len, D]")
        check(t.stride(3) == 1, f"{name} needs a contiguous last dim")
        check(t.dtype == q.dtype, f"{name} dtype {t.dtype} != q dtype {q.dtype}")
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    check(H % Hkv == 0, f"query heads {H} not divisible by kv heads {Hkv}")
    check(tuple(v.shape) == tuple(k.shape), f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    check(k.shape[0] == B and k.shape[3] == D, f"k must be [B={B}, Hkv, S, D={D}], got {tuple(k.shape)}")
    for name, t in (("k_blk", k_blk), ("v_blk", v_blk)):
        check(tuple(t.shape) == (B, Hkv, T, D), f"{name} must be {(B, Hkv, T, D)}, got {tuple(t.shape)}")
    if idx is not None:
        check_shape("idx", idx, 3, "[B, Hkv, k]")
        check(idx.shape[:2] == (B, Hkv), f"idx must be [B={B}, Hkv={Hkv}, k], got {tuple(idx.shape)}")
        check(idx.dtype in (torch.int32, torch.int64), f"idx must be int32/int64, got {idx.dtype}")
        check(idx.stride(2) == 1, "idx needs a contiguous last dim")


@define_op("sparse_attention")
def sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_blk: torch.Tensor,
                        v_blk: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(q):
        require_triton("sparse_attention")
        return sparse_attention_triton(q, k, v, k_blk, v_blk, idx)
    return sparse_attention_reference(q, k, v, k_blk, v_blk, idx)


@sparse_attention_op.register_fake
def _(q, k, v, k_blk, v_blk, idx=None):
    return torch.empty_like(q)
