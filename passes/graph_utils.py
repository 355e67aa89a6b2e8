"""Small FX helpers shared by the passes: finding attention nodes, adding inputs/outputs, inlining code,
reading and dropping a program's attributes.

Phase graphs are plain ``torch.fx.GraphModule``s with a flat calling convention: positional tensor inputs
(placeholders, in order) and a tuple output. Every pass keeps that form."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

SDPA = torch.ops.aten.scaled_dot_product_attention.default
SYM_SIZE = torch.ops.aten.sym_size.int


def placeholders(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}


def add_input(gm: fx.GraphModule, name: str) -> fx.Node:
    """Append a placeholder after the last one (inputs keep their order); returns the existing one if
    present."""
    ph = placeholders(gm)
    if name in ph:
        return ph[name]
    last = list(ph.values())[-1] if ph else None
    ctx = gm.graph.inserting_after(last) if last is not None else gm.graph.inserting_before(None)
    with ctx:
        return gm.graph.placeholder(name)


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def outputs(gm: fx.GraphModule) -> list:
    out = output_node(gm).args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def set_outputs(gm: fx.GraphModule, values: list) -> None:
    output_node(gm).args = (tuple(values),)


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The SDPA node of every layer, in execution (= layer) order."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == SDPA]


def shape_of(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def kv_source(node: fx.Node, n_kv: int) -> fx.Node:
    """Walk back from an SDPA key/value argument through GQA expansion (repeat_interleave, expand, reshape,
    dtype casts) to the per-KV-head tensor [B, Hkv, T, D] the layer computed: the thing a cache stores."""
    cur = node
    for _ in range(16):
        shp = shape_of(cur)
        if shp is not None and len(shp) == 4 and shp[1] == n_kv:
            return cur
        tensor_args = [a for a in cur.args if isinstance(a, fx.Node)]
        if not tensor_args:
            break
        cur = tensor_args[0]
    raise ValueError(f"cannot find the per-KV-head source of attention input {node.name} (expected a "
                     f"[B, {n_kv}, T, D] tensor before the GQA expansion)")


def inline(gm: fx.GraphModule, fn, args: list, before: fx.Node | None = None):
    """Trace ``fn(*args)`` (plain torch code without data-dependent Python control flow; constants bound by
    closure) with torch.fx and copy its nodes into gm before ``before`` (default: the output node).
    ``args`` are gm nodes. Returns what fn returns, as gm nodes."""
    sub = _trace(fn, len(args))
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    val_map = dict(zip(phs, args))
    with gm.graph.inserting_before(before or output_node(gm)):
        return gm.graph.graph_copy(sub.graph, val_map)


def _trace(fn, nargs: int) -> fx.GraphModule:
    params = ", ".join(f"x{i}" for i in range(nargs))
    ns: dict = {"fn": fn}
    exec(f"def wrapper({params}):\n    return fn({params})\n", ns)   # fixed arity: fx traces positional args
    return fx.symbolic_trace(ns["wrapper"])


def remove_guard_calls(gm: fx.GraphModule) -> int:
    """torch.export's unlifted module calls a shape-guard submodule; phase rewrites change input shapes on
    purpose, so the guards go (the re-export of the rewritten graph installs its own)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and "guard" in str(node.target):
            gm.graph.erase_node(node)
            n += 1
    return n


def getitem(graph: fx.Graph, node: fx.Node, i: int) -> fx.Node:
    return graph.call_function(operator.getitem, (node, i))


def getattr_path(mod, target: str):
    """The attribute a ``get_attr`` target names (dotted path from ``mod``)."""
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def attr_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads (a weight), or None for any other node or attribute."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        t = getattr_path(gm, node.target)
        return t if isinstance(t, torch.Tensor) else None
    return None


def drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Delete parameters no get_attr node reads any more (they would be lifted into exported artifacts)."""
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()):
        if name not in used:
            path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(path) if path else gm
            delattr(owner, attr)
