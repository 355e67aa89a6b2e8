"""A CPU stand-in for a GPU's pacing: the eager runner whose calls also take fixed *device* time, spent with
the GIL released, and whose Reuse steps can run ahead like the CUDA-graph runner's (``step.LookaheadRunner``:
each step of a run lands ``step_s`` after the one before (counted from the launch: the eager compute is
the host's launch work, overlapped with the device's), and the host waits for it as it would on a CUDA
event). The model's own (tiny) CPU time is host time, as a GPU runner's launches are.

What it is for: timing the served path against the in-process engine where the device, not the host, sets
the pace (bench/serve_overhead.py, tests/server/test_serve_overhead.py), so what HTTP, threads and the GIL add
shows as it would on a GPU, without one. Tokens are the eager runner's, exactly."""
from __future__ import annotations

import time

import torch

from dlc.runtime.runners.ahead import run_ahead
from dlc.runtime.runners.eager import EagerRunner


class Landing:
    """A device event that completes at a fixed time (``synchronize`` sleeps until then: GIL released)."""

    def __init__(self, at: float):
        self.at = at

    def synchronize(self) -> None:
        left = self.at - time.perf_counter()
        if left > 0:
            time.sleep(left)


class PacedRunner(EagerRunner):
    """EagerRunner + device time: a Refresh / full call ``refresh_s``, a Reuse step ``step_s`` (the host waits
    for it: sleep), a run of n Reuse steps ahead lands step by step at ``step_s`` intervals after launch."""
    mixes = False               # a mixed iteration runs as one call per group (the graph runner's GPU path)

    def __init__(self, model, step_s: float = 0.004, refresh_s: float = 0.012):
        super().__init__(model)
        self.step_s, self.refresh_s = step_s, refresh_s
        self.stats = {"calls": 0, "ahead_calls": 0, "replays": 0}

    def _device(self, secs: float, out):
        self.stats["calls"] += 1
        time.sleep(secs)
        return out

    def full(self, batch):
        return self._device(self.refresh_s, super().full(batch))

    def refresh(self, batch):
        return self._device(self.refresh_s, super().refresh(batch))

    def reuse(self, batch):
        self.stats["replays"] += 1
        return self._device(self.step_s, super().reuse(batch))

    def can_run_ahead(self, batch) -> bool:
        return (batch.phase == "reuse" and batch.temperature == 0 and batch.cfg_scale == 0
                and not batch.wants_extras())

    @torch.no_grad()
    def reuse_ahead(self, batch, counts: torch.Tensor):
        B, t0 = batch.n_seqs, time.perf_counter()          # the device starts as the host launches
        cols = batch.out_start[:, None] + torch.arange(batch.n_out)           # [B, N] in the whole row
        out = run_ahead(lambda: EagerRunner.reuse(self, batch), batch.ids[:B], cols, counts,
                        self.config.mask_id)
        out.events = [Landing(t0 + (s + 1) * self.step_s) for s in range(counts.shape[1])]
        self.stats["ahead_calls"] += 1
        self.stats["replays"] += counts.shape[1]
        return out
