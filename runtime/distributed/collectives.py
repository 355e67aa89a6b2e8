"""One rank's collectives: the typed home of what a tensor-parallel shard sums with (issue 16).

``ShardCollectives`` holds the rank's all-reduce (``dlc.models.all_reduce.AllReduce``: the backend, its
one-shot cap and symmetric buffer, the op's counts) and its two-micro-batch forward
(``dlc.models.overlap.TwoBatchOverlap``: threshold, compiled half-steps, split counts). ``launch.load_shard``
builds it once per rank: the all-reduce before loading (every parallel layer is built holding it:
``tensor_parallel.shard_modules_``), configured after loading (``all_reduce.setup``, collective), the
overlap from the loaded shard. The rank's runners own it (``ShardRunner.collectives``; a
``ShardGraphRunner`` made from a shard takes the same object, and so does the eager runner it falls back to)
and pass it explicitly where it is needed: the runners' model call (``forward``: the split forward for the
steps it splits, else the model's own), compiling (``compile``), the STATS message's switches (``check`` /
``tune``), the per-rank report (``report``) and leaving the group (``release``). Nothing is stored on the
model or its modules beyond the layers' own ``reduce``, given at construction."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dlc.models.all_reduce import AllReduce
from dlc.models.overlap import TwoBatchOverlap, check_min_tokens


@dataclass(frozen=True, eq=False)
class ShardCollectives:
    reduce: AllReduce                          # every parallel layer's all-reduce (the same object)
    overlap: TwoBatchOverlap | None = None     # the split forward; None: the shard cannot split (MoE, biases)

    def forward(self, model, ids: torch.Tensor, position_ids, key_mask, cache=None, start=0,
                embed_add=None) -> torch.Tensor:
        """The shard's forward of one step: ids [B, T] -> h [B, T, d], through the two-micro-batch forward
        when it ``splits`` the step (at least its threshold of fed tokens, two rows), else ``model``'s own."""
        ov = self.overlap
        if ov is not None and ov.splits(ids, cache, False):
            return ov.forward(model, ids, position_ids, key_mask, cache, start, embed_add)
        return model(ids, position_ids, key_mask, cache=cache, start=start, embed_add=embed_add)

    def compile(self, backend: str) -> None:
        """Compile the split forward's half-steps beside the shard's compiled blocks."""
        if self.overlap is not None:
            self.overlap.compile(backend)

    def check(self, all_reduce: str | None = None, overlap_tokens: int | None = None) -> None:
        """Refuse switches ``tune`` cannot make (ValueError naming the field), before any rank switches."""
        if all_reduce is not None:
            self.reduce.check_switch(all_reduce)
        if overlap_tokens is not None:
            check_min_tokens(overlap_tokens)

    def tune(self, all_reduce: str | None = None, overlap_tokens: int | None = None) -> bool:
        """Switch the all-reduce backend and / or the split threshold (None: unchanged; benches). Returns
        whether a captured graph holds the old choice (the caller drops its graphs: every rank recaptures)."""
        self.check(all_reduce, overlap_tokens)
        stale = False
        if all_reduce is not None:
            self.reduce.switch(all_reduce)
            stale = True
        ov = self.overlap
        if overlap_tokens is not None and ov is not None and ov.min_tokens != overlap_tokens:
            ov.min_tokens = overlap_tokens
            stale = True
        return stale

    def report(self, reset: bool = False) -> dict:
        """``step_times``' per-rank entries: ``all_reduce`` (backend, one-shot cap, the op's choices so far)
        and ``overlap`` (threshold and forwards split since the last reset; None where the shard cannot
        split)."""
        ov = self.overlap
        out = {"all_reduce": self.reduce.report(),
               "overlap": None if ov is None else {"min_tokens": ov.min_tokens, **ov.stats}}
        if reset and ov is not None:
            ov.stats["split_forwards"] = 0
        return out

    def release(self) -> None:
        """Free the symmetric buffer before the rank leaves its group (``AllReduce.release``)."""
        self.reduce.release()
