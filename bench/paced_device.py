"""A CPU stand-in for a GPU's pacing: the eager runner whose calls also take *device* time, spent with the
GIL released, and whose Reuse steps can run ahead like the CUDA-graph runner's (``step.LookaheadRunner``:
each step of a run lands one step's device time after the one before, counted from the launch, and the host
waits for it as it would on a CUDA event). The model's own (tiny) CPU time is host time, as a GPU runner's
launches are.

Device time per call: a Reuse step ``step_s + row_s * rows`` (bandwidth-bound: the weights once, a little per
row), a Refresh / full forward ``max(refresh_s, token_s * tokens)`` (compute-bound: proportional to the
tokens fed). ``H200_8B`` is that model fitted to LLaDA-8B on an H200 (../shared/REFERENCE.md section 8 and
bench/RESULTS.md: Refresh 19.9 ms at 768 tokens and 653 ms at 32 x 768; captured Reuse step 6.4 ms at batch 1,
~30 ms at 32), so a serving run on CPU meets the GPU's cost structure: Refresh rows cost their sequence,
Reuse rows a fraction of a step.

What it is for: timing the served path against the in-process engine where the device, not the host, sets
the pace (bench/serve_overhead.py, tests/server/test_serve_overhead.py), and scheduling policies under the
GPU's costs (bench/serve_bench.py --paced). Tokens are the eager runner's, exactly."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from dlc.runtime.runners.ahead import AheadRun, resume
from dlc.runtime.runners.eager import EagerRunner

H200_8B = dict(step_s=5.6e-3, row_s=0.76e-3, refresh_s=3.7e-3, token_s=0.0266e-3)


class Landing:
    """A device event that completes at a fixed time (``synchronize`` sleeps until then: GIL released)."""

    def __init__(self, at: float):
        self.at = at

    def synchronize(self) -> None:
        left = self.at - time.perf_counter()
        if left > 0:
            time.sleep(left)


class PacedRunner(EagerRunner):
    """EagerRunner + device time (module docstring); ``scale`` multiplies every device time. A call returns
    when its device time has passed since it began, or when the host's work (the eager compute) ends if that
    takes longer: the host is hidden behind the device while it is faster."""
    mixes = False               # a mixed iteration runs as one call per group (the graph runner's GPU path)

    def __init__(self, model, step_s: float = 0.004, refresh_s: float = 0.012, row_s: float = 0.0,
                 token_s: float = 0.0, scale: float = 1.0):
        super().__init__(model)
        self.step_s, self.refresh_s, self.row_s, self.token_s = (scale * step_s, scale * refresh_s,
                                                                  scale * row_s, scale * token_s)
        self.stats = {"calls": 0, "ahead_calls": 0, "ahead_continued": 0, "replays": 0, "device_s": 0.0,
                      "idle_s": {}}    # device idle before a launch, by what the launch was
        self._free_at = 0.0                 # perf_counter when the device's queued work ends
        self._ahead: AheadRun | None = None
        self._ahead_dt = 0.0                # device seconds per step of the latest run

    def _step_s(self, batch) -> float:
        return self.step_s + self.row_s * batch.fed

    def _device(self, secs: float, call, batch):
        """The call's outputs once its device time has passed since it began, after the work queued before it
        (the eager compute is the host's launch work, overlapped with the device's)."""
        self._ahead = None                                  # a run ahead's inputs are not kept over a call
        end = self._start(batch.phase) + secs
        out = call(self, batch)
        self._free_at = end
        self.stats["calls"] += 1
        self.stats["device_s"] += secs
        left = end - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return out

    def _start(self, kind: str) -> float:
        """When the device starts a launch made now: now, or when its queued work ends; the idle time before
        it (the gap since the queued work ended; the first launch after a long pause counts up to 50 ms)
        is added to ``stats["idle_s"][kind]``."""
        now = time.perf_counter()
        if self._free_at and now > self._free_at:
            idle = self.stats["idle_s"]
            idle[kind] = idle.get(kind, 0.0) + min(now - self._free_at, 0.05)
        return max(now, self._free_at)

    def _forward_s(self, batch) -> float:
        return max(self.refresh_s, self.token_s * int(batch.lengths.sum()))

    def full(self, batch):
        return self._device(self._forward_s(batch), EagerRunner.full, batch)

    def refresh(self, batch):
        return self._device(self._forward_s(batch), EagerRunner.refresh, batch)

    def reuse(self, batch):
        self.stats["replays"] += 1
        return self._device(self._step_s(batch), EagerRunner.reuse, batch)

    ahead_rules = True          # the decoding core's commit of any rule (step.LookaheadRunner)

    def can_run_ahead(self, batch, commit=None) -> bool:
        """T = 0 Reuse steps; with the core's ``commit`` also the extras (entropy, credit, logprobs,
        smoothing)."""
        ruled = commit is not None and batch.top_k is None
        return (batch.phase == "reuse" and batch.temperature == 0 and batch.cfg_scale == 0
                and (not batch.wants_extras() or ruled))

    @torch.no_grad()
    def reuse_ahead(self, batch, counts: torch.Tensor, commit=None):
        B = batch.n_seqs
        cols = batch.out_start[:, None] + torch.arange(batch.n_out)           # [B, N] in the whole row
        credit = None
        if batch.credit_ids is not None:          # static credit inputs with a column per step to come
            N, M = batch.n_out, batch.credit_ids.shape[-1]
            ids = torch.zeros(B, N, max(N, M), dtype=torch.long)
            vals = torch.zeros(B, N, max(N, M), dtype=torch.float64)
            ids[..., :M], vals[..., :M] = batch.credit_ids, batch.credit_vals
            batch = replace(batch, credit_ids=ids, credit_vals=vals)
            credit = (ids, vals, batch.credit_alpha)
        embed = None
        if batch.soft_tau is not None:            # smoothing: a static soft input [B, N, d] the commit writes
            buf = torch.zeros(B, batch.n_out, self.config.d_model, dtype=self.dtype)
            if batch.embed_delta is not None:
                buf.copy_(batch.embed_delta)      # the model's dtype, as the eager runner's embed_add
            batch = replace(batch, embed_delta=buf)
            embed = (buf, torch.arange(batch.n_out).expand(B, -1))
        self._ahead = AheadRun(lambda: EagerRunner.reuse(self, batch), batch.ids[:B], cols,
                               self.config.mask_id, commit, credit, embed)
        self._ahead_dt = self._step_s(batch)
        self.stats["ahead_calls"] += 1
        return self._paced(self._ahead, counts)

    @torch.no_grad()
    def continue_ahead(self, steps, counts: torch.Tensor):
        self.stats["ahead_continued"] += 1
        return self._paced(resume(self._ahead, steps, "paced runner"), counts)

    def _paced(self, run: AheadRun, counts: torch.Tensor):
        """The run's next steps; step s lands one step's device time after the one before it, the first
        after the device's queued work (or the launch, if the device is idle)."""
        t0, dt = self._start("ahead" if run.launched == 0 else "ahead_more"), self._ahead_dt
        out = run.steps(counts)
        n = counts.shape[1]
        out.events = [Landing(t0 + (s + 1) * dt) for s in range(n)]
        self._free_at = t0 + n * dt
        self.stats["replays"] += n
        self.stats["device_s"] += n * dt
        return out
