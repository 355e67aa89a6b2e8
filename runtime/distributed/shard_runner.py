"""One rank's runner: the eager runner's forwards over the rank's shard, decoding through the vocab-parallel
head (``vocab.py``; credit, smoothing and sampling filters through ``rules_decode``: the decoding core's
chunk sweep per shard, merged by ``vocab.combine_sweep``; ``vocab_filters.py`` for filters the merged
candidates do not bound; a ``fused`` graph runner's T = 0 credit and smoothing steps through
``fused_rules_decode``: one GPU's fused routes per shard, float32, then the small combine). Every rank runs
it on the same StepBatch; the collectives inside the model
(row-parallel all-reduces) and in decoding keep them in lockstep, and every rank ends with the same
(x0, conf). The rank's forwards go through its ``ShardCollectives`` (collectives.py: the all-reduce its layers
hold, the two-micro-batch forward for big steps), which the runner owns and hands to the graph runner made
from it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from dlc.kernels.filter_bisect import is_plan
from dlc.kernels.sampling import FILTER_CANDIDATES, filter_candidates, filter_route, finish_stats, sweep_stats
from dlc.models.tensor_parallel import head_shard

from ..runners.eager import EagerRunner, _tempered
from ..runners.graph import LOGPROB_BUCKETS, GraphRunner, fused_route
from ..step import StepBatch
from ..step_output import StepOutput
from .collectives import ShardCollectives
from .vocab import CHUNK, combine, combine_sweep, fused_stats, shard_stats, shard_top_soft
from .vocab_filters import exact_filters


class ShardRunner(EagerRunner):
    def __init__(self, model, config, rank: int, world: int, group, collectives: ShardCollectives):
        super().__init__(model)
        self.config = config                   # the shard's config: its heads (sizes its KV pool)
        self.rank, self.world, self.group = rank, world, group
        self.collectives = collectives         # the rank's all-reduce and split forward (collectives.py)

    def model_forward(self, ids, pos, key_mask, cache=None, start=0, embed_add=None) -> torch.Tensor:
        return self.collectives.forward(self.model, ids, pos, key_mask, cache, start, embed_add)

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def decode(self, rows: torch.Tensor, batch: StepBatch):
        return vocab_decode(self, rows, batch)


def vocab_decode(shard, rows: torch.Tensor, batch: StepBatch, fused: bool = False):
    """A shard's decoding (``ShardRunner``, and ``ShardGraphRunner``'s uncaptured steps): rows [fed, N, d] ->
    (x0 [B, N], conf [B, N] float64), or a StepOutput with logprobs / entropy, combined over the ranks.
    ``fused``: a T = 0 step without guidance (the caller checked) through the fused sweep
    (``fused_stats``)."""
    if has_rules(batch):
        return vocab_decode_rules(shard, rows, batch, fused)
    w, v0 = head_shard(shard.model, shard.rank, shard.world)
    temperature = batch.temperature
    if batch.tempered_conf and temperature > 0 and not batch.wants_extras():
        rows, temperature = rows / temperature, 1.0               # as EagerRunner.decode: softmax(l / T)
    k = batch.logprobs or 0
    if fused:                   # k as the graphs' variants round it: one kernel per bucket, not per k
        k = next(b for b in LOGPROB_BUCKETS if b >= k)
        st = fused_stats(rows, w, v0, topk=k, entropy=batch.entropy)
    else:
        st = shard_stats(rows, w, v0, batch.cond_rows, batch.un_rows, batch.cfg_weight(rows.dtype),
                         temperature, batch.seeds, shard.config.vocab_size, topk=k, entropy=batch.entropy)
    out = combine(st, shard.group, topk=k)
    if not batch.wants_extras():
        return out["tokens"], out["confidence"]
    return StepOutput.from_decode(extras_of(out, batch.logprobs is not None, batch.entropy))


def has_rules(batch: StepBatch) -> bool:
    """A batch carrying credit, smoothing's soft output or sampling filters (``vocab_decode_rules``)."""
    return batch.credit_ids is not None or batch.soft_tau is not None or batch.top_k is not None


def vocab_decode_rules(shard, rows: torch.Tensor, batch: StepBatch, fused: bool = False) -> StepOutput:
    """Credit, iteration smoothing and sampling filters at T > 0 decoded vocab-parallel, as one process's
    ``eager.decode_step_extras`` decodes them (rows [fed, N, d], tempered as there): ``rules_decode`` with
    the batch's fields (the filters' route read here, on the host). ``fused`` (a ``fused`` graph runner's
    eager step at T = 0 without guidance, the caller checked): ``fused_rules_decode``, as its captured
    steps."""
    credit = batch.credit()
    if fused:
        ex = GraphRunner._extras_key(batch)
        return StepOutput.from_decode(fused_rules_decode(shard, rows, ex, credit))
    rows, temperature = _tempered(rows, batch.temperature, batch.tempered_conf)
    filters = None if batch.top_k is None or temperature == 0 else (batch.top_k, batch.top_p, batch.min_p)
    out = rules_decode(shard, rows, batch.cond_rows, batch.un_rows, batch.cfg_weight(rows.dtype), temperature,
                       batch.seeds, credit=credit, soft_tau=batch.soft_tau, soft_k=batch.soft_top_k,
                       filters=filters, cover=None if filters is None else filters_covered(*filters, credit),
                       entropy=batch.entropy, logprobs=batch.logprobs, filtered_conf=batch.tempered_conf)
    return StepOutput.from_decode(out)


def rules_decode(shard, rows, cond_rows, un_rows, cfg_w, temperature, seeds, *, credit=None, soft_tau=None,
                 soft_k: int = 0, filters=None, cover=None, entropy: bool = False,
                 logprobs: int | None = None, filtered_conf: bool = False,
                 acc: torch.dtype = torch.float64) -> dict:
    """The rules' vocab-parallel decoding of rows [fed, N, d] -> ``decode_rows_ext``'s dict (the eager steps'
    ``vocab_decode_rules`` and the captured steps' ``ShardGraphRunner._graph_decode``, whose temperature is a
    static [1] tensor). Each rank sweeps its shard with the core's chunk loop (``sweep_stats``: the credit
    of the ids in its shard added before its statistics), ``combine_sweep`` merges the ranks' statistics,
    then every rank finishes as one process does (``finish_stats``: credit's own-step correction on the
    global raw top-1; ``filter_candidates``: top-k, top-p on the renormalised survivors, min-p and the
    Gumbel-max over the merged top ``FILTER_CANDIDATES`` where they hold the survivors: ``cover``, from
    ``filters_covered``; else ``vocab_filters.exact_filters``' bisection, ``cover`` its ``bisect_plan``:
    fixed search passes, each one all_reduce, no host read, so it captures). Smoothing's soft embedding: each
    rank's share of exp(l / tau - max) @ W_e[shard], one all_reduce (truncated, ``soft_k`` > 0:
    ``shard_top_soft`` over the merged top-k). ``acc``: the sweep's arithmetic (float64, the eager runner's
    and ``exact`` decoding's; float32 where one GPU's ``fused`` graph runner sweeps in float32:
    ``fused_rules_decode``'s "sweep" route)."""
    w, v0 = head_shard(shard.model, shard.rank, shard.world)
    vocab = shard.config.vocab_size
    we = shard.model.embed.weight[:w.shape[0]]                 # this rank's embedding rows: the same ids
    soft_k = soft_k if soft_tau else 0
    soft = (we, soft_tau) if soft_tau and not soft_k else None
    candidates = bool(cover) and not is_plan(cover)           # the filters over the merged top candidates
    kc = min(FILTER_CANDIDATES, vocab) if candidates else 0
    topk = max(logprobs or 0, soft_k)                          # what the caller reads of the top list
    k_sweep = max(topk, kc)
    # every row filters over the candidates, or the bisection draws: the sweep draws nothing (T = 0)
    t_sweep = 0.0 if cover == "filtered" or (filters is not None and not candidates) else temperature
    st = sweep_stats(rows, w, cond_rows, un_rows, cfg_w, t_sweep, seeds, vocab=vocab, chunk=CHUNK,
                     topk=k_sweep, entropy=entropy, credit=credit, soft=soft, acc=acc, v0=v0, rows=w.shape[0])
    st = combine_sweep(st, shard.group, topk=k_sweep)
    out = finish_stats(st, t_sweep, seeds, vocab=vocab, topk=k_sweep,
                       logprobs=filters is not None or logprobs is not None, entropy=entropy, credit=credit,
                       soft=soft is not None, acc=acc)
    if filters is not None and candidates:
        out = filter_candidates(out, filters, temperature, seeds, vocab=vocab, topk=topk,
                                logprobs=logprobs is not None, filtered_conf=filtered_conf, acc=acc)
    elif filters is not None:                  # survivors the candidates need not hold: the exact bisection
        out = exact_filters(shard, rows, cond_rows, un_rows, cfg_w, temperature, seeds, filters, out,
                            credit=credit, filtered_conf=filtered_conf, plan=cover or None)
    if soft_k:
        out["soft"] = shard_top_soft(out["topk_ids"][..., :soft_k], out["topk_logprobs"][..., :soft_k], we,
                                     v0, soft_tau, shard.group)
    return _asked(out, logprobs)


def fused_rules_decode(shard, rows: torch.Tensor, ex, credit) -> dict:
    """A T = 0 step with rules (credit, smoothing, and entropy / logprobs beside them; sampling filters,
    which T = 0 ignores) in ``fused`` mode: rows [B, N, d], the variant ``ex`` (``GraphRunner._extras_key``)
    and its ``credit`` (ids, vals [B, N, M], alpha [B]) -> ``decode_rows_ext``'s dict, computed as one GPU's
    ``fused`` graph runner computes it (the same ``runners.graph.fused_route``), over this rank's vocab
    shard in float32, then the small combine: "extras", the fused per-shard sweep (``vocab.fused_stats``)
    with credit's sparse correction (``credit_finish``); "smooth", smoothing's one pass of model-dtype logits
    per shard (``_fused_smooth``); "sweep", ``rules_decode`` in float32. No float64 chunk loop over
    [rows, Vr]: what credit and smoothing cost a TP step beyond the plain one is the single GPU's. Numerics
    as for plain fused decoding (kernels/shard_logits.py): the same float32 logits and ties, so tokens equal
    one GPU's fused decode on the same rows; sums differ in order (~1e-7 relative), and smoothing's
    model-dtype probabilities round relative to each shard's max (bf16: ~2^-9, as one GPU's chunks round
    relative to theirs; tests/kernels/test_shard_logits.py)."""
    route = fused_route(ex)
    if route == "sweep":
        ar = torch.arange(rows.shape[0], device=rows.device)
        one = torch.ones(1, dtype=rows.dtype, device=rows.device)
        out = rules_decode(shard, rows, ar, ar, one, 0.0, torch.zeros_like(ar), credit=credit,
                           soft_tau=ex.smooth_tau, soft_k=ex.smooth_k, entropy=ex.entropy,
                           logprobs=None if ex.logprobs < 0 else ex.logprobs, acc=torch.float32)
        return out
    w, v0 = head_shard(shard.model, shard.rank, shard.world)
    if route == "smooth":
        return _fused_smooth(shard, rows, w, v0, ex.smooth_k)
    k = max(ex.logprobs, 0)
    st = fused_stats(rows, w, v0, topk=k, entropy=ex.entropy)
    sums = None if credit is None else credit_logits(rows, w, v0, credit[0])
    out = combine(st, shard.group, topk=k, sums=sums)
    if credit is not None:
        out = credit_finish(out, credit)
    if not ex.entropy:
        out.pop("entropy")
    return _asked(out, None if ex.logprobs < 0 else ex.logprobs)


def credit_logits(rows: torch.Tensor, w: torch.Tensor, v0: int, ids: torch.Tensor) -> torch.Tensor:
    """The logits of the credited ids ``ids`` [B, N, M] (global) that this rank's head rows ``w`` (ids
    v0 ..) hold, 0 for the others -> [M, B, N] (summed over the ranks by ``combine``'s ``sums``: each id's
    float32 logit exactly, as one GPU's ``gather_logits`` computes it)."""
    from dlc.kernels.select_extras import gather_logits
    B, N, M = ids.shape
    local = ids - v0
    inside = (local >= 0) & (local < w.shape[0])
    lg = gather_logits(rows.reshape(B * N, -1), w, local.clamp(0, w.shape[0] - 1).reshape(B * N, M))
    lg = torch.where(inside.reshape(B * N, M), lg, torch.zeros_like(lg))                     # [B * N, M]
    return lg.t().reshape(M, B, N)


def credit_finish(out: dict, credit) -> dict:
    """``combine``'s output (the raw sweep merged, the credited ids' logits in ``_sums``) -> credit decoding
    by ``select_extras.credit_correction``, the sparse correction one GPU's fused kernel path applies."""
    from dlc.kernels.select_extras import credit_correction
    ids, vals, alpha = credit
    B, N, M = ids.shape
    flat = {k: out[k].reshape(B * N) for k in ("tokens", "confidence", "logprob", "_lse", "_best")}
    lg = out["_sums"].reshape(M, B * N).t()                                                  # [B * N, M]
    res = credit_correction(flat, lg, ids.reshape(B * N, M), vals.reshape(B * N, M),
                            alpha[:, None].expand(B, N).reshape(B * N))
    out.update({k: res[k].view(B, N) for k in ("tokens", "confidence", "logprob", "top1_ids", "top1_prob")})
    return out


def _fused_smooth(shard, rows: torch.Tensor, w: torch.Tensor, v0: int, soft_k: int) -> dict:
    """Smoothing alone at tau 1 (``kernels.smoothing``): this rank's ``smooth_shard_stats`` merged by
    ``combine`` (the selection: the max logit is the token's), then the soft embedding: each rank's share
    rescaled to the global max (``soft_share``), one all_reduce of [B, N, d] (truncated, ``soft_k``:
    ``shard_top_soft`` over the merged top k)."""
    we = shard.model.embed.weight[:w.shape[0]]                 # this rank's embedding rows: the same ids
    st, sa = smooth_shard_stats(rows, w, we, v0, soft_k)
    out = combine(st, shard.group, topk=soft_k)
    if soft_k:
        soft = shard_top_soft(out["topk_ids"], out["topk_logprobs"], we, v0, 1.0, shard.group)
    else:
        sa = soft_share(sa, st["m"], out["_m"])
        dist.all_reduce(sa, group=shard.group)
        soft = sa / out["_s"].to(sa.dtype)[..., None]
    return {"tokens": out["tokens"], "confidence": out["confidence"], "soft": soft}


def smooth_shard_stats(rows: torch.Tensor, w: torch.Tensor, we: torch.Tensor, v0: int, soft_k: int):
    """A rank's part of fused smoothing: ``kernels.smoothing.smooth_stats`` over its head rows ``w`` and
    embedding rows ``we`` (ids v0 ..) for rows [B, N, d] -> (``combine``'s statistics [B, N] float64, the top
    ``soft_k`` with it; the unnormalised soft sum [B, N, d] float32 relative to this rank's max, None with
    ``soft_k``)."""
    from dlc.kernels.smoothing import chunk_columns, smooth_stats
    B, N, d = rows.shape
    sm = smooth_stats(rows.reshape(B * N, d), w, we, vocab=w.shape[0],
                      chunk=chunk_columns(B * N, w.shape[0], CHUNK), top_k=soft_k)
    f = torch.float64
    m = sm["m"].to(f).view(B, N)
    st = {"best": m, "tok": (sm["tok"] + v0).to(f).view(B, N), "bl": m, "m": m,
          "s": sm["s"].to(f).view(B, N), "a": torch.zeros_like(m)}
    if soft_k:
        st["tv"], st["ti"] = sm["tv"].to(f).view(B, N, -1), (sm["ti"] + v0).view(B, N, -1)
        return st, None
    return st, sm["sa"].view(B, N, d)


def soft_share(sa: torch.Tensor, m: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """A rank's soft sum sa [B, N, d] = sum e^(l - m) W_e over its shard, moved to the global max M [B, N]
    (the ranks' shares then add up to sum e^(l - M) W_e over the vocabulary)."""
    return sa * torch.exp(m - M).to(sa.dtype)[..., None]


def _asked(out: dict, logprobs: int | None) -> dict:
    """The outputs the caller asked for: top-k cut to ``logprobs`` (the sweep kept more for the filters or
    truncated smoothing), no logprob without logprobs, no internals."""
    k = logprobs or 0
    if k:
        out["topk_ids"], out["topk_logprobs"] = out["topk_ids"][..., :k], out["topk_logprobs"][..., :k]
    else:
        out.pop("topk_ids", None), out.pop("topk_logprobs", None)
    if logprobs is None:
        out.pop("logprob", None)
    return {key: v for key, v in out.items() if not key.startswith("_")}


def filters_covered(top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, credit=None) -> str:
    """``sampling.filter_route`` of the rows' filters ("filtered" / "mixed": every filtering row has a top-k
    of at most ``FILTER_CANDIDATES``, so the merged top candidates hold its survivors), or the exact
    bisection's ``bisect_plan`` (``vocab_filters.exact_filters``), also for a batch with credit (one process
    filters the credit-fused logits). Read as if without tempered confidences: a row without filters keeps
    the tempered sweep's token and confidence, which is its confidence over the whole tempered vocabulary."""
    return filter_route(top_k, top_p, min_p, credit=credit is not None)


def extras_of(out: dict, logprobs: bool, entropy: bool) -> dict:
    """``combine``'s dict -> the keys ``StepOutput`` takes (tokens, confidence and the extras asked for)."""
    res = {"tokens": out["tokens"], "confidence": out["confidence"]}
    if logprobs:                 # logprobs 0: no alternatives (no None values: graph variants copy each key)
        res.update({k: out[k] for k in ("logprob", "topk_ids", "topk_logprobs") if k in out})
    if entropy:
        res["entropy"] = out["entropy"]
    return res
