"""A sliding window of fixed-schedule Reuse steps in flight on the device (the engine's run ahead).

A run covers a lone Reuse group's remaining fixed-schedule steps of its block (``DecodeState.lookahead``). The
first ``window`` steps launch at once (``LookaheadRunner.reuse_ahead``); as each step lands, the engine
launches the next one from the device state the previous launch left (``continue_ahead``: no restaging), then
applies the landed step through the decoding core. So the device never waits for a host round trip inside a
block, and a request that arrives meanwhile waits for the steps in flight only (``window`` x step time: the
engine stops launching while a request waits), not for the run's length.

Variable-count rules (threshold, factor, hierarchical, entropy-bound, credit) do not know their steps in
advance: their run is the block's masks left long (an upper bound); LLaDA2.0's / SDAR's block threshold runs
its schedule, which the threshold may cut short (``DecodeState.ahead_bounded``). For both the engine passes
each launch a horizon (``DecodeState.ahead_horizon``: the steps the masks last at the block's tokens per step
so far), so few steps launch after the block completes; those commit nothing on the device and the host drops
them.

Sampled rows (T > 0) run ahead with each step's seed known in advance (``seeds``: the next draws of each
row's generator, ``step.ahead_seeds``); the engine draws a row's seed from its real generator as it applies
that step, so a step dropped and run again samples with the seed it had."""
from __future__ import annotations

import torch

from .step import AheadSteps


class AheadWindow:
    """Steps ``0 .. n`` of one run ahead over a batch of B rows; ``counts`` [B, n] host int64: each row's
    schedule count per step. At most ``window`` steps are launched and not yet landed (``wait``)."""

    def __init__(self, runner, batch, counts: torch.Tensor, window: int, commit=None,
                 horizon: int | None = None, seeds: torch.Tensor | None = None):
        """``commit``: the core's ``decoding.AheadCommit`` (None: the low-confidence schedule); ``horizon``:
        launch no more than this many steps at first (``DecodeState.ahead_horizon``); ``seeds`` [B, n] host
        int64: each row's sampling seed per step (None: no row samples)."""
        self.runner, self.counts, self.window = runner, counts, max(1, window)
        self.seeds = seeds
        self.n = counts.shape[1]
        self.chunks: list[tuple[int, AheadSteps]] = []      # (first step, its launch's steps)
        self.launched = self.landed = 0
        self.max_in_flight = 0
        first = min(self.window, self.n, max(1, horizon or self.n))
        kw = {} if commit is None else {"commit": commit}
        self._launch(lambda b, c, **sd: runner.reuse_ahead(b, c, **kw, **sd), batch, first)

    def _launch(self, call, first, k: int) -> None:
        cols = slice(self.launched, self.launched + k)
        sd = {} if self.seeds is None else {"seeds": self.seeds[:, cols]}    # T = 0: runners see no seeds
        steps = call(first, self.counts[:, cols], **sd)
        self.chunks.append((self.launched, steps))
        self.launched += k
        self.max_in_flight = max(self.max_in_flight, self.launched - self.landed)

    def refill(self, upto: int | None = None) -> int:
        """Launch steps until ``window`` are in flight (none past the run's end, nor from step ``upto`` on)
        -> how many it launched."""
        k = min(self.window - (self.launched - self.landed), (self.n if upto is None else min(self.n, upto))
                - self.launched)
        if k > 0:
            self._launch(self.runner.continue_ahead, self.chunks[-1][1], k)
        return max(k, 0)

    def _at(self, s: int) -> tuple[AheadSteps, int]:
        for first, steps in reversed(self.chunks):
            if s >= first:
                return steps, s - first
        raise IndexError(s)

    def wait(self, s: int) -> None:
        """Until step s (launched) has landed on the host."""
        steps, i = self._at(s)
        steps.wait(i)
        self.landed = max(self.landed, s + 1)

    def outputs(self, s: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row j's landed step s: (x0 [N] int64, conf [N] float64)."""
        steps, i = self._at(s)
        return steps.x0[i, j], steps.conf[i, j].to(torch.float64)

    def output(self, s: int, j: int):
        """Row j's landed step s as a ``StepOutput`` (with the extras the core's apply reads)."""
        steps, i = self._at(s)
        return steps.output(i, j)

    def last_block(self) -> torch.Tensor:
        """[B, N] on the device: each row's block after the last launched step's commit."""
        return self.chunks[-1][1].last_block

    def fed_block(self, s: int, j: int) -> torch.Tensor:
        """[N] the block row j's step s was fed: the device's commit of step s - 1 (s >= 1)."""
        steps, i = self._at(s - 1)
        return steps.blocks[i, j]
