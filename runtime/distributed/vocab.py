"""Vocab-parallel decoding of the selected rows: each rank reduces its slice of the LM head, small collectives
combine the slices. Never gathers [rows, vocab].

Rank r holds head rows [v0, v1). Per decoded row it streams its slice in chunks, exactly like
``dlc.kernels.logits.decode_rows`` (guided logits in float64, Gumbel-max with the counter-hash noise of the
*global* vocab id, so the draw is the one a single process makes) and keeps: best score, its global id and
logit, the running max ``m`` and ``s = sum exp(l - m)`` (plus ``a = sum exp(l - m) l`` for entropy and a
top-k for logprobs). One ``all_gather`` of these [C, N] statistics (a few floats per row and rank) combines:
``M = max m``, ``S = sum s exp(m - M)``, the token is the best score over ranks (ties: the lowest rank, i.e.
the lowest id, as the single-process chunk loop), confidence ``exp(l_tok - M) / S``, logprob
``l_tok - (M + log S)``, entropy ``M + log S - A / S``; top-k merges the ranks' k candidates. The collectives
are ``all_gather_into_tensor`` (``all_gather_single``) and nothing reads a value on the host, so the combine
runs inside a captured Reuse step (``shard_graph.ShardGraphRunner``).

``fused_stats`` is the same statistics at T = 0 without guidance from the fused selected-row logits sweep
(``dlc.kernels.fused_shard_stats``, kernels/shard_logits.py: one pass over the shard's head, float32 logits
as TP=1's ``fused`` graph runner decodes): what a ``fused`` graph runner's rank computes (the CUDA default);
sampled and guided steps keep ``shard_stats`` (on CUDA a sampled one without top-k or entropy by one GPU's
fused unfiltered draw, ``filter_bisect.plain_stats``). ``merge`` is the combine without its collective.

The rules with more state than these statistics (credit, iteration smoothing, sampling filters at T > 0) sweep
the shard with the decoding core's own chunk loop (``dlc.kernels.sampling.sweep_stats`` at the shard's global
id offset: credit added to the ids of the shard before its statistics, hash noise of the global id) and
``combine_sweep`` merges the ranks' statistics into what one sweep of the whole vocabulary keeps (one
all_gather of [13, C, N] float64, one of the top-k candidates; smoothing's soft embedding, each rank's
exp(l / tau - M) @ W_e[shard] rescaled to the global max, by one all_reduce of [C, N, d]); the core's
``finish_stats`` / ``filter_candidates`` then run on every rank as on one process
(``shard_runner.vocab_decode_rules``); a ``fused`` graph runner's T = 0 credit and smoothing steps skip that
float64 sweep: ``fused_stats`` plus credit's sparse correction (the credited logits summed by ``combine``'s
``sums``), or smoothing's model-dtype pass per shard (``shard_runner.fused_rules_decode``).
``shard_top_soft`` is truncated smoothing's soft embedding over the
merged top-k ids, each rank adding the rows of its embedding shard (one all_reduce of [C, N, d])."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dlc.kernels.filter_bisect import plain_ok, plain_stats
from dlc.kernels.logits import uniform_noise

STATS = ("best", "tok", "bl", "m", "s", "a")   # one rank's per-row statistics, in the all_gather's order
CHUNK = 32768                  # head rows per chunk (the eager runner's VOCAB_CHUNK)
# torch 2.13 renamed all_gather_into_tensor (a deprecation warning per call) to all_gather_single
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def shard_stats(h, w, v0: int, cond_rows, un_rows, cfg_w, temp, seeds, vocab: int, topk: int = 0,
                entropy: bool = False, chunk: int = CHUNK) -> dict:
    """This rank's statistics over head rows w [Vr, d] (global ids v0 .. v0 + Vr) for rows h [B, N, d]. A
    sampled step without top-k or entropy on CUDA: ``filter_bisect.plain_stats`` (one Triton kernel per chunk
    of the same GEMM instead of the float64 passes; the same statistics up to float64 summation order)."""
    sampling = not (isinstance(temp, (int, float)) and temp == 0)
    if not (topk or entropy) and plain_ok(h, temp, torch.float64):
        st = plain_stats(h, w, v0, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk,
                         rows=w.shape[0])
        return dict(st, tok=st["tok"].to(torch.float64), a=torch.zeros_like(st["m"]))
    N, st = h.size(1), {}
    for c0 in range(0, w.shape[0], chunk):
        c1 = min(w.shape[0], c0 + chunk)
        lc = F.linear(h, w[c0:c1])                                                # [B, N, Vc]
        cond, un = lc.index_select(0, cond_rows), lc.index_select(0, un_rows)     # [C, N, Vc]
        l64 = (un + cfg_w * (cond - un)).to(torch.float64)
        score = l64
        if sampling:
            g = torch.log(-torch.log(uniform_noise(seeds, N, v0 + c0, v0 + c1, vocab, h.device)))
            score = l64 - temp * g
        ci = score.argmax(-1, keepdim=True)                                       # [C, N, 1]
        cs, cl, cm = score.gather(-1, ci)[..., 0], l64.gather(-1, ci)[..., 0], l64.amax(-1)
        e = torch.exp(l64 - cm[..., None])
        cur = {"best": cs, "tok": (ci[..., 0] + v0 + c0).to(torch.float64), "bl": cl, "m": cm, "s": e.sum(-1),
               "a": (e * l64).sum(-1) if entropy else torch.zeros_like(cm)}
        st = cur if not st else _merge_chunk(st, cur)
        if topk:
            tv, ti = l64.topk(min(topk, c1 - c0), dim=-1)
            tv, ti = (tv, ti + v0 + c0) if "tv" not in st else (torch.cat([st["tv"], tv], -1),
                                                                 torch.cat([st["ti"], ti + v0 + c0], -1))
            st["tv"], j = tv.topk(min(topk, tv.shape[-1]), dim=-1)
            st["ti"] = ti.gather(-1, j)
    return st


def _merge_chunk(st: dict, cur: dict) -> dict:
    take = cur["best"] > st["best"]                                               # ties keep the earlier id
    out = {k: torch.where(take, cur[k], st[k]) for k in ("best", "tok", "bl")}
    m = torch.maximum(st["m"], cur["m"])
    fo, fn = torch.exp(st["m"] - m), torch.exp(cur["m"] - m)
    out.update(m=m, s=st["s"] * fo + cur["s"] * fn, a=st["a"] * fo + cur["a"] * fn)
    for k in ("tv", "ti"):
        if k in st:
            out[k] = st[k]
    return out


def fused_stats(h, w, v0: int, topk: int = 0, entropy: bool = False) -> dict:
    """``shard_stats`` at T = 0 without guidance (rows h [B, N, d] decoded as they are) through the fused
    selected-row logits sweep over this rank's head rows (``dlc.kernels.fused_shard_stats``: float32 logits
    as TP=1's ``fused`` graph runner computes them, no [B, N, Vr] tensor; on CPU its float32 reference)."""
    from dlc.kernels import fused_shard_stats
    B, N = h.shape[:2]
    st = fused_shard_stats(h.reshape(B * N, h.shape[-1]), w, v0, entropy, topk)
    return {k: v.view(B, N, *v.shape[1:]) for k, v in st.items()}


def combine(st: dict, group, topk: int = 0, sums: torch.Tensor | None = None) -> dict:
    """All ranks' statistics -> {"tokens", "confidence", "logprob", "entropy", top-k, and ``merge``'s
    internals}: one all_gather of [6, C, N] float64 (and one of the top-k candidates when asked). ``sums``
    [K, C, N]: values summed over the ranks in the same all_gather (``_sums``; e.g. credited ids' logits,
    each held by one rank, the others adding exact zeros)."""
    world = dist.get_world_size(group)
    mine = torch.stack([st[k] for k in STATS])                                     # [6, C, N]
    if sums is not None:
        mine = torch.cat([mine, sums.to(mine.dtype)])                             # [6 + K, C, N]
    ranks = _all_gather(mine, group, world)                                       # [R, 6 (+ K), C, N]
    tops = _gather_topk(st["tv"], st["ti"], group, world) if topk else None
    out = merge(ranks[:, :len(STATS)], topk, tops)
    if sums is not None:
        out["_sums"] = ranks[:, len(STATS):].sum(0)                               # [K, C, N]
    return out


def merge(ranks: torch.Tensor, topk: int = 0, tops: tuple | None = None) -> dict:
    """The combine itself, no collective: every rank's statistics ``ranks`` [R, 6, C, N] (``STATS`` order)
    and top-k candidates ``tops`` ([C, N, R * k] values, ids) -> the decoded rows, and the internals the
    fused rules finish with (``shard_runner.fused_rules_decode``): ``_lse``, ``_best`` (the token's logit),
    ``_m`` / ``_s`` (the global max logit and sum e^(l - _m))."""
    best, tok, bl, m, s, a = ranks.unbind(1)                                      # each [R, C, N]
    M = m.amax(0)
    f = torch.exp(m - M)
    S, A = (s * f).sum(0), (a * f).sum(0)
    j = best.argmax(0, keepdim=True)                                              # first max: lowest rank
    l_tok = bl.gather(0, j)[0]
    lse = M + torch.log(S)
    out = {"tokens": tok.gather(0, j)[0].to(torch.int64), "confidence": torch.exp(l_tok - M) / S,
           "logprob": l_tok - lse, "entropy": lse - A / S, "_lse": lse, "_best": l_tok, "_m": M, "_s": S}
    if topk:
        tv, ti = tops
        v, jj = tv.topk(min(topk, tv.shape[-1]), dim=-1)
        out["topk_ids"], out["topk_logprobs"] = ti.gather(-1, jj), v - lse[..., None]
    return out


def _gather_topk(tv, ti, group, world):
    pv, pi = _all_gather(tv, group, world), _all_gather(ti, group, world)          # [R, C, N, k]
    return torch.cat(pv.unbind(0), -1), torch.cat(pi.unbind(0), -1)               # [C, N, R * k]


def _all_gather(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[...] on every rank -> [R, ...]: one ``all_gather_into_tensor`` into a single output (no list of
    outputs, no host sync: it captures inside a CUDA graph with NCCL and runs on gloo)."""
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _GATHER(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


# sweep_stats' [C, N] statistics merged over the ranks: (max key, summed keys) pairs, argmax groups
_SWEEP_SUMS = (("m", ("s", "a")), ("bm", ("bs",)), ("sm", ("ss",)))
_SWEEP_ARGMAX = (("best", ("tok", "bl", "blb")), ("r1l", ("r1",)))
_SWEEP_INT = ("tok", "r1")


def combine_sweep(st: dict, group, topk: int = 0) -> dict:
    """Every rank's ``sampling.sweep_stats`` of its shard -> the statistics one sweep of the whole vocabulary
    keeps (to within float64 rounding of the sums): the best score's group from the first rank holding the
    max (the lowest id, as the chunk loop's ties), the raw top-1 likewise, logsumexp pairs rescaled to the
    global max, the top-k merged, the soft embedding's partial sums (``sa``, present with smoothing)
    rescaled and all-reduced. Every rank ends with the same statistics."""
    world = dist.get_world_size(group)
    soft = "sa" in st
    keys = [k for k, _ in _SWEEP_ARGMAX] + [k for _, ks in _SWEEP_ARGMAX for k in ks] + \
        [k for m, ks in _SWEEP_SUMS if m in st for k in (m, *ks)]
    mine = torch.stack([st[k].to(torch.float64) for k in keys])                   # [K, C, N]
    r = dict(zip(keys, _all_gather(mine, group, world).unbind(1)))               # each [R, C, N]
    out = {}
    for lead, group_keys in _SWEEP_ARGMAX:
        j = r[lead].argmax(0, keepdim=True)                                      # first max: lowest rank
        for k in (lead, *group_keys):
            out[k] = r[k].gather(0, j)[0]
    for k in _SWEEP_INT:
        out[k] = out[k].to(torch.int64)
    for mk, sums in _SWEEP_SUMS:
        if mk in r:
            M = r[mk].amax(0)
            f = torch.exp(r[mk] - M)                                              # [R, C, N]
            out[mk] = M
            out.update({k: (r[k] * f).sum(0) for k in sums})
    if soft:                                                                      # [C, N, d] on every rank
        sa = st["sa"] * torch.exp(st["sm"] - out["sm"]).to(st["sa"].dtype)[..., None]
        dist.all_reduce(sa, group=group)
        out["sa"] = sa
    if topk:
        tv, ti = _gather_topk(st["tv"], st["ti"], group, world)                   # [C, N, R * k]
        out["tv"], j = tv.topk(min(topk, tv.shape[-1]), dim=-1)
        out["ti"] = ti.gather(-1, j)
    return out


def shard_top_soft(ids: torch.Tensor, scores: torch.Tensor, we: torch.Tensor, v0: int, tau: float,
                   group) -> torch.Tensor:
    """``sampling.top_soft`` with the embedding sharded: ids [..., k] (global) and their ``scores``, this
    rank's embedding rows ``we`` (ids v0 ..) -> softmax(scores / tau) @ W_e[ids] [..., d]: each rank adds the
    rows it holds, one all_reduce sums them (each id lives on one rank)."""
    p = torch.softmax(scores / tau, -1)                                          # [..., k]
    local = ids - v0
    inside = (local >= 0) & (local < we.shape[0])
    rows = we[local.clamp(0, we.shape[0] - 1)].to(p.dtype)                       # [..., k, d]
    out = (torch.where(inside, p, torch.zeros_like(p))[..., None] * rows).sum(-2)
    dist.all_reduce(out, group=group)
    return out
