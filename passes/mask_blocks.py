"""Block-causal attention for block-diffusion models (LLaDA2.0 / LLaDA2.1, SDAR) inside the phase programs.

The traced forward attends with the key mask ``key_mask [B, S]`` (SDPA's mask ``[B, 1, 1, S]``). A
block-diffusion model attends bidirectionally inside a block and causally across blocks aligned to column 0,
so its mask is per query: this pass adds the input ``block_size [1]`` (int64, the request's block length: one
engine serves any) and gives every layer's SDPA the mask ``block_key_mask(key_mask, positions, block_size)``
``[B, 1, T, S]``, built once in the graph from the positions (``position_ids``; ``q_pos`` in ``reuse`` after
``cache_kv_reuse`` renames it) and the real keys. The runtime builds the same mask with the same function
(``dlc.models.common.block_key_mask``, the eager runner's ``attention_keys``), so an engine attends exactly as
the eager model; no [B, T, S] tensor crosses the program boundary.

Runs first (before ``cache_kv_reuse``, which keeps each SDPA's mask argument while it rewires the keys to the
KV pool). Only block-diffusion builds run it (``select_passes``). Rewrites counted: one per attention
layer."""
from __future__ import annotations

import torch.fx as fx

from dlc.models.common import block_key_mask

from .graph_utils import add_input, attention_nodes, inline, placeholders

BLOCK_INPUT = "block_size"
MASK_ARG = 3                    # aten.scaled_dot_product_attention(query, key, value, attn_mask, ...)


def run(gm: fx.GraphModule, ctx) -> int:
    if not getattr(ctx.config, "block_diffusion", False):
        raise ValueError(f"pass mask_blocks applies to block-diffusion models; {ctx.config.family} attends "
                         "bidirectionally")
    ph = placeholders(gm)
    key_mask, pos = ph["key_mask"], ph["position_ids"]
    block = add_input(gm, BLOCK_INPUT)
    attn = attention_nodes(gm)
    (mask,) = inline(gm, lambda km, qp, bs: (block_key_mask(km, qp, bs)[:, None],),   # [B, 1, T, S]
                     [key_mask, pos, block], before=attn[0])
    for node in attn:
        args = list(node.args) + [None] * max(0, MASK_ARG + 1 - len(node.args))
        args[MASK_ARG] = mask
        node.args = tuple(args)
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "attn_mask"}
    return len(attn)
