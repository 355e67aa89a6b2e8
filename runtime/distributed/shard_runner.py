"""One rank's runner: the eager runner's forwards over the rank's shard, decoding through the vocab-parallel
head (``vocab.py``). Every rank runs it on the same StepBatch; the collectives inside the model (row-parallel
all-reduces) and in decoding keep them in lockstep, and every rank ends with the same (x0, conf)."""
from __future__ import annotations

import torch

from dlc.models.tensor_parallel import head_shard

from ..runners.eager import EagerRunner
from ..runners.graph import LOGPROB_BUCKETS
from ..step import StepBatch
from ..step_output import StepOutput
from .vocab import combine, fused_stats, shard_stats


class ShardRunner(EagerRunner):
    def __init__(self, model, config, rank: int, world: int, group):
        super().__init__(model)
        self.config = config                   # the shard's config: its heads (sizes its KV pool)
        self.rank, self.world, self.group = rank, world, group

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def decode(self, rows: torch.Tensor, batch: StepBatch):
        return vocab_decode(self, rows, batch)


def vocab_decode(shard, rows: torch.Tensor, batch: StepBatch, fused: bool = False):
    """A shard's decoding (``ShardRunner``, and ``ShardGraphRunner``'s uncaptured steps): rows [fed, N, d] ->
    (x0 [B, N], conf [B, N] float64), or a StepOutput with logprobs / entropy, combined over the ranks.
    ``fused``: a T = 0 step without guidance (the caller checked) through the fused sweep
    (``fused_stats``)."""
    w, v0 = head_shard(shard.model, shard.rank, shard.world)
    temperature = batch.temperature
    if batch.tempered_conf and temperature > 0 and not batch.wants_extras():
        rows, temperature = rows / temperature, 1.0               # as EagerRunner.decode: softmax(l / T)
    k = batch.logprobs or 0
    if fused:                   # k as the graphs' variants round it: one kernel per bucket, not per k
        k = next(b for b in LOGPROB_BUCKETS if b >= k)
        st = fused_stats(rows, w, v0, topk=k, entropy=batch.entropy)
    else:
        st = shard_stats(rows, w, v0, batch.cond_rows, batch.un_rows, batch.cfg_weight(rows.dtype),
                         temperature, batch.seeds, shard.config.vocab_size, topk=k, entropy=batch.entropy)
    out = combine(st, shard.group, topk=k)
    if not batch.wants_extras():
        return out["tokens"], out["confidence"]
    return StepOutput.from_decode(extras_of(out, batch.logprobs is not None, batch.entropy))


def extras_of(out: dict, logprobs: bool, entropy: bool) -> dict:
    """``combine``'s dict -> the keys ``StepOutput`` takes (tokens, confidence and the extras asked for)."""
    res = {"tokens": out["tokens"], "confidence": out["confidence"]}
    if logprobs:                 # logprobs 0: no alternatives (no None values: graph variants copy each key)
        res.update({k: out[k] for k in ("logprob", "topk_ids", "topk_logprobs") if k in out})
    if entropy:
        res["entropy"] = out["entropy"]
    return res
