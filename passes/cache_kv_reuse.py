"""KV-reuse caching: turn the traced full-sequence forward into the two phase programs of Fast-dLLM / dInfer,
working on the runtime's KV slot pool.

Both phases take the pool as inputs: ``k_pool, v_pool [n_layers, P, Hkv, S, D]`` (every slot of the runtime's
pool, the tensor ``KVCacheManager.k_all`` itself) and ``rows [B]`` (the batch's pool rows).

* ``refresh`` (whole sequence): unchanged compute; each layer writes its post-RoPE K/V into columns [0, L) of
  its pool rows.
* ``reuse`` (a query slice over the cache): inputs become ``q_ids/q_pos [B, T]`` (the fed tokens), ``q_start
  [B]`` (absolute column of each row's first fed token) and ``key_mask [B, S]``. Each layer writes its fresh
  K/V at columns ``q_start[b] .. q_start[b] + T`` of its pool row, then attends over the row.

In place (``ctx.kv_inplace``, the torch artifacts: export, AOTI, in-memory): the writes are ``index_put_`` on
the pool inputs (exported input mutation), so a call never copies a cache; the programs return only the
decoded tokens. Functional (ONNX / TensorRT, which have no input mutation): the programs read the pool and
return the new K/V (refresh ``k, v [n_layers, B, Hkv, L, D]``; reuse ``k_new, v_new [n_layers, B, Hkv, T,
D]``), which the runner writes into the pool.

Attention reads the batch's rows of the layer's pool (``pool[rows]``, one layer at a time); GPU lowerings
(``ctx.use_kernels``) call ``torch.ops.dlc.pool_attention`` instead, the runtime's kernel, which indexes the
pool by row (no gather; keys [0, key_mask.sum()) of each row, the runtime's layout), and
head-sparse Reuse (``sparsify_heads``) gathers only the kept columns. ``attn.meta["dlc_kv"]`` carries, per
Reuse layer, ``(k_pool_l, v_pool_l, rows, k_rows, v_rows)`` for those later passes (rows None in functional
programs, whose pool does not hold the fresh K/V yet: read ``k_rows``).

The prefix layout feeds the block and everything after it, the dual layout the block (+ a vicinity window
either side): both are the same reuse program with different (q_start, T), chosen by the runner.
Rewrites counted: one per attention layer (and per sym-size re-derivation in reuse)."""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import (SYM_SIZE, add_input, attention_nodes, inline, kv_source, outputs, placeholders,
                          set_outputs)

RENAME_REUSE = {"input_ids": "q_ids", "position_ids": "q_pos"}
POOL_INPUTS = ("k_pool", "v_pool", "rows")


def run(gm: fx.GraphModule, ctx) -> int:
    return _refresh(gm, ctx) if ctx.phase == "refresh" else _reuse(gm, ctx)


def write_pool(pool_l: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, new: torch.Tensor) -> None:
    """One layer's pool [P, Hkv, S, D]: write new [B, Hkv, T, D] at pool_l[rows[b], :, cols[b, t]] in place
    (cols [B, T] or [1, T])."""
    val = new.transpose(1, 2).to(pool_l.dtype)                                   # [B, T, Hkv, D]
    torch.ops.aten.index_put_.default(pool_l, [rows[:, None], None, cols], val)  # pool_l[r, :, c] = val


def write_rows(cache_l: torch.Tensor, q_start: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """cache_l [B, Hkv, S, D] with new [B, Hkv, T, D] written at columns q_start[b] + arange(T)
    (functional)."""
    cols = q_start[:, None] + torch.arange(new.size(2), device=q_start.device)   # [B, T]
    idx = cols[:, None, :, None].expand_as(new)                                   # [B, Hkv, T, D]
    return torch.scatter(cache_l, 2, idx, new.to(cache_l.dtype))


def _pool_inputs(gm: fx.GraphModule) -> list[fx.Node]:
    return [add_input(gm, name) for name in POOL_INPUTS]


def _stack_outputs(gm: fx.GraphModule, ks: list, vs: list) -> list:
    return list(inline(gm, lambda *t: (torch.stack(t[:len(ks)]), torch.stack(t[len(ks):])), ks + vs))


def _refresh(gm: fx.GraphModule, ctx) -> int:
    attn = attention_nodes(gm)
    ks = [kv_source(a.args[1], ctx.config.n_kv_heads) for a in attn]
    vs = [kv_source(a.args[2], ctx.config.n_kv_heads) for a in attn]
    hidden = outputs(gm)[0]
    if not ctx.kv_inplace:
        set_outputs(gm, [hidden] + _stack_outputs(gm, ks, vs))  # [B, L, d], [n_layers, B, Hkv, L, D] x2
        return len(attn)
    k_pool, v_pool, rows = _pool_inputs(gm)
    for layer, (a, k, v) in enumerate(zip(attn, ks, vs)):
        def write(kp, vp, r, kk, vv, layer=layer):
            cols = torch.arange(kk.size(2), device=kk.device)[None]               # [1, L]
            write_pool(kp[layer], r, cols, kk)
            write_pool(vp[layer], r, cols, vv)
            return ()
        inline(gm, write, [k_pool, v_pool, rows, k, v], before=a)
    set_outputs(gm, [hidden])                                   # [B, L, d]; K/V are in the pool
    return len(attn)


def _reuse(gm: fx.GraphModule, ctx) -> int:
    ph = placeholders(gm)
    for old, new in RENAME_REUSE.items():
        ph[old].target = new
        ph[old].name = new
    q_ids, key_mask = ph["input_ids"], ph["key_mask"]
    q_start = add_input(gm, "q_start")
    k_pool, v_pool, rows = _pool_inputs(gm)
    n = 0
    # The full forward had one sequence length: its per-token reshapes read it from key_mask. Here key_mask
    # is [B, S] (cache columns) while the fed tokens are [B, T]: re-derive those sizes from q_ids.
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target == SYM_SIZE and node.args[0] is key_mask:
            node.args = (q_ids,) + tuple(node.args[1:])
            n += 1
    rep = ctx.config.n_heads // ctx.config.n_kv_heads
    inplace = ctx.kv_inplace
    # the pool kernel attends to keys [0, kv_len) of each row: not block-causal (passes/mask_blocks.py)
    pool_kernel = (inplace and ctx.use_kernels and ctx.sparse_retention is None
                   and not getattr(ctx.config, "block_diffusion", False))
    if pool_kernel:
        import dlc.kernels  # noqa: F401  (registers torch.ops.dlc.pool_attention)
        (kv_len,) = inline(gm, lambda km: (km.sum(1),), [key_mask], before=attention_nodes(gm)[0])   # [B]
    ks, vs = [], []
    for layer, attn in enumerate(attention_nodes(gm)):
        k_new = kv_source(attn.args[1], ctx.config.n_kv_heads)
        v_new = kv_source(attn.args[2], ctx.config.n_kv_heads)

        def cached_kv(kp, vp, r, qs, kn, vn, layer=layer):
            kl, vl = kp[layer], vp[layer]                         # [P, Hkv, S, D] views of the pool
            if inplace:                                           # write, then read the rows back
                cols = qs[:, None] + torch.arange(kn.size(2), device=qs.device)   # [B, T]
                write_pool(kl, r, cols, kn)
                write_pool(vl, r, cols, vn)
                return kl, vl, kl[r], vl[r]
            return kl, vl, write_rows(kl[r], qs, kn), write_rows(vl[r], qs, vn)   # copies of the rows

        kp_l, vp_l, k_full, v_full = inline(gm, cached_kv, [k_pool, v_pool, rows, q_start, k_new, v_new],
                                            before=attn)
        attn.meta["dlc_kv"] = (kp_l, vp_l, rows if inplace else None, k_full, v_full)   # for later passes
        if pool_kernel:                          # the runtime's pool attention: rows indexed, never gathered
            def pool_attn(q, kp, vp, r, kl):
                return (torch.ops.dlc.pool_attention(q.contiguous(), kp, vp, r, kl),)
            (o,) = inline(gm, pool_attn, [attn.args[0], kp_l, vp_l, rows, kv_len], before=attn)
            attn.replace_all_uses_with(o)
            gm.graph.erase_node(attn)
            ks.append(k_new)
            vs.append(v_new)
            n += 1
            continue
        k_att, v_att = (k_full, v_full) if rep == 1 else inline(
            gm, lambda k, v: (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)),
            [k_full, v_full], before=attn)
        attn.args = (attn.args[0], k_att, v_att) + tuple(attn.args[3:])
        ks.append(k_new)
        vs.append(v_new)
        n += 1
    hidden = outputs(gm)[0]
    if inplace:
        set_outputs(gm, [hidden])                                 # [B, T, d]; K/V are in the pool
    else:
        set_outputs(gm, [hidden] + _stack_outputs(gm, ks, vs))    # + [n_layers, B, Hkv, T, D] x2
    return n
