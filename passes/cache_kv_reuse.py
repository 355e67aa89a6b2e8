"""KV-reuse caching: turn the traced full-sequence forward into the two phase programs of Fast-dLLM / dInfer.

* ``refresh`` (whole sequence): unchanged compute, plus every layer's post-RoPE K/V as outputs, stacked to
  ``k, v [n_layers, B, Hkv, L, D]`` (the runner copies them into its cache).
* ``reuse`` (a query slice over a cache): inputs become ``q_ids/q_pos [B, T]`` (the fed tokens), ``q_start
  [B]`` (absolute column of each row's first fed token), ``key_mask [B, S]`` and ``k_cache/v_cache
  [n_layers, B, Hkv, S, D]``. Each layer writes its fresh K/V into a functional copy of the cache at columns
  ``q_start[b] .. q_start[b] + T`` and attends over the whole row; the fresh ``k_new, v_new [n_layers, B,
  Hkv, T, D]`` are outputs so the runner updates its cache (slot pool rows, per-row offsets).

The prefix layout feeds the block and everything after it, the dual layout the block (+ a vicinity window
either side): both are the same reuse program with different (q_start, T), chosen by the runner.
Rewrites counted: one per attention layer (and per sym-size re-derivation in reuse)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import SYM_SIZE, add_input, attention_nodes, inline, kv_source, outputs, placeholders, set_outputs

RENAME_REUSE = {"input_ids": "q_ids", "position_ids": "q_pos"}


def run(gm: fx.GraphModule, ctx) -> int:
    return _refresh(gm, ctx) if ctx.phase == "refresh" else _reuse(gm, ctx)


def _refresh(gm: fx.GraphModule, ctx) -> int:
    attn = attention_nodes(gm)
    ks = [kv_source(a.args[1], ctx.config.n_kv_heads) for a in attn]
    vs = [kv_source(a.args[2], ctx.config.n_kv_heads) for a in attn]
    hidden = outputs(gm)[0]
    k_all, v_all = inline(gm, lambda *t: (torch.stack(t[:len(ks)]), torch.stack(t[len(ks):])), ks + vs)
    set_outputs(gm, [hidden, k_all, v_all])          # [B, L, d], [n_layers, B, Hkv, L, D] x2
    return len(attn)


def write_rows(cache_l: torch.Tensor, q_start: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """cache_l [B, Hkv, S, D] with new [B, Hkv, T, D] written at columns q_start[b] + arange(T) (functional)."""
    cols = q_start[:, None] + torch.arange(new.size(2), device=q_start.device)   # [B, T]
    idx = cols[:, None, :, None].expand_as(new)                                   # [B, Hkv, T, D]
    return torch.scatter(cache_l, 2, idx, new)


def _reuse(gm: fx.GraphModule, ctx) -> int:
    ph = placeholders(gm)
    for old, new in RENAME_REUSE.items():
        ph[old].target = new
        ph[old].name = new
    q_ids, key_mask = ph["input_ids"], ph["key_mask"]
    q_start = add_input(gm, "q_start")
    k_cache = add_input(gm, "k_cache")
    v_cache = add_input(gm, "v_cache")
    n = 0
    # The full forward had one sequence length: its per-token reshapes read it from key_mask. Here key_mask
    # is [B, S] (cache columns) while the fed tokens are [B, T]: re-derive those sizes from q_ids.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == SYM_SIZE and node.args[0] is key_mask:
            node.args = (q_ids,) + tuple(node.args[1:])
            n += 1
    rep = ctx.config.n_heads // ctx.config.n_kv_heads
    ks, vs = [], []
    for layer, attn in enumerate(attention_nodes(gm)):
        k_new = kv_source(attn.args[1], ctx.config.n_kv_heads)
        v_new = kv_source(attn.args[2], ctx.config.n_kv_heads)

        def full_kv(kc, vc, qs, kn, vn, layer=layer):
            k = write_rows(kc[layer], qs, kn)                     # [B, Hkv, S, D]
            v = write_rows(vc[layer], qs, vn)
            return k, v

        k_full, v_full = inline(gm, full_kv, [k_cache, v_cache, q_start, k_new, v_new], before=attn)
        attn.meta["dlc_kv"] = (k_full, v_full)                   # per-KV-head cached K/V, for later passes
        k_att, v_att = (k_full, v_full) if rep == 1 else inline(
            gm, lambda k, v: (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)),
            [k_full, v_full], before=attn)
        attn.args = (attn.args[0], k_att, v_att) + tuple(attn.args[3:])
        ks.append(k_new)
        vs.append(v_new)
        n += 1
    hidden = outputs(gm)[0]
    k_all, v_all = inline(gm, lambda *t: (torch.stack(t[:len(ks)]), torch.stack(t[len(ks):])), ks + vs)
    set_outputs(gm, [hidden, k_all, v_all])          # [B, T, d], [n_layers, B, Hkv, T, D] x2
    return n
