"""Steps run ahead of the host (``step.LookaheadRunner``), shared by the runners that replay a captured
Reuse step: the eager model's ``GraphRunner`` and an engine's ``ProgramGraphs``.

Both stage one batch into static inputs, then call ``launch()`` n times; after each launch the step's tokens
are committed on the device into the static fed ids (``decoding.commit_ahead``), which the next launch reads,
and the step's candidates, confidences and committed block are copied back to the host as the step ends
(``AheadSteps``: one event per step on CUDA), so the host applies step s while the device runs the later
ones. A run goes on from where its last launch left the device (``AheadRun.steps``: no restaging), which the
engine uses to keep a window of steps in flight (``step.LookaheadRunner.continue_ahead``)."""
from __future__ import annotations

import torch

from ..decoding import commit_ahead
from ..step import AheadSteps


class AheadRun:
    """One run of steps ahead over a runner's static inputs: ``launch() -> (tok [bb, N], conf [bb, N])`` one
    step; ``ids`` [B, T]: the static fed ids of the batch's rows (a view, written in place); ``cols`` [B, N]:
    the decoded columns inside the fed span. ``steps(counts)`` launches more steps from the device state the
    last launch left (``step.LookaheadRunner.continue_ahead``)."""

    def __init__(self, launch, ids: torch.Tensor, cols: torch.Tensor, mask_id: int):
        self.launch, self.ids, self.cols, self.mask_id = launch, ids, cols, mask_id
        self.launched = 0                                 # steps launched so far

    def steps(self, counts: torch.Tensor) -> AheadSteps:
        """``counts`` [B, n] (device): each row's schedule count per step -> the n steps' ``AheadSteps``."""
        (B, N), n = self.cols.shape, counts.shape[1]
        cuda = self.ids.device.type == "cuda"
        host = dict(dtype=torch.long, pin_memory=cuda)
        out = AheadSteps(torch.empty(n, B, N, **host), None, torch.empty(n, B, N, **host),
                         [] if cuda else None, run=self)
        for s in range(n):
            tok, conf = self.launch()
            if out.conf is None:
                out.conf = torch.empty(n, B, N, dtype=conf.dtype, pin_memory=cuda)
            new = commit_ahead(self.ids.gather(1, self.cols), tok[:B], conf[:B], counts[:, s],
                               self.mask_id)                                                      # [B, N]
            self.ids.scatter_(1, self.cols, new)
            for dst, src in ((out.x0, tok), (out.conf, conf), (out.blocks, new)):
                dst[s].copy_(src[:B], non_blocking=cuda)
            if cuda:                                      # step s lands while the later steps run
                out.events.append(torch.cuda.Event())
                out.events[-1].record()
        out.last_block = new
        self.launched += n
        return out


def run_ahead(launch, ids: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
              mask_id: int) -> AheadSteps:
    """A new run (``AheadRun``) and its first ``counts.shape[1]`` steps."""
    return AheadRun(launch, ids, cols, mask_id).steps(counts)


def resume(latest: AheadRun | None, steps: AheadSteps, who: str) -> AheadRun:
    """The run ``steps`` belong to, if it is still the runner's latest (its static inputs untouched since)."""
    if steps.run is None or steps.run is not latest:
        raise ValueError(f"{who}: continue_ahead needs the runner's latest run; another call restaged its "
                         f"static inputs since")
    return latest


def decoded_cols(batch, device) -> torch.Tensor:
    """[B, N] the decoded columns of a Reuse batch inside its fed span (Dream's shift included)."""
    B = batch.n_seqs
    first = (batch.out_start - batch.q_start[:B]).to(device)
    return first[:, None] + torch.arange(batch.n_out, device=device)
