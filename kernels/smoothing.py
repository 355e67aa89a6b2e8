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
``_fused_smooth``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
        cm, ci = l.max(-1)                                                       # [R] the selection
        if top_k:                                        # the chunk's top k, merged into the running list
            cv, cj = l.topk(min(top_k, c1 - c0), dim=-1)
            cv, cj = cv.float(), cj + c0
            if tv is not None:
                cv, cj = torch.cat([tv, cv], -1), torch.cat([ti, cj], -1)
                tv, j = cv.topk(min(top_k, cv.shape[-1]), dim=-1)
                ti = cj.gather(-1, j)
            else:
                tv, ti = cv, cj
        e = l.sub_(cm[:, None]).exp_()                                           # [R, Vc] in place
        cs = e.sum(-1, dtype=torch.float32)                                      # [R]
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
