"""Expert parallelism for the MoE families (LLaDA-MoE, LLaDA2 with its shared expert, SDAR-MoE).

``shard_moe_layer(moe, rank, world, group)`` turns one MoE block into this rank's shard of it
(``ExpertParallelMoE``): the same ``forward(x [B, T, d]) -> [B, T, d]`` and the same semantics, where

* the router is replicated: every rank routes every token (``route_tokens`` of the block, so the family's
  own rule: softmax top-k for LLaDA-MoE / SDAR, group-limited sigmoid with expert bias and routed scaling for
  LLaDA2) and gets the same (weights, expert ids), since its input is replicated;
* rank r holds only the routed experts ``[r * E / world, (r + 1) * E / world)`` and computes their weighted
  contribution for the tokens routed to them (the family's ``MOE_IMPLS`` implementation over the local
  experts, zero for tokens routed elsewhere);
* the shared expert (LLaDA2) is tensor parallel when its hidden size divides by ``world``: gate / up split by
  rows (column parallel), down by columns (row parallel), so its partial sum rides the same collective;
  otherwise it is replicated and added after the collective;
* one ``all_reduce`` (sum) over ``group`` of the [tokens, d] partial outputs combines the ranks.

All-reduce rather than all_to_all dispatch / combine: a dLLM step routes few tokens (a Reuse step feeds one
block per sequence), every rank already holds every token (attention is replicated or tensor parallel), and an
all-reduce of [N, d] is one fixed-shape collective that CUDA graphs capture; all_to_all would pay off only for
large Refresh batches. The parameter names of a shard are the checkpoint's (``mlp.gate.weight``,
``mlp.experts.J.*`` for this rank's J only, ``mlp.shared_experts.*``), so ``load_moe_shard`` reads exactly the
tensors (and the shared-expert slices) a rank needs from the safetensors files and nothing else.

``shard_moe_model`` shards every MoE block of a model in place; ``load_expert_parallel`` builds a model on the
meta device, shards it and loads the rank's weights: no rank materialises the other ranks' experts."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from .common import SwiGLU
from .llada2_moe import MoEBlock
from .llada_moe import MOE_IMPLS, Experts, SparseMoeBlock

MOE_BLOCKS = (SparseMoeBlock, MoEBlock)       # the families' MoE blocks (SDAR-MoE uses SparseMoeBlock)
SHARED = "shared_experts"


def expert_range(n_experts: int, rank: int, world: int) -> tuple[int, int]:
    """The experts [lo, hi) rank ``rank`` of ``world`` holds; refuses a split that is not even."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"expert parallel: rank {rank} is not in 0..{world - 1} (world size {world})")
    if n_experts % world:
        raise ValueError(f"expert parallel: n_experts={n_experts} does not divide by the world size {world}; "
                         f"use a size that divides it")
    per = n_experts // world
    return rank * per, (rank + 1) * per


def local_routing(w: torch.Tensor, idx: torch.Tensor, n_experts: int, lo: int, hi: int, grouped: bool):
    """The routing restricted to experts [lo, hi): (weights [N, k'], local ids [N, k']), k' = min(k, hi - lo).
    Tokens' routed experts on this rank come first with their weights; the other slots carry weight 0
    (distinct ids, so the implementations' scatter is well defined; ``grouped`` marks them -1: they run
    nothing)."""
    N = w.shape[0]
    dense = torch.zeros(N, n_experts, dtype=w.dtype, device=w.device).scatter(1, idx, w)[:, lo:hi]  # [N, E_r]
    wl, il = dense.topk(min(idx.shape[1], hi - lo), dim=-1)                                          # [N, k']
    if grouped:
        il = il.masked_fill(wl == 0, -1)
    return wl, il


def _slice_param(p: torch.Tensor, dim: int, a: int, b: int) -> nn.Parameter:
    """Own copy of p[a:b] along ``dim`` (meta stays meta), so the full tensor can be freed."""
    return nn.Parameter(p.detach().narrow(dim, a, b - a).clone(), requires_grad=False)


def _shard_swiglu(mlp: SwiGLU, rank: int, world: int) -> tuple[SwiGLU, dict]:
    """Tensor-parallel shard of a SwiGLU: gate / up rows, down columns. Returns (module, weight slices)."""
    n = mlp.names
    gate = getattr(mlp, n["gate"]).weight
    hidden, d = gate.shape
    h = hidden // world
    a, b = rank * h, (rank + 1) * h
    with torch.device("meta"):
        out = SwiGLU(d, h, n)
    slices = {}
    for key, dim in (("gate", 0), ("up", 0), ("down", 1)):
        lin = getattr(out, n[key])
        lin.weight = _slice_param(getattr(mlp, n[key]).weight, dim, a, b)
        slices[f"{SHARED}.{n[key]}.weight"] = (dim, a, b)
    return out, slices


def _own_storage(module: nn.Module) -> None:
    """Give each parameter that views a larger tensor (experts packed by ``pack_experts`` into [E, 2H, d])
    its own copy, so this rank does not keep the other ranks' experts alive through the shared storage."""
    for mod in module.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.device.type != "meta" and p.untyped_storage().nbytes() > p.numel() * p.element_size():
                setattr(mod, name, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


class ExpertParallelMoE(nn.Module):
    """One rank's shard of a MoE block (see the module docstring). ``weight_slices`` maps each parameter that
    is a slice of a checkpoint tensor (the tensor-parallel shared expert) to (dim, start, stop)."""

    def __init__(self, moe: nn.Module, rank: int, world: int, group=None):
        super().__init__()
        E = len(moe.experts)
        self.lo, self.hi = expert_range(E, rank, world)
        self.n_experts, self.rank, self.world, self.group = E, rank, world, group
        self.impl = moe.impl
        self.gate = moe.gate                                              # the router: replicated
        self.experts = nn.ModuleDict({str(j): moe.experts[j] for j in range(self.lo, self.hi)})
        _own_storage(self.experts)
        router = copy.copy(moe)                                           # routes through the family's own
        router._modules = {"gate": self.gate}                             # route_tokens, without its experts
        self.__dict__["_router"] = router
        self.__dict__["_local"] = Experts(self.experts.values())         # compute view: no second names
        self.weight_slices: dict[str, tuple[int, int, int]] = {}
        self.shared_tp = False
        shared = getattr(moe, SHARED, None)
        if shared is not None:
            hidden = getattr(shared, shared.names["gate"]).weight.shape[0]
            self.shared_tp = hidden % world == 0
            if self.shared_tp:
                shared, self.weight_slices = _shard_swiglu(shared, rank, world)
            self.shared_experts = shared

    def shard_plan(self) -> dict:
        """The tensor-parallel loader's hook (models/tensor_parallel.py): parameters to read as a slice of
        their checkpoint tensor, names relative to this block -> (dim, start, stop); other ranks' experts are
        not parameters here, so the loader skips them."""
        from .tensor_parallel import Slice
        return {name: Slice(*sl) for name, sl in self.weight_slices.items()}

    def extra_repr(self) -> str:
        shared = "" if not hasattr(self, SHARED) else (
            f", shared expert {'tensor parallel' if self.shared_tp else 'replicated'}")
        return f"experts [{self.lo}, {self.hi}) of {self.n_experts}, rank {self.rank} of {self.world}{shared}"

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial outputs [N, d] in place (one all-reduce on the group)."""
        if self.world > 1:
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=self.group)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)                                        # [N, d]
        w, idx = self._router.route_tokens(flat)                          # [N, k]: the same on every rank
        wl, il = local_routing(w, idx, self.n_experts, self.lo, self.hi, self.impl == "grouped")
        y = MOE_IMPLS[self.impl](flat, wl, il, self._local)               # [N, d] this rank's experts' share
        shared = getattr(self, SHARED, None)
        if shared is not None and self.shared_tp:
            y = y + shared(flat)                                          # partial: summed by the all-reduce
        y = self.combine(y)
        if shared is not None and not self.shared_tp:
            y = y + shared(flat)                                          # replicated: added once, after
        return y.view(B, T, d)


def shard_moe_layer(moe_module: nn.Module, rank: int, world: int, group=None) -> ExpertParallelMoE:
    """This rank's expert-parallel shard of one MoE block of the families (see the module docstring)."""
    if not isinstance(moe_module, MOE_BLOCKS):
        raise ValueError(f"expert parallel: {type(moe_module).__name__} is not a MoE block of the dlc "
                         f"families ({', '.join(c.__name__ for c in MOE_BLOCKS)})")
    return ExpertParallelMoE(moe_module, rank, world, group)


def shard_moe_model(model: nn.Module, rank: int, world: int, group=None) -> int:
    """Replace every MoE block of ``model`` by its shard for this rank, in place; returns how many."""
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MOE_BLOCKS)]
    for name, mod in found:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, shard_moe_layer(mod, rank, world, group))
    return len(found)


def weight_slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Full parameter name -> (dim, start, stop) of every parameter that is a slice of a checkpoint tensor."""
    return {f"{name}.{rel}": sl for name, mod in model.named_modules() if isinstance(mod, ExpertParallelMoE)
            for rel, sl in mod.weight_slices.items()}


def load_moe_shard(model: nn.Module, path: str | Path, dtype: torch.dtype, device="cpu",
                   progress: bool = True, rank: int = 0, world: int = 1, slices: dict | None = None) -> int:
    """Fill a sharded model (``shard_moe_model``, typically on the meta device) from the safetensors
    checkpoint at ``path``: the replicated tensors whole, this rank's experts only, the shared expert's slice
    through ``get_slice`` (never the whole tensor). Other ranks' experts are skipped unread; a missing
    or mis-shaped tensor raises ``CheckpointError`` naming it, the file and the rank (the reader is
    ``dlc.models.loading.load_weights`` with this rank's plan). ``slices`` adds the
    (dim, start, stop) slices of other sharded parameters (the tensor-parallel plan of the attention, dense
    MLPs and LM head), so one pass loads a TP + EP rank. Returns the bytes loaded."""
    from .loading import CheckpointError, load_weights
    from .tensor_parallel import Slice

    def as_slice(sl):                     # (dim, start, stop), a Slice, or a tuple of Slices (fused q|k|v)
        return sl if isinstance(sl, Slice) or isinstance(sl[0], tuple) else Slice(*sl)

    plan = {n: as_slice(sl) for n, sl in {**(slices or {}), **weight_slices(model)}.items()}
    try:                                  # the one checkpoint reader, with this rank's plan
        load_weights(model, Path(path), dtype, device, progress, plan=plan,
                     desc=f"loading rank {rank}/{world}")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (rank {rank} of {world})") from None
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def load_expert_parallel(model: str, rank: int, world: int, group=None, weights: str | None = None,
                         dtype=None, device="cpu", progress: bool = True):
    """A checkpoint (preset or directory) as this rank's expert-parallel model: built on the meta device,
    every MoE block sharded, only this rank's weights read. Returns a ``LoadedModel``."""
    from . import build_model
    from .loading import LoadedModel, read_config, resolve_checkpoint_dir, resolve_dtype
    from .presets import PRESETS

    dt = resolve_dtype(dtype, device)
    path = resolve_checkpoint_dir(model, weights)
    if path is None:
        raise ValueError(f"expert parallel: {model!r} is an in-process random preset; save it as a "
                         f"checkpoint (dlc.models.loading.save_checkpoint) and pass the directory")
    cfg = read_config(path)
    if not cfg.is_moe:
        raise ValueError(f"expert parallel: {path} is not a MoE model ({cfg.family}); use tensor parallel")
    with torch.device("meta"):
        m = build_model(cfg)
        shard_moe_model(m, rank, world, group)
    load_moe_shard(m, path, dt, device, progress, rank, world)
    m.eval()
    from .tokenizer import has_tokenizer, load_tokenizer
    tok = load_tokenizer(path) if has_tokenizer(path) else None
    chat = PRESETS[model]["chat"] if model in PRESETS else bool(tok is not None and tok.chat_template)
    return LoadedModel(m, tok, cfg, str(path), chat)
