"""Two-micro-batch overlap of a tensor-parallel rank's forward (issue 16; SGLang's two-batch overlap).

A TP rank's layer sums its row-parallel outputs over the group twice (attention output, MLP down projection):
at B = 32 x 32 fed tokens of LLaDA-8B each all-reduce is [1024, 4096] bf16, ~57 us on 2 x H200, 65 per Reuse
step, serialized with the compute. Rows are independent in every op of a forward (attention is per row, the
rest token-wise), so a big step splits its rows into halves A and B and runs the sublayers interleaved,
A's attention, B's attention, A's MLP, B's MLP, each issuing its output's sum and waiting for the sum before
it only where it is used (the residual add at the start of the half's next sublayer): one half's sum is in
flight while the other half computes.

Sums are functional all-reduces (``AllReduce.issue`` / ``wait``: NCCL on its own stream, the compute stream
waits only where the sum is used, in eager code, in Inductor's and in captured CUDA graphs); the row-parallel
layers and the vocab-parallel embedding return their partial sums while the split forward runs
(``AllReduce.deferred``). Only B's last MLP sum is exposed (and A's embedding sum, behind B's embedding).
Each row's arithmetic is the unsplit forward's (x + sum, in the same order), so in fp32 on CPU tokens are
identical with the split on and off.

Compiled blocks (``compile``): each half's sublayer step (``attention_step``, ``mlp_step``: wait for
the previous sum, residual add, sublayer, issue its sum) is one compiled function, so a captured step
replays Inductor's code in the interleaved order. One function per layer over both halves did not keep it:
Inductor fused the two halves' RMSNorms into one kernel, which put B's wait before A's compute (checked
with ``TORCH_LOGS=output_code`` on gloo). Which steps split: ``splits`` (at least ``min_tokens`` fed tokens
and two rows; blocks with ``attention_branch`` / ``mlp_branch`` sublayers and row-parallel outputs without
bias: the dense families). ``min_tokens`` 0 turns it off. ``stats``: forwards split (host calls: captures and
eager forwards, not replays).

Where it lives: ``for_shard`` builds a shard's ``TwoBatchOverlap`` (``launch.load_shard``); the rank's
``ShardCollectives`` (runtime/distributed/collectives.py) holds it beside the all-reduce and calls its
``forward`` in place of ``DiffusionLM.forward`` for the steps it splits (``DiffusionLM.layer_inputs`` gives
both the same RoPE tables and mask). Nothing is stored on the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .all_reduce import AllReduce
from .common import KVCache

# Default of ``tp_overlap_tokens``: split when the step feeds at least this many tokens; 0: off. Off, because
# it lost where measured: on 2 x H200 (LLaDA-8B shape, bf16, compiled + captured ranks, served B = 32) the
# split at 1024 tokens (halves of 512 rows, each compute-bound) ran 0.96x the unsplit step (bench/RESULTS.md,
# `bench/tp_bench.py --overlap-ab`). TRY_TOKENS is the threshold the bench tries.
MIN_TOKENS = 0
TRY_TOKENS = 1024


class TwoBatchOverlap:
    """One rank's two-micro-batch forward over ``model`` (its row-parallel layers sum with ``reduce``)."""

    def __init__(self, reduce: AllReduce, min_tokens: int = MIN_TOKENS):
        self.reduce = reduce
        self.min_tokens = check_min_tokens(min_tokens)
        self.attention, self.mlp = attention_step, mlp_step             # compiled by ``compile``
        self.stats = {"split_forwards": 0}

    def compile(self, backend: str = "inductor") -> None:
        """Run each half's sublayer step as compiled code (one code object per step kind for every layer)."""
        self.attention = torch.compile(attention_step, fullgraph=True, backend=backend)
        self.mlp = torch.compile(mlp_step, fullgraph=True, backend=backend)

    def splits(self, ids: torch.Tensor, cache, return_kv: bool) -> bool:
        B, T = ids.shape
        return (self.min_tokens > 0 and B >= 2 and B * T >= self.min_tokens and not return_kv
                and (cache is None or (isinstance(cache, KVCache) and cache.score_index is None)))

    def forward(self, model, ids, position_ids, key_mask, cache, start, embed_add):
        """``DiffusionLM.forward`` (its arguments, without ``return_kv``) as embedding, layers and final norm
        over halves [0, h) and [h, B): ids [B, T] -> h [B, T, d]. Each half is (x without its last sum, that
        sum in flight)."""
        B, h = ids.shape[0], (ids.shape[0] + 1) // 2
        cos, sin, mask = model.layer_inputs(ids, position_ids, key_mask, start)
        ar, att, ff = self.reduce, self.attention, self.mlp
        self.stats["split_forwards"] += 1
        halves = (slice(0, h), slice(h, B))
        with ar.deferred():
            xa, sa = _embedded(model, ar, ids[:h], None if embed_add is None else embed_add[:h])
            xb, sb = _embedded(model, ar, ids[h:], None if embed_add is None else embed_add[h:])
            rows = None if cache is None else (cache.rows if cache.rows is not None
                                               else torch.arange(B, device=ids.device))
            for i, block in enumerate(model.blocks):
                ckv = None if cache is None else cache.layer(i)._replace(rows=rows)
                a, b = (_half(r, cos, sin, mask, ckv, start) for r in halves)
                xa, sa = att(ar, block, xa, sa, a)           # A's sums fly while B computes, and back
                xb, sb = att(ar, block, xb, sb, b)
                xa, sa = ff(ar, block, xa, sa)
                xb, sb = ff(ar, block, xb, sb)
            xa, xb = xa + ar.wait(sa), xb + ar.wait(sb)
        return model.norm(torch.cat([xa, xb]))                                  # [B, T, d]


def _embedded(model, ar: AllReduce, ids: torch.Tensor, embed_add) -> tuple:
    """One half's input embedding as (x, sum in flight): x the smoothing add (zeros without), the
    vocab-parallel embedding's partial rows summing (x + sum = embed(ids) + embed_add, as unsplit)."""
    part = model.embed(ids)                                                      # [h, T, d] partial
    x = torch.zeros_like(part) if embed_add is None else embed_add.to(part.dtype)
    return x, ar.issue(part)


def attention_step(ar: AllReduce, block: nn.Module, x, pending, args: tuple):
    """One half's attention sublayer: x [h, T, d] plus its previous sublayer's sum ``pending`` (waited for
    here, at its use) -> (x, the attention output's sum, issued). ``args``: (cos, sin, mask, layer cache,
    start) of the half. A compiled unit of its own: Inductor cannot fuse it with the other half's ops (it
    fused the two halves' RMSNorms into one kernel when a layer of both halves was one function, moving
    B's wait before A's compute)."""
    x = x + ar.wait(pending)
    out, _ = block.attention_branch(x, *args)
    return x, ar.issue(out)


def mlp_step(ar: AllReduce, block: nn.Module, x, pending):
    """One half's MLP sublayer, as ``attention_step``: -> (x, the MLP output's sum, issued)."""
    x = x + ar.wait(pending)
    return x, ar.issue(block.mlp_branch(x))


def _half(rows: slice, cos, sin, mask, ckv, start) -> tuple:
    """One half's layer inputs: the batch rows ``rows`` of every per-row input."""
    if ckv is not None:
        ckv = ckv._replace(rows=ckv.rows[rows],
                           kv_len=None if ckv.kv_len is None else ckv.kv_len[rows],
                           keep=None if ckv.keep is None else ckv.keep[rows],
                           n_keep=None if ckv.n_keep is None else ckv.n_keep[rows])
    st = start[rows] if isinstance(start, torch.Tensor) else start
    return cos[rows], sin[rows], None if mask is None else mask[rows], ckv, st


def check_min_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"tp_overlap_tokens must be an integer >= 0 (0: off), got {n!r}")
    return n


def unsupported(model: nn.Module) -> str | None:
    """Why ``model`` (a TP shard) cannot run the split forward (None: it can)."""
    from .tensor_parallel import RowParallelLinear
    for block in model.blocks:
        if not all(callable(getattr(block, n, None)) for n in ("attention_branch", "mlp_branch")):
            return f"{type(block).__name__} has no attention_branch / mlp_branch sublayers"
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    if len(rows) != 2 * len(model.blocks):
        return "a layer sums its output other than by two row-parallel linears (MoE)"
    if any(m.bias is not None for m in rows):
        return "a row-parallel linear has a bias (added once after the sum)"
    return None


def for_shard(model: nn.Module, reduce: AllReduce, min_tokens: int = MIN_TOKENS) -> TwoBatchOverlap | None:
    """The shard's two-micro-batch forward (held by its ``ShardCollectives``, runtime/distributed/
    collectives.py, which runs it instead of ``model.forward`` for the steps it ``splits``); None where the
    model cannot split (MoE layers, biased row-parallel outputs) or on one device."""
    check_min_tokens(min_tokens)
    if reduce is None or reduce.group is None or unsupported(model):
        return None
    return TwoBatchOverlap(reduce, min_tokens)
