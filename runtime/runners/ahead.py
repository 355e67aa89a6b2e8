"""Steps run ahead of the host (``step.LookaheadRunner``), shared by the runners that replay a captured
Reuse step: the eager model's ``GraphRunner`` and an engine's ``ProgramGraphs``.

Both stage one batch into static inputs, then call ``launch()`` n times; after each launch the step's tokens
are committed on the device into the static fed ids (``decoding.commit_ahead``), which the next launch reads,
and the step's candidates, confidences and committed block are copied back to the host as the step ends
(``AheadSteps``: one event per step on CUDA), so the host applies step s while the device runs the later
ones."""
from __future__ import annotations

import torch

from ..decoding import commit_ahead
from ..step import AheadSteps


def run_ahead(launch, ids: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
              mask_id: int) -> AheadSteps:
    """``launch() -> (tok [bb, N], conf [bb, N])`` one step over the static inputs; ``ids`` [B, T]: the static
    fed ids of the batch's rows (a view, written in place); ``cols`` [B, N]: the decoded columns inside the
    fed span; ``counts`` [B, n] (device): each row's schedule count per step."""
    (B, N), n, dev = cols.shape, counts.shape[1], ids.device
    cuda = dev.type == "cuda"
    host = dict(dtype=torch.long, pin_memory=cuda)
    out = AheadSteps(torch.empty(n, B, N, **host), None, torch.empty(n, B, N, **host), [] if cuda else None)
    for s in range(n):
        tok, conf = launch()
        if out.conf is None:
            out.conf = torch.empty(n, B, N, dtype=conf.dtype, pin_memory=cuda)
        new = commit_ahead(ids.gather(1, cols), tok[:B], conf[:B], counts[:, s], mask_id)   # [B, N]
        ids.scatter_(1, cols, new)
        for dst, src in ((out.x0, tok), (out.conf, conf), (out.blocks, new)):
            dst[s].copy_(src[:B], non_blocking=cuda)
        if cuda:                                          # step s lands while the later steps run
            out.events.append(torch.cuda.Event())
            out.events[-1].record()
    return out


def decoded_cols(batch, device) -> torch.Tensor:
    """[B, N] the decoded columns of a Reuse batch inside its fed span (Dream's shift included)."""
    B = batch.n_seqs
    first = (batch.out_start - batch.q_start[:B]).to(device)
    return first[:, None] + torch.arange(batch.n_out, device=device)
