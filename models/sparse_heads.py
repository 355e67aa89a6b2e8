"""Head-centric sparse attention: which cached positions each KV head keeps (Sparse-dLLM / dLLM-Serve).

Shared by the ``sparsify_heads`` compiler pass (which inlines ``head_scores`` into Refresh programs and
``gather_heads`` into Reuse programs), the runtime (which picks each Reuse step's kept columns with
``keep_columns`` from the scores its Refresh stored in the KV pool)
and ``dlc.tiny.train`` (which trains with the
same selection). docs/QUALITY.md and passes/sparsify_heads.py say why the score is what it is."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

POOL_KERNEL = 1          # 1-D max-pool width over positions of the scores (1: none; Sparse-dLLM uses 3); odd

def head_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                out_index: torch.Tensor,
                group: int, pool: int = POOL_KERNEL) -> torch.Tensor:
    """q [B, H, L, D], k/v [B, Hkv, L, D], key_mask [B, L], out_index [B, N] -> scores [B, Hkv, L] (float32):
    mean over the N block queries of the attention probability of each key times the key's value norm, max
    over the group's query heads, max-pooled over positions with width ``pool``; padding keys -inf."""
    idx = out_index[:, None, :, None].expand(-1, q.size(1), -1, q.size(3))        # [B, H, N, D]
    qb = torch.gather(q, 2, idx).float()                                          # [B, H, N, D]
    kf = k.float().repeat_interleave(group, dim=1)                                # [B, H, L, D]
    vf = v.float()
    vnorm = (vf * vf).sum(-1).sqrt().repeat_interleave(group, dim=1)              # [B, H, L]
    logits = torch.einsum("bhnd,bhld->bhnl", qb, kf) / math.sqrt(q.size(3))       # [B, H, N, L]
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    s = logits.softmax(-1).mean(2) * vnorm                                        # [B, H, L]
    s = s.unflatten(1, (-1, group)).amax(2)                                       # [B, Hkv, L]
    if pool > 1:
        s = max_pool(s, pool)
    return s.masked_fill(~key_mask[:, None, :], float("-inf"))


def keep_columns(scores: torch.Tensor, cols: torch.Tensor, retention: float) -> torch.Tensor:
    """The Reuse step's kept columns per head: scores [..., B, Hkv, S] (``head_scores``, padding -inf), fed
    columns cols [B, T] -> [..., B, Hkv, K] ascending, K = min(S, T + ceil(retention x (S - T))):
    the fed columns
    plus the top-scoring others. K = S keeps every column in order (the gather is the identity). The runner
    feeds this as ``keep_idx``; ``dlc.tiny.train`` uses it to train with the same selection."""
    S, T = scores.shape[-1], cols.shape[1]
    k = min(S, T + math.ceil(retention * (S - T)))
    if k == S:
        return torch.arange(S, device=cols.device).expand(scores.shape).contiguous()
    forced = torch.zeros(cols.shape[0], S, dtype=torch.bool, device=cols.device)
    forced.scatter_(1, cols, True)
    sc = scores.masked_fill(forced[:, None, :], float("inf"))                    # [..., B, Hkv, S]
    return sc.topk(k, dim=-1).indices.sort(-1).values.contiguous()


def kept_counts(lengths: list[int], T: int, retention: float) -> list[int]:
    """Columns each row keeps: the T fed ones plus ``ceil(retention x (L - T))`` of its L - T other cached
    keys (so 1.0 keeps every real key, and a row's choice never depends on the rows batched with it)."""
    return [min(L, T + math.ceil(retention * (L - T))) for L in lengths]


def keep_columns_rows(scores: torch.Tensor, cols: torch.Tensor, lengths: list[int],
                      retention: float) -> torch.Tensor:
    """``keep_columns`` with each row's own count: scores [..., B, Hkv, S] (padding -inf), fed columns cols
    [B, T], real keys per row ``lengths`` -> [..., B, Hkv, K] with K = the largest ``kept_counts``: row b's
    first n_b entries are its kept columns (ascending), the rest repeat column S - 1, a padding key of that
    row (its L < S whenever n_b < K), so a key mask or ``kv_len`` masks them."""
    S = scores.shape[-1]
    n = kept_counts(lengths, cols.shape[1], retention)
    K = max(n)
    forced = torch.zeros(cols.shape[0], S, dtype=torch.bool, device=cols.device)
    forced.scatter_(1, cols, True)
    sc = scores.masked_fill(forced[:, None, :], float("inf"))                    # [..., B, Hkv, S]
    idx = sc.topk(K, dim=-1).indices                                              # best first
    drop = torch.arange(K, device=cols.device)[None, :] >= torch.tensor(n, device=cols.device)[:, None]
    idx = idx.masked_fill(drop[:, None, :], S - 1)                                # [B, 1, K] broadcast
    return idx.sort(-1).values.contiguous()


def max_pool(s: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """1-D max-pool over the last dim, odd ``kernel``, stride 1, -inf padding (= F.max_pool1d(s, kernel, 1,
    kernel // 2)); written with slices so export keeps the length symbolic and ONNX needs no pooling op."""
    if kernel % 2 != 1:
        raise ValueError(f"pool kernel must be odd, got {kernel}")
    r = kernel // 2
    p = F.pad(s, (r, r), value=float("-inf"))
    n = p.size(-1) - 2 * r
    out = p[..., r:r + n]
    for o in range(-r, r + 1):
        if o:
            out = torch.maximum(out, p[..., r + o:r + o + n])
    return out


def max_pool3(s: torch.Tensor) -> torch.Tensor:
    """Kernel-3 max-pool (Sparse-dLLM's smoothing)."""
    return max_pool(s, 3)


def gather_pool_heads(k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor, key_mask: torch.Tensor,
                      keep: torch.Tensor, group: int):
    """Like ``gather_heads`` but straight from one layer's slot pool k_pool, v_pool [P, Hkv, S, D] at pool
    rows ``rows`` [B]: only the kept columns are read (no copy of the batch's rows)."""
    heads = torch.arange(k_pool.size(1), device=keep.device)[None, :, None]        # [1, Hkv, 1]
    r = rows[:, None, None]                                                        # [B, 1, 1]
    ks, vs = k_pool[r, heads, keep], v_pool[r, heads, keep]                        # [B, Hkv, K, D]
    km = torch.gather(key_mask[:, None, :].expand(-1, k_pool.size(1), -1), 2, keep)   # [B, Hkv, K]
    if group > 1:
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        km = km.repeat_interleave(group, dim=1)
    return ks, vs, km[:, :, None, :]


def gather_heads(k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, keep: torch.Tensor, group: int):
    """k, v [B, Hkv, S, D], key_mask [B, S], keep [B, Hkv, K] -> per-head K/V [B, H, K, D] and the SDPA mask
    [B, H, 1, K]."""
    idx = keep[..., None].expand(-1, -1, -1, k.size(3))                           # [B, Hkv, K, D]
    ks, vs = torch.gather(k, 2, idx), torch.gather(v, 2, idx)                     # [B, Hkv, K, D]
    km = torch.gather(key_mask[:, None, :].expand(-1, k.size(1), -1), 2, keep)    # [B, Hkv, K]
    if group > 1:
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        km = km.repeat_interleave(group, dim=1)
    return ks, vs, km[:, :, None, :]
