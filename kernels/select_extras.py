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
  kernels/sampling.py): the kernel adds alpha log(1 + prior credit) to each tile's logits before selecting
  (its softmax is then over those), and tracks the raw logits' max / sum / argmax beside; this step's own
  credit (p1 ** gamma on the raw top-1, known only at the end) is ``sampling._credit_correction``, the same
  closed form the float64 path applies. ``top1_ids`` / ``top1_prob`` (raw) come back for the state's update.

The reference (CPU tensors, and the numerics the kernel is checked against) is ``decode_rows_ext`` itself in
float32; the float64 ``decode_rows_ext`` is the exact decoding every runner's tokens are compared with
(tests/kernels, tests/runtime/test_graph_extras.py). Only T = 0: sampled steps (T > 0) decode eagerly."""
from __future__ import annotations

import torch

from . import logits as L
from ._registry import check, check_shape, define_op, launch, require_triton, use_triton

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


def select_extras_triton(hidden, weight, entropy: bool, topk: int, credit_ids=None, credit_vals=None,
                         credit_alpha=None, BN=None, BV=128, BD=64, num_warps=4, num_stages=3,
                         programs_per_sm=4) -> dict:
    """One launch of ``logits._select_extras_kernel``, then the splits' reduction."""
    N, D = hidden.shape
    V = weight.shape[0]
    BN, BV, n_split, cols = L.plan(N, V, L._sm_count(hidden.device), BN, BV, programs_per_sm)
    dev = hidden.device

    def part(dt=torch.float32, *extra):
        return torch.empty((N, n_split, *extra), dtype=dt, device=dev)
    pm, ps, pb = part(), part(), part()
    pi = part(torch.int32)
    credit = credit_ids is not None
    kpad = 1 << max(0, (topk - 1).bit_length()) if topk else 1
    pe = part() if entropy else None
    prm, prs, pr1l, pbr = (part(), part(), part(), part()) if credit else (None,) * 4
    pr1 = part(torch.int32) if credit else None
    ptv, pti = (part(torch.float32, kpad), part(torch.int32, kpad)) if topk else (None, None)
    grid = (-(-N // BN) * n_split,)
    opt = [pm if t is None else t for t in (pe, prm, prs, pr1, pr1l, pbr, ptv, pti, credit_ids, credit_vals,
                                            credit_alpha)]          # pointers not asked for: any tensor
    launch(L._select_extras_kernel)[grid](
        hidden, weight, pm, ps, pb, pi, *opt, N, V, D, n_split, cols,
        hidden.stride(0), weight.stride(0), credit_ids.shape[1] if credit else 0,
        credit_ids.stride(0) if credit else 0,
        IEEE=hidden.dtype == torch.float32, ENTROPY=entropy, CREDIT=credit, TOPK=topk, KPAD=kpad,
        BN=BN, BV=BV, BD=BD, num_warps=num_warps, num_stages=num_stages)
    return _combine_extras(pm, ps, pb, pi, pe, prm, prs, pr1, pr1l, pbr, ptv, pti, topk,
                           (credit_ids, credit_vals, credit_alpha) if credit else None)


def _lse_parts(pm, ps):
    """Partials [N, n_split] of (max, sum e^(l - max)) -> (M [N], Z [N], weights e^(pm - M) [N, n_split])."""
    M = pm.amax(1)
    w = torch.exp(pm - M[:, None])
    return M, (ps * w).sum(1), w


def _combine_extras(pm, ps, pb, pi, pe, prm, prs, pr1, pr1l, pbr, ptv, pti, topk, credit) -> dict:
    """The splits' partials [N, n_split] (top lists [N, n_split, KPAD]) -> the op's dict."""
    bm, bs, _ = _lse_parts(pm, ps)                                  # the selection's logits (credit-fused)
    j = pb.argmax(1, keepdim=True)                                  # first max: lowest vocab split
    tok = pi.gather(1, j)[:, 0].to(torch.int64)
    blb = pb.gather(1, j)[:, 0]
    if credit is not None:
        rm_p, rs_p = prm, prs
        braw = pbr.gather(1, j)[:, 0]
    else:
        rm_p, rs_p, braw = pm, ps, blb
    rm, rs, w = _lse_parts(rm_p, rs_p)                              # the raw distribution
    lse = rm + torch.log(rs)                                        # [N]
    out = {}
    if pe is not None:
        S = (w * (pe + (rm_p - rm[:, None]) * rs_p)).sum(1)        # S moved to the global max
        out["entropy"] = torch.log(rs) - S / rs
    if credit is not None:
        from .sampling import _credit_correction
        jr = pr1l.argmax(1, keepdim=True)
        r1, r1l = pr1.gather(1, jr)[:, 0].to(torch.int64), pr1l.gather(1, jr)[:, 0]
        p1 = torch.exp(r1l - lse)
        st = {"r1": r1[:, None], "r1l": r1l[:, None], "best": blb[:, None], "tok": tok[:, None],
              "blb": blb[:, None], "bs": bs[:, None], "bm": bm[:, None]}
        ids, vals, alpha = credit
        t2, l2, den = _credit_correction(st, (ids[:, None], vals[:, None], alpha), p1[:, None], 0.0, None,
                                         0, False, torch.float32)
        tok, conf = t2[:, 0], (torch.exp(l2 - st["bm"]) / den)[:, 0]
        braw = torch.where(tok == r1, r1l, braw)
        out["top1_ids"], out["top1_prob"] = r1, p1
    else:
        conf = torch.exp(blb - bm) / bs
    out["tokens"], out["confidence"], out["logprob"] = tok, conf, braw - lse
    if topk:
        v, i = ptv.flatten(1).topk(topk, dim=1)                    # [N, k] of [N, n_split x KPAD]
        out["topk_ids"] = pti.flatten(1).gather(1, i).to(torch.int64)
        out["topk_logprobs"] = v - lse[:, None]
    return out


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
    else:
        out = select_extras_reference(hidden, weight, entropy, topk, credit_ids, credit_vals, credit_alpha)
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
    if credit_ids is not None:                       # the kernel reads them as float32 / one layout
        credit_ids = credit_ids.contiguous()
        credit_vals = credit_vals.to(torch.float32).contiguous()
        credit_alpha = credit_alpha.to(torch.float32).contiguous()
    res = torch.ops.dlc.fused_select_extras(hidden, weight, bool(entropy), int(topk), credit_ids, credit_vals,
                                            credit_alpha)
    return {k: v for k, v in zip(EXTRAS, res) if v.numel() or k in ("tokens", "confidence", "logprob")}
