"""The eager runner: ``dlc.models`` modules over a StepBatch
(the reference every other runner is tested against).

* ``full``: one forward over the whole sequence, no cache;
* ``refresh``: the same forward writing every column's K/V into the batch's KV pool rows (Refresh phase);
* ``reuse``: feeds only the fed span over the cached K/V, writing the span's new K/V in place (Reuse phase:
  prefix = block and everything after; dual = the block).

Decoding is ``dlc.kernels.logits.decode_rows``, the function the compiler's CPU lowering inlines into phase
programs: guidance on the logits, Gumbel-max with the hash noise of each sequence's step seed, confidence =
softmax probability of the chosen token in float64, vocab in chunks so no [B, N, V] float64 tensor exists."""
from __future__ import annotations

import torch

from dlc.kernels.logits import decode_rows
from dlc.kernels.sampling import decode_rows_ext
from dlc.models.common import DiffusionLM

from ..step import StepBatch, attention_keys, take_cols, take_rows
from ..step_output import StepOutput

VOCAB_CHUNK = 32768          # head rows per decoding chunk (bounds the float64 transient at large batch)


def pad_keys(key_mask: torch.Tensor, S: int) -> torch.Tensor:
    """Key mask [B, W] -> [B, S] for a cache longer than the batch (extra columns are not attended)."""
    W = key_mask.shape[1]
    if W > S:
        raise ValueError(f"the batch is {W} columns wide, the KV cache holds {S}")
    if S == W:
        return key_mask
    return torch.cat([key_mask, key_mask.new_zeros(key_mask.shape[0], S - W)], dim=1)


class EagerRunner:
    sparse_retention = None
    max_batch_size = None

    def __init__(self, model: DiffusionLM):
        self.model = model
        self.config = model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def decode(self, rows: torch.Tensor, batch: StepBatch):
        """rows [fed, N, d] hidden rows of the decoded columns -> (x0 [B, N], conf [B, N] float64), or a
        StepOutput with the extras the batch asks for.
        ``tempered_conf``: the rows are scaled by 1 / T and decoded at temperature 1 (logits are linear in the
        rows): the same Gumbel-max draw (tokens equal up to rounding), confidence = softmax(logits / T) of the
        token, as LLaDA2's and SDAR's samplers report it (not applied to extras' batches)."""
        if batch.wants_extras():
            return StepOutput.from_decode(decode_extras(rows, self.model, batch, VOCAB_CHUNK))
        temperature = batch.temperature
        if batch.tempered_conf and temperature > 0:
            rows, temperature = rows / temperature, 1.0
        return decode_rows(rows, self.model.head_weight(), batch.cond_rows, batch.un_rows,
                           batch.cfg_weight(rows.dtype), temperature, batch.seeds,
                           vocab=self.config.vocab_size, chunk=VOCAB_CHUNK, topk=0)

    @torch.no_grad()
    def full(self, batch: StepBatch):
        h = self.model(batch.ids, batch.pos, attention_keys(batch, batch.key_mask, batch.pos),
                       embed_add=embed_add(batch, batch.width, 0, self.dtype))   # [fed, W, d]
        return self.decode(take_rows(h, batch.hid_start, batch.n_out), batch)

    @torch.no_grad()
    def refresh(self, batch: StepBatch):
        c = batch.cache.narrow(batch.width)           # keys [0, W): the sequences, not the whole slot
        full = c.seq_len == batch.width and not batch.block_size and bool((batch.lengths == batch.width).all())
        keys = None if full else attention_keys(batch, pad_keys(batch.key_mask, c.seq_len), batch.pos)
        h = self.model(batch.ids, batch.pos, keys, cache=c, start=0,
                       embed_add=embed_add(batch, batch.width, 0, self.dtype))
        return self.decode(take_rows(h, batch.hid_start, batch.n_out), batch)

    @torch.no_grad()
    def reuse(self, batch: StepBatch):
        c, qs, T = batch.cache, batch.q_start_dev, batch.n_fed
        pos = take_cols(batch.pos, qs, T)
        keys = attention_keys(batch, pad_keys(batch.key_mask, c.seq_len), pos)
        h = self.model(take_cols(batch.ids, qs, T), pos, keys, cache=c, start=qs,
                       embed_add=embed_add(batch, T, qs, self.dtype))                 # [fed, T, d]
        return self.decode(take_rows(h, batch.hid_start - qs, batch.n_out), batch)


def decode_extras(rows: torch.Tensor, model: DiffusionLM, batch: StepBatch, chunk: int) -> dict:
    """``decode_rows_ext`` over a batch that wants extras (the eager runner's and the graph runner's)."""
    vocab = model.config.vocab_size
    credit = None
    if batch.credit_ids is not None:
        credit = (batch.credit_ids, batch.credit_vals, batch.credit_alpha)
    soft = None if batch.soft_tau is None else (model.embed.weight[:vocab], batch.soft_tau)
    filters = None if batch.top_k is None else (batch.top_k, batch.top_p, batch.min_p)
    return decode_rows_ext(rows, model.head_weight(), batch.cond_rows, batch.un_rows,
                           batch.cfg_weight(rows.dtype), batch.temperature, batch.seeds, vocab=vocab, chunk=chunk,
                           topk=batch.logprobs or 0, logprobs=batch.logprobs is not None, entropy=batch.entropy,
                           credit=credit, soft=soft, filters=filters)


def embed_add(batch: StepBatch, T: int, start, dtype) -> torch.Tensor | None:
    """Smoothing's soft inputs as an embedding delta [fed, T, d] over the fed columns (fed from ``start``: 0 or
    q_start [fed]): ``embed_delta`` lands on the decoded columns [out_start, + N), zeros elsewhere."""
    d = batch.embed_delta
    if d is None:
        return None
    out = torch.zeros(batch.fed, T, d.shape[-1], dtype=dtype, device=d.device)
    first = batch.out_start.to(d.device) - start                                  # [fed] column in the slice
    cols = first[:, None] + torch.arange(batch.n_out, device=d.device)            # [fed, N]
    return out.scatter(1, cols[..., None].expand(-1, -1, d.shape[-1]), d.to(dtype))
