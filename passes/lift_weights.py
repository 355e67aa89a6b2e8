"""Lift every weight of a phase program to an input, so an engine stores its weights once.

Each ``get_attr`` of a tensor (parameters, buffers, fused projections, the LM head, constants the trace made)
becomes a placeholder ``w__<attribute path, dots as __>`` appended after the runtime inputs, in sorted order,
and the attribute is dropped from the program. The tensors go to ``ctx.shared["weights"]`` (name -> tensor):
both phases read the same names, so ``dlc compile`` writes them once (``weights.safetensors``) and the runtime
loads one copy onto the device, fed to every phase program. Without this pass each exported artifact would
carry the whole model (2 x 16 GB for LLaDA-8B).

Runs last (after every pass that adds or rewires weights). Rewrites counted: one per lifted tensor."""
from __future__ import annotations

import torch
import torch.fx as fx

from dlc.manifest import WEIGHT_PREFIX

from .graph_utils import add_input, attr_tensor, getattr_path


def weight_input_name(target: str) -> str:
    return WEIGHT_PREFIX + target.replace(".", "__")


def _drop(gm: fx.GraphModule, target: str) -> None:
    path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    if attr in owner._parameters:
        del owner._parameters[attr]
    elif attr in owner._buffers:
        del owner._buffers[attr]
    elif hasattr(owner, attr):
        delattr(owner, attr)


def run(gm: fx.GraphModule, ctx) -> int:
    store: dict[str, torch.Tensor] = ctx.shared.setdefault("weights", {})
    uses: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if attr_tensor(gm, node) is not None:
            uses.setdefault(node.target, []).append(node)
    last = None                       # the inputs go after the last placeholder, in order (one scan: MoE
    for target in sorted(uses):       # programs lift ~15k weights)
        tensor = getattr_path(gm, target).detach()
        name = weight_input_name(target)
        if name in store and not _same(store[name], tensor):
            raise ValueError(f"lift_weights: two different tensors named {target} in the phase programs")
        store[name] = tensor
        if last is None:
            last = add_input(gm, name)
        else:
            with gm.graph.inserting_after(last):
                last = gm.graph.placeholder(name)
        ph = last
        ph.meta["val"] = tensor
        for node in uses[target]:
            node.replace_all_uses_with(ph)
            gm.graph.erase_node(node)
        _drop(gm, target)
    return len(uses)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)
