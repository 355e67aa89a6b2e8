"""Weights stacked once, at build time: a MoE program reads its experts' packed weights, never re-stacks them.

A MoE block runs its experts as a few wide GEMMs over packed weights (``models/llada_moe.py``: ``w_gu``
[E, 2H, d] from every expert's gate and up weights, ``w_down`` from their down weights). Eager mode packs
them once (``pack_experts``); a traced program cannot keep that cache, so the trace holds ``stack`` / ``cat``
over the experts' parameters (3 x E weights a layer), and a compiled engine ran them every forward: a copy
of every expert weight a step (LLaDA2-mini: its 28.5 GiB of experts, more than once, every forward) and two
copies of the experts in memory.

This pass computes such values once, at build time. A node is *constant* when it is a ``get_attr`` of a tensor
or a pure op in ``FOLDABLE`` over constants only; a constant node read by a non-constant one (the *frontier*)
whose constant ancestry contains an op in ``COPIES`` (``stack``, ``cat``, a dtype cast: LLaDA2's router reads
its gate weight in fp32; reshapes and clones of their results are folded with them) becomes a ``get_attr`` of
one precomputed, contiguous parameter (``dlc_folded_<i>``). Constant views of a single weight (``t(lm_head)``)
copy nothing and are left alone, so no weight is stored twice. The value is built once per build and shared by
the phases (``ctx.shared``); where its memory holds each source parameter as a view (stack / cat chains with
transposes and reshapes), the model's parameters are re-pointed at those views (as ``fuse_projections`` does),
so the build holds one copy of the experts; the per-expert attributes the programs no longer read are dropped,
and so are export's dtype checks of a weight (``_assert_tensor_metadata``: fixed at build time).

Numbers: the same values (a stack or cat moves elements; a cast at build time is the cast the forward made).
Rewrites counted: one per folded frontier node.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .graph_utils import attr_tensor, drop_unused_attrs, getattr_path

aten = torch.ops.aten
PREFIX = "dlc_folded"
CASTS = {aten.to.dtype, aten._to_copy.default}     # a weight's cast (LLaDA2's router: its gate in fp32)
COPIES = {aten.stack.default, aten.cat.default} | CASTS          # always new memory: these trigger a fold
MAY_COPY = {aten.reshape.default, aten.clone.default, aten.contiguous.default, aten._unsafe_view.default}
VIEWS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
         aten.unsqueeze.default, aten.squeeze.dim, aten.select.int, aten.slice.Tensor,
         aten.narrow.default, aten.alias.default}
FOLDABLE = COPIES | MAY_COPY | VIEWS
ASSERT_META = aten._assert_tensor_metadata.default


def _pure(n: fx.Node) -> bool:
    """A FOLDABLE op that computes a value from its inputs only (no out=, a cast changes the dtype only)."""
    if n.target in CASTS:
        return set(n.kwargs) <= {"dtype"} and all(not isinstance(a, torch.device) for a in n.args)
    return n.target in FOLDABLE and not n.kwargs.get("out")


def constant_nodes(gm: fx.GraphModule) -> set:
    """Nodes whose value depends on weights only: tensor get_attrs and FOLDABLE ops over such nodes."""
    const: set = set()
    for n in gm.graph.nodes:
        if attr_tensor(gm, n) is not None:
            const.add(n)
        elif n.op == "call_function" and _pure(n):
            ins = n.all_input_nodes
            if ins and all(i in const for i in ins):
                const.add(n)
    return const


def _copies(n: fx.Node, const: set, memo: dict) -> bool:
    """Does n's constant ancestry contain an op in ``COPIES``? (A reshape or clone of one weight alone never
    triggers a fold: it may copy nothing, and folding it would store that weight twice.)"""
    if n not in memo:
        memo[n] = n.op == "call_function" and (n.target in COPIES or
                                               any(_copies(i, const, memo) for i in n.all_input_nodes))
    return memo[n]


def _key(n: fx.Node):
    """The value's structure (ops, constant arguments, weight names): equal keys, equal values."""
    def arg(a):
        if isinstance(a, fx.Node):
            return _key(a)
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        return a
    if n.op == "get_attr":
        return ("attr", n.target)
    return (str(n.target), arg(n.args), tuple(sorted((k, arg(v)) for k, v in n.kwargs.items())))


def _value(gm: fx.GraphModule, n: fx.Node, memo: dict) -> torch.Tensor:
    if n not in memo:
        if n.op == "get_attr":
            memo[n] = getattr_path(gm, n.target).detach()
        else:
            args = fx.node.map_arg(n.args, lambda a: _value(gm, a, memo))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: _value(gm, a, memo))
            memo[n] = n.target(*args, **kwargs)
    return memo[n]


def _inverse_views(n: fx.Node, folded: torch.Tensor, gm: fx.GraphModule, memo: dict, out: dict) -> None:
    """For each parameter under n, the view of ``folded`` (n's value) holding it: walk from n down to the
    weights, undoing each op on a view (stack -> select, cat -> narrow, transpose / permute / reshape /
    view -> the inverse view); ``out[target] = view``. A step that cannot stay a view ends the walk there."""
    if n.op == "get_attr":
        out.setdefault(n.target, folded)
        return
    t, a = n.target, n.args
    try:
        if t == aten.stack.default:
            dim = a[1] if len(a) > 1 else 0
            for i, x in enumerate(a[0]):
                _inverse_views(x, folded.select(dim % folded.dim(), i), gm, memo, out)
        elif t == aten.cat.default:
            dim, off = (a[1] if len(a) > 1 else 0), 0
            for x in a[0]:
                size = _value(gm, x, memo).shape[dim]
                _inverse_views(x, folded.narrow(dim, off, size), gm, memo, out)
                off += size
        elif t == aten.transpose.int:
            _inverse_views(a[0], folded.transpose(a[1], a[2]), gm, memo, out)
        elif t == aten.t.default:
            _inverse_views(a[0], folded.t(), gm, memo, out)
        elif t == aten.permute.default:
            inv = [0] * len(a[1])
            for i, p in enumerate(a[1]):
                inv[p % len(a[1])] = i
            _inverse_views(a[0], folded.permute(inv), gm, memo, out)
        elif t in (aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.clone.default,
                   aten.contiguous.default, aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim):
            _inverse_views(a[0], folded.view(_value(gm, a[0], memo).shape), gm, memo, out)
    except RuntimeError:                   # not expressible as a view of the folded tensor: keep the weight
        return


def _fold(gm: fx.GraphModule, ctx, n: fx.Node, memo: dict) -> torch.nn.Parameter:
    """n's value, contiguous, built once per build (``ctx.shared``); the model's source parameters re-pointed
    at views of it where they are (checked equal first)."""
    key = ("fold_weight_stacks", _key(n))
    if key not in ctx.shared:
        with torch.no_grad():
            folded = _value(gm, n, memo).contiguous()
            if folded.device.type != "meta":
                views: dict = {}
                _inverse_views(n, folded, gm, memo, views)
                for target, view in views.items():
                    p = getattr_path(gm, target)
                    if view.shape == p.shape and view.dtype == p.dtype and torch.equal(view, p):
                        p.data = view                  # the model's weight now lives in the folded tensor
        ctx.shared[key] = torch.nn.Parameter(folded, requires_grad=False)
    return ctx.shared[key]


def run(gm: fx.GraphModule, ctx) -> int:
    const = constant_nodes(gm)
    copies: dict = {}
    frontier = [n for n in gm.graph.nodes if n in const and n.op == "call_function"
                and any(u not in const for u in n.users) and _copies(n, const, copies)]
    for i, n in enumerate(frontier):
        attr = f"{PREFIX}_{i}"
        gm.register_parameter(attr, _fold(gm, ctx, n, {}))   # intermediates freed per fold (build memory)
        with gm.graph.inserting_before(n):
            got = gm.graph.get_attr(attr)
        got.meta = dict(n.meta)
        for u in [u for u in n.users if u not in const]:
            u.replace_input_with(n, got)
    if frontier:
        for n in list(gm.graph.nodes):           # export's dtype checks of a weight: fixed at build time
            if n.target == ASSERT_META and n.args and n.args[0] in const:
                gm.graph.erase_node(n)
        drop_unused_attrs(gm)
    return len(frontier)
