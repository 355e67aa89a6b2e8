"""Inductor code generation at load for export engines (``CompiledRunner.enable_compile``).

An export engine's phase programs take the whole KV slot pool ``k_pool, v_pool [n_layers, P, Hkv, S, D]``
and write each layer's K/V into ``select(k_pool, 0, layer)`` in place (``index_put_``). Interpreted, that is
a write of the new columns. Compiled as is, AOTAutograd functionalizes the write through the view: every
layer materialises a copy of its whole [P, Hkv, S, D] pool slice and scatters it back (measured on an H100 at
8B: a B=1 Reuse step went from 8 ms to 29 ms). Mutations of graph inputs themselves are re-inplaced by
Inductor, so ``split_pool_inputs`` rewrites the graph to take one input per layer (``k_pool__<l>``,
``v_pool__<l>``, the views ``k_all[l]`` the runner already holds) in place of the selects, and
``CompiledProgram`` feeds them from the pool on each call. Same values, same engine files.

The program is then split at its layer boundaries (``split_layers``: the exported nodes' module paths say
which transformer block each belongs to) and the pieces whose code is the same once their names are made
canonical (every layer of a model) share ONE compiled function, as the runtime's compiled blocks do: at 8B the
whole 32-layer program compiled with every size symbolic took 132-177 s of warm-up on an H100, and the
weights' sizes, symbolic too, kept Inductor from specialising its kernels on the hidden sizes (24-37 s split,
1.05x / 0.98x the runtime path at B=1 / 32 instead of 0.98x / 0.92x). Each piece compiles with Dynamo's
automatic dynamic shapes: static first, then only the sizes that changed (batch, widths) symbolic."""
from __future__ import annotations

import copy
import re

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

POOLS = ("k_pool", "v_pool")
LAYER_PATH = re.compile(r"(?:blocks|layers|layer|h)\.(\d+)(?:\.|$)")


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
    g.set_codegen(fx.graph.CodeGen())                  # plain positional inputs, outputs as returned
    g.lint()
    out = fx.GraphModule(gm, g)
    return out, [n.name for n in g.nodes if n.op == "placeholder"]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = str(list(stack.values())[-1][0]) if stack else ""
    return "" if path.startswith("_empty") else path


def layer_partitions(gm: fx.GraphModule, n_layers: int) -> dict[fx.Node, int] | None:
    """Node -> piece: 0 before the first layer, l + 1 for layer l, n_layers + 1 after the last. A node
    without a module path (a pass's insertion: the pool write, the decoding) joins the piece of the node
    before it. None when the layers are not contiguous in program order (no split then)."""
    part, cur, seen = {}, 0, set()
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        path = _module_path(n)
        m = LAYER_PATH.search(path)
        if m:
            layer = int(m.group(1)) + 1
            if layer < cur or layer > n_layers:
                return None
            cur = layer
        elif path and cur > 0:
            cur = n_layers + 1
        part[n] = cur
        seen.add(cur)
    return part if seen >= set(range(1, n_layers + 1)) else None


def canonical_code(sub: fx.GraphModule) -> str:
    """Rename the piece's nodes by position (inputs a0.., values n0..) and return its code: pieces of the
    same computation on different layers then read the same."""
    i = j = 0
    for n in sub.graph.nodes:
        if n.op == "placeholder":
            n.name = n.target = f"a{i}"
            i += 1
        elif n.op != "output":
            n.name = f"n{j}"
            j += 1
    sub.recompile()
    return sub.code


def split_layers(gm: fx.GraphModule, n_layers: int) -> tuple[fx.GraphModule, dict[str, list[str]]] | None:
    """The program as a chain of pieces (prelude, one per layer, epilogue) -> (top module calling them,
    {piece code: piece names}), or None when it cannot be split (then it compiles whole)."""
    for n in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        gm.graph.erase_node(n)            # an attribute read nothing uses (a lifted weight's leftover)
    if any(n.op == "get_attr" for n in gm.graph.nodes):     # pieces reading other constants could look alike
        return None
    part = layer_partitions(gm, n_layers)
    if part is None:
        return None
    top = split_module(gm, None, lambda n: part[n], keep_original_order=True)
    groups: dict[str, list[str]] = {}
    for name, sub in top.named_children():
        groups.setdefault(canonical_code(sub), []).append(name)
    return top, groups


SDPA = torch.ops.aten.scaled_dot_product_attention.default
MASK_VIEWS = {torch.ops.aten.slice.Tensor, torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default,
              torch.ops.aten.expand.default, torch.ops.aten.reshape.default}


def _is_padding_mask(node, key_mask: str) -> bool:
    """True when ``node`` is the program's ``key_mask`` input seen through views only (a key-padding
    mask: all True when no row is padded)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in MASK_VIEWS:
        node = node.args[0]
    return isinstance(node, fx.Node) and node.op == "placeholder" and node.target == key_mask


def without_padding_mask(gm: fx.GraphModule, key_mask: str = "key_mask") -> fx.GraphModule | None:
    """A copy of the program whose attention takes no mask, or None unless every attention's mask is the
    key-padding mask (a block-causal or any other mask keeps its program). For a batch with no padded row
    the two are the same computation, and without a mask SDPA runs its flash kernel (the eager runner's
    Refresh rule, runners/eager.py ``inputs``)."""
    g = copy.deepcopy(gm.graph)
    attn = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    if not attn or not all(len(n.args) > 3 and _is_padding_mask(n.args[3], key_mask) for n in attn):
        return None
    for n in attn:
        n.args = (*n.args[:3], None, *n.args[4:])
    return fx.GraphModule(gm, g)


def without_decode(gm: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of a GPU-lowered Reuse program without its in-graph decode (its one ``dlc::fused_select_logits``
    node: a pass over the LM head), or None where the program has not exactly one such node. Tokens and
    confidence come back as zeros of their shapes and dtypes; every other output (the hidden rows) and the K/V
    written into the pool stay as they were. ``CompiledRunner`` runs it (``reuse_rows``) for the batches it
    decodes from the hidden rows, which otherwise read the head twice a step."""
    import operator
    g = copy.deepcopy(gm.graph)
    op = torch.ops.dlc.fused_select_logits                 # the packet (FX builds) or its overload (exported)
    sel = [n for n in g.nodes if n.op == "call_function" and n.target in (op, op.default)]
    if len(sel) != 1 or not all(u.op == "call_function" and u.target is operator.getitem
                                and u.args[1] in (0, 1) for u in sel[0].users):
        return None
    node = sel[0]
    with g.inserting_after(node):
        col = g.call_function(torch.ops.aten.select.int, (node.args[0], 1, 0))              # [R]
    for u in list(node.users):
        with g.inserting_after(col):
            zero = g.call_function(torch.ops.aten.zeros_like.default, (col,),
                                   {"dtype": torch.int64 if u.args[1] == 0 else torch.float32})
        u.replace_all_uses_with(zero)
        g.erase_node(u)
    g.erase_node(node)
    return fx.GraphModule(gm, g)


def _compile(fn):
    return torch.compile(fn, dynamic=None, fullgraph=True)


class CompiledProgram:
    """A phase program with the same positional signature (``names``: its inputs in call order) running
    Inductor's code (compiled on first call): its layers share one compiled function (``n_compiled``
    functions in all: prelude, layer, epilogue), or the whole program is one compiled graph when it does not
    split by layer."""

    def __init__(self, gm: fx.GraphModule, names: list[str], n_layers: int, shared: dict | None = None):
        """``shared``: {piece code: compiled function} across a runner's programs, so that programs with the
        same pieces (the Reuse program and its rows-only variant: all but the epilogue) compile them once."""
        split, order = split_pool_inputs(gm, n_layers)
        pieces = split_layers(split, n_layers)
        if pieces is None:
            self.module, self.n_compiled = _compile(split), 1
        else:
            top, groups = pieces
            shared = {} if shared is None else shared
            for code, names_alike in groups.items():
                if code not in shared:
                    shared[code] = _compile(getattr(top, names_alike[0]))
                for name in names_alike:
                    setattr(top, name, shared[code])
            self.module, self.n_compiled = top, len(groups)
        at = {n: i for i, n in enumerate(names)}
        self.base = [at[n] for n in order if n in at]                 # every input but the pools
        self.pools = [at[p] for p in POOLS if p in at]

    def __call__(self, *args):
        layers = [v for i in self.pools for v in args[i].unbind(0)]   # [P, Hkv, S, D] views, no copy
        return self.module(*[args[i] for i in self.base], *layers)
