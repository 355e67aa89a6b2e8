"""Decoding rules: which masked positions of the active block to unmask at one step.

Every rule implements one contract, ``select(conf, masked, n_sched) -> bool [B, K]``:
``conf`` [B, K] float64 confidences of the block's candidates (-inf where not masked), ``masked`` [B, K] bool,
``n_sched`` [B] int64 the reference schedule's token count for this step (used by ``low_confidence``).
The decoding loop (runtime/generate.py) owns everything else: blocks, caches, sampling, EOS.

* ``schedule``: LLaDA's reference: the top ``n_sched`` masked positions by confidence.
* ``threshold``: Fast-dLLM: every masked position with confidence >= threshold, at least the best one.
* ``factor``: Fast-dLLM's parallel-factor rule: sort descending and accept the longest prefix whose n-th
  confidence (n >= 2) satisfies conf_n >= 1 - factor / (n + 1); the best one is always accepted.
"""
from __future__ import annotations

import torch


def _topk_mask(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-k[b] positions per row (k varies per row): [B, K] bool."""
    order = conf.argsort(dim=-1, descending=True, stable=True)              # [B, K]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return ranks < k[:, None]


class ScheduleRule:
    name = "schedule"
    fixed_steps = True

    def select(self, conf, masked, n_sched):
        # torch.topk per row, as the reference does, so ties break the same way.
        sel = torch.zeros_like(masked)
        for j in range(conf.shape[0]):
            k = int(n_sched[j])
            if k > 0:
                sel[j, torch.topk(conf[j], k=k).indices] = True
        return sel & masked


class ThresholdRule:
    name = "threshold"
    fixed_steps = False

    def __init__(self, threshold: float):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def select(self, conf, masked, n_sched):
        best = _topk_mask(conf, masked.any(-1).long())
        return ((conf >= self.threshold) | best) & masked


class FactorRule:
    name = "factor"
    fixed_steps = False

    def __init__(self, factor: float):
        if factor <= 0:
            raise ValueError(f"factor must be > 0, got {factor}")
        self.factor = factor

    def select(self, conf, masked, n_sched):
        srt = conf.sort(dim=-1, descending=True).values                    # [B, K]
        n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=torch.float64)
        ok = srt >= 1 - self.factor / (n + 1)
        ok[:, 0] = True
        count = ok.long().cumprod(-1).sum(-1)                               # longest accepted prefix
        count = torch.minimum(count, masked.sum(-1))
        return _topk_mask(conf, count) & masked


DECODERS = {"schedule": ScheduleRule, "low_confidence": ScheduleRule, "threshold": ThresholdRule,
            "factor": FactorRule}


def unmask_step(rule, x0: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, n_now, mask_id: int):
    """One step on a block: which positions to unmask, and which rows cannot progress.

    x0 [B, K] candidates, conf [B, K] confidences, masked [B, K]. Threshold and factor rules never accept a
    prediction equal to the mask id (dInfer): such positions are not candidates, and a row whose every masked
    position predicts the mask id is stuck (at T = 0 the next forward would repeat it forever), so the loop
    ends its block. The schedule rule keeps LLaDA's reference behaviour. Returns (select [B, K], stuck [B])."""
    cand = masked if rule.fixed_steps else masked & (x0 != mask_id)
    conf = torch.where(cand, conf, torch.full_like(conf, float("-inf")))
    stuck = masked.any(-1) & ~cand.any(-1)
    return rule.select(conf, cand, n_now), stuck


def make_rule(threshold: float | None = None, factor: float | None = None):
    if threshold is not None and factor is not None:
        raise ValueError("choose either threshold or factor decoding, not both")
    if threshold is not None:
        return ThresholdRule(threshold)
    if factor is not None:
        return FactorRule(factor)
    return ScheduleRule()


def num_transfer_tokens(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: masks split evenly over steps, remainder to the first steps. [B] -> [B, steps]."""
    base = masked_count // steps
    rem = masked_count % steps
    sched = base[:, None].expand(-1, steps).clone()
    sched += (torch.arange(steps, device=masked_count.device)[None] < rem[:, None]).long()
    return sched
