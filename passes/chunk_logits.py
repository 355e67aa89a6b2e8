"""Logit chunking (logit-aware activation budgeting, dLLM-Serve): decode inside the graph, never [B, L, V].

Replaces the hidden-state output with (tokens [C, N], confidence [C, N] float64) for the requested rows only:

1. gather ``out_index [B, N]`` rows of the hidden states (absolute positions; reuse subtracts ``q_start``);
2. for each vocab chunk of ``ctx.logit_chunk`` rows of the LM head: ``[B, N, Vc]`` logits, classifier-free
   guidance ``un + w * (cond - un)`` with ``cond_rows/un_rows [C]`` and ``cfg_weight [1]`` (= cfg_scale + 1;
   without CFG both row lists are ``arange(B)`` so the logits pass through bit-exactly), cast to float64;
3. Gumbel-max: ``argmax(l - T * log(-log u))`` (equal to the reference ``exp(l) / (-log u)^T``; T = 0 is the
   plain argmax, exactly). ``u`` comes from a counter-based hash of (``seeds [C]``, row, vocab id), computed
   per chunk inside the graph, so no [B, N, V] noise tensor is ever an input;
4. each chunk is reduced at once: running (best score, token, its logit) and an online float64 logsumexp,
   giving confidence = softmax probability of the chosen token (``low_confidence``); optional running top-k
   logprobs (``ctx.logprobs``).

Block-diffusion models (LLaDA2, SDAR) report the confidence under softmax(logits / T): their rows are scaled
by 1 / T and decoded at temperature 1 when T > 0 (``tempered``, the eager runner's rule), before any lowering.

The largest vocab-sized tensor is [B, N, Vc]: the planner sizes Vc from the activation budget.
Rewrites counted: one per vocab chunk.

GPU targets (``ctx.use_kernels``: a CUDA target whose artifact runs torch ops, i.e. export / AOTI) decode with
one ``torch.ops.dlc.fused_select_logits`` node instead (``decode_rows_fused``; the Triton kernel streams the
head in vocab tiles with an online softmax, so no vocab loop and no [C, N, V] tensor exist in the graph at
all):

* CFG is applied to the hidden rows before the op: the LM head is linear without bias, so
  ``head(un_h + w (cond_h - un_h)) = un + w (cond - un)``, exact up to rounding (the combination is done in
  float32 and cast to the head's dtype; without CFG both row lists are equal, ``cond - un`` is 0 and the rows
  pass through bit-exactly);
* sampling uses the op's graph form: ``temperature [1]`` as a tensor and per-row hash keys
  ``row_key(seeds[c], n)`` for decoded row n of request c, so each request draws what a call of the op with
  its own seed draws, independent of its batch position (the noise is the kernel's hash, not
  ``uniform_noise``: GPU and CPU builds sample differently for the same seed, both by Gumbel-max);
* confidence comes back float32 (the kernel's online softmax) and is cast to float64 for the output spec;
* top-k logprobs come from ``torch.ops.dlc.fused_topk_logprobs`` on the same guided rows (float32, cast).
Rewrites counted: one per emitted op. With ``ctx.extras`` the GPU lowering adds only ``embed_delta`` and
``hidden_rows`` (below): the runner decodes every batch that wants extras from the rows.

With ``ctx.extras`` (``dlc compile --decode-extras``, chunked lowering) the programs also serve the rules that
need more than the chunked reductions (``EXTRA_INPUTS`` / ``EXTRA_OUTPUTS``):

* credit decoding's inputs, and entropy / logprob / raw top-1 outputs, reduced per chunk as above;
* ``embed_delta [B, N, d]`` (iteration smoothing's soft inputs): added to the input embedding of the decoded
  columns (``out_index`` + the logit shift, in the fed slice), zeros for rows without smoothing, exactly as
  the eager runner's ``embed_add``; the embedding's weight is renamed ``EMBED_ATTR`` (the lifted input
  ``dlc.manifest.EMBED_WEIGHT``), the table the soft embedding is built from;
* ``hidden_rows [B, N, d]``: the decoded rows' final hidden states. Smoothing's next soft input
  ``softmax(l / tau) @ W_e`` and T > 0 sampling filters (top-k / top-p / min-p need a row's every logit at
  once: a sort over the vocabulary) are decoded from them by the runner with ``decode_rows_ext``, the eager
  runner's own function over the same rows and weights, so the sampling rule keeps one home and the tokens
  are eager's. Why not in the graph: a program cannot skip work per call, so an in-graph soft embedding would
  add a second head-sized GEMM to every step of every request, and in-graph filters a [C, N, V] sort; the
  hidden rows cost N x d per row, and the extra head pass is paid only by batches that smooth or filter."""
from __future__ import annotations

import torch
import torch.fx as fx

import dlc.kernels  # noqa: F401  (registers torch.ops.dlc.*, emitted for GPU targets)
from dlc.kernels.logits import decode_rows, row_key
from dlc.kernels.sampling import decode_rows_ext
from dlc.manifest import EMBED_WEIGHT, HEAD_WEIGHT, WEIGHT_PREFIX

from .graph_utils import add_input, inline, outputs, placeholders, set_outputs

DECODE_INPUTS = ("out_index", "cond_rows", "un_rows", "cfg_weight", "temperature", "seeds")
# With ``ctx.extras`` (chunked lowering): credit decoding's and smoothing's inputs and every rule's extra
# outputs, after (tokens, confidence[, topk_ids, topk_logprobs]) and before the K/V outputs. Credit rows with
# alpha 0 and rows whose embed_delta is zero decode exactly as without the inputs, so one program serves every
# request (dlc.kernels.sampling.decode_rows_ext); hidden_rows [B, N, d] is what the runner decodes smoothing's
# soft embedding and T > 0 filters from (the module docstring says why).
EXTRA_INPUTS = ("credit_ids", "credit_vals", "credit_alpha", "embed_delta")
EXTRA_OUTPUTS = ("entropy", "logprob", "top1_ids", "top1_prob", "hidden_rows")
EMBEDDING = torch.ops.aten.embedding.default



def guided_hidden(h, cond_rows, un_rows, cfg_w, dtype):
    """h [B, N, d] -> guided rows [C, N, d] in ``dtype``: ``un + w * (cond - un)`` on hidden states
    (float32)."""
    cond, un = h.index_select(0, cond_rows).float(), h.index_select(0, un_rows).float()
    return (un + cfg_w.float() * (cond - un)).to(dtype)


def decode_rows_fused(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, topk: int):
    """GPU lowering of decode_rows: one dlc.fused_select_logits over the guided rows (+
    dlc.fused_topk_logprobs)."""
    g = guided_hidden(h, cond_rows, un_rows, cfg_w, w.dtype)                  # [C, N, d]
    n = g.size(1)
    flat = g.reshape(-1, g.size(2)).contiguous()                               # [C * N, d]
    keys = row_key(seeds[:, None], torch.arange(n, device=h.device)[None, :]).reshape(-1)   # [C * N]
    tok, conf = torch.ops.dlc.fused_select_logits(flat, w, 0.0, 0, None, temp, keys)
    tok, conf = tok.reshape(-1, n), conf.to(torch.float64).reshape(-1, n)      # [C, N]
    if topk:
        lp, ids = torch.ops.dlc.fused_topk_logprobs(flat, w, topk)              # [C * N, k]
        return tok, conf, ids.reshape(-1, n, topk), lp.to(torch.float64).reshape(-1, n, topk)
    return tok, conf


def tempered(h: torch.Tensor, temp: torch.Tensor):
    """Block decoders (LLaDA2, SDAR) report the confidence under softmax(logits / T): at T > 0 decode the rows
    h [B, N, d] scaled by 1 / T at temperature 1 (logits are linear in the rows: the same Gumbel-max draw),
    as the eager runner does (``runners/eager.py``: ``_tempered``); T = 0 passes the rows through.
    temp [1] -> (rows, the temperature to decode at [1])."""
    on = temp > 0                                                                # [1]
    return torch.where(on, (h.float() / temp.float()).to(h.dtype), h), on.to(temp.dtype)


def select_rows(hidden: torch.Tensor, out_index: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, d], out_index [B, N] (row positions in hidden) -> [B, N, d]."""
    return torch.gather(hidden, 1, out_index[..., None].expand(-1, -1, hidden.size(-1)))


def run(gm: fx.GraphModule, ctx) -> int:
    c = ctx.config
    vocab = c.vocab_size
    chunk = min(ctx.logit_chunk or vocab, vocab)
    ins = {name: add_input(gm, name) for name in DECODE_INPUTS}
    ph = placeholders(gm)
    outs = outputs(gm)
    hidden = outs[0]
    w = _head_weight_node(gm, ctx)
    if ctx.phase == "reuse":
        (rows,) = inline(gm, lambda h, oi, qs: (select_rows(h, oi - qs[:, None]),),
                         [hidden, ins["out_index"], ph["q_start"]])
    else:
        (rows,) = inline(gm, lambda h, oi: (select_rows(h, oi),), [hidden, ins["out_index"]])
    temp = ins["temperature"]
    if getattr(c, "block_diffusion", False):              # LLaDA2 / SDAR: confidence under softmax(l / T)
        rows, temp = inline(gm, tempered, [rows, temp])
    args = [rows, w, ins["cond_rows"], ins["un_rows"], ins["cfg_weight"], temp, ins["seeds"]]
    if ctx.use_kernels:
        def fused(h, ww, cr, ur, cw, t, sd):
            head = ww if ctx.head_weight.shape[0] == vocab else ww[:vocab]       # [V, d] (contiguous rows)
            return decode_rows_fused(h, head, cr, ur, cw, t, sd, topk=ctx.logprobs)
        dec = list(inline(gm, fused, args))
        if ctx.extras:               # no chunked reductions: the runner decodes every extra from the rows
            add_embed_delta(gm, ctx, ins["out_index"], ph.get("q_start"))
            dec.append(rows)
        set_outputs(gm, dec + outs[1:])
        return 1 + bool(ctx.logprobs)
    acc = ctx.decode_dtype or torch.float64
    if ctx.extras:
        ext = [add_input(gm, name) for name in EXTRA_INPUTS[:3]]
        add_embed_delta(gm, ctx, ins["out_index"], ph.get("q_start"))
        k = ctx.logprobs

        def extras(h, ww, cr, ur, cw, t, sd, ci, cv, ca):
            r = decode_rows_ext(h, ww, cr, ur, cw, t, sd, vocab=vocab, chunk=chunk, topk=k, logprobs=True,
                                entropy=True, credit=(ci, cv, ca), acc=acc)
            return tuple(r[n] for n in ("tokens", "confidence") + (("topk_ids", "topk_logprobs") if k else ())
                         + EXTRA_OUTPUTS[:-1])
        set_outputs(gm, list(inline(gm, extras, args + ext)) + [rows] + outs[1:])
        return -(-vocab // chunk)
    dec = inline(gm, lambda h, ww, cr, ur, cw, t, sd: decode_rows(h, ww, cr, ur, cw, t, sd, vocab=vocab,
                                                                   chunk=chunk, topk=ctx.logprobs,
                                                                   acc=acc), args)
    set_outputs(gm, list(dec) + outs[1:])
    return -(-vocab // chunk)


HEAD_ATTR = HEAD_WEIGHT.removeprefix(WEIGHT_PREFIX)      # lift_weights names them back as the manifest's
EMBED_ATTR = EMBED_WEIGHT.removeprefix(WEIGHT_PREFIX)


def add_embed_delta(gm: fx.GraphModule, ctx, out_index: fx.Node, q_start: fx.Node | None) -> None:
    """Input ``embed_delta [B, N, d]`` added to the input embedding [B, T, d] at the decoded columns (Refresh:
    ``out_index`` + shift; Reuse: minus ``q_start``, the fed slice's first column), the embedding's weight
    read through ``EMBED_ATTR``. ``scatter_add`` gives x + delta there and x elsewhere: the eager runner's
    ``x + embed_add`` bit for bit. The columns are in the fed slice by construction (its span covers the
    decoded columns; graph padding rows decode columns [0, N) of a slice at least that wide)."""
    emb = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == EMBEDDING]
    if len(emb) != 1:
        raise ValueError(f"chunk_logits: smoothing's embed_delta needs the one input embedding of the "
                         f"program, found {len(emb)} embedding lookups")
    (e,) = emb
    w = e.args[0]
    if not hasattr(gm, EMBED_ATTR):
        t = gm.get_parameter(w.target) if w.op == "get_attr" else None
        if t is None:
            raise ValueError(f"chunk_logits: the input embedding's weight is not a module attribute ({w})")
        gm.register_parameter(EMBED_ATTR, t if isinstance(t, torch.nn.Parameter)
                              else torch.nn.Parameter(t, requires_grad=False))
    with gm.graph.inserting_before(e):
        e.args = (gm.graph.get_attr(EMBED_ATTR),) + tuple(e.args[1:])
    delta = add_input(gm, "embed_delta")
    shift = ctx.config.logit_shift
    users = list(e.users)

    def add(x, dl, oi, *qs):
        cols = oi + shift - qs[0][:, None] if qs else oi + shift                   # [B, N] in the fed slice
        idx = cols[..., None].expand(-1, -1, x.size(-1))                           # [B, N, d]
        return (x.scatter_add(1, idx, dl.to(x.dtype)),)
    (x2,) = inline(gm, add, [e, delta, out_index] + ([q_start] if q_start is not None else []),
                   before=e.next)
    for u in users:
        u.replace_input_with(e, x2)


def _head_weight_node(gm: fx.GraphModule, ctx) -> fx.Node:
    """The LM head weight as a get_attr node (registered on gm under HEAD_ATTR, sharing the model's
    tensor)."""
    if ctx.head_weight is None:
        raise ValueError("chunk_logits needs ctx.head_weight (the LM head weight tensor)")
    if not hasattr(gm, HEAD_ATTR):
        w = ctx.head_weight
        gm.register_parameter(HEAD_ATTR, w if isinstance(w, torch.nn.Parameter)
                              else torch.nn.Parameter(w, requires_grad=False))
    first = next(iter(gm.graph.nodes))
    with gm.graph.inserting_before(first):
        return gm.graph.get_attr(HEAD_ATTR)
