"""Phase runners: how the decoding loop runs the model.

A runner answers three calls, each returning (x0 [B, N], confidence [B, N]) for the decoded rows
``out = (a, b)`` of the sequence:

* ``full``: one forward over the whole sequence, no cache (the reference);
* ``refresh``: the same forward that also returns a filled K/V cache (Refresh phase);
* ``reuse``: feeds only the query slice ``q = (qa, qb)`` over the cached K/V, writing the slice's new K/V into
  the cache in place (Reuse phase: prefix schedule = block and everything after; dual = the block).

The eager runner here runs ``dlc.models`` modules; compiled engines provide the same three calls. Runners own
classifier-free guidance (the batch is doubled with the prompt masked) and Dream's logit shift (predictions for
rows [a, b) come from hidden rows [a - 1, b - 1), so the query slice is widened by one on the left)."""
from __future__ import annotations

import torch

from dlc.models.common import DiffusionLM, KVCache

from .sampling import Sampling, guided_logits, sample_tokens


class EagerRunner:
    def __init__(self, model: DiffusionLM):
        self.model = model
        self.config = model.config
        self.shift = model.config.logit_shift

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def _cfg_inputs(self, ids, pos, key_mask, s: Sampling, prompt_mask):
        if s.cfg_scale <= 0:
            return ids, pos, key_mask
        un = torch.where(prompt_mask, torch.full_like(ids, self.config.mask_id), ids)
        return torch.cat([ids, un]), torch.cat([pos, pos]), torch.cat([key_mask, key_mask])

    def _decode(self, hidden: torch.Tensor, s: Sampling):
        logits = self.model.logits(hidden)                                 # [B(*2), N, V]
        if s.cfg_scale > 0:
            cond, un = logits.chunk(2, dim=0)
            logits = guided_logits(cond, un, s.cfg_scale)
        return sample_tokens(logits, s)

    @torch.no_grad()
    def full(self, ids, pos, key_mask, out, s: Sampling, prompt_mask=None):
        a, b = out
        ids2, pos2, km2 = self._cfg_inputs(ids, pos, key_mask, s, prompt_mask)
        h = self.model(ids2, pos2, km2)                                    # [B, L, d]
        return self._decode(h[:, a - self.shift:b - self.shift], s)

    @torch.no_grad()
    def refresh(self, ids, pos, key_mask, out, s: Sampling, prompt_mask=None):
        a, b = out
        ids2, pos2, km2 = self._cfg_inputs(ids, pos, key_mask, s, prompt_mask)
        cache = KVCache.empty(self.config, ids2.shape[0], ids2.shape[1], self.dtype, ids2.device)
        h = self.model(ids2, pos2, km2, cache=cache, start=0)
        x0, conf = self._decode(h[:, a - self.shift:b - self.shift], s)
        return x0, conf, cache

    @torch.no_grad()
    def reuse(self, cache: KVCache, ids, pos, key_mask, q, out, s: Sampling, prompt_mask=None):
        a, b = out
        qa, qb = min(q[0], a - self.shift), q[1]
        ids2, pos2, km2 = self._cfg_inputs(ids, pos, key_mask, s, prompt_mask)
        h = self.model(ids2[:, qa:qb], pos2[:, qa:qb], km2, cache=cache, start=qa)   # [B, qb-qa, d]
        return self._decode(h[:, a - self.shift - qa:b - self.shift - qa], s)


def as_runner(model_or_runner):
    if isinstance(model_or_runner, DiffusionLM):
        return EagerRunner(model_or_runner)
    if all(hasattr(model_or_runner, m) for m in ("full", "refresh", "reuse", "config")):
        return model_or_runner
    raise TypeError(f"expected a dlc model or a phase runner, got {type(model_or_runner).__name__}")
