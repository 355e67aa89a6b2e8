"""Iteration smoothing's decoding in the model's dtype: selection and soft embedding from ONE pass of logits.

A smoothing step needs, besides each decoded row's (token, confidence), the soft embedding
``softmax(l / tau) @ W_e`` (``dlc.kernels.sampling``: dInfer's IterationSmooth): every row's probabilities
over the whole vocabulary and a second vocabulary-sized GEMM. ``decode_rows_ext`` computes it in float32 or
float64 torch ops over vocab chunks (about ten passes over [R, Vc] in 4- or 8-byte floats per chunk: at
B = 32 on LLaDA-8B, 1024 rows x 126464, each pass moves ~0.5-1 GB); this is the fast form the CUDA-graph
runner's ``fused`` mode replays (``GraphRunner._decode_extras``):

per vocab chunk of ``chunk`` head rows, one cuBLAS GEMM ``l = h @ W_c^T`` in the model dtype (bf16: exactly
the logits ``decode_rows`` and the eager runner compute before upcasting), then in place on that buffer
``max`` / ``argmax`` (one read: the selection, the first maximal id as ``decode_rows``), ``l - max`` and
``exp`` (the probabilities in the model dtype, as dInfer's), their float32 sum, and one GEMM ``e @ W_e,c``;
the chunks combine by online rescaling (float32). Per element: ~16 bytes of traffic and no logits recomputed,
so the step pays the second GEMM (the floor: ~1.06 TFLOP at B = 32, ~1 GB of W_e read at B = 1) and ~0.7 ms
of elementwise passes at B = 32 on an H100 instead of the fused kernel's sweep plus ten float32 passes.

Numerics (tests/kernels/test_smoothing.py, against ``decode_rows_ext`` in float64): tokens are the argmax of
the model-dtype logits, so they equal the exact path's (``decode_rows``: the same bf16 logits upcast; ties
to the first id); the confidence is ``1 / sum e`` relative to the row's max, with e rounded to the model
dtype (relative error ~ 2^-9 worst case, far less on average); the soft embedding is a convex combination of
W_e rows with those rounded weights normalised by their own sum. T = 0, smoothing temperature 1 (the core's
``SMOOTH_TAU``), no guidance, no other extras: the graph runner uses it for a smoothing step whose variant
has nothing else (else ``decode_rows_ext``). ``smooth_stats`` is its sweep without the finish: a
tensor-parallel rank runs it over its vocab shard and the ranks merge (runtime/distributed/shard_runner.py,
``_fused_smooth``).

On CUDA (and under TRITON_INTERPRET=1) a chunk's selection and exponentials run as two Triton launches over
(row, column split) (``split_stats``) instead of torch's ``max`` / ``sub_`` / ``exp_`` / ``sum``: at B = 1
(32 rows) a row reduction over 126464 columns keeps a fraction of the SMs busy, and those four passes cost
~77 us a step on an H200 next to the two GEMMs' ~0.49 ms (bench/probes/smooth_gemm.py). The kernels compute
``exp(l - max)`` in float32 from the model-dtype logits and round it once to the model dtype (torch's form
rounds ``l - max`` first): the same tokens, probabilities within the same 2^-9."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._registry import HAS_TRITON, INTERPRET, launch, tl, triton, use_triton


CHUNK_ELEMS = 1 << 25        # logits per vocab chunk: 64 MB in bf16 (B = 32 x N = 32 rows: 32768 columns)


def chunk_columns(rows: int, vocab: int, least: int) -> int:
    """Vocab columns per chunk for ``rows`` rows: as many as keep a chunk's logits under ``CHUNK_ELEMS`` (at
    least ``least``), so a small batch runs the whole vocabulary as one chunk (~9 kernels instead of ~9 per
    chunk: launches are what a B = 1 step pays besides reading W and W_e)."""
    return min(vocab, max(least, CHUNK_ELEMS // max(rows, 1)))


def smooth_select(h: torch.Tensor, w: torch.Tensor, we: torch.Tensor, *, vocab: int, chunk: int,
                  top_k: int = 0) -> dict:
    """h [B, N, d] rows, w [>=V, d] LM head, we [>=V, d] input embedding -> {"tokens" [B, N] int64,
    "confidence" [B, N] float32, "soft" [B, N, d] float32} at T = 0 and smoothing temperature 1 (dInfer's
    and the decoding core's ``SMOOTH_TAU``: the selection's softmax is the smoothing softmax itself).
    ``top_k`` > 0: truncated smoothing (``GenerationConfig.smoothing_top_k``): the soft embedding over each
    row's k largest logits, renormalised (``sampling.top_soft``): a top-k per chunk, no W_e GEMM."""
    from .sampling import top_soft
    B, N, d = h.shape
    st = smooth_stats(h.reshape(B * N, d), w, we, vocab=vocab, chunk=chunk, top_k=top_k)
    # the chosen token is the max: its probability is e^0 / sum
    soft = top_soft(st["ti"], st["tv"], we, 1.0) if top_k else st["sa"] / st["s"][:, None]
    return {"tokens": st["tok"].view(B, N), "confidence": (1.0 / st["s"]).view(B, N),
            "soft": soft.view(B, N, d)}


def smooth_stats(x: torch.Tensor, w: torch.Tensor, we: torch.Tensor, *, vocab: int, chunk: int,
                 top_k: int = 0) -> dict:
    """``smooth_select``'s sweep over head rows w[:vocab] (ids 0 .. vocab: the whole head, or a
    tensor-parallel rank's vocab shard, whose ranks merge these statistics: runtime/distributed/vocab.py)
    for rows x [R, d] -> its running statistics, each [R]: ``m`` the largest logit (float32), ``tok`` its
    first id, ``s`` = sum e^(l - m) (float32, e rounded to the model dtype), and ``sa`` [R, d] float32 =
    sum e^(l - m) W_e (unnormalised; absent with ``top_k``) or ``tv`` / ``ti`` [R, k] the k largest logits
    (float32) and their ids."""
    m = s = tok = acc = tv = ti = None
    for c0 in range(0, vocab, chunk):
        c1 = min(vocab, c0 + chunk)
        l = F.linear(x, w[c0:c1])                                                # [R, Vc] model dtype
        if top_k:                                        # the chunk's top k, merged into the running list
            cv, cj = l.topk(min(top_k, c1 - c0), dim=-1)
            cv, cj = cv.float(), cj + c0
            if tv is not None:
                cv, cj = torch.cat([tv, cv], -1), torch.cat([ti, cj], -1)
                tv, j = cv.topk(min(top_k, cv.shape[-1]), dim=-1)
                ti = cj.gather(-1, j)
            else:
                tv, ti = cv, cj
        if HAS_TRITON and (use_triton(l) or INTERPRET):
            cm, ci, cs, e = split_stats(l)                     # [R] the selection; e in l's storage
        else:
            cm, ci = l.max(-1)                                                   # [R] the selection
            e = l.sub_(cm[:, None]).exp_()                                       # [R, Vc] in place
            cs = e.sum(-1, dtype=torch.float32)                                  # [R]
        ca = None if top_k else (e @ we[c0:c1]).float()                          # [R, d] the second GEMM
        cm = cm.float()
        if m is None:
            m, s, tok, acc = cm, cs, ci + c0, ca
            continue
        tok = torch.where(cm > m, ci + c0, tok)                                  # ties keep the earlier id
        nm = torch.maximum(m, cm)
        fo, fn = torch.exp(m - nm), torch.exp(cm - nm)
        s, m = s * fo + cs * fn, nm
        if not top_k:
            acc = acc * fo[:, None] + ca * fn[:, None]
    st = {"m": m, "tok": tok, "s": s}
    st.update({"tv": tv, "ti": ti} if top_k else {"sa": acc})
    return st


SPLIT_MAX, SPLIT_MIN, SPLIT_BLOCK = 8192, 1024, 1024   # columns per program; lanes per tile


def split_columns(rows: int, cols: int) -> int:
    """Columns per program of ``split_stats``: ``SPLIT_MAX``, halved (to ``SPLIT_MIN`` at least) while a
    launch has under 2048 programs (B = 1: 32 rows x 126464 columns -> 62 splits of 2048)."""
    split = SPLIT_MAX
    while split > SPLIT_MIN and rows * triton.cdiv(cols, split) < 2048:
        split //= 2
    return split


def split_stats(l: torch.Tensor) -> tuple:
    """l [R, C] model-dtype logits (last dim contiguous) -> (m [R] the row max in float32, i [R] its first
    column (int64), s [R] = sum e (float32), e): ``e = exp(l - m)`` rounded to l's dtype, written over l.
    Two launches over (row, split): each split's max and first argmax, then (with the row max merged: the
    first split holding it) the exponentials and each split's sum."""
    R, C = l.shape
    split = split_columns(R, C)
    S = triton.cdiv(C, split)
    pm = torch.empty(R, S, dtype=torch.float32, device=l.device)
    pi = torch.empty(R, S, dtype=torch.int32, device=l.device)
    ps = torch.empty(R, S, dtype=torch.float32, device=l.device)
    launch(_split_max_kernel)[(R, S)](l, pm, pi, C, l.stride(0), S, SPLIT=split, BLOCK=SPLIT_BLOCK,
                                      num_warps=4)
    j = pm.argmax(1, keepdim=True)                                  # the first split holding the max
    m, i = pm.gather(1, j)[:, 0], pi.gather(1, j)[:, 0].long()
    launch(_split_exp_kernel)[(R, S)](l, m, ps, C, l.stride(0), S, SPLIT=split, BLOCK=SPLIT_BLOCK,
                                      num_warps=4)
    return m, i, ps.sum(1), l


if HAS_TRITON:
    @triton.jit
    def _split_max_kernel(X, PM, PI, C, stride, S, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        col = tl.zeros([BLOCK], tl.int32)
        for c0 in range(0, SPLIT, BLOCK):
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            x = tl.load(X + r * stride + c, mask=c < C, other=float("-inf")).to(tl.float32)
            up = x > best                                        # strictly: a lane keeps its first max
            best = tl.where(up, x, best)
            col = tl.where(up, c, col)
        m = tl.max(best, 0)
        first = tl.min(tl.where(best == m, col, 2147483647), 0)  # the lowest column among the lanes' maxima
        tl.store(PM + r * S + sp, m)
        tl.store(PI + r * S + sp, first)

    @triton.jit
    def _split_exp_kernel(X, M, PS, C, stride, S, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        m = tl.load(M + r)
        acc = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, SPLIT, BLOCK):
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < C
            x = tl.load(X + r * stride + c, mask=inside, other=float("-inf")).to(tl.float32)
            e = tl.exp(x - m).to(X.dtype.element_ty)        # rounded once (RTNE on the GPU)
            tl.store(X + r * stride + c, e, mask=inside)
            acc += e.to(tl.float32)
        tl.store(PS + r * S + sp, tl.sum(acc, 0))
