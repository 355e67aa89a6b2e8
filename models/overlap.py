"""Two-micro-batch overlap of a tensor-parallel rank's forward (issue 16; SGLang's two-batch overlap).

A TP rank's layer sums its row-parallel outputs over the group twice (attention output, MLP down projection):
at B = 32 x 32 fed tokens of LLaDA-8B each all-reduce is [1024, 4096] bf16, ~57 us on 2 x H200, 65 per Reuse
step, serialized with the compute. Rows are independent in every op of a forward (attention is per row, the
rest token-wise), so a big step splits its rows into halves A and B and runs each layer's sublayers
interleaved, so that one half's sum is in flight while the other half computes:

    issue B's MLP sum of the layer before | A: attention, issue its sum | wait B's, B: attention, issue
    | wait A's, A: MLP, issue | wait B's, B: MLP (its sum issued at the start of the next layer)

Every sum is a functional all-reduce (``AllReduce.issue`` / ``wait``: NCCL on its own stream, the compute
stream waits only where the sum is used); the row-parallel layers return their partial sums while the
forward runs (``AllReduce.deferred``). A's embedding sum and B's last MLP sum are the only exposed ones.
Each row's arithmetic is the unsplit forward's (x + sum, in the same order), so in fp32 on CPU tokens are
identical with the split on and off.

Compiled blocks (``compile``): one layer of both halves (``overlap_layer``) is compiled as one function, so
the captured step replays Inductor's code in which each sum's wait sits at its first use:
``reorder_for_compute_comm_overlap`` with only the ``sink_waits`` pass, because Inductor otherwise moves a
wait right after its collective (checked with ``TORCH_LOGS=output_code`` on gloo), which would serialize
again. Which steps split: ``splits`` (at least ``min_tokens`` fed tokens and two rows; blocks that have
``attention`` / ``feed_forward`` sublayers and row-parallel outputs without bias: the dense families).
``min_tokens`` 0 turns it off. ``stats``: forwards split (host calls: captures and eager runs, not replays).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .all_reduce import AllReduce
from .common import KVCache

# Default of ``tp_overlap_tokens``: split when the step feeds at least this many tokens. Each half must stay
# compute-bound, or splitting doubles the weight reads for nothing: a bf16 GEMM on an H200 turns compute-bound
# above ~200 rows (989 TFLOP/s over 4.8 TB/s); 1024 tokens (B = 32 x block 32) gives halves of 512.
MIN_TOKENS = 1024


class TwoBatchOverlap:
    """One rank's two-micro-batch forward over ``model`` (its row-parallel layers sum with ``reduce``)."""

    def __init__(self, reduce: AllReduce, min_tokens: int = MIN_TOKENS):
        self.reduce = reduce
        self.min_tokens = check_min_tokens(min_tokens)
        self.layer = overlap_layer                    # compiled by ``compile``
        self.stats = {"split_forwards": 0}

    def compile(self, backend: str = "inductor") -> None:
        """Run each layer of both halves as one compiled function (waits sunk to their first use)."""
        opts = ({"reorder_for_compute_comm_overlap": True,
                 "reorder_for_compute_comm_overlap_passes": ["sink_waits"]} if backend == "inductor" else None)
        self.layer = torch.compile(overlap_layer, fullgraph=True, backend=backend, options=opts)

    def splits(self, ids: torch.Tensor, cache, return_kv: bool) -> bool:
        B, T = ids.shape
        return (self.min_tokens > 0 and B >= 2 and B * T >= self.min_tokens and not return_kv
                and (cache is None or (isinstance(cache, KVCache) and cache.score_index is None)))

    def forward(self, model, ids, cos, sin, mask, cache, start, embed_add):
        """``DiffusionLM.forward``'s embedding, layers and final norm over halves [0, h) and [h, B):
        ids [B, T] -> h [B, T, d]."""
        B, h = ids.shape[0], (ids.shape[0] + 1) // 2
        ar = self.reduce
        self.stats["split_forwards"] += 1
        with ar.deferred():
            xa = ar.wait(ar.issue(model.embed(ids[:h])))                       # [h, T, d]
            if embed_add is not None:
                xa = xa + embed_add[:h].to(xa.dtype)
            pb = model.embed(ids[h:])                                           # partial sum [B - h, T, d]
            xb = torch.zeros_like(pb) if embed_add is None else embed_add[h:].to(pb.dtype)
            rows = None if cache is None else (cache.rows if cache.rows is not None
                                               else torch.arange(B, device=ids.device))
            for i, block in enumerate(model.blocks):
                ckv = None if cache is None else cache.layer(i)._replace(rows=rows)
                a = _half(slice(0, h), cos, sin, mask, ckv, start)
                b = _half(slice(h, B), cos, sin, mask, ckv, start)
                xa, xb, pb = self.layer(ar, block, xa, xb, pb, a, b)
            xb = xb + ar.wait(ar.issue(pb))
        return model.norm(torch.cat([xa, xb]))                                  # [B, T, d]


def overlap_layer(ar: AllReduce, block: nn.Module, xa, xb, pb, a: tuple, b: tuple):
    """One layer over both halves: xa [hA, T, d] complete, xb [hB, T, d] without its last sublayer's sum,
    pb that sublayer's partial sum -> the same three after this layer. Each sum is issued before the other
    half's next sublayer computes and waited for where it is used. ``a`` / ``b``: each half's (cos, sin,
    mask, layer cache, start)."""
    rb = ar.issue(pb)                                    # B's previous MLP sum, while A's attention runs
    att, _ = block.attention(xa, *a)
    ra = ar.issue(att)
    xb = xb + ar.wait(rb)
    att, _ = block.attention(xb, *b)                     # ... while A's attention sum is in flight
    rb = ar.issue(att)
    xa = xa + ar.wait(ra)
    ra = ar.issue(block.feed_forward(xa))                # A's MLP while B's attention sum is in flight
    xb = xb + ar.wait(rb)
    pb = block.feed_forward(xb)                          # B's MLP while A's MLP sum is in flight
    xa = xa + ar.wait(ra)
    return xa, xb, pb


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
        if not (callable(getattr(block, "attention", None)) and callable(getattr(block, "feed_forward", None))):
            return f"{type(block).__name__} has no attention / feed_forward sublayers"
    rows = [m for m in model.modules() if isinstance(m, RowParallelLinear)]
    if len(rows) != 2 * len(model.blocks):
        return "a layer sums its output other than by two row-parallel linears (MoE)"
    if any(m.bias is not None for m in rows):
        return "a row-parallel linear has a bias (added once after the sum)"
    return None


def install(model: nn.Module, reduce: AllReduce, min_tokens: int = MIN_TOKENS) -> TwoBatchOverlap | None:
    """The shard's two-micro-batch forward (``DiffusionLM.forward`` takes it for big steps); None where the
    model cannot split (MoE layers, biased row-parallel outputs) or one device."""
    check_min_tokens(min_tokens)
    if reduce is None or reduce.group is None or unsupported(model):
        model.__dict__.pop("_overlap", None)
        return None
    ov = TwoBatchOverlap(reduce, min_tokens)
    model.__dict__["_overlap"] = ov
    return ov


def of(model: nn.Module) -> TwoBatchOverlap | None:
    """The model's two-micro-batch forward, None when it has none."""
    return model.__dict__.get("_overlap")
