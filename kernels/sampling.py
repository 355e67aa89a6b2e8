"""Decoding with the extras some rules and requests need beyond (token, confidence): the one function every
runner (eager, the CUDA-graph runner's eager fallback, compiled phase programs through ``chunk_logits``) calls
when a ``StepBatch`` asks for more than ``decode_rows`` gives.

Per decoded row, on top of ``decode_rows``' token (Gumbel-max) and confidence (softmax probability):

* ``entropy`` [C, N]: the Shannon entropy (nats) of the row's guided distribution at T = 1 (the
  entropy-bounded rule), from an online float64 ``m, s = sum e^(l-m), a = sum e^(l-m) l``:
  ``H = m + log s - a / s``;
* ``logprob`` [C, N] and top-k ``topk_ids`` / ``topk_logprobs`` [C, N, k] of the model's distribution (the
  OpenAI ``logprobs`` field; the fused op's streaming top-k);
* credit (dInfer's ``CreditThresholdParallelDecoder``): ``credit_ids`` / ``credit_vals`` [C, N, M] are the
  block's credit so far (sparse: a position's credit lives on the few ids that were its top-1; duplicates
  add), already decayed by beta for this step; ``credit_alpha`` [C] (0: off for that row). The step first
  adds its own raw top-1 probability ``p1 ** gamma`` on the raw top-1 id, then selects on the fused logits
  ``l + alpha * log(1 + credit)``: token = Gumbel-max of the fused logits, confidence = their softmax
  probability. One pass over the vocabulary: the prior credit is scattered into each chunk, and the current
  step's own contribution (one id per row, known only at the end) is a closed-form correction of the
  running best and of the logsumexp. ``top1_ids`` / ``top1_prob`` (raw) come back for the caller's update;
* ``soft`` [C, N, d]: ``softmax(l / tau) @ W_e`` (iteration smoothing's soft embedding), online over chunks;
* sampling filters at T > 0 (``top_k`` [C] int, 0 = off; ``top_p`` [C], 1 = off; ``min_p`` [C], 0 = off),
  as vLLM / HF apply them: on the tempered distribution ``softmax(l / T)``, top-k first, top-p on the
  renormalised survivors (smallest prefix of the sorted probabilities reaching ``top_p``), min-p relative to
  the most likely token; the token is Gumbel-max over the survivors with the same hash noise, so a filter
  that keeps everything changes nothing. At T = 0 filters are skipped (each always keeps the argmax).
  Candidates (vLLM's and SGLang's top-k-first sampling): when every filtering row has a top-k of at most
  ``FILTER_CANDIDATES`` (and no credit), the survivors are among the row's top-k logits, so the one chunked
  sweep keeps each row's ``FILTER_CANDIDATES`` largest logits beside its logsumexp, and top-k / top-p / min-p
  and the Gumbel-max (the same hash noise, drawn at the candidates' ids) run over those: the same tokens and
  confidences as the full path, no [N, V] tensor, no vocabulary sort. Otherwise (top-p or min-p without a
  top-k, a larger top-k, or credit) filtered rows need every logit of a row at once: only then is [C, N, V]
  formed (float64, e.g. 1 GiB at C = N = 32 for LLaDA-8B: the cost of such filters, paid only then), and
  either sorted per sequence (``_decode_full``: the eager path, the reference) or, on the graph runner's
  route (``filter_route``'s ``bisect_plan``), searched by ``filter_bisect``'s exact bisection on the
  survivors' threshold (fixed search passes, no host read, so it captures; chunks of sequences; the same
  tokens).

Checked against dInfer's public ``python/dinfer/decoding/parallel_strategy.py`` (commit fce4e32):
``CreditThresholdParallelDecoder`` (alpha 0.7, gamma 0.2, beta 0.8; fused = logits + alpha log(1 + credit);
float32 there, float64 here).

Tensor parallelism runs the same code per vocab shard: ``sweep_stats`` (the chunk loop, at a global id
offset) and ``finish_stats`` (outputs from the statistics) are ``_decode_chunked``'s two halves, and
``filter_candidates`` is the candidates path's tail; runtime/distributed/vocab.py merges the ranks' statistics
between them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .filter_bisect import bisect_filters, bisect_plan, fused_ok, is_plan, plain_draw, plain_ok
from .logits import decode_rows, seeded_uniform, uniform_noise

CREDIT_GAMMA = 0.2           # dInfer's boost_gamma: a step adds p1 ** gamma to its top-1 id's credit
FILTER_CANDIDATES = 64       # top-k filters up to this k sample over the sweep's top candidates


def hash_noise(seeds: torch.Tensor, cols: torch.Tensor, vocab: int, dtype=torch.float64) -> torch.Tensor:
    """``uniform_noise``'s draw for arbitrary ids: seeds [C], cols [C, N, J] vocab ids -> [C, N, J] (the same
    value ``uniform_noise(seeds, N, c0, c1, vocab)`` gives at those (row, id))."""
    row = torch.arange(cols.shape[1], device=cols.device)[None, :, None]           # [1, N, 1]
    return seeded_uniform(seeds, row, cols, vocab, dtype)


def _credit_chunk(credit_ids, credit_vals, c0: int, c1: int, like: torch.Tensor) -> torch.Tensor:
    """Prior credit of the chunk's ids [C, N, Vc] (duplicates add)."""
    inside = (credit_ids >= c0) & (credit_ids < c1)
    idx = torch.where(inside, credit_ids - c0, torch.zeros_like(credit_ids))
    vals = torch.where(inside, credit_vals.to(like.dtype), torch.zeros_like(credit_vals, dtype=like.dtype))
    return torch.zeros_like(like).scatter_add(-1, idx, vals)


def _credit_at(credit_ids, credit_vals, ids: torch.Tensor) -> torch.Tensor:
    """Prior credit of ids [C, N] -> [C, N]."""
    hit = credit_ids == ids[..., None]
    return torch.where(hit, credit_vals, torch.zeros_like(credit_vals)).sum(-1)


def filter_mask(scaled: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """Survivors [C, N, V] of top-k, then top-p, then min-p over tempered logits ``scaled`` [C, N, V]."""
    V = scaled.shape[-1]
    srt, order = scaled.sort(dim=-1, descending=True, stable=True)                    # [C, N, V]
    rank = torch.arange(V, device=scaled.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, V))[:, None, None]   # [C, 1, 1]
    keep_sorted = (rank < k).expand_as(srt).clone()
    p = torch.softmax(torch.where(keep_sorted, srt, torch.full_like(srt, float("-inf"))), -1)
    before = p.cumsum(-1) - p                                                      # mass strictly before
    keep_sorted &= before < top_p.to(p.dtype)[:, None, None]
    keep_sorted[..., 0] = True
    pmax = p[..., :1]
    keep_sorted &= p >= min_p.to(p.dtype)[:, None, None] * pmax
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter(-1, order, keep_sorted)


def decode_rows_ext(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab: int, chunk: int, topk: int = 0,
                    logprobs: bool = False, entropy: bool = False, credit=None, soft=None, filters=None,
                    filtered_conf: bool = False, acc: torch.dtype = torch.float64,
                    candidates: str | bool | None = None) -> dict:
    """h [B, N, d] rows, w [>=V, d] head -> {"tokens", "confidence", and the asked extras} (see the module).

    ``credit``: (ids [C, N, M], vals [C, N, M], alpha [C]); ``soft``: (W_e [>=V, d], tau float) or (W_e, tau,
    k): truncated smoothing over each row's top k (``_decode_top_soft``; k = 0: the whole vocabulary);
    ``filters``: (top_k [C], top_p [C], min_p [C]) or None; ``filtered_conf``: with filters at T > 0 the
    confidence is the token's probability under the filtered, tempered distribution (renormalised over the
    survivors: LLaDA2's and SDAR's samplers) instead of the unfiltered one. ``candidates``: filter over the
    sweep's top candidates (``candidates_cover``'s answer, which the caller read: "filtered" / "mixed"; True:
    "mixed"), over the full logits (False: the sort of ``_decode_full``, the eager path), by the bisection
    on the survivors' threshold (a ``filter_bisect.bisect_plan`` string: ``filter_route``'s answer for the
    filters the candidates do not bound; no host read, so it captures), or decide here (None: reads the
    filters on the host; candidates or the sort). Without extras this is ``decode_rows`` itself; at T > 0
    on CUDA (``filter_bisect.plain_ok``) its fused twin ``filter_bisect.plain_draw`` (the same tokens, the
    confidence within float64 summation order, no [C, N, chunk] float64 tensor)."""
    if soft is not None and len(soft) > 2:
        if not soft[2]:
            soft = soft[:2]                          # k = 0: the whole vocabulary
        else:
            return _decode_top_soft(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab,
                                    chunk=chunk,
                                    topk=topk, logprobs=logprobs, entropy=entropy, credit=credit, soft=soft,
                                    filters=filters, filtered_conf=filtered_conf, acc=acc,
                                    candidates=candidates)
    sampling = not (isinstance(temp, (int, float)) and temp == 0)
    if candidates is None and filters is not None and sampling and credit is None:
        candidates = candidates_cover(*filters, filtered_conf)
    if filters is not None and sampling and is_plan(candidates):
        out = _decode_bisect(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk,
                             topk=topk, logprobs=logprobs, entropy=entropy, credit=credit, soft=soft,
                             filters=filters, filtered_conf=filtered_conf, acc=acc, plan=candidates)
        return {k: v for k, v in out.items() if not k.startswith("_")}
    if filters is not None and sampling and credit is None and candidates:
        out = _decode_candidates(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk,
                                 topk=topk, logprobs=logprobs, entropy=entropy, soft=soft, filters=filters,
                                 filtered_conf=filtered_conf, acc=acc, every_row=candidates == "filtered")
        return {k: v for k, v in out.items() if not k.startswith("_")}
    if filters is not None and sampling:
        out = _decode_full(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk, topk=topk,
                           logprobs=logprobs, entropy=entropy, credit=credit, soft=soft, filters=filters,
                           filtered_conf=filtered_conf, acc=acc)
        return {k: v for k, v in out.items() if not k.startswith("_")}
    if credit is None and soft is None and not entropy and not logprobs:
        if filters is None and not topk and plain_ok(h, temp, acc):    # T > 0 unfiltered: the fused draw
            return plain_draw(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk)
        res = decode_rows(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk, topk=topk,
                          acc=acc)
        out = {"tokens": res[0], "confidence": res[1]}
        if topk:
            out["topk_ids"], out["topk_logprobs"] = res[2], res[3]
        return out
    out = _decode_chunked(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk, topk=topk,
                          logprobs=logprobs, entropy=entropy, credit=credit, soft=soft, acc=acc)
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _decode_top_soft(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab, chunk, topk, soft, **kw) -> dict:
    """Truncated smoothing (``soft`` = (W_e, tau, k), ``GenerationConfig.smoothing_top_k``): the soft
    embedding over each row's k largest raw logits, renormalised (``top_soft``), from the sweep's top list
    (asked for max(topk, k) entries, then cut back to the caller's topk): no second vocabulary GEMM."""
    we, tau, k = soft
    out = decode_rows_ext(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk,
                          topk=max(topk, k), **kw)
    ids, lps = out.pop("topk_ids"), out.pop("topk_logprobs")                     # [C, N, >= k]
    out["soft"] = top_soft(ids[..., :k], lps[..., :k], we, tau)
    if topk:
        out["topk_ids"], out["topk_logprobs"] = ids[..., :topk], lps[..., :topk]
    return out


def top_soft(ids: torch.Tensor, scores: torch.Tensor, we: torch.Tensor, tau: float) -> torch.Tensor:
    """ids [..., k] of each row's most likely tokens with their logits or logprobs ``scores`` [..., k] ->
    softmax(scores / tau) @ W_e[ids] [..., d] (the weights renormalised over the k; ``scores``' dtype)."""
    p = torch.softmax(scores / tau, -1)                                          # [..., k]
    return (p[..., None] * we[ids].to(p.dtype)).sum(-2)


def _guided(h, w, cond_rows, un_rows, cfg_w, c0, c1, acc):
    """Logits of head rows [c0, c1) for the C decoded sequences: ``un + cfg_w (cond - un)``; without guidance
    (one index tensor for both, as the graph runner passes) that is ``cond`` bit for bit, so no arithmetic
    passes over [C, N, Vc]."""
    lc = F.linear(h, w[c0:c1])                                                     # [B, N, Vc]
    if cond_rows is un_rows:
        return lc.index_select(0, cond_rows).to(acc)
    cond, un = lc.index_select(0, cond_rows), lc.index_select(0, un_rows)          # [C, N, Vc]
    return (un + cfg_w * (cond - un)).to(acc)


def _decode_chunked(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab, chunk, topk, logprobs, entropy,
                    credit, soft, acc):
    st = sweep_stats(h, w, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk, topk=topk,
                     entropy=entropy, credit=credit, soft=soft, acc=acc)
    return finish_stats(st, temp, seeds, vocab=vocab, topk=topk, logprobs=logprobs, entropy=entropy,
                        credit=credit, soft=soft is not None, acc=acc)


def sweep_stats(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab, chunk, topk, entropy, credit, soft,
                acc, v0: int = 0, rows: int | None = None) -> dict:
    """The chunked sweep's running statistics over head rows w[:rows] (global ids v0 .. v0 + rows; default
    the whole vocabulary): all [C, N] (``soft``'s ``sa`` [C, N, d], top-k ``tv`` / ``ti`` [C, N, k]). Ids,
    hash noise and credit use the global id, so a vocab-parallel rank (runtime/distributed/vocab.py) sweeps
    its shard with the same code and the ranks' statistics merge into what one sweep of the whole vocabulary
    keeps; ``finish_stats`` turns them into the outputs. ``soft``: (W_e rows of the same ids, tau)."""
    sampling = not (isinstance(temp, (int, float)) and temp == 0)
    N = h.size(1)
    n = vocab if rows is None else rows
    st = {}                          # running reductions, all [C, N] (soft: [C, N, d])
    top_v = top_i = None
    have = 0
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        g0, g1 = v0 + c0, v0 + c1                                                # global ids of the chunk
        l64 = _guided(h, w, cond_rows, un_rows, cfg_w, c0, c1, acc)              # [C, N, Vc]
        ci = None
        if topk:                             # the chunk's top values: its max is the first (no amax pass)
            tv, ti = l64.topk(min(topk, c1 - c0), dim=-1)
            cm = tv[..., 0]
        elif sampling or credit is not None:
            cm = l64.amax(-1)
        else:                                # the score is l64: its max and first argmax in one pass
            cm, ci = l64.max(-1, keepdim=True)
            cm = cm[..., 0]
        e = torch.exp(l64 - cm[..., None])
        csum = e.sum(-1)
        cdot = (e * l64).sum(-1) if entropy else csum                           # (a placeholder without)
        if credit is not None:
            ri = l64.argmax(-1, keepdim=True)                                    # raw top-1 in the chunk
            ids, vals, alpha = credit
            lb = l64 + alpha.to(acc)[:, None, None] * torch.log1p(_credit_chunk(ids, vals, g0, g1, l64))
        else:
            lb = l64
        score = lb - temp * torch.log(-torch.log(uniform_noise(seeds, N, g0, g1, vocab, h.device, acc))) \
            if sampling else lb
        ci = score.argmax(-1, keepdim=True) if ci is None else ci
        cs, cl, clb = score.gather(-1, ci)[..., 0], l64.gather(-1, ci)[..., 0], lb.gather(-1, ci)[..., 0]
        if credit is None:               # lb is l64: its max and sum are the raw ones (no more passes)
            ri, bm, bsum = ci, cm, csum                                          # (ri: unused without credit)
        else:
            bm = lb.amax(-1)
            bsum = torch.exp(lb - bm[..., None]).sum(-1)
        if soft is not None:
            we, tau = soft
            if tau == 1.0:                   # softmax(l / 1) is the selection's own: e, max and sum reused
                sm, es, ssum = cm, e, csum
            else:                            # max(l / tau) = max(l) / tau (the same element, bit for bit)
                sm = cm / tau
                es = torch.exp(l64 / tau - sm[..., None])                        # [C, N, Vc]
                ssum = es.sum(-1)                                                # [C, N]
            # the [C, N, Vc] x [Vc, d] product in the embedding's dtype (dInfer's too): a second head-sized
            # GEMM, in float64 it would dominate a GPU step
            sacc = torch.matmul(es.to(we.dtype), we[c0:c1]).to(acc)             # [C, N, d]
        if not st:
            st = {"best": cs, "tok": ci[..., 0] + g0, "bl": cl, "blb": clb, "m": cm, "s": csum, "a": cdot,
                  "r1": ri[..., 0] + g0, "r1l": l64.gather(-1, ri)[..., 0], "bm": bm, "bs": bsum}
            if soft is not None:
                st.update(sm=sm, ss=ssum, sa=sacc)
        else:
            take = cs > st["best"]                                               # ties keep the earlier id
            st["best"] = torch.where(take, cs, st["best"])
            st["tok"] = torch.where(take, ci[..., 0] + g0, st["tok"])
            st["bl"], st["blb"] = torch.where(take, cl, st["bl"]), torch.where(take, clb, st["blb"])
            rl = l64.gather(-1, ri)[..., 0]
            rtake = rl > st["r1l"]
            st["r1"] = torch.where(rtake, ri[..., 0] + g0, st["r1"])
            st["r1l"] = torch.where(rtake, rl, st["r1l"])
            nm = torch.maximum(st["m"], cm)
            f_old, f_new = torch.exp(st["m"] - nm), torch.exp(cm - nm)
            st["s"], st["a"], st["m"] = st["s"] * f_old + csum * f_new, st["a"] * f_old + cdot * f_new, nm
            nb = torch.maximum(st["bm"], bm)
            st["bs"], st["bm"] = st["bs"] * torch.exp(st["bm"] - nb) + bsum * torch.exp(bm - nb), nb
            if soft is not None:
                ns = torch.maximum(st["sm"], sm)
                fo, fn = torch.exp(st["sm"] - ns), torch.exp(sm - ns)
                st["ss"], st["sa"], st["sm"] = st["ss"] * fo + ssum * fn, st["sa"] * fo[..., None] + \
                    sacc * fn[..., None], ns
        if topk:
            ti = ti + g0
            if top_v is not None:
                tv, ti = torch.cat([top_v, tv], -1), torch.cat([top_i, ti], -1)
            have = min(topk, have + min(topk, c1 - c0))
            top_v, j = tv.topk(have, dim=-1)
            top_i = ti.gather(-1, j)
    if topk:
        st["tv"], st["ti"] = top_v, top_i
    return st


def finish_stats(st: dict, temp, seeds, *, vocab, topk, logprobs, entropy, credit, soft: bool, acc) -> dict:
    """``sweep_stats``' statistics (one sweep's, or the vocab-parallel ranks' merged) -> the outputs: the
    token and confidence (with credit: this step's own credit added, ``_credit_correction``), the asked
    extras, and the internals ``_bm`` / ``_den`` / ``_lse`` / ``_topv`` the filters read."""
    sampling = not (isinstance(temp, (int, float)) and temp == 0)
    lse = st["m"] + torch.log(st["s"])                                           # raw logsumexp [C, N]
    p1 = torch.exp(st["r1l"] - lse)                                              # raw top-1 probability
    tok, l_tok, den = st["tok"], st["blb"], st["bs"]
    out = {}
    if credit is not None:
        tok, l_tok, den = _credit_correction(st, credit, p1, temp, seeds, vocab, sampling, acc)
        out["top1_ids"], out["top1_prob"] = st["r1"], p1
    # exp(l - m) / s as decode_rows computes it: a row without credit (alpha 0 adds exactly 0.0) gets
    # decode_rows' confidence bit for bit, whatever else its batch asks for
    out["tokens"], out["confidence"] = tok, torch.exp(l_tok - st["bm"]) / den
    out["_bm"], out["_den"], out["_lse"] = st["bm"], den, lse
    if logprobs:
        # the chosen token's raw logit: the sweep's (credit's own-step bonus may switch it to the raw top-1),
        # so a row's logprob is the same whether or not its batch carries credit
        l_raw = st["bl"] if credit is None else torch.where(tok == st["r1"], st["r1l"], st["bl"])
        out["logprob"] = l_raw - lse
    if entropy:
        out["entropy"] = lse - st["a"] / st["s"]
    if topk:
        out["topk_ids"], out["topk_logprobs"], out["_topv"] = st["ti"], st["tv"] - lse[..., None], st["tv"]
    if soft:
        out["soft"] = st["sa"] / st["ss"][..., None]
    return out


def _credit_correction(st, credit, p1, temp, seeds, vocab, sampling, acc):
    """Add this step's own credit (p1 ** gamma on the raw top-1 id t) to the running best and logsumexp."""
    ids, vals, alpha = credit
    a = alpha.to(acc)[:, None]                                                   # [C, 1]
    t = st["r1"]
    prior = _credit_at(ids, vals.to(acc), t)                                     # [C, N]
    b_old, b_new = a * torch.log1p(prior), a * torch.log1p(prior + p1 ** CREDIT_GAMMA)
    lt = st["r1l"]
    score_t = lt + b_new
    if sampling:
        u = hash_noise(seeds, t[..., None], vocab, acc)[..., 0]
        score_t = score_t - temp * torch.log(-torch.log(u))
    take = (score_t > st["best"]) | ((score_t == st["best"]) & (t < st["tok"])) | (t == st["tok"])
    tok = torch.where(take, t, st["tok"])
    l_tok = torch.where(take, lt + b_new, st["blb"])
    den = st["bs"] + torch.exp(lt - st["bm"]) * (torch.exp(b_new) - torch.exp(b_old))   # alpha 0: + 0.0
    return tok, l_tok, den


def candidates_cover(top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                     filtered_conf: bool = False) -> str | None:
    """Whether every row's filters keep only ids among its ``FILTER_CANDIDATES`` largest logits: a top-k of at
    most that many, or no filter at all (plain Gumbel-max over the sweep; not with ``filtered_conf``, whose
    confidence is then over the whole tempered vocabulary). "filtered": every row has such a top-k (the sweep
    draws no noise: only the candidates do); "mixed": some rows sample the whole vocabulary; None: not
    covered. Reads the [C] filters on the host."""
    k, p, m = torch.stack([top_k.to(torch.float64), top_p.to(torch.float64), min_p.to(torch.float64)]).cpu()
    off = (k == 0) & (p >= 1.0) & (m <= 0.0) & (not filtered_conf)                 # (one copy to the host)
    top = (k > 0) & (k <= FILTER_CANDIDATES)
    if not bool((top | off).all()):
        return None
    return "filtered" if bool(top.all()) else "mixed"


def filter_route(top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, filtered_conf: bool = False,
                 credit: bool = False) -> str:
    """How a batch's filters at T > 0 decode without sorting the vocabulary (one host read): over the sweep's
    candidates (``candidates_cover``'s "filtered" / "mixed"), else by the bisection on the survivors'
    threshold (``filter_bisect.bisect_plan``'s route: top-p / min-p without a top-k, a top-k over
    ``FILTER_CANDIDATES``, filters with credit, whose fused logits the candidates do not hold)."""
    cover = None if credit else candidates_cover(top_k, top_p, min_p, filtered_conf)
    return cover or bisect_plan(top_k, top_p, min_p)


def _decode_bisect(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab, chunk, topk, logprobs, entropy,
                   credit, soft, filters, filtered_conf, acc, plan: str) -> dict:
    """Filters the candidates do not bound, without the sort: the chunked extras for all rows (credit's
    statistics, the confidence's denominator, the logsumexp; no draw), then ``filter_bisect``'s exact
    threshold and the Gumbel-max over the survivors (one process: no group), the same tokens as
    ``_decode_full``'s. Without other extras on the fused kernels' route (``filter_bisect.fused_ok``) no
    sweep runs: the bisection's first pass gives the raw max and softmax sum (``stats``) from its own logits
    (one head GEMM instead of two, no float64 sweep; the confidences within float64 summation order)."""
    if credit is None and not (topk or entropy) and soft is None and fused_ok(h):
        return bisect_filters(h, w[:vocab], 0, vocab, cond_rows, un_rows, cfg_w, temp, seeds, filters, {},
                              chunk=chunk, filtered_conf=filtered_conf, plan=plan, stats=True,
                              logprobs=logprobs)
    out = _decode_chunked(h, w, cond_rows, un_rows, cfg_w, 0.0, seeds, vocab=vocab, chunk=chunk, topk=topk,
                          logprobs=logprobs, entropy=entropy, credit=credit, soft=soft, acc=acc)
    return bisect_filters(h, w[:vocab], 0, vocab, cond_rows, un_rows, cfg_w, temp, seeds, filters, out,
                          chunk=chunk, credit=credit, filtered_conf=filtered_conf, plan=plan)


def _decode_candidates(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab, chunk, topk, logprobs, entropy,
                       soft, filters, filtered_conf, acc, every_row: bool = False):
    """Filters over each row's top ``FILTER_CANDIDATES`` logits (``candidates_cover`` holds): one chunked
    sweep (Gumbel-max over the whole vocabulary for rows without a filter; ``every_row``: none, so the sweep
    draws no noise), then per filtering row top-k,
    top-p over the renormalised survivors, min-p, and the Gumbel-max over the survivors (noise at their
    ids)."""
    kc = min(FILTER_CANDIDATES, vocab)
    out = _decode_chunked(h, w, cond_rows, un_rows, cfg_w, 0.0 if every_row else temp, seeds, vocab=vocab,
                          chunk=chunk, topk=max(topk, kc), logprobs=True, entropy=entropy, credit=None,
                          soft=soft, acc=acc)
    return filter_candidates(out, filters, temp, seeds, vocab=vocab, topk=topk, logprobs=logprobs,
                             filtered_conf=filtered_conf, acc=acc)


def filter_candidates(out: dict, filters, temp, seeds, *, vocab, topk, logprobs, filtered_conf, acc) -> dict:
    """The filters over each row's top ``FILTER_CANDIDATES`` logits of a finished sweep ``out``
    (``finish_stats`` of a sweep asked for at least that many top entries and logprobs; one process's, or the
    vocab-parallel ranks' merged): top-k, top-p on the renormalised survivors, min-p, and the Gumbel-max over
    the survivors with the hash noise at their ids, for the rows that filter; the others keep the sweep's."""
    kc = min(FILTER_CANDIDATES, vocab)
    lv, ci = out["_topv"][..., :kc], out["topk_ids"][..., :kc]                  # [C, N, kc] logits (sorted)
    lse = out["_lse"]                                                            # [C, N]
    top_k, top_p, min_p = filters
    on = ~((top_k == 0) & (top_p >= 1.0) & (min_p <= 0.0))                       # [C] rows that filter
    scaled = lv / temp
    rank = torch.arange(kc, device=lv.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, kc))[:, None, None]            # [C, 1, 1]
    keep = (rank < k).expand_as(lv).clone()                                      # [C, N, kc]
    p = torch.softmax(torch.where(keep, scaled, torch.full_like(scaled, float("-inf"))), -1)
    keep &= (p.cumsum(-1) - p) < top_p.to(p.dtype)[:, None, None]               # mass strictly before
    keep[..., 0] = True
    keep &= p >= min_p.to(p.dtype)[:, None, None] * p[..., :1]
    g = torch.log(-torch.log(hash_noise(seeds, ci, vocab, acc)))
    j = torch.where(keep, lv - temp * g, torch.full_like(lv, float("-inf"))).argmax(-1, keepdim=True)
    tok, lt = ci.gather(-1, j)[..., 0], lv.gather(-1, j)[..., 0]                # [C, N]
    if filtered_conf:
        kept = torch.where(keep, scaled, torch.full_like(scaled, float("-inf")))
        conf = torch.exp(scaled.gather(-1, j)[..., 0] - torch.logsumexp(kept, -1))
    else:
        conf = torch.exp(lt - out["_bm"]) / out["_den"]
    sel = on[:, None]
    out["tokens"] = torch.where(sel, tok, out["tokens"])
    out["confidence"] = torch.where(sel, conf, out["confidence"])
    if logprobs:
        out["logprob"] = torch.where(sel, lt - lse, out["logprob"])
    else:
        del out["logprob"]
    if topk:
        out["topk_ids"], out["topk_logprobs"] = out["topk_ids"][..., :topk], out["topk_logprobs"][..., :topk]
    else:
        del out["topk_ids"], out["topk_logprobs"]
    return out


def _decode_full(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab, chunk, topk, logprobs, entropy,
                 credit, soft, filters, filtered_conf, acc):
    """Sampling filters need a row's every logit: the chunked extras for all rows, then per sequence its
    [N, V] logits at once and the filtered Gumbel-max over its fused logits."""
    out = _decode_chunked(h, w, cond_rows, un_rows, cfg_w, 0.0, seeds, vocab=vocab, chunk=chunk, topk=topk,
                          logprobs=False, entropy=entropy, credit=credit, soft=soft, acc=acc)
    N = h.size(1)
    toks, lps = [], []
    for c in range(cond_rows.shape[0]):                                          # one sequence at a time
        r = slice(c, c + 1)
        l = torch.cat([_guided(h, w, cond_rows[r], un_rows[r], cfg_w, c0, min(vocab, c0 + chunk), acc)
                       for c0 in range(0, vocab, chunk)], -1)                    # [1, N, V]
        lb = l
        if credit is not None:
            ids, vals, alpha = (t[r] for t in credit)
            cred = _credit_chunk(ids, vals, 0, vocab, l).scatter_add(
                -1, out["top1_ids"][r][..., None], (out["top1_prob"][r] ** CREDIT_GAMMA)[..., None])
            lb = l + alpha.to(acc)[:, None, None] * torch.log1p(cred)
        keep = filter_mask(lb / temp, *(f[r] for f in filters))
        g = torch.log(-torch.log(uniform_noise(seeds[r], N, 0, vocab, vocab, h.device, acc)))
        tok = torch.where(keep, lb - temp * g, torch.full_like(lb, float("-inf"))).argmax(-1)   # [1, N]
        if filtered_conf:                    # softmax over the survivors of lb / T
            kept = torch.where(keep, lb / temp, torch.full_like(lb, float("-inf")))
            toks.append(torch.exp(kept.gather(-1, tok[..., None])[..., 0] - torch.logsumexp(kept, -1)))
        else:
            toks.append(torch.exp(lb.gather(-1, tok[..., None])[..., 0] - out["_bm"][r]) / out["_den"][r])
        lps.append(l.gather(-1, tok[..., None])[..., 0] - torch.logsumexp(l, -1))
        toks[-1] = (tok, toks[-1])
    out["tokens"] = torch.cat([t for t, _ in toks])
    out["confidence"] = torch.cat([c for _, c in toks])
    if logprobs:
        out["logprob"] = torch.cat(lps)
    return out
