"""The eager runner: ``dlc.models`` modules over a StepBatch
(the reference every other runner is tested against).

* ``full``: one forward over the whole sequence, no cache;
* ``refresh``: the same forward writing every column's K/V into the batch's KV pool rows (Refresh phase);
* ``reuse``: feeds only the fed span over the cached K/V, writing the span's new K/V in place (Reuse phase:
  prefix = block and everything after; dual = the block);
* ``mixed``: the groups of one iteration (a ``MixedBatch``: Refresh rows beside Reuse rows) as ONE ragged
  forward, each part's inputs and attention exactly its own call's, the weights read once.

Head-sparse (``sparse_retention``, Sparse-dLLM's head-centric attention, as head-sparse engines run it):
a Refresh also writes every layer's per-head key scores of the decoded block into the pool
(``KVCache.score_index``), and a Reuse step attends per head over the kept columns ``batch.keep_idx`` only
(``KVCache.keep``: ``dlc.kernels.pool_attention`` with ``cols``, reading just those K/V from the pool).

Decoding is ``dlc.kernels.logits.decode_rows``, the function the compiler's CPU lowering inlines into phase
programs: guidance on the logits, Gumbel-max with the hash noise of each sequence's step seed, confidence =
softmax probability of the chosen token in float64, vocab in chunks so no [B, N, V] float64 tensor exists."""
from __future__ import annotations

import torch

from dlc.kernels.logits import decode_rows
from dlc.kernels.sampling import decode_rows_ext, filter_route
from dlc.models.common import DiffusionLM, RaggedPart

from ..step import MixedBatch, StepBatch, attention_keys, take_cols, take_rows
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
    mixes = True               # step.MixedRunner: a mixed iteration runs as one ragged forward (``mixed``)

    def __init__(self, model: DiffusionLM, sparse_retention: float | None = None):
        self.model = model
        self.config = model.config
        if sparse_retention is not None:
            if not 0 < sparse_retention <= 1:
                raise ValueError(f"sparse_retention must be in (0, 1], got {sparse_retention}")
            if model.config.block_diffusion:
                raise ValueError("sparse_retention: head-sparse attention needs a bidirectional model "
                                 "(block diffusion models attend block-causally)")
            self.sparse_retention = float(sparse_retention)

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
        ``tempered_conf`` (LLaDA2, SDAR) at T > 0: the rows are scaled by 1 / T and decoded at temperature 1
        (logits are linear in the rows): the same Gumbel-max draw (tokens equal up to rounding), and every
        output under softmax(logits / T): the confidence, as LLaDA2's and SDAR's samplers report it, and with
        sampling filters the probability renormalised over the filters' survivors (their top-k / top-p
        samplers)."""
        if batch.wants_extras():
            return decode_step_extras(rows, self.model.head_weight(), self.model.embed.weight,
                                      self.config.vocab_size, batch)
        return self._decode(rows, batch.cond_rows, batch.un_rows, batch.cfg_weight(rows.dtype),
                            batch.temperature, batch.tempered_conf, batch.seeds)

    def _decode(self, rows, cond_rows, un_rows, cfg_w, temperature: float, tempered: bool, seeds):
        rows, temperature = _tempered(rows, temperature, tempered)
        return decode_rows(rows, self.model.head_weight(), cond_rows, un_rows, cfg_w, temperature, seeds,
                           vocab=self.config.vocab_size, chunk=VOCAB_CHUNK, topk=0)

    def inputs(self, batch: StepBatch) -> RaggedPart:
        """The model inputs of the batch's forward: every column (full, refresh: start 0) or the fed span
        (reuse: from q_start, its K/V written in place), keys padded to the cache's length. A Refresh attends
        over its width only (``KVCache.narrow``), without a mask when no row is padded (SDPA's flash
        kernel)."""
        c = self._sparse_view(batch)
        if batch.phase == "refresh":                # keys [0, W): the sequences, not the whole slot
            c = c.narrow(batch.width)
        keys = batch.key_mask if c is None else pad_keys(batch.key_mask, c.seq_len)
        if batch.phase != "reuse":
            unpadded = (batch.phase == "refresh" and c.seq_len == batch.width and not batch.block_size
                        and batch.unpadded())
            # no padding: no mask
            return RaggedPart(batch.ids, batch.pos,
                              None if unpadded else attention_keys(batch, keys, batch.pos), c, 0,
                              embed_add(batch, batch.width, 0, self.dtype))
        qs, T = batch.q_start_dev, batch.n_fed
        pos = take_cols(batch.pos, qs, T)                                          # [fed, T]
        return RaggedPart(take_cols(batch.ids, qs, T), pos, attention_keys(batch, keys, pos), c, qs,
                          embed_add(batch, T, qs, self.dtype))

    def _sparse_view(self, batch: StepBatch):
        """The batch's cache, for head-sparse steps with what the model needs: a Refresh the hidden rows
        whose queries score the keys; a Reuse its kept columns, their count and the rows' key lengths."""
        c = batch.cache
        if self.sparse_retention is None or c is None:
            return c
        if batch.phase == "refresh":
            if c.scores is None:
                raise ValueError("head-sparse refresh needs a KV pool with head scores "
                                 "(KVCacheManager(head_scores=True))")
            idx = batch.hid_start[:, None] + torch.arange(batch.n_out, device=batch.hid_start.device)
            return c.with_(score_index=idx)                                           # [fed, N]
        if batch.phase == "reuse" and batch.keep_idx is not None:
            keep = batch.keep_idx                                                     # [nl, fed, Hkv, K]
            n = torch.full((batch.fed,), keep.shape[-1], dtype=torch.long, device=keep.device)
            return c.with_(keep=keep, n_keep=n, kv_len=batch.lengths.to(keep.device, non_blocking=True))
        return c

    @staticmethod
    def decoded_rows(h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """The hidden rows [fed, N, d] of the decoded columns out of the forward's h [fed, T, d]."""
        first = batch.hid_start - batch.q_start_dev if batch.phase == "reuse" else batch.hid_start
        return take_rows(h, first, batch.n_out)

    def model_forward(self, ids, pos, key_mask, cache=None, start=0, embed_add=None) -> torch.Tensor:
        """One step's forward: ids [B, T] -> h [B, T, d]. The model's own; a tensor-parallel shard's runners
        run it through their ``ShardCollectives`` (the two-micro-batch forward for big steps)."""
        return self.model(ids, pos, key_mask, cache=cache, start=start, embed_add=embed_add)

    def _run(self, batch: StepBatch):
        p = self.inputs(batch)
        h = self.model_forward(p.ids, p.pos, p.key_mask, cache=p.cache, start=p.start, embed_add=p.embed_add)
        return self.decode(self.decoded_rows(h, batch), batch)

    @torch.no_grad()
    def full(self, batch: StepBatch):
        return self._run(batch)

    @torch.no_grad()
    def refresh(self, batch: StepBatch):
        return self._run(batch)

    @torch.no_grad()
    def reuse(self, batch: StepBatch):
        return self._run(batch)

    @torch.no_grad()
    def mixed(self, batch: MixedBatch) -> list:
        """Every part of the batch in one ragged forward (``DiffusionLM.forward_ragged``: one pass over the
        weights, attention per part), then the parts' decoding; parts that decode alike share one pass over
        the LM head (``decode_parts``)."""
        hs = self.model.forward_ragged([self.inputs(b) for b in batch.parts])
        return self.decode_parts([self.decoded_rows(h, b) for h, b in zip(hs, batch.parts)], batch.parts)

    def decode_parts(self, rows: list[torch.Tensor], parts) -> list:
        """Each part's decoding of its rows [fed_i, N_i, d]: one ``decode_rows`` over all of them when no part
        wants extras and they share the decoded width, temperature and guidance, else one per part."""
        b0 = parts[0]
        key = [(b.n_out, b.temperature, b.tempered_conf, b.cfg_scale + 1.0 if b.fed != b.n_seqs else 1.0)
               for b in parts]
        if any(b.wants_extras() for b in parts) or len(set(key)) > 1:
            return [self.decode(r, b) for r, b in zip(rows, parts)]
        offs = torch.tensor([0] + [b.fed for b in parts[:-1]]).cumsum(0).tolist()
        cond = torch.cat([b.cond_rows + o for b, o in zip(parts, offs)])
        un = torch.cat([b.un_rows + o for b, o in zip(parts, offs)])
        x0, conf = self._decode(torch.cat(rows), cond, un, b0.cfg_weight(rows[0].dtype), b0.temperature,
                                b0.tempered_conf, torch.cat([b.seeds for b in parts]))
        n = [b.n_seqs for b in parts]
        return list(zip(x0.split(n), conf.split(n)))


def _tempered(rows: torch.Tensor, temperature: float, tempered: bool):
    """(rows, temperature) to decode: with ``tempered_conf`` at T > 0, rows / T at temperature 1."""
    if tempered and temperature > 0:
        return rows / temperature, 1.0
    return rows, temperature


def decode_step_extras(rows: torch.Tensor, head: torch.Tensor, embed: torch.Tensor, vocab: int,
                       batch: StepBatch) -> StepOutput:
    """A batch that wants extras, decoded from its rows [fed, N, d] with the LM head and the input embedding
    (both [>= vocab, d]): the eager runner's decoding (the graph runner's eager fallback's too), and a
    compiled engine's for what its programs leave to the runner (smoothing's soft embedding, T > 0 sampling
    filters: runners/compiled.py), so those rules have this one home."""
    rows, temperature = _tempered(rows, batch.temperature, batch.tempered_conf)
    return StepOutput.from_decode(decode_extras(rows, head, embed, vocab, batch, VOCAB_CHUNK, temperature,
                                                filtered_conf=batch.tempered_conf))


def decode_extras(rows: torch.Tensor, head: torch.Tensor, embed: torch.Tensor, vocab: int, batch: StepBatch,
                  chunk: int, temperature: float | None = None, filtered_conf: bool = False) -> dict:
    """``decode_rows_ext`` over a batch that wants extras; ``temperature``: instead of the batch's (rows
    already scaled by 1 / T: 1.0)."""
    credit = batch.credit()
    soft = None if batch.soft_tau is None else (embed[:vocab], batch.soft_tau, batch.soft_top_k)
    filters = None if batch.top_k is None else (batch.top_k, batch.top_p, batch.min_p)
    temp = batch.temperature if temperature is None else temperature
    route = None                     # filters at T > 0: the candidates or the bisection, never the sort (one
    if filters is not None and batch.temperature > 0:          # host read, as the graph runner's variants)
        route = filter_route(*filters, filtered_conf=filtered_conf, credit=credit is not None)
    return decode_rows_ext(rows, head, batch.cond_rows, batch.un_rows,
                           batch.cfg_weight(rows.dtype), temp, batch.seeds, vocab=vocab, chunk=chunk,
                           topk=batch.logprobs or 0, logprobs=batch.logprobs is not None,
                           entropy=batch.entropy, credit=credit, soft=soft, filters=filters,
                           filtered_conf=filtered_conf, candidates=route)


def embed_add(batch: StepBatch, T: int, start, dtype) -> torch.Tensor | None:
    """Smoothing's soft inputs as an embedding delta [fed, T, d] over the fed columns (fed from ``start``: 0
    or q_start [fed]): ``embed_delta`` lands on the decoded columns [out_start, + N), zeros elsewhere."""
    d = batch.embed_delta
    if d is None:
        return None
    first = batch.out_start.to(d.device) - start                                  # [fed] column in the slice
    out = torch.empty(batch.fed, T, d.shape[-1], dtype=dtype, device=d.device)
    return scatter_delta(out, d, first)


def scatter_delta(out: torch.Tensor, delta: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``out`` [fed, T, d] <- zeros with ``delta`` [fed, N, d] on columns [first, first + N) of each row
    (``first`` [fed] on the device), in place: smoothing's delta over a fed span (``embed_add``; a TP rank's
    step staged from the control frame writes its graph's static input with it)."""
    cols = first[:, None] + torch.arange(delta.shape[1], device=delta.device)       # [fed, N]
    out.zero_()
    return out.scatter_(1, cols[..., None].expand(-1, -1, delta.shape[-1]), delta.to(out.dtype))
