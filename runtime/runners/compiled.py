"""The runner of compiled phase programs (engine directories and in-memory builds) over a StepBatch.

A phase program is any callable taking its inputs positionally (in the order of its recorded input names) and
returning its outputs in order: an FX GraphModule (in-process), a loaded torch.export program, an AOTI package
or an onnxruntime session wrapper. The programs decode inside the graph
(``chunk_logits``: guidance, Gumbel-max
with the per-sequence step seeds, confidence); this class feeds them from the StepBatch and moves K/V: a
Refresh program returns every column's K/V (and, head-sparse, per-head key scores), written into the batch's
pool rows; a Reuse program takes the rows' cache and returns the fed span's new K/V, written back in place."""
from __future__ import annotations

import torch

import dlc.kernels  # noqa: F401  (registers torch.ops.dlc.*: GPU-lowered phase programs call them)

from ..decoding import FieldError
from ..step import StepBatch, take_cols
from ..step_output import StepOutput
from .eager import pad_keys


class CompiledRunner:
    def __init__(self, config, phases: dict, input_names: dict[str, list[str]], *, device="cpu",
                 dtype=torch.float32, sparse_retention: float | None = None, kind: str = "export",
                 max_seq_len: int | None = None, max_batch_size: int | None = None,
                 temperature_dtype: torch.dtype = torch.float64):
        missing = {"refresh", "reuse"} - set(phases)
        if missing:
            raise ValueError(f"compiled runner: missing phase program(s) {sorted(missing)}")
        self.config, self.phases, self.input_names = config, phases, input_names
        self.device, self.dtype = torch.device(device), dtype
        self.sparse_retention = sparse_retention
        self.kind = kind
        self.max_seq_len = min(max_seq_len or config.max_seq_len, config.max_seq_len)   # the build limits
        self.max_batch_size = max_batch_size
        self.temperature_dtype = temperature_dtype      # float32 in engines for runtimes without doubles
        self.extras = all("credit_ids" in names for names in input_names.values())   # chunk_logits' extras

    def _decode_inputs(self, batch: StepBatch, hid_start: torch.Tensor) -> dict:
        """hid_start [fed]: the decoded rows' first index into the program's hidden states."""
        n = batch.n_out
        feed = {"out_index": hid_start[:, None] + torch.arange(n, device=hid_start.device),   # [fed, N]
                "cond_rows": batch.cond_rows, "un_rows": batch.un_rows,
                "cfg_weight": batch.cfg_weight(self.dtype),
                "temperature": torch.tensor([batch.temperature], dtype=self.temperature_dtype, device=self.device),
                "seeds": batch.seeds}
        if self.extras:                  # chunk_logits.EXTRA_INPUTS; no credit: one neutral entry (alpha 0)
            B, dt = batch.n_seqs, self.temperature_dtype
            if batch.credit_ids is None:
                feed.update(credit_ids=torch.zeros(B, n, 1, dtype=torch.long, device=self.device),
                            credit_vals=torch.zeros(B, n, 1, dtype=dt, device=self.device),
                            credit_alpha=torch.zeros(B, dtype=dt, device=self.device))
            else:
                feed.update(credit_ids=batch.credit_ids, credit_vals=batch.credit_vals.to(dt),
                            credit_alpha=batch.credit_alpha.to(dt))
        elif batch.wants_extras():
            raise ValueError("this compiled engine decodes (token, confidence) only: rebuild it with "
                             "`dlc compile --decode-extras` for entropy, logprobs and credit decoding")
        return feed

    def _decode_outputs(self, res: list, batch: StepBatch):
        """(tokens, confidence), or a StepOutput with the extras the batch asked for (chunk_logits'
        EXTRA_OUTPUTS after the optional top-k pair)."""
        if not batch.wants_extras():
            return res[0], res[1]
        k = batch.logprobs or 0
        ext = 4 if res[2].dtype == torch.long and res[2].dim() == 3 else 2          # past the top-k pair
        if k and ext == 2:
            raise ValueError("this engine was built without top-k logprobs (dlc compile --logprobs K)")
        if k > (res[2].shape[-1] if ext == 4 else 0):
            raise ValueError(f"logprobs {k}: this engine was built for at most {res[2].shape[-1]} alternatives")
        ent, lp, t1, p1 = res[ext:ext + 4]
        return StepOutput(res[0], res[1], entropy=ent, logprob=lp, top1_ids=t1, top1_prob=p1,
                          topk_ids=res[2][..., :k] if k else None, topk_logprobs=res[3][..., :k] if k else None)

    def check_generation(self, gen) -> None:
        """Refuse, naming the field, what compiled programs cannot decode: iteration smoothing (its soft
        inputs enter the embedding, which phase programs do not take) and sampling filters at T > 0 (they
        need a row's every logit at once; programs decode in vocab chunks)."""
        if gen.smoothing:
            raise FieldError("smoothing", "iteration smoothing needs an eager model (a checkpoint or preset); "
                                          "compiled engines do not take soft input embeddings")
        if gen.filters() is not None:
            field = "top_k" if gen.top_k else "top_p" if gen.top_p < 1 else "min_p"
            raise FieldError(field, f"{field} at temperature > 0 needs an eager model; compiled engines sample "
                                    f"over vocab chunks without filters")
        if not self.extras and (gen.logprobs is not None or gen.credit or gen.rule().needs_entropy):
            raise FieldError("logprobs" if gen.logprobs is not None else "credit" if gen.credit
                             else "entropy_bound", "this compiled engine decodes (token, confidence) only; "
                                                   "rebuild it with `dlc compile --decode-extras`")

    def _call(self, phase: str, feed: dict):
        args = [feed[n].contiguous() for n in self.input_names[phase]]   # AOTI reads inputs as dense buffers
        return list(self.phases[phase](*args))

    def _refresh(self, batch: StepBatch):
        feed = {"input_ids": batch.ids, "position_ids": batch.pos, "key_mask": batch.key_mask,
                **self._decode_inputs(batch, batch.hid_start)}
        return self._call("refresh", feed)

    # --- the runner contract -------------------------------------------------------------------------
    @torch.no_grad()
    def full(self, batch: StepBatch):
        res = self._refresh(batch)
        return self._decode_outputs(res, batch)

    @torch.no_grad()
    def refresh(self, batch: StepBatch):
        res = self._refresh(batch)
        c = batch.cache
        kv = res[-3:-1] if self.sparse_retention is not None else res[-2:]
        k, v = kv                                                                   # [nl, fed, Hkv, W, D]
        W = k.shape[3]
        if c.batch != k.shape[1] or c.seq_len < W:
            raise ValueError(f"refresh: the cache holds {c.batch} rows x {c.seq_len} columns, "
                             f"the batch needs "
                             f"{k.shape[1]} x {W}")
        rows = c.row_index(k.shape[1], k.device)
        for i in range(k.shape[0]):
            c.k[i][rows, :, :W] = k[i].to(c.k[i].dtype)
            c.v[i][rows, :, :W] = v[i].to(c.v[i].dtype)
        if self.sparse_retention is not None:                                       # [nl, fed, Hkv, W] scores
            if c.scores is None:
                raise ValueError("head-sparse refresh needs a KV pool with head scores (KVCacheManager("
                                 "head_scores=True))")
            c.scores[:, rows] = float("-inf")
            c.scores[:, rows, :, :W] = res[-1].to(c.scores.dtype)
        return self._decode_outputs(res, batch)

    @torch.no_grad()
    def reuse(self, batch: StepBatch):
        c, qs, T = batch.cache, batch.q_start_dev, batch.n_fed
        fed = batch.fed
        rows = c.row_index(fed, qs.device)
        k_cache = torch.stack([k[rows] for k in c.k])                             # [nl, fed, Hkv, S, D]
        v_cache = torch.stack([v[rows] for v in c.v])
        feed = {"q_ids": take_cols(batch.ids, qs, T), "q_pos": take_cols(batch.pos, qs, T), "q_start": qs,
                "key_mask": pad_keys(batch.key_mask, c.seq_len),
                "k_cache": k_cache.to(self.dtype), "v_cache": v_cache.to(self.dtype),
                **self._decode_inputs(batch, batch.hid_start)}
        if self.sparse_retention is not None:
            feed["keep_idx"] = batch.keep_idx
        res = self._call("reuse", feed)
        k_new, v_new = res[-2], res[-1]                                           # [nl, fed, Hkv, T, D]
        cols = qs[:, None] + torch.arange(T, device=qs.device)                    # [fed, T]
        for i in range(k_new.shape[0]):
            c.k[i][rows[:, None], :, cols] = k_new[i].transpose(1, 2).to(c.k[i].dtype)
            c.v[i][rows[:, None], :, cols] = v_new[i].transpose(1, 2).to(c.v[i].dtype)
        return self._decode_outputs(res, batch)
