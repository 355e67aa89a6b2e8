"""Projection fusion (GPU targets): linear layers reading one input become one GEMM over concatenated weights.

Every layer computes ``q, k, v = x Wq^T, x Wk^T, x Wv^T`` and ``gate, up = x Wg^T, x Wu^T`` from one
normalised input. At the small token counts of a Reuse step (B x 32 rows) each GEMM is a short, launch- and
latency-bound kernel; one GEMM over ``W = [Wq; Wk; Wv]`` reads the same bytes in one launch with a wider N.
The pass rewrites each group of ``aten.linear(x, W_i[, b_i])`` sharing ``x`` (weights as parameters, all with
a bias or none) into ``linear(x, W_cat[, b_cat])`` followed by ``split`` along the last dim; the consumers
read the slices.

Memory: the concatenated weight is built once per build (both phases share it) and the model's own parameters
are re-pointed to views of it (``p.data = W_cat[rows]``), so the weights are not held twice and the eager
model computes exactly what it did; the now unused per-projection attributes are dropped from the phase
program (an exported artifact carries the concatenated weight only).

Numbers: the same products and sums per output element; a wider GEMM may block its reduction differently, so
results agree to rounding (tests compare with a tolerance). Rewrites counted: one per fused group."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph_utils import attr_tensor, drop_unused_attrs, getattr_path

LINEAR = torch.ops.aten.linear.default
PREFIX = "dlc_fused_proj"


def groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Linear nodes sharing their input, with parameter weights [out_i, d] of one dtype and all-or-no bias."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target != LINEAR or attr_tensor(gm, n.args[1]) is None:
            continue
        bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if bias is not None and attr_tensor(gm, bias) is None:
            continue
        by_input.setdefault(n.args[0], []).append(n)
    out = []
    for nodes in by_input.values():
        ws = [attr_tensor(gm, n.args[1]) for n in nodes]
        has_bias = [(n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")) is not None for n in nodes]
        if len(nodes) < 2 or len({w.dtype for w in ws}) != 1 or len({w.shape[1] for w in ws}) != 1 \
                or len(set(has_bias)) != 1 or len({w.device for w in ws}) != 1:
            continue
        out.append(nodes)
    return out


def _bias(n: fx.Node):
    return n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")


def _concat(gm: fx.GraphModule, ctx, nodes: list[fx.Node], attr: str, which) -> str:
    """Register the concatenated tensor of ``which(node)`` parameters under ``attr`` (built once per build and
    shared by the phases through ctx.shared; the originals are re-pointed to views of it)."""
    targets = tuple(which(n).target for n in nodes)
    key = ("fuse_projections", targets)
    if key not in ctx.shared:
        ts = [getattr_path(gm, t) for t in targets]
        with torch.no_grad():
            cat = torch.cat([t.detach() for t in ts], 0)
            o = 0
            for t in ts:                       # the model's parameters become views: no second copy
                t.data = cat[o:o + t.shape[0]]
                o += t.shape[0]
        ctx.shared[key] = torch.nn.Parameter(cat, requires_grad=False)
    gm.register_parameter(attr, ctx.shared[key])
    return attr


def run(gm: fx.GraphModule, ctx) -> int:
    n_groups = 0
    for nodes in groups(gm):
        first = min(nodes, key=lambda n: list(gm.graph.nodes).index(n))
        sizes = [attr_tensor(gm, n.args[1]).shape[0] for n in nodes]
        w_attr = _concat(gm, ctx, nodes, f"{PREFIX}_{n_groups}_w", lambda n: n.args[1])
        b_attr = (_concat(gm, ctx, nodes, f"{PREFIX}_{n_groups}_b", _bias) if _bias(nodes[0]) is not None
                  else None)
        g = gm.graph
        with g.inserting_before(first):
            w = g.get_attr(w_attr)
            args = (first.args[0], w) + ((g.get_attr(b_attr),) if b_attr else ())
            fused = g.call_function(LINEAR, args)                               # [..., sum(out_i)]
            parts = g.call_function(torch.ops.aten.split_with_sizes.default, (fused, sizes, -1))
            outs = [g.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        for n, o in zip(nodes, outs):
            o.meta = dict(n.meta)
            n.replace_all_uses_with(o)
            g.erase_node(n)
        n_groups += 1
    drop_unused_attrs(gm)
    return n_groups
