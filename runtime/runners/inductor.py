"""Inductor code generation at load for export engines (``CompiledRunner.enable_compile``).

An export engine's phase programs take the whole KV slot pool ``k_pool, v_pool [n_layers, P, Hkv, S, D]``
and write each layer's K/V into ``select(k_pool, 0, layer)`` in place (``index_put_``). Interpreted, that is
a write of the new columns. Compiled as is, AOTAutograd functionalizes the write through the view: every
layer materialises a copy of its whole [P, Hkv, S, D] pool slice and scatters it back (measured on an H100 at
8B: a B=1 Reuse step went from 8 ms to 29 ms). Mutations of graph inputs themselves are re-inplaced by
Inductor, so ``split_pool_inputs`` rewrites the graph to take one input per layer (``k_pool__<l>``,
``v_pool__<l>``, the views ``k_all[l]`` the runner already holds) in place of the selects, and
``CompiledProgram`` feeds them from the pool on each call. Same values, same engine files."""
from __future__ import annotations

import torch
import torch.fx as fx

POOLS = ("k_pool", "v_pool")


def split_pool_inputs(gm: fx.GraphModule, n_layers: int) -> tuple[fx.GraphModule, list[str]]:
    """The program with each pool input replaced by ``n_layers`` per-layer inputs (appended after the
    others, k then v) -> (module with plain positional inputs, its input names). Raises ValueError when a
    pool is used other than through ``select(pool, 0, <int>)``."""
    g = gm.graph
    ph = {n.name: n for n in g.nodes if n.op == "placeholder"}
    last = list(ph.values())[-1]
    for name in POOLS:
        pool = ph.get(name)
        if pool is None:
            continue
        layers = []
        with g.inserting_after(last):
            for layer in range(n_layers):
                last = g.placeholder(f"{name}__{layer}")
                last.meta = {}
                layers.append(last)
        for user in list(pool.users):
            if user.target is not torch.ops.aten.select.int or user.args[1] != 0 \
                    or not isinstance(user.args[2], int):
                raise ValueError(f"compile: {name} is read by {user.target}, not a per-layer select")
            user.replace_all_uses_with(layers[user.args[2]])
            g.erase_node(user)
        g.erase_node(pool)
    g._codegen = fx.graph.CodeGen()                    # plain positional inputs, outputs as returned
    g.lint()
    out = fx.GraphModule(gm, g)
    return out, [n.name for n in g.nodes if n.op == "placeholder"]


class CompiledProgram:
    """A phase program with the same positional signature (``names``: its inputs in call order) running
    Inductor's code (``module``: compiled on first call; every size symbolic, fullgraph)."""

    def __init__(self, gm: fx.GraphModule, names: list[str], n_layers: int):
        split, order = split_pool_inputs(gm, n_layers)
        self.module = torch.compile(split, dynamic=True, fullgraph=True)
        at = {n: i for i, n in enumerate(names)}
        self.base = [at[n] for n in order if n in at]                 # every input but the pools
        self.pools = [at[p] for p in POOLS if p in at]

    def __call__(self, *args):
        layers = [v for i in self.pools for v in args[i].unbind(0)]   # [P, Hkv, S, D] views, no copy
        return self.module(*[args[i] for i in self.base], *layers)
