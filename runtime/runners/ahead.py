"""Steps run ahead of the host (``step.LookaheadRunner``), shared by the runners that replay a captured
Reuse step: the eager model's ``GraphRunner`` and an engine's ``ProgramGraphs``.

Both stage one batch into static inputs, then call ``launch()`` n times; after each launch the step's tokens
are committed on the device into the static fed ids (``decoding.commit_ahead``), which the next launch reads,
and the step's candidates, confidences and committed block are copied back to the host as the step ends
(``AheadSteps``: one event per step on CUDA), so the host applies step s while the device runs the later
ones. Sampled runs (T > 0) copy each step's seeds (``step.ahead_seeds``, on the device) into the runner's
static seeds before its launch. A run goes on from where its last launch left the device
(``AheadRun.steps``: no restaging), which the
engine uses to keep a window of steps in flight (``step.LookaheadRunner.continue_ahead``).

Rules beyond low-confidence: the run takes the decoding core's ``AheadCommit`` (``commit``), which selects
with the rows' own rules, reads the step's extras (entropy) and carries credit in the runner's static credit
inputs (``credit``), writes smoothing's next soft input into the runner's static embedding delta
(``embed``); the extras the host's apply needs land with each step (``AheadSteps.extras``: logprobs too; the
soft embedding stays on the device). Nothing of a rule is decided here."""
from __future__ import annotations

import torch

from ..decoding import AheadCommit, commit_ahead
from ..step import AheadSteps
from ..step_output import EXTRA_KEYS, StepOutput


class AheadRun:
    """One run of steps ahead over a runner's static inputs: ``launch()`` one step -> (tok [bb, N], conf
    [bb, N]), (tok, conf, extras dict of [bb, N] tensors) or a ``StepOutput``; ``ids`` [B, T]: the static fed
    ids of the batch's rows (a view, written in place); ``cols`` [B, N]: the decoded columns inside the fed
    span; ``commit``: the core's ``AheadCommit`` (None: the low-confidence schedule, ``commit_ahead``);
    ``credit``: the static credit inputs the launch reads (ids, vals [bb, N, M], alpha [bb]), which the commit
    carries to the next step; ``embed``: (the static embedding delta [bb, T, d] the launch adds to its fed
    columns, the decoded columns' index in it [B, N]), where the commit writes smoothing's next soft input;
    ``seeds``: the static sampling seeds [>= B] the launch reads (sampled runs stage each step's).
    ``steps(counts, seeds)`` launches more steps from the device state the last launch left
    (``step.LookaheadRunner.continue_ahead``)."""

    def __init__(self, launch, ids: torch.Tensor, cols: torch.Tensor, mask_id: int,
                 commit: AheadCommit | None = None, credit: tuple | None = None, embed: tuple | None = None,
                 seeds: torch.Tensor | None = None):
        self.launch, self.ids, self.cols, self.mask_id = launch, ids, cols, mask_id
        self.commit, self.credit, self.embed, self.seed_buf = commit, credit, embed, seeds
        if commit is not None and commit.credit_on is not None and credit is None:
            raise ValueError("run ahead: credit rows need the runner's static credit inputs")
        if commit is not None and commit.smooth_on is not None and embed is None:
            raise ValueError("run ahead: smoothing rows need the runner's static embedding delta")
        self.launched = 0                                 # steps launched so far

    def steps(self, counts: torch.Tensor, seeds: torch.Tensor | None = None) -> AheadSteps:
        """``counts`` [B, n] (device): each row's schedule count per step; ``seeds`` [B, n] (device) each
        row's sampling seed per step (None: the static seeds as staged, T = 0) -> the n steps'
        ``AheadSteps``."""
        (B, N), n = self.cols.shape, counts.shape[1]
        if (seeds is None) != (self.seed_buf is None):
            raise ValueError("run ahead: a sampled run takes each step's seeds (seeds [B, n]), a T = 0 run "
                             "none")
        cuda = self.ids.device.type == "cuda"
        host = dict(dtype=torch.long, pin_memory=cuda)
        out = AheadSteps(torch.empty(n, B, N, **host), None, torch.empty(n, B, N, **host),
                         [] if cuda else None, run=self)
        reads = keeps = ()
        for s in range(n):
            if seeds is not None:
                self.seed_buf[:B].copy_(seeds[:, s])
            tok, conf, ex = _split(self.launch())
            if out.conf is None:
                out.conf = torch.empty(n, B, N, dtype=conf.dtype, pin_memory=cuda)
                if self.commit is not None:           # logprobs: [B, N, k] alternatives (k: the variant's)
                    reads = tuple(k for k in self.commit.reads if k in ex)
                    keeps = tuple(k for k in self.commit.keeps if k in ex)
                    out.extras = {k: torch.empty((n, *ex[k][:B].shape), dtype=ex[k].dtype, pin_memory=cuda)
                                  for k in reads}
                    out.extras.update({k: torch.empty((n, *ex[k][:B].shape), dtype=ex[k].dtype,
                                                      device=ex[k].device) for k in keeps})   # on the device
            blk = self.ids.gather(1, self.cols)                                                   # [B, N]
            if self.commit is None:
                new = commit_ahead(blk, tok[:B], conf[:B], counts[:, s], self.mask_id)
            else:
                new = self.commit.step(blk, tok[:B], conf[:B], counts[:, s], _rows(ex, B))
                if self.credit is not None:
                    self.commit.carry_credit(self.credit, blk, ex)
                if self.embed is not None:
                    self.commit.carry_smoothing(self.embed, new, ex["soft"])
            self.ids.scatter_(1, self.cols, new)
            pairs = [(out.x0, tok), (out.conf, conf), (out.blocks, new)]
            for dst, src in pairs + [(out.extras[k], ex[k]) for k in reads + keeps]:
                dst[s].copy_(src[:B], non_blocking=cuda)
            if cuda:                                      # step s lands while the later steps run
                out.events.append(torch.cuda.Event())
                out.events[-1].record()
        out.last_block = new
        self.launched += n
        return out


def _split(res) -> tuple:
    """A launch's result -> (tok, conf, extras dict or None)."""
    if isinstance(res, StepOutput):
        return res.x0, res.conf, {k: getattr(res, k) for k in EXTRA_KEYS if getattr(res, k) is not None}
    return res[0], res[1], res[2] if len(res) > 2 else None


def _rows(ex: dict | None, B: int) -> dict | None:
    return None if ex is None else {k: v[:B] for k, v in ex.items()}


def run_ahead(launch, ids: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
              mask_id: int, commit: AheadCommit | None = None, credit: tuple | None = None,
              embed: tuple | None = None, seeds: tuple | None = None) -> AheadSteps:
    """A new run (``AheadRun``) and its first ``counts.shape[1]`` steps; ``seeds``: (the static seeds of a
    sampled run or None, the steps' seeds [B, n] on the device or None; ``AheadRun.steps`` checks that both
    or neither are given), else None."""
    buf, per_step = seeds if seeds is not None else (None, None)
    return AheadRun(launch, ids, cols, mask_id, commit, credit, embed, buf).steps(counts, per_step)


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
