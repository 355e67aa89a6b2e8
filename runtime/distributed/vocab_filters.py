"""Sampling filters at T > 0 that the merged top candidates do not bound (top-p / min-p without a top-k of at
most ``FILTER_CANDIDATES``, a larger top-k, filters with credit), exact under vocab parallelism, never
gathering [rows, vocab]: ``dlc.kernels.filter_bisect``'s bisection on the survivors' threshold (its one
home, which one GPU's graph runner runs with no group) over each rank's head shard, each search pass (on
CUDA the fused kernels' 16-threshold passes; the torch path's halvings) one all_reduce of the ranks' counts
and masses, the ranks' best draws merged by one all_gather. Eager steps read
the ``bisect_plan`` on the host; a rank's captured variant holds it (``shard_graph.ShardGraphRunner``: the
halvings' all_reduces inside the graph, as the model's)."""
from __future__ import annotations

from dlc.kernels.filter_bisect import bisect_filters

from .vocab import CHUNK


def exact_filters(shard, rows, cond_rows, un_rows, cfg_w, temp, seeds, filters, out: dict, credit=None,
                  filtered_conf: bool = False, plan: str | None = None) -> dict:
    """Tokens, confidences and logprobs of the filtered Gumbel-max for every row (rows without a filter keep
    every id: the sweep's draw) from ``out`` (``finish_stats`` of the merged sweep), updated in place.
    ``shard``: the rank (model, rank, world, group); ``plan``: ``bisect_plan`` (None: read on the host)."""
    from dlc.models.tensor_parallel import head_shard
    w, v0 = head_shard(shard.model, shard.rank, shard.world)
    return bisect_filters(rows, w, v0, shard.config.vocab_size, cond_rows, un_rows, cfg_w, temp, seeds,
                          filters, out, chunk=CHUNK, credit=credit, filtered_conf=filtered_conf, plan=plan,
                          group=shard.group)
