"""Decoding extras in the fused selected-row logits' one vocab sweep (issue 18): what the entropy-bounded,
credit and logprobs rules need, without a second pass over the LM head and without [N, V] logits.

``fused_select_extras(hidden [R, d], weight [V, d], entropy, topk, credit)`` decodes R rows at T = 0 as
``fused_select_logits`` does (token = argmax, confidence = its softmax probability, float32) and returns
besides, from the same tiles of logits (``logits._select_extras_kernel``: the plain kernel's sweep with these
outputs; a kernel of its own so that the plain one, which compiled programs trace, keeps its signature):

* ``entropy`` [R]: the Shannon entropy (nats) of softmax(l), online: per row a running max m, Z = sum
  e^(l - m) and S = sum e^(l - m) (l - m), each moved to a new max as the sweep finds one; H = log Z - S / Z;
* ``logprob`` [R] of the token and, with ``topk`` = k > 0, ``topk_ids`` / ``topk_logprobs`` [R, k] of the raw
  distribution: each program keeps a running top-k list (every tile's k largest logits merged in), the
  splits' lists are merged on the host side of the kernel (a [R, splits x k] topk);
* credit (``credit_ids`` / ``credit_vals`` [R, M], ``credit_alpha`` [R]; the decoding core's credit rule,
  kernels/sampling.py) is no term of the sweep: the kernel runs as without it, and ``credit_correction``
  then recombines the selection exactly from the M credited ids' logits (``gather_logits_triton``: R x M
  dots of d, no [R, M, d] copy): the fused argmax is among the credited ids (credit only raises logits,
  and the raw top-1 always earns this step's own credit), the fused logsumexp is the plain one plus
  log1p(sum_j p_j expm1(b_j)) in float64. So a credit step costs the plain sweep + O(R x M x d), instead of
  a per-(row, token) term in every tile (register spill at 32 x 32 rows on an H100, +73% per Reuse step).
  ``top1_ids`` / ``top1_prob`` (raw: the sweep's own token and confidence) come back for the state's update.

The reference (the numerics the kernel is checked against) is ``decode_rows_ext`` itself in float32 (credit
added in every vocab chunk); the op's CPU implementation is that reference, with credit the kernel's own path
in torch (``select_extras_sparse``: the plain sweep, then the correction), so CPU runs of the graph runner's
``fused`` variants exercise the correction; the float64 ``decode_rows_ext`` is the exact decoding every
runner's tokens are compared with
(tests/kernels, tests/runtime/test_graph_extras.py). Only T = 0: sampled steps (T > 0) decode eagerly."""
from __future__ import annotations

import torch

from . import logits as L
from ._registry import (HAS_TRITON, INTERPRET, check, check_shape, define_op, launch, require_triton, tl,
                        triton, use_triton)

EXTRAS = ("tokens", "confidence", "entropy", "logprob", "topk_ids", "topk_logprobs", "top1_ids", "top1_prob")


def select_extras_reference(hidden, weight, entropy: bool, topk: int, credit_ids=None, credit_vals=None,
                            credit_alpha=None, acc: torch.dtype = torch.float32) -> dict:
    """``decode_rows_ext`` over R rows as R one-row sequences (credit alpha is per sequence there)."""
    from .sampling import decode_rows_ext
    R = hidden.shape[0]
    ar = torch.arange(R, device=hidden.device)
    credit = None
    if credit_ids is not None:
        credit = (credit_ids[:, None], credit_vals[:, None], credit_alpha)
    one = torch.ones(1, dtype=hidden.dtype, device=hidden.device)
    out = decode_rows_ext(hidden[:, None], weight, ar, ar, one, 0.0, torch.zeros_like(ar),
                          vocab=weight.shape[0], chunk=L.REF_CHUNK, topk=topk, logprobs=True, entropy=entropy,
                          credit=credit, acc=acc)
    return {k: v[:, 0] for k, v in out.items()}


def reference_sweep(hidden, weight, entropy: bool, topk: int, acc: torch.dtype) -> dict:
    """The decoding core's chunked sweep (``sampling._decode_chunked``, no credit, T = 0) of rows
    ``hidden`` [R, d] over head rows ``weight`` -> its dict, each value [R, ...]: the plain sweep the Triton
    kernels are checked against (select_extras' credit path, shard_logits' per-shard statistics)."""
    from .sampling import _decode_chunked
    ar = torch.arange(hidden.shape[0], device=hidden.device)
    one = torch.ones(1, dtype=hidden.dtype, device=hidden.device)
    out = _decode_chunked(hidden[:, None], weight, ar, ar, one, 0.0, torch.zeros_like(ar),
                          vocab=weight.shape[0], chunk=L.REF_CHUNK, topk=topk, logprobs=True, entropy=entropy,
                          credit=None, soft=None, acc=acc)
    return {k: v[:, 0] for k, v in out.items()}


def select_extras_triton(hidden, weight, entropy: bool, topk: int, credit_ids=None, credit_vals=None,
                         credit_alpha=None, BN=None, BV=128, BD=None, num_warps=4, num_stages=3,
                         programs_per_sm=4) -> dict:
    """One launch of ``logits._select_extras_kernel`` (the plain sweep: credit adds nothing to it), the
    splits' reduction, then credit's sparse correction (``credit_correction``)."""
    N, D = hidden.shape
    V = weight.shape[0]
    BN, BV, n_split, cols = L.plan(N, V, L._sm_count(hidden.device), BN, BV, programs_per_sm)
    BD = BD or L.block_d(BN, BV, num_stages, hidden)
    dev = hidden.device

    def part(dt=torch.float32, *extra):
        return torch.empty((N, n_split, *extra), dtype=dt, device=dev)
    pm, ps, pb = part(), part(), part()
    pi = part(torch.int32)
    kpad = 1 << max(0, (topk - 1).bit_length()) if topk else 1
    pe = part() if entropy else None
    ptv, pti = (part(torch.float32, kpad), part(torch.int32, kpad)) if topk else (None, None)
    grid = (-(-N // BN) * n_split,)
    opt = [pm if t is None else t for t in (pe, ptv, pti)]           # pointers not asked for: any tensor
    launch(L._select_extras_kernel)[grid](
        hidden, weight, pm, ps, pb, pi, *opt, N, V, D, n_split, cols, hidden.stride(0), weight.stride(0),
        IEEE=hidden.dtype == torch.float32, ENTROPY=entropy, TOPK=topk, KPAD=kpad,
        BN=BN, BV=BV, BD=BD, num_warps=num_warps, num_stages=num_stages)
    out = _combine_extras(pm, ps, pb, pi, pe, ptv, pti, topk)
    if credit_ids is not None:
        lg = gather_logits_triton(hidden, weight, credit_ids)
        out = credit_correction(out, lg, credit_ids, credit_vals, credit_alpha)
    return {k: v for k, v in out.items() if not k.startswith("_")}


def _lse_parts(pm, ps):
    """Partials [N, n_split] of (max, sum e^(l - max)) -> (M [N], Z [N], weights e^(pm - M) [N, n_split])."""
    M = pm.amax(1)
    w = torch.exp(pm - M[:, None])
    return M, (ps * w).sum(1), w


def _combine_extras(pm, ps, pb, pi, pe, ptv, pti, topk) -> dict:
    """The splits' partials [N, n_split] (top lists [N, n_split, KPAD]) -> the op's dict, plus ``_lse`` and
    ``_best`` (the logsumexp and the token's logit, [N]) for ``credit_correction``."""
    j = pb.argmax(1, keepdim=True)                                  # first max: lowest vocab split
    tok = pi.gather(1, j)[:, 0].to(torch.int64)
    blb = pb.gather(1, j)[:, 0]
    bm, bs, w = _lse_parts(pm, ps)
    lse = bm + torch.log(bs)                                        # [N]
    out = {"tokens": tok, "confidence": torch.exp(blb - bm) / bs, "logprob": blb - lse, "_lse": lse,
           "_best": blb}
    if pe is not None:
        S = (w * (pe + (pm - bm[:, None]) * ps)).sum(1)             # S moved to the global max
        out["entropy"] = torch.log(bs) - S / bs
    if topk:
        v, i = ptv.flatten(1).topk(topk, dim=1)                    # [N, k] of [N, n_split x KPAD]
        out["topk_ids"] = pti.flatten(1).gather(1, i).to(torch.int64)
        out["topk_logprobs"] = v - lse[:, None]
    return out


# ----------------------------------------------------------------------------- credit: a sparse correction
def gather_logits_reference(hidden, weight, ids, acc: torch.dtype = torch.float32) -> torch.Tensor:
    """hidden [R, d], ids [R, M] -> logits [R, M] of those ids (``acc`` arithmetic)."""
    return torch.einsum("rmd,rd->rm", weight[ids].to(acc), hidden.to(acc))


def gather_logits_triton(hidden, weight, ids, BP=32, BD=128) -> torch.Tensor:
    """``gather_logits_reference`` in one launch of ``logits._gather_logits_kernel`` (fp32 [R, M]): reads
    the M head rows of each row, no sweep, no [R, M, d] copy."""
    R, M = ids.shape
    out = torch.empty(R, M, dtype=torch.float32, device=hidden.device)
    if R * M:
        flat = ids.contiguous()
        launch(L._gather_logits_kernel)[(-(-(R * M) // BP),)](
            hidden, weight, flat, out, R * M, M, hidden.shape[1], hidden.stride(0), weight.stride(0),
            BP=BP, BD=BD)
    return out


def gather_logits(hidden, weight, ids) -> torch.Tensor:
    """The credited ids' logits [R, M] as the op computes them: ``gather_logits_triton`` on CUDA, the float32
    reference elsewhere (what ``fused_select_extras``' CPU path reads). Also a tensor-parallel rank's part
    (runtime/distributed/shard_runner.py: the ids inside its shard, at local ids)."""
    if use_triton(hidden):
        require_triton("gather_logits")
        return gather_logits_triton(hidden, weight, ids)
    return gather_logits_reference(hidden, weight, ids, torch.float32)


def credit_correction(out: dict, lg: torch.Tensor, ids, vals, alpha) -> dict:
    """``credit_correction_reference``'s result: on CUDA (and under TRITON_INTERPRET=1) one launch of
    ``_credit_kernel``, a program per row over its M + 1 entries in registers, instead of ~25 float64 torch
    ops over [R, M + 1, M + 1] (0.16 ms of a B = 1 step on an H200: the credit rule's extra cost over
    entropy's sweep, bench/probes/row_decode_cost.py)."""
    if HAS_TRITON and (use_triton(lg) or INTERPRET):
        return credit_correction_triton(out, lg, ids, vals, alpha)
    return credit_correction_reference(out, lg, ids, vals, alpha)


def credit_correction_reference(out: dict, lg: torch.Tensor, ids, vals, alpha) -> dict:
    """Credit decoding (kernels/sampling.py: fused logits l + alpha log(1 + credit)) from the plain sweep's
    result and the logits ``lg`` [R, M] of the credited ids ``ids`` / ``vals`` [R, M] (duplicates add),
    ``alpha`` [R] (0: the row is left as the sweep decoded it).

    The credit of an id is the prior (``vals``) plus this step's own p1 ** gamma on the raw top-1 t (the
    sweep's token). Only credited ids change, and each only upwards, so: the fused argmax is among them (t
    itself has credit and the raw maximum, so no uncredited id beats it; equal scores: the lowest id, as the
    sweep), and the fused logsumexp is lse' = lse + log1p(sum_j e^(l_j - lse) expm1(b_j)) over the distinct
    credited ids (b_j = alpha log(1 + credit_j)): exact, and stable in float64 over these M + 1 terms. The
    sweep's ``tokens`` / ``confidence`` / ``logprob`` become the credit-fused token, its fused confidence and
    its raw logprob; ``top1_ids`` / ``top1_prob`` (raw) are added for the state's update. Static shapes, no
    host read: capturable."""
    from .sampling import CREDIT_GAMMA
    f = torch.float64
    t, lse, l1 = out["tokens"], out["_lse"].to(f), out["_best"].to(f)      # raw top-1, logsumexp, its logit
    p1 = torch.exp(l1 - lse)                                                  # [R]
    cid = torch.cat([ids, t[:, None]], 1)                                     # [R, M + 1]
    vext = torch.cat([vals.to(f), (p1 ** CREDIT_GAMMA)[:, None]], 1)          # t's entry: this step's credit
    lx = torch.cat([lg.to(f), l1[:, None]], 1)
    lx = torch.where(cid == t[:, None], l1[:, None], lx)                     # t's logit: the sweep's
    same = cid[:, :, None] == cid[:, None, :]                                 # [R, M + 1, M + 1]
    cred = (same * vext[:, None, :]).sum(-1)                                  # each entry's id's total credit
    k = torch.arange(cid.shape[1], device=cid.device)
    first = ~(same & (k[None, :] < k[:, None])).any(-1)                       # the id's first entry
    b = alpha.to(f)[:, None] * torch.log1p(cred)                              # [R, M + 1] fused bonus
    fused = torch.where(cred > 0, lx + b, torch.full_like(lx, float("-inf")))
    best = fused.amax(1, keepdim=True)                                        # [R, 1]
    big = torch.iinfo(torch.int64).max
    tok = torch.where(fused == best, cid, torch.full_like(cid, big)).amin(1)  # lowest id among equals
    j = (cid == tok[:, None]).to(torch.int8).argmax(1, keepdim=True)         # its first entry
    add = (first & (cred > 0)) * torch.exp(lx - lse[:, None]) * torch.expm1(b)
    lse2 = lse + torch.log1p(add.sum(1))                                      # the fused logsumexp
    on = alpha > 0
    cdt = out["confidence"].dtype
    res = dict(out)
    res["tokens"] = torch.where(on, tok, t)
    res["confidence"] = torch.where(on, torch.exp(best[:, 0] - lse2).to(cdt), out["confidence"])
    res["logprob"] = torch.where(on, (lx.gather(1, j)[:, 0] - lse).to(cdt), out["logprob"])
    res["top1_ids"], res["top1_prob"] = t, p1.to(cdt)
    return res


def credit_correction_triton(out: dict, lg: torch.Tensor, ids, vals, alpha) -> dict:
    """``credit_correction_reference`` in one launch (float64 arithmetic in registers, the same formulas;
    sums over the entries in the kernel's order)."""
    from .sampling import CREDIT_GAMMA
    R, M = ids.shape
    cdt = out["confidence"].dtype
    tok = torch.empty(R, dtype=torch.int64, device=lg.device)
    conf = torch.empty(R, dtype=cdt, device=lg.device)
    logp = torch.empty(R, dtype=out["logprob"].dtype, device=lg.device)
    p1 = torch.empty(R, dtype=cdt, device=lg.device)
    if R:
        ids, vals, alpha = ids.contiguous(), vals.contiguous(), alpha.contiguous()
        launch(_credit_kernel)[(R,)](
            ids, vals, lg.contiguous(), out["tokens"].contiguous(), out["_lse"].contiguous(),
            out["_best"].contiguous(), alpha, out["confidence"].contiguous(), out["logprob"].contiguous(),
            tok, conf, logp, p1, M, float(CREDIT_GAMMA), BM=max(2, triton.next_power_of_2(M + 1)))
    res = dict(out)
    res.update(tokens=tok, confidence=conf, logprob=logp, top1_ids=out["tokens"], top1_prob=p1)
    return res


if HAS_TRITON:
    from .math64 import expm164 as _expm164, log1p64 as _log1p64, pow64 as _pow64

    @triton.jit
    def _credit_kernel(IDS, VALS, LG, T, LSE, BEST, ALPHA, CONF_IN, LOGP_IN, TOK, CONF, LOGP, P1, M, gamma,
                       BM: tl.constexpr):
        """Row r: entries k < M the credited ids (ids, prior, logits), entry M the raw top-1 t (this step's
        own credit p1 ** gamma, the sweep's logit); padding entries -1 (no id equals it)."""
        r = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BM)
        ink, ist = k < M, k == M
        valid = k <= M
        t = tl.load(T + r)
        lse = tl.load(LSE + r).to(tl.float64)
        l1 = tl.load(BEST + r).to(tl.float64)
        alpha = tl.load(ALPHA + r).to(tl.float64)
        p1 = tl.exp(l1 - lse)
        cid = tl.load(IDS + r * M + k, mask=ink, other=-1)
        cid = tl.where(ist, t, cid)
        own = _pow64(p1, gamma)
        vext = tl.load(VALS + r * M + k, mask=ink, other=0.0).to(tl.float64)
        vext = tl.where(ist, own, vext)
        lx = tl.load(LG + r * M + k, mask=ink, other=0.0).to(tl.float64)
        lx = tl.where(cid == t, l1, lx)                   # t's logit (and entry M): the sweep's
        same = (cid[:, None] == cid[None, :]) & valid[:, None] & valid[None, :]      # [BM, BM]
        cred = tl.sum(tl.where(same, vext[None, :], 0.0), 1)             # each entry's id's total credit
        earlier = tl.sum(tl.where(same & (k[None, :] < k[:, None]), 1, 0), 1)
        first = earlier == 0                                             # the id's first entry
        b = alpha * _log1p64(cred)
        live = valid & (cred > 0)
        fused = tl.where(live, lx + b, float("-inf"))
        best = tl.max(fused, 0)
        big = 9223372036854775807
        tok = tl.min(tl.where(fused == best, cid, big), 0)               # lowest id among equals
        jj = tl.min(tl.where(valid & (cid == tok), k, BM), 0)            # its first entry
        l_tok = tl.sum(tl.where(k == jj, lx, 0.0), 0)
        add = tl.where(first & live, tl.exp(lx - lse) * _expm164(b), 0.0)
        lse2 = lse + _log1p64(tl.sum(add, 0))                            # the fused logsumexp
        on = alpha > 0
        tl.store(TOK + r, tl.where(on, tok, t))
        tl.store(CONF + r, tl.where(on, tl.exp(best - lse2), tl.load(CONF_IN + r).to(tl.float64))
                 .to(CONF.dtype.element_ty))
        tl.store(LOGP + r, tl.where(on, l_tok - lse, tl.load(LOGP_IN + r).to(tl.float64))
                 .to(LOGP.dtype.element_ty))
        tl.store(P1 + r, p1.to(P1.dtype.element_ty))


def select_extras_sparse(hidden, weight, entropy: bool, topk: int, credit_ids, credit_vals, credit_alpha,
                         acc: torch.dtype = torch.float64) -> dict:
    """The sparse credit path in plain torch (``acc`` arithmetic; CPU tests): the reference sweep without
    credit, then ``credit_correction`` with ``gather_logits_reference``."""
    out = reference_sweep(hidden, weight, entropy, topk, acc)
    out["_best"] = out["logprob"] + out["_lse"]
    lg = gather_logits_reference(hidden, weight, credit_ids, acc)
    res = credit_correction(out, lg, credit_ids, credit_vals, credit_alpha)
    return {k: v for k, v in res.items() if not k.startswith("_")}


def validate(hidden, weight, topk: int, credit_ids, credit_vals, credit_alpha) -> None:
    L.validate(hidden, weight, 0.0, None)
    check(0 <= topk <= weight.shape[0], f"topk must be in [0, vocab={weight.shape[0]}], got {topk}")
    if credit_ids is None:
        check(credit_vals is None and credit_alpha is None, "credit_vals / credit_alpha need credit_ids")
        return
    R = hidden.shape[0]
    check_shape("credit_ids", credit_ids, 2, "[R, M]")
    check(credit_ids.shape[0] == R and credit_ids.dtype == torch.int64,
          f"credit_ids must be int64 [R={R}, M], got {credit_ids.dtype} {tuple(credit_ids.shape)}")
    check(credit_vals is not None and tuple(credit_vals.shape) == tuple(credit_ids.shape),
          f"credit_vals must be [R, M] = {tuple(credit_ids.shape)}")
    check(credit_alpha is not None and tuple(credit_alpha.shape) == (R,), f"credit_alpha must be [R={R}]")
    check(credit_ids.stride(1) == 1 and credit_vals.stride() == credit_ids.stride(),
          "credit_ids / credit_vals need one contiguous layout")


@define_op("fused_select_extras", opaque=True)
def fused_select_extras_op(hidden: torch.Tensor, weight: torch.Tensor, entropy: bool, topk: int,
                           credit_ids: torch.Tensor | None = None, credit_vals: torch.Tensor | None = None,
                           credit_alpha: torch.Tensor | None = None) -> list[torch.Tensor]:
    if use_triton(hidden):
        require_triton("fused_select_extras")
        out = select_extras_triton(hidden, weight, entropy, topk, credit_ids, credit_vals, credit_alpha)
    elif credit_ids is not None:         # the kernel's path in torch: plain sweep, then the sparse correction
        out = select_extras_sparse(hidden, weight, entropy, topk, credit_ids, credit_vals, credit_alpha,
                                   acc=torch.float32)
    else:
        out = select_extras_reference(hidden, weight, entropy, topk)
    return [_or_empty(out.get(k), hidden) for k in EXTRAS]


def _or_empty(t, like):
    return like.new_empty(0) if t is None else t.contiguous()


@fused_select_extras_op.register_fake
def _(hidden, weight, entropy, topk, credit_ids=None, credit_vals=None, credit_alpha=None):
    R, f, i = hidden.shape[0], torch.float32, torch.int64
    e = hidden.new_empty(0)
    c = credit_ids is not None
    return [hidden.new_empty(R, dtype=i), hidden.new_empty(R, dtype=f),
            hidden.new_empty(R, dtype=f) if entropy else e, hidden.new_empty(R, dtype=f),
            hidden.new_empty(R, topk, dtype=i) if topk else e,
            hidden.new_empty(R, topk, dtype=f) if topk else e,
            hidden.new_empty(R, dtype=i) if c else e, hidden.new_empty(R, dtype=f) if c else e]


def fused_select_extras(hidden: torch.Tensor, weight: torch.Tensor, entropy: bool = False, topk: int = 0,
                        credit_ids: torch.Tensor | None = None, credit_vals: torch.Tensor | None = None,
                        credit_alpha: torch.Tensor | None = None) -> dict:
    """hidden [R, d] rows, weight [V, d] head -> {"tokens" [R] int64, "confidence" [R] float32, "logprob" [R],
    and "entropy" [R] / "topk_ids", "topk_logprobs" [R, k] / "top1_ids", "top1_prob" [R] as asked} at T = 0.
    Credit: ``credit_ids`` / ``credit_vals`` [R, M] (vals already decayed), ``credit_alpha`` [R] (0: off)."""
    validate(hidden, weight, topk, credit_ids, credit_vals, credit_alpha)
    if credit_ids is not None:       # one layout; dtypes kept (the correction reads them in float64: no
        credit_ids = credit_ids.contiguous()                 # float32 round trip, no cast kernels per step)
        credit_vals = credit_vals.contiguous()
        credit_alpha = credit_alpha.contiguous()
    res = torch.ops.dlc.fused_select_extras(hidden, weight, bool(entropy), int(topk), credit_ids, credit_vals,
                                            credit_alpha)
    return {k: v for k, v in zip(EXTRAS, res) if v.numel() or k in ("tokens", "confidence", "logprob")}
