"""One rank's CUDA-graph runner: ``GraphRunner`` over the rank's shard (issue 16, capture per rank).

Every rank holds one (rank 0 inside ``TensorParallelRunner``, the others in ``runner.worker_loop``) and gets
the same calls in the same order: ``bind_pool`` (each rank's own pool of its heads, the same scratch slot for
the padding rows), ``warmup`` (the same buckets captured in the same order), and per step the same StepBatch,
so every rank picks the same bucket (or the same eager fallback), stages it into its static buffers and
replays. The captured Reuse step holds the model's row-parallel all-reduces and the vocab-parallel embedding's
(NCCL on CUDA; on CPU, gloo and ``capture=False``: the same static-buffer step run uncaptured), and decodes
through the vocab-parallel combine (``vocab.py``: per-shard statistics, one small ``all_gather_into_tensor``;
no host sync, never [rows, vocab]), so the collectives stay in lockstep and every rank ends with the same
(x0, conf). NCCL communicators exist before any capture: ``GraphRunner._graph`` runs each step twice on a
side stream before capturing it, and those runs execute the collectives.

Decoding is always the shard's float64 combine (there is no fused selected-row kernel over a vocab slice):
tokens equal ``ShardRunner``'s, which equal one process's on decisive fp32 models. Captured variants exist for
what the combine computes (T > 0 sampling, logprobs, entropy); credit, smoothing and sampling filters are
refused for tensor parallelism (``TensorParallelRunner.check_generation``). Refresh, full forwards, guidance
and block-causal steps run ``GraphRunner``'s eager fallbacks, decoded by the same combine. Blocks are not
torch.compiled here (collectives inside compiled blocks are a later step)."""
from __future__ import annotations

import gc

import torch

from dlc.models.tensor_parallel import head_shard

from ..runners.graph import BUCKETS, GraphRunner
from ..step import StepBatch
from .shard_runner import ShardRunner, extras_of, vocab_decode
from .vocab import combine, shard_stats


class ShardGraphRunner(GraphRunner):
    mixes = False                        # the TP runner sends phase calls only (no mixed iterations)

    def __init__(self, shard: ShardRunner, buckets=BUCKETS, capture: bool | None = None, max_width: int = 128,
                 pool_attention: bool | None = None):
        super().__init__(shard.model, decode="exact", buckets=buckets, capture=capture, compile=False,
                         max_width=max_width, pool_attention=pool_attention)
        self.config = shard.config       # the shard's heads (its KV pool) and the full vocabulary
        self.rank, self.world, self.group = shard.rank, shard.world, shard.group
        self.mixes = False

    def eager(self) -> ShardRunner:
        """The eager shard runner over the same (shard) model."""
        return ShardRunner(self.model, self.config, self.rank, self.world, self.group)

    def bind_pool(self, kv, scratch: int | None = None) -> None:
        """GraphRunner's binding; ``scratch``: rank 0's padding slot, which a worker's pool uses too."""
        super().bind_pool(kv)
        if scratch is not None and self.pool is not None and self.scratch != scratch:
            self.pool.free(self.scratch)
            self.scratch = scratch

    @staticmethod
    def _extras_key(batch: StepBatch):
        """GraphRunner's variants, minus what the vocab-parallel combine does not compute (eager)."""
        ex = GraphRunner._extras_key(batch)
        if ex and (ex.credit_width or ex.smooth_tau or ex.filtered):
            return None
        return ex

    def decode(self, rows: torch.Tensor, batch: StepBatch):
        """Eager steps (Refresh, full, fallbacks): the vocab-parallel combine."""
        return vocab_decode(self, rows, batch)

    def _graph_decode(self, rows: torch.Tensor, g):
        """The captured step's decoding: rows [bb, N, d] -> this shard's statistics, combined over the ranks
        (tok [bb, N], conf [bb, N] float64; with extras ``g.ex`` the StepOutput keys)."""
        ex = g.ex
        w, v0 = head_shard(self.model, self.rank, self.world)
        ar = torch.arange(rows.shape[0], device=rows.device)
        one = torch.ones(1, dtype=rows.dtype, device=rows.device)
        temp, seeds = g.sampling if ex and ex.sampled else (0.0, torch.zeros_like(ar))
        k = max(ex.logprobs, 0) if ex else 0
        st = shard_stats(rows, w, v0, ar, ar, one, temp, seeds, self.config.vocab_size, topk=k,
                         entropy=bool(ex and ex.entropy))
        out = combine(st, self.group, topk=k)
        if not ex:
            return out["tokens"], out["confidence"]
        return extras_of(out, ex.logprobs >= 0, ex.entropy)


def with_graphs(shard, on: bool, capture: bool | None = None):
    """The rank's runner with CUDA graphs on (a ``ShardGraphRunner`` over the shard's model) or off (the eager
    ``ShardRunner``); unchanged if it already is."""
    if on:
        return shard if isinstance(shard, ShardGraphRunner) else ShardGraphRunner(shard, capture=capture)
    return shard.eager() if isinstance(shard, ShardGraphRunner) else shard


def release_graphs(runner) -> None:
    """Free the rank's captured graphs (and their memory pool) before it leaves the process group: while a
    CUDA graph holding NCCL collectives is alive, ``destroy_process_group`` hangs on every rank, even when all
    enter it (measured on 2 x H100: bench/probes/nccl_graph_destroy.py); with the graphs freed it takes 0.5 s."""
    if not isinstance(runner, ShardGraphRunner):
        return
    runner.graphs.clear()
    runner._mempool = None
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
