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

from ..step import StepBatch, take_cols
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

    def _decode_inputs(self, batch: StepBatch, hid_start: torch.Tensor) -> dict:
        """hid_start [fed]: the decoded rows' first index into the program's hidden states."""
        n = batch.n_out
        return {"out_index": hid_start[:, None] + torch.arange(n, device=hid_start.device),   # [fed, N]
                "cond_rows": batch.cond_rows, "un_rows": batch.un_rows,
                "cfg_weight": batch.cfg_weight(self.dtype),
                "temperature": torch.tensor([batch.temperature], dtype=self.temperature_dtype, device=self.device),
                "seeds": batch.seeds}

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
        return res[0], res[1]

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
        return res[0], res[1]

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
        return res[0], res[1]
