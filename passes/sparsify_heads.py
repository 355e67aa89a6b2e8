"""Head-centric sparse attention (Sparse-dLLM / dLLM-Serve): each KV head keeps its own positions.

* ``refresh``: scores every cached position per KV head with the mean query of the decoded block,
  ``q_mean . k / sqrt(D)``, max over the query heads of the group, smoothed by a 1-D max-pool (kernel 3);
  padding keys score -inf. New output ``head_scores [n_layers, B, Hkv, L]`` (float32).
* ``reuse``: new input ``keep_idx [n_layers, B, Hkv, K]`` (ascending cache columns per head, chosen by the
  runner: the top ``retention`` fraction of positions by score plus the fed columns). After the cache write
  each layer gathers those K columns of K/V and of the key mask per head, and attends over them only.

With retention 1.0 the runner keeps every column in order: the gather is the identity and attention equals
the dense program exactly. Rewrites counted: one per attention layer."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph_utils import add_input, attention_nodes, inline, kv_source, outputs, placeholders, set_outputs

POOL_KERNEL = 3


def run(gm: fx.GraphModule, ctx) -> int:
    if ctx.sparse_retention is None:
        return 0
    return _refresh(gm, ctx) if ctx.phase == "refresh" else _reuse(gm, ctx)


def head_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor, out_index: torch.Tensor,
                group: int) -> torch.Tensor:
    """q [B, H, L, D], k [B, Hkv, L, D], key_mask [B, L], out_index [B, N] -> scores [B, Hkv, L] (float32)."""
    idx = out_index[:, None, :, None].expand(-1, q.size(1), -1, q.size(3))        # [B, H, N, D]
    q_mean = torch.gather(q, 2, idx).float().mean(2)                             # [B, H, D]
    kf = k.float().repeat_interleave(group, dim=1)                                # [B, H, L, D]
    s = torch.einsum("bhd,bhld->bhl", q_mean, kf) / math.sqrt(q.size(3))          # [B, H, L]
    s = s.unflatten(1, (-1, group)).amax(2)                                       # [B, Hkv, L]
    s = max_pool3(s)
    return s.masked_fill(~key_mask[:, None, :], float("-inf"))


def max_pool3(s: torch.Tensor) -> torch.Tensor:
    """1-D max-pool over the last dim, kernel 3, stride 1, -inf padding (= F.max_pool1d(s, 3, 1, 1)); written
    with slices so export keeps the length symbolic and ONNX needs no pooling op."""
    p = F.pad(s, (1, 1), value=float("-inf"))
    return torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])


def _refresh(gm: fx.GraphModule, ctx) -> int:
    ph = placeholders(gm)
    out_index = add_input(gm, "out_index")
    group = ctx.config.n_heads // ctx.config.n_kv_heads
    scores = []
    for attn in attention_nodes(gm):
        k = kv_source(attn.args[1], ctx.config.n_kv_heads)
        (s,) = inline(gm, lambda q, kk, km, oi: (head_scores(q, kk, km, oi, group),),
                      [attn.args[0], k, ph["key_mask"], out_index])
        scores.append(s)
    (stacked,) = inline(gm, lambda *t: (torch.stack(t),), scores)
    set_outputs(gm, outputs(gm) + [stacked])                  # + head_scores [n_layers, B, Hkv, L]
    return len(scores)


def gather_heads(k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, keep: torch.Tensor, group: int):
    """k, v [B, Hkv, S, D], key_mask [B, S], keep [B, Hkv, K] -> per-head K/V [B, H, K, D] and the SDPA mask
    [B, H, 1, K]."""
    idx = keep[..., None].expand(-1, -1, -1, k.size(3))                           # [B, Hkv, K, D]
    ks, vs = torch.gather(k, 2, idx), torch.gather(v, 2, idx)                     # [B, Hkv, K, D]
    km = torch.gather(key_mask[:, None, :].expand(-1, k.size(1), -1), 2, keep)    # [B, Hkv, K]
    if group > 1:
        ks, vs = ks.repeat_interleave(group, dim=1), vs.repeat_interleave(group, dim=1)
        km = km.repeat_interleave(group, dim=1)
    return ks, vs, km[:, :, None, :]


def _reuse(gm: fx.GraphModule, ctx) -> int:
    ph = placeholders(gm)
    keep_idx = add_input(gm, "keep_idx")
    group = ctx.config.n_heads // ctx.config.n_kv_heads
    n = 0
    for layer, attn in enumerate(attention_nodes(gm)):
        if "dlc_kv" not in attn.meta:
            raise ValueError("sparsify_heads must run after cache_kv_reuse (no cached K/V found)")
        k_full, v_full = attn.meta["dlc_kv"]
        ks, vs, mask = inline(gm, lambda k, v, km, keep, layer=layer: gather_heads(k, v, km, keep[layer], group),
                              [k_full, v_full, ph["key_mask"], keep_idx], before=attn)
        attn.args = (attn.args[0], ks, vs, mask) + tuple(attn.args[4:])
        n += 1
    return n
