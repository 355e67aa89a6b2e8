"""Phase runners: how the decoding loop runs the model.

A runner answers three calls, each returning (x0 [B, N], confidence [B, N]) for the decoded rows
``out = (a, b)`` of the sequence (each bound an int, or a LongTensor [B] with one width for every row):

* ``full``: one forward over the whole sequence, no cache (the reference);
* ``refresh``: the same forward that also returns a filled K/V cache (Refresh phase);
* ``reuse``: feeds only the query slice ``q = (qa, qb)`` (ints or per row) over the cached K/V, writing the slice's new K/V into
  the cache in place (Reuse phase: prefix schedule = block and everything after; dual = the block).

The eager runner here runs ``dlc.models`` modules; compiled engines provide the same three calls. Runners own
classifier-free guidance (the batch is doubled with the prompt masked) and Dream's logit shift (predictions for
rows [a, b) come from hidden rows [a - 1, b - 1), so the query slice is widened by one on the left)."""
from __future__ import annotations

import torch

from dlc.models.common import DiffusionLM, KVCache

from .sampling import Sampling, guided_logits, sample_tokens


def _take(x: torch.Tensor, a, n: int) -> torch.Tensor:
    """Columns a .. a + n of x [B, T, ...]; ``a`` is an int or a LongTensor [B] (one start per row)."""
    if isinstance(a, int):
        return x[:, a:a + n]
    cols = a[:, None] + torch.arange(n, device=x.device)                # [B, n]
    if x.dim() == 2:
        return x.gather(1, cols)
    return x.gather(1, cols[..., None].expand(-1, -1, x.shape[-1]))


def _width(a, b) -> int:
    w = b - a
    if isinstance(w, torch.Tensor):
        if w.numel() and not bool((w == w[0]).all()):
            raise ValueError(f"per-row spans must have one width for the whole batch, got {w.tolist()}")
        return int(w[0]) if w.numel() else 0
    return int(w)


def _double(a):
    return torch.cat([a, a]) if isinstance(a, torch.Tensor) else a


def cfg_inputs(ids, pos, key_mask, s: Sampling, prompt_mask, mask_id: int):
    """Classifier-free guidance doubles the batch: rows B.. are the same state with the prompt masked."""
    if s.cfg_scale <= 0:
        return ids, pos, key_mask
    if prompt_mask is None:
        raise ValueError("classifier-free guidance (cfg_scale > 0) needs the prompt mask")
    un = torch.where(prompt_mask, torch.full_like(ids, mask_id), ids)
    return torch.cat([ids, un]), torch.cat([pos, pos]), torch.cat([key_mask, key_mask])


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
        return cfg_inputs(ids, pos, key_mask, s, prompt_mask, self.config.mask_id)

    def _decode(self, hidden: torch.Tensor, s: Sampling):
        logits = self.model.logits(hidden)                                 # [B(*2), N, V]
        if s.cfg_scale > 0:
            cond, un = logits.chunk(2, dim=0)
            logits = guided_logits(cond, un, s.cfg_scale)
        return sample_tokens(logits, s)

    def _out_rows(self, h, out, s: Sampling, offset=0):
        """Hidden rows that predict the decoded columns out = (a, b), h's column 0 being ``offset``."""
        a, b = out
        n = _width(a, b)
        a = a - self.shift - offset
        return _take(h, _double(a) if s.cfg_scale > 0 else a, n)

    @torch.no_grad()
    def full(self, ids, pos, key_mask, out, s: Sampling, prompt_mask=None):
        ids2, pos2, km2 = self._cfg_inputs(ids, pos, key_mask, s, prompt_mask)
        h = self.model(ids2, pos2, km2)                                    # [B, L, d]
        return self._decode(self._out_rows(h, out, s), s)

    @torch.no_grad()
    def refresh(self, ids, pos, key_mask, out, s: Sampling, prompt_mask=None, cache: KVCache | None = None):
        ids2, pos2, km2 = self._cfg_inputs(ids, pos, key_mask, s, prompt_mask)
        if cache is None:
            cache = KVCache.empty(self.config, ids2.shape[0], ids2.shape[1], self.dtype, ids2.device)
        elif cache.batch != ids2.shape[0] or cache.seq_len < ids2.shape[1]:
            raise ValueError(f"refresh: cache holds {cache.batch} rows x {cache.seq_len} columns, the batch needs "
                             f"{ids2.shape[0]} x {ids2.shape[1]}")
        h = self.model(ids2, pos2, _pad_keys(km2, cache.seq_len), cache=cache, start=0)
        return *self._decode(self._out_rows(h, out, s), s), cache

    @torch.no_grad()
    def reuse(self, cache: KVCache, ids, pos, key_mask, q, out, s: Sampling, prompt_mask=None):
        """Feed columns q = (qa, qb) over the cache (widened on the left to cover Dream's shifted rows)."""
        qa, qb = q
        a = out[0]
        if self.shift:
            qa = torch.minimum(torch.as_tensor(qa), torch.as_tensor(a - self.shift)) \
                if isinstance(qa, torch.Tensor) or isinstance(a, torch.Tensor) else min(qa, a - self.shift)
        w = _width(qa, qb)
        qa = qa.to(ids.device) if isinstance(qa, torch.Tensor) else qa
        ids2, pos2, km2 = self._cfg_inputs(ids, pos, key_mask, s, prompt_mask)
        qa2 = _double(qa) if s.cfg_scale > 0 else qa
        h = self.model(_take(ids2, qa2, w), _take(pos2, qa2, w), _pad_keys(km2, cache.seq_len), cache=cache,
                       start=qa2)                                          # [B, w, d]
        return self._decode(self._out_rows(h, out, s, offset=qa), s)


def _pad_keys(key_mask: torch.Tensor, S: int) -> torch.Tensor:
    """Key mask [B, L] -> [B, S] for a cache longer than the token state (extra columns are not attended)."""
    L = key_mask.shape[1]
    if S == L:
        return key_mask
    return torch.cat([key_mask, key_mask.new_zeros(key_mask.shape[0], S - L)], dim=1)


def as_runner(model_or_runner):
    if isinstance(model_or_runner, DiffusionLM):
        return EagerRunner(model_or_runner)
    if all(hasattr(model_or_runner, m) for m in ("full", "refresh", "reuse", "config")):
        return model_or_runner
    raise TypeError(f"expected a dlc model or a phase runner, got {type(model_or_runner).__name__}")
