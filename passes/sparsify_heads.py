"""Head-centric sparse attention (Sparse-dLLM / dLLM-Serve): each KV head keeps its own positions.

* ``refresh``: scores every cached position per KV head by its expected contribution to the decoded block's
  attention outputs: ``mean_t softmax_j(q_t . k_j / sqrt(D)) * ||v_j||`` over the block's queries t (attention
  probability from the block's own queries, as SnapKV / H2O accumulate it, weighted by the value norm as in
  VATP, arXiv 2406.12335), max over the query heads of the group; optionally smoothed by a 1-D max-pool
  (``POOL_KERNEL``; Sparse-dLLM uses 3); padding keys score -inf. New output ``head_scores
  [n_layers, B, Hkv, L]`` (float32).
* ``reuse``: new input ``keep_idx [n_layers, B, Hkv, K]`` (ascending cache columns per head, chosen by the
  runner: the top ``retention`` fraction of positions by score plus the fed columns). After the cache write
  each layer reads only those K columns of its pool rows (and of the key mask) per head, and attends over
  them.

Why not Sparse-dLLM's score (``mean_t q_t . k_j``, raw logits of the mean query, pool 3): on the trained
``dlc-tiny`` (docs/QUALITY.md) it kept the wrong half of the context (low-confidence dual, retention 0.5:
78.5% vs 100% dense). The mean of the queries is not the mean of their attention: queries that attend to
different positions (each answer character copies a different prompt character) average out, and raw logits
ignore the softmax's normalisation across keys. Per-query probabilities fix that (97.0%); weighting by
``||v_j||`` ranks keys by how much they move the output rather than how much they are looked at (99.5%).
Max-pooling blurs the choice onto neighbours and cost 1.5-3.5 points there, so it is off by default.

On GPU targets (``ctx.use_kernels``: export / AOTI artifacts for CUDA) each Reuse attention becomes one
``torch.ops.dlc.sparse_attention`` node (``kernel_attention``: the Triton kernel reads the kept columns by
index instead of gathering K/V, then attends over them plus the block's own K/V); elsewhere gather + SDPA.

With retention 1.0 the runner keeps every column in order: the gather is the identity and attention equals
the dense program exactly. Rewrites counted: one per attention layer."""
from __future__ import annotations

import torch
import torch.fx as fx

from dlc.models.sparse_heads import POOL_KERNEL, gather_heads, gather_pool_heads, head_scores

from .graph_utils import add_input, attention_nodes, inline, kv_source, outputs, placeholders, set_outputs
SCORE = "attention x value norm, mean over the block's queries, max over the group"


def params(ctx) -> dict:
    """The pass's parameters as config.json should record them (PassContext.params)."""
    return {"retention": ctx.sparse_retention, "score": SCORE,
            "pool_kernel": getattr(ctx, "sparse_pool_kernel", POOL_KERNEL)}


def run(gm: fx.GraphModule, ctx) -> int:
    if ctx.sparse_retention is None:
        return 0
    return _refresh(gm, ctx) if ctx.phase == "refresh" else _reuse(gm, ctx)










def _refresh(gm: fx.GraphModule, ctx) -> int:
    ph = placeholders(gm)
    out_index = add_input(gm, "out_index")
    group = ctx.config.n_heads // ctx.config.n_kv_heads
    pool = getattr(ctx, "sparse_pool_kernel", POOL_KERNEL)
    scores = []
    for attn in attention_nodes(gm):
        k = kv_source(attn.args[1], ctx.config.n_kv_heads)
        v = kv_source(attn.args[2], ctx.config.n_kv_heads)
        (s,) = inline(gm, lambda q, kk, vv, km, oi: (head_scores(q, kk, vv, km, oi, group, pool),),
                      [attn.args[0], k, v, ph["key_mask"], out_index])
        scores.append(s)
    (stacked,) = inline(gm, lambda *t: (torch.stack(t),), scores)
    set_outputs(gm, outputs(gm) + [stacked])                  # + head_scores [n_layers, B, Hkv, L]
    return len(scores)




def kernel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                     keep: torch.Tensor, q_start: torch.Tensor) -> torch.Tensor:
    """The same attention as ``gather_heads`` + SDPA through ``torch.ops.dlc.sparse_attention`` (GPU targets):
    q [B, H, T, D], k/v [B, Hkv, S, D] (cache with the fed block written), key_mask [B, S], keep [B, Hkv, K],
    q_start [B] -> [B, H, T, D]. The op reads the kept cache columns by index (never materialising the
    gathered K/V) plus the block's own K/V; kept entries that are fed columns or padding keys become -1
    (skipped)."""
    T, D = q.size(2), k.size(3)
    cols = q_start[:, None] + torch.arange(T, device=q_start.device)             # [B, T]
    cidx = cols[:, None, :, None].expand(-1, k.size(1), -1, D)                    # [B, Hkv, T, D]
    k_blk, v_blk = torch.gather(k, 2, cidx), torch.gather(v, 2, cidx)
    valid = torch.gather(key_mask[:, None, :].expand(-1, k.size(1), -1), 2, keep)  # [B, Hkv, K]
    fed = (keep[..., None] == cols[:, None, None, :]).any(-1)                     # [B, Hkv, K]
    idx = torch.where(valid & ~fed, keep, torch.full_like(keep, -1))
    return torch.ops.dlc.sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), k_blk.contiguous(),
                                          v_blk.contiguous(), idx.contiguous())


def _reuse(gm: fx.GraphModule, ctx) -> int:
    ph = placeholders(gm)
    keep_idx = add_input(gm, "keep_idx")
    group = ctx.config.n_heads // ctx.config.n_kv_heads
    kernels = bool(getattr(ctx, "use_kernels", False))      # GPU targets: torch.ops.dlc.sparse_attention
    if kernels:
        import dlc.kernels  # noqa: F401  (registers torch.ops.dlc.*)
    n = 0
    for layer, attn in enumerate(attention_nodes(gm)):
        if "dlc_kv" not in attn.meta:
            raise ValueError("sparsify_heads must run after cache_kv_reuse (no cached K/V found)")
        kp_l, vp_l, rows, k_full, v_full = attn.meta["dlc_kv"]
        if kernels:
            (o,) = inline(gm, lambda q, k, v, km, keep, qs, layer=layer: (kernel_attention(q, k, v, km,
                                                                                           keep[layer], qs),),
                          [attn.args[0], k_full, v_full, ph["key_mask"], keep_idx, ph["q_start"]],
                          before=attn)
            attn.replace_all_uses_with(o)
            gm.graph.erase_node(attn)
        else:
            if rows is None:                    # functional programs: rows copied with the block written
                ks, vs, mask = inline(gm, lambda k, v, km, keep, layer=layer: gather_heads(
                    k, v, km, keep[layer], group), [k_full, v_full, ph["key_mask"], keep_idx], before=attn)
            else:                               # in place: read only the kept columns of the pool rows
                ks, vs, mask = inline(gm, lambda kp, vp, r, km, keep, layer=layer: gather_pool_heads(
                    kp, vp, r, km, keep[layer], group), [kp_l, vp_l, rows, ph["key_mask"], keep_idx],
                    before=attn)
            attn.args = (attn.args[0], ks, vs, mask) + tuple(attn.args[4:])
        n += 1
    return n
