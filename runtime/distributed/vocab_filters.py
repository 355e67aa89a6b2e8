"""Sampling filters at T > 0 that the merged top candidates do not bound (top-p / min-p without a top-k of at
most ``FILTER_CANDIDATES``, a larger top-k, filters with credit), exact under vocab parallelism by a
bisection on the survivors' threshold, never gathering [rows, vocab].

One process (``sampling._decode_full``) sorts a row's tempered logits s = lb / T (lb: the logits, with credit
the credit-fused ones) and keeps the prefix that passes top-k, then top-p over the renormalised top-k, then
min-p against the most likely token. Each filter keeps every value above some bound, so the survivors are
{x : s_x >= t*} for the smallest value t* an element could have and still pass (``_passes``): with
cnt(t) = #{s >= t} and mass(t) = sum_{s > t} exp(s - M) (M the global max), t passes when cnt(t) <= k,
mass(t) < top_p Z_k (Z_k the mass of the top k, itself the mass at or above the k-th value, found by the same
bisection on cnt) and exp(t - M) >= min_p. Both counts are monotone in t, so a bisection over the float64
values in their total order (``_key``: the bits as an order-preserving int64) finds t* exactly in at most 64
halvings, each one all_reduce of [2, C, N] over the ranks (every rank holds its shard's [C, N, V / R] logits,
as one process holds a row's [N, V]). Then the Gumbel-max with the hash noise of the global ids over each
rank's survivors and one all_gather merges the ranks' best (ties: the lowest rank, the lowest id), as one
process's argmax over the survivors. Values tied exactly at t* are kept together (one process's stable sort
could split such a tie at a top-k boundary: a measure-zero event on real logits)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dlc.kernels.logits import uniform_noise
from dlc.kernels.sampling import CREDIT_GAMMA, _credit_chunk, _guided

from .vocab import _all_gather

_FLIP = 0x7FFFFFFFFFFFFFFF
HALVINGS = 64                      # the int64 keys of float64 values: 64 halvings end every bracket


def _key(x: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 in the same order (negative values: all bits but the sign flipped); an involution."""
    b = x.view(torch.int64)
    return b ^ ((b >> 63) & _FLIP)


def _value(k: torch.Tensor) -> torch.Tensor:
    """``_key``'s inverse: int64 keys -> the float64 values."""
    return (k ^ ((k >> 63) & _FLIP)).view(torch.float64)


def _bisect(passes, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The smallest float64 t in (lo, hi] with ``passes(t)`` [C, N] (``passes`` monotone: false at lo, true
    at hi; both [C, N] float64), by halving the int64 keys between them."""
    a, b = _key(lo), _key(hi)
    for _ in range(HALVINGS):
        mid = (a >> 1) + (b >> 1) + (a & b & 1)                  # floor((a + b) / 2) without overflow
        ok = passes(_value(mid))
        a, b = torch.where(ok, a, mid), torch.where(ok, mid, b)
    return _value(b)


def exact_filters(shard, rows, cond_rows, un_rows, cfg_w, temp, seeds, filters, out: dict, credit=None,
                  filtered_conf: bool = False) -> dict:
    """Tokens, confidences and logprobs of the filtered Gumbel-max for every row (rows without a filter keep
    every id: the sweep's draw) from ``out`` (``finish_stats`` of the merged sweep: ``_bm``, ``_den``,
    ``_lse``, credit's ``top1_ids`` / ``top1_prob``), updated in place. ``shard``: the rank (model, group).
    Reads on the host whether any row needs the top-k mass (this path runs eager, as one GPU's)."""
    from dlc.models.tensor_parallel import head_shard
    w, v0 = head_shard(shard.model, shard.rank, shard.world)
    group, vocab, acc = shard.group, shard.config.vocab_size, torch.float64
    lraw = _guided(rows, w, cond_rows, un_rows, cfg_w, 0, w.shape[0], acc)        # [C, N, Vr] this shard
    lb = lraw if credit is None else _credit_fused(lraw, credit, out, v0)
    s = lb / temp                                                                 # [C, N, Vr] tempered
    M, lo = _extremes(s, group)
    e = torch.exp(s - M[..., None])
    keep = s >= _threshold(s, e, M, lo, filters, vocab, group)[..., None]        # [C, N, Vr] survivors
    g = torch.log(-torch.log(uniform_noise(seeds, rows.shape[1], v0, v0 + w.shape[0], vocab, s.device, acc)))
    score = torch.where(keep, lb - temp * g, torch.full_like(lb, -float("inf")))
    j = score.argmax(-1, keepdim=True)                                           # first max: lowest id
    mine = torch.stack([score.gather(-1, j)[..., 0], (j[..., 0] + v0).to(acc), lb.gather(-1, j)[..., 0],
                        lraw.gather(-1, j)[..., 0], s.gather(-1, j)[..., 0]])   # [5, C, N]
    ranks = _all_gather(mine, group, dist.get_world_size(group))                 # [R, 5, C, N]
    r = ranks[:, 0].argmax(0, keepdim=True)                                      # first max: lowest rank
    best = ranks.gather(0, r[:, None].expand(1, 5, *r.shape[1:]))[0]             # [5, C, N]
    out["tokens"] = best[1].to(torch.int64)
    if filtered_conf:                             # the probability among the survivors of s
        kept = _sum(torch.where(keep, e, torch.zeros_like(e)).sum(-1), group)[0]
        out["confidence"] = torch.exp(best[4] - M) / kept
    else:
        out["confidence"] = torch.exp(best[2] - out["_bm"]) / out["_den"]
    if "logprob" in out:
        out["logprob"] = best[3] - out["_lse"]
    return out


def _credit_fused(lraw, credit, out: dict, v0: int) -> torch.Tensor:
    """The shard's credit-fused logits [C, N, Vr] with this step's own credit (p1 ** gamma on the global raw
    top-1, where this shard holds it), as one process's ``_decode_full`` fuses them."""
    ids, vals, alpha = credit
    n = lraw.shape[-1]
    cred = _credit_chunk(ids, vals, v0, v0 + n, lraw)
    own = out["top1_ids"] - v0                                                    # [C, N]
    inside = (own >= 0) & (own < n)
    add = torch.where(inside, out["top1_prob"] ** CREDIT_GAMMA, torch.zeros_like(out["top1_prob"]))
    cred = cred.scatter_add(-1, own.clamp(0, n - 1)[..., None], add[..., None])
    return lraw + alpha.to(lraw.dtype)[:, None, None] * torch.log1p(cred)


def _extremes(s: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(global max of s, a value below the global min) per row [C, N]: one all_gather."""
    both = torch.stack([s.amax(-1), -s.amin(-1)])[None]                           # [1, 2, C, N]
    r = _all_gather(both, group, dist.get_world_size(group))[:, 0].amax(0)        # [2, C, N]
    lo = -r[1]
    return r[0], torch.nextafter(lo, torch.full_like(lo, -float("inf")))


def _threshold(s, e, M, lo, filters, vocab: int, group) -> torch.Tensor:
    """t* [C, N]: the smallest value that passes top-k, top-p over the top k's mass and min-p (the survivors
    are s >= t*), by ``_bisect`` over the ranks' summed counts and masses."""
    acc = s.dtype
    top_k, top_p, min_p = (f.to(s.device) for f in filters)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).to(acc)[:, None]          # [C, 1]

    def count(t):                                                                 # #{s >= t} [C, N]
        return (s >= t[..., None]).sum(-1).to(acc)
    z = _sum(e.sum(-1), group)[0]                                                 # the row's whole mass
    if bool(((top_k > 0) & (top_p < 1)).any()):        # top-p renormalises over the top k: Z_k
        tk = _bisect(lambda t: _sum(count(t), group)[0] <= k, lo, M)              # the k-th value
        zk = _sum(torch.where(s >= tk[..., None], e, torch.zeros_like(e)).sum(-1), group)[0]
        z = torch.where((top_k > 0)[:, None], zk, z)
    p_top, p_min = top_p.to(acc)[:, None], min_p.to(acc)[:, None]

    def passes(t):                                     # would an element of value t survive every filter
        above = torch.where(s > t[..., None], e, torch.zeros_like(e)).sum(-1)     # mass strictly above t
        cnt, mass = _sum(torch.stack([count(t), above]), group)
        return (cnt <= k) & (mass < p_top * z) & (torch.exp(t - M) >= p_min)
    return _bisect(passes, lo, M)


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    """[..., C, N] summed over the ranks (one all_reduce), as [k, C, N]."""
    x = x.reshape(-1, *x.shape[-2:]).contiguous()
    dist.all_reduce(x, group=group)
    return x
