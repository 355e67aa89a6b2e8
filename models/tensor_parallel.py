"""Tensor parallelism for the dense families (LLaDA, Dream; the attention of the others): one rank's shard.

Megatron layout, one all-reduce per sublayer: q/k/v and the MLP's gate/up are column-parallel (each rank
holds whole heads and a slice of the MLP hidden), the attention output and the MLP's down projection are
row-parallel (each rank multiplies its slice and the partial sums are all-reduced). KV heads split across
ranks; with fewer KV heads than ranks each rank keeps the one KV head its query heads read (replicated, the
GQA rule of vLLM). The LM head is vocab-parallel: rank r holds rows [v0, v1) of the head and decodes its
slice (``dlc.runtime.distributed.vocab``); the input embedding too (the same rows; the last rank also the
padding rows past the vocab), combined by one all-reduce. Norms are replicated. Under
``AllReduce.deferred`` the row-parallel layers and the embedding return their partial sums and the caller
sums them (the two-micro-batch forward, ``dlc.models.overlap``).

``shard_modules_`` swaps the model's linears for shard-sized ones (on the meta device before loading, or on a
full model, copying the slices, for the in-process tiny presets) and returns the plan: per parameter name, the
slice of the checkpoint tensor the rank holds (``Slice``), so the loader reads just that slice from the
safetensors file (``get_slice``) and no rank holds the full model. MoE layers go through
``dlc.models.expert_parallel.shard_moe_layer`` when that module exists (called on the meta device before
loading; the loader reads every tensor the returned block still names, whole, plus the slices its optional
``shard_plan()`` lists), else a model with MoE layers is refused.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .all_reduce import AllReduce
from .common import TiedHead
from .config import ModelConfig

ATTN_OUT = ("attn_out", "o_proj", "dense")             # row-parallel attention output (LLaDA, HF, LLaDA2)
MLP_NAMES = (("ff_proj", "up_proj", "ff_out"), ("gate_proj", "up_proj", "down_proj"))   # gate, up, down


class Slice(NamedTuple):
    dim: int          # the sliced dim of the checkpoint tensor
    start: int
    stop: int


class HeadLayout(NamedTuple):
    q: tuple[int, int]         # this rank's query heads [a, b)
    kv: tuple[int, int]        # its KV heads [a, b) (one replicated head when KV heads < ranks)


def head_layout(c: ModelConfig, rank: int, world: int) -> HeadLayout:
    """Query / KV heads of ``rank``; refuses layouts that cannot split evenly (one line naming the
    numbers)."""
    H, K = c.n_heads, c.n_kv_heads
    if H % world:
        raise ValueError(f"tensor_parallel_size {world}: the model's {H} attention heads do not split evenly")
    hq = H // world
    if K >= world:
        if K % world:
            raise ValueError(f"tensor_parallel_size {world}: the model's {K} KV heads do not split evenly "
                             f"(use a size dividing {K}, or a multiple of it)")
        hk = K // world
        return HeadLayout((rank * hq, rank * hq + hq), (rank * hk, rank * hk + hk))
    if world % K:
        raise ValueError(f"tensor_parallel_size {world}: {K} KV heads cannot be replicated evenly (the size "
                         f"must be a multiple of {K})")
    kv = rank * hq // (H // K)                       # the one group this rank's query heads belong to
    return HeadLayout((rank * hq, rank * hq + hq), (kv, kv + 1))


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's rows [v0, v1) of the LM head (ceil-split; the last shard may be shorter)."""
    per = -(-vocab // world)
    return min(vocab, rank * per), min(vocab, (rank + 1) * per)


def shard_config(c: ModelConfig, world: int) -> ModelConfig:
    """What one rank holds, as a ModelConfig: its query / KV heads (head_dim kept explicit). The runtime sizes
    the KV slot pool from it, so each rank's pool holds only its heads; every other field is the model's."""
    if world == 1:
        return c
    lay = head_layout(c, 0, world)
    return dataclasses.replace(c, n_heads=lay.q[1] - lay.q[0], n_kv_heads=lay.kv[1] - lay.kv[0],
                               attn_head_dim=c.head_dim)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) + b: the rank's input slice times its column slice of W, summed over ranks
    by ``reduce`` (the rank's all-reduce, shared by every parallel layer). ``weight`` [out, in / world] keeps
    the checkpoint's parameter name."""

    def __init__(self, in_local: int, out: int, bias: bool, reduce: AllReduce, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, in_local, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out, device=device, dtype=dtype), requires_grad=False) if bias \
            else None
        self.reduce = reduce              # the rank's one all-reduce over its group (models/all_reduce.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reduce(F.linear(x, self.weight))                         # [B, T, out] summed over ranks
        return y if self.bias is None else y + self.bias


def _column(lin: nn.Linear, a: int, b: int, full: bool, ranges: list | None = None) -> nn.Linear:
    """Output rows [a, b) of ``lin`` (or the concatenated ``ranges`` [(a, b), ...]: a fused q|k|v)."""
    ranges = ranges or [(a, b)]
    new = nn.Linear(lin.in_features, sum(y - x for x, y in ranges), bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    if full:
        with torch.no_grad():
            new.weight.copy_(torch.cat([lin.weight[x:y] for x, y in ranges]))
            if lin.bias is not None:
                new.bias.copy_(torch.cat([lin.bias[x:y] for x, y in ranges]))
    new.requires_grad_(False)
    return new


def _row(lin: nn.Linear, a: int, b: int, reduce: AllReduce, full: bool) -> RowParallelLinear:
    new = RowParallelLinear(b - a, lin.out_features, lin.bias is not None, reduce, lin.weight.device,
                            lin.weight.dtype)
    if full:
        with torch.no_grad():
            new.weight.copy_(lin.weight[:, a:b])
            if lin.bias is not None:
                new.bias.copy_(lin.bias)
    return new


def _attention(block: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, module) owning q/k/v: the LLaDA block itself or an HF layer's self_attn."""
    if hasattr(block, "q_proj"):
        return "", block
    for name in ("self_attn", "attention"):                # HF layers; LLaDA2's fused query_key_value
        mod = getattr(block, name, None)
        if mod is not None and (hasattr(mod, "q_proj") or hasattr(mod, "query_key_value")):
            return name + ".", mod
    raise ValueError(f"tensor parallel: {type(block).__name__} has no attention projections to shard; "
                     f"use tensor_parallel_size 1")


def _mlp(block: nn.Module) -> tuple[str, nn.Module, tuple[str, str, str]] | None:
    """(prefix, module, (gate, up, down) names) of a dense SwiGLU MLP, or None (an MoE layer)."""
    for prefix, mod in (("", block), ("mlp.", getattr(block, "mlp", None))):
        for names in MLP_NAMES:
            if mod is not None and all(isinstance(getattr(mod, n, None), nn.Linear) for n in names):
                return prefix, mod, names
    return None


def check_layout(model: nn.Module, world: int) -> None:
    """Refuse, before any process starts, a model this size cannot shard (one line naming the numbers)."""
    head_layout(model.config, 0, world)
    for block in model.blocks:
        _attention(block)
        found = _mlp(block)
        if found is None and _moe_sharder() is None:
            raise ValueError(f"tensor_parallel_size {world}: {model.config.family} has MoE layers "
                             "and this build has no expert parallelism (dlc.models.expert_parallel); use "
                             "tensor_parallel_size 1")
        if found is not None and getattr(found[1], found[2][0]).out_features % world:
            raise ValueError(f"tensor_parallel_size {world}: the MLP hidden size "
                             f"{getattr(found[1], found[2][0]).out_features} does not split evenly")


def _moe_sharder():
    try:
        from .expert_parallel import shard_moe_layer
    except ImportError:
        return None
    return shard_moe_layer


def shard_modules_(model: nn.Module, rank: int, world: int, reduce: AllReduce,
                   full: bool = False) -> dict[str, Slice]:
    """Replace the model's linears by this rank's shards, in place; returns the plan (parameter name ->
    ``Slice`` of the checkpoint tensor; replicated parameters are absent). ``reduce``: the rank's all-reduce
    over its group (``reduce.group``), given to every row-parallel layer and the embedding (one object,
    configured once loaded: ``all_reduce.setup``). ``full``: the model holds real full weights (tiny
    presets) and the slices are copied; else it is on the meta device, to be loaded."""
    c: ModelConfig = model.config
    lay = head_layout(c, rank, world)
    plan: dict[str, Slice] = {}
    blocks_prefix = _blocks_prefix(model)
    for i, block in enumerate(model.blocks):
        pre = f"{blocks_prefix}.{i}."
        ap, attn = _attention(block)
        shard_attention_(attn, pre + ap, lay, c, reduce, full, plan)
        _shard_mlp(block, pre, rank, world, reduce, full, plan, c)
    _shard_head(model, rank, world, full, plan)
    _shard_embedding(model, rank, world, reduce, full, plan)
    return plan


def shard_attention_(attn: nn.Module, pre: str, lay: HeadLayout, c: ModelConfig, reduce: AllReduce,
                     full: bool, plan: dict) -> None:
    """One attention module -> its shard (heads ``lay``), in place; records the slices under ``pre``."""
    hd = c.head_dim
    q, kv = (lay.q[0] * hd, lay.q[1] * hd), (lay.kv[0] * hd, lay.kv[1] * hd)
    if hasattr(attn, "query_key_value"):          # rows: q heads | k heads | v heads, each rank's three spans
        H, K = c.n_heads * hd, c.n_kv_heads * hd
        ranges = [q, (H + kv[0], H + kv[1]), (H + K + kv[0], H + K + kv[1])]
        lin = attn.query_key_value
        plan[pre + "query_key_value.weight"] = tuple(Slice(0, a, b) for a, b in ranges)
        if lin.bias is not None:
            plan[pre + "query_key_value.bias"] = tuple(Slice(0, a, b) for a, b in ranges)
        attn.query_key_value = _column(lin, 0, 0, full, ranges)
    else:
        for name, (a, b) in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            _record(plan, pre + name, getattr(attn, name), 0, a, b)
            setattr(attn, name, _column(getattr(attn, name), a, b, full))
    out_name = next(n for n in ATTN_OUT if hasattr(attn, n))
    plan[pre + out_name + ".weight"] = Slice(1, *q)
    setattr(attn, out_name, _row(getattr(attn, out_name), *q, reduce, full))
    attn.n_heads, attn.n_kv = lay.q[1] - lay.q[0], lay.kv[1] - lay.kv[0]


def _shard_mlp(block, pre, rank, world, reduce, full, plan, c) -> None:
    found = _mlp(block)
    if found is None:
        sharder = _moe_sharder()
        if sharder is None:
            raise ValueError(f"tensor_parallel_size {world}: {c.family} has MoE layers and this build has no "
                             f"expert parallelism (dlc.models.expert_parallel); use tensor_parallel_size 1")
        block.mlp = sharder(block.mlp, rank, world, reduce.group)  # on the meta device when loading
        sub = getattr(block.mlp, "shard_plan", None)             # slices it needs read (e.g. a TP shared
        if callable(sub):                                        # expert), names relative to the MoE block
            plan.update({f"{pre}mlp.{k}": v for k, v in sub().items()})
        return
    mp, mlp, (g, u, d) = found
    hidden = getattr(mlp, g).out_features
    if hidden % world:
        raise ValueError(f"tensor_parallel_size {world}: the MLP hidden size {hidden} does not split evenly")
    a, b = rank * hidden // world, (rank + 1) * hidden // world
    for name in (g, u):
        _record(plan, pre + mp + name, getattr(mlp, name), 0, a, b)
        setattr(mlp, name, _column(getattr(mlp, name), a, b, full))
    plan[pre + mp + d + ".weight"] = Slice(1, a, b)
    setattr(mlp, d, _row(getattr(mlp, d), a, b, reduce, full))


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the input embedding: ids outside give zeros, one all-reduce sums the ranks
    (exactly one rank contributes each row, so the sum is the row itself, bit for bit)."""

    def __init__(self, start: int, n: int, d: int, reduce: AllReduce, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype), requires_grad=False)
        self.start = start
        self.reduce = reduce              # the rank's one all-reduce over its group (models/all_reduce.py)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])                 # [B, T]
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # [B, T, d]
        x = x * inside[..., None].to(x.dtype)
        return self.reduce(x)


def embedding_range(c: ModelConfig, rank: int, world: int) -> tuple[int, int]:
    """This rank's embedding rows: its head rows [v0, v1), the last rank also the padding rows past vocab."""
    v0, v1 = vocab_range(c.vocab_size, rank, world)
    return v0, (c.embedding_size if rank == world - 1 else v1)


def _replace(model, old: nn.Module, new: nn.Module) -> str:
    """Put ``new`` where ``old`` sits in the module tree; returns its qualified name."""
    for parent_name, parent in model.named_modules():
        for attr, child in list(parent.named_children()):
            if child is old:
                setattr(parent, attr, new)
                return f"{parent_name}.{attr}".lstrip(".")
    raise ValueError(f"tensor parallel: {type(old).__name__} is not in the model")


def _shard_head(model, rank, world, full, plan) -> None:
    """An untied head keeps only rows [v0, v1); a tied head is the embedding, sharded the same way."""
    if model.config.tie_embeddings:
        return
    v0, v1 = vocab_range(model.config.vocab_size, rank, world)
    head = model.head
    name = _replace(model, head, _column(head, v0, v1, full))
    _record(plan, name, head, 0, v0, v1)


def _shard_embedding(model, rank, world, reduce, full, plan) -> None:
    old = model.embed
    e0, e1 = embedding_range(model.config, rank, world)
    w = old.weight
    new = VocabParallelEmbedding(e0, e1 - e0, w.shape[1], reduce, w.device, w.dtype)
    if full:
        with torch.no_grad():
            new.weight.copy_(old.weight[e0:e1])
    plan[_replace(model, old, new) + ".weight"] = Slice(0, e0, e1)
    if isinstance(model.head, TiedHead):          # the tied head reads the new (sharded) embedding
        model.head.tie(new)


def head_shard(model, rank: int, world: int) -> tuple[torch.Tensor, int]:
    """(this rank's head rows [v1 - v0, d], v0): the first rows of the tied embedding's shard, or the sharded
    head."""
    v0, v1 = vocab_range(model.config.vocab_size, rank, world)
    if model.config.tie_embeddings:
        return model.embed.weight[: v1 - v0], v0
    return model.head_weight(), v0


def _record(plan, name, lin, dim, a, b) -> None:
    plan[name + ".weight"] = Slice(dim, a, b)
    if lin.bias is not None:
        plan[name + ".bias"] = Slice(0, a, b)


def _blocks_prefix(model) -> str:
    for name, mod in model.named_modules():
        if mod is model.blocks:
            return name
    raise ValueError("tensor parallel: the model has no blocks list")


def read_slice(f, name: str, sl: Slice | tuple | None) -> torch.Tensor:
    """One tensor of an open safetensors file, only the rank's slice of it (``get_slice``: the other rows
    are never read into memory)."""
    if sl is None:
        return f.get_tensor(name)
    if not isinstance(sl, Slice):                 # a fused q|k|v: the rank's spans, concatenated
        return torch.cat([read_slice(f, name, s) for s in sl])
    part = f.get_slice(name)
    if sl.dim == 0:
        return part[sl.start:sl.stop]
    return part[:, sl.start:sl.stop]
