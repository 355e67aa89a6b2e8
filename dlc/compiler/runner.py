"""The runner of compiled phase programs: the runner contract of docs/DEVELOPING.md over refresh/reuse graphs.

A phase program is any callable taking its inputs positionally (in the order of its recorded input names)
and returning its outputs in order: an FX GraphModule (in-process), a loaded torch.export program, an AOTI
package or an onnxruntime session wrapper. This class owns everything outside the graphs, exactly as
``EagerRunner`` does: classifier-free guidance (batch doubling with the prompt masked), Dream's logit shift,
per-row bounds, the KV cache (a ``dlc.models.KVCache``; with ``rows`` a slot pool) updated from the graphs'
K/V outputs, head-sparse column selection (top ``retention`` per head from the refresh's scores), and the
``random`` remasking draw."""
from __future__ import annotations

import torch

import dlc.kernels  # noqa: F401  (registers torch.ops.dlc.*: GPU-lowered phase programs call them)
from dlc.models.common import KVCache
from dlc.passes.sparsify_heads import keep_columns
from dlc.runtime.model_runner import cfg_inputs
from dlc.runtime.sampling import Sampling


def _bound(x, batch: int, device) -> torch.Tensor:
    """int or LongTensor [B] -> LongTensor [B]."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.long).reshape(-1).expand(batch)
    return torch.full((batch,), int(x), dtype=torch.long, device=device)


def _width(a: torch.Tensor, b) -> int:
    w = _bound(b, a.shape[0], a.device) - a
    if w.numel() and bool((w != w[0]).any()):
        raise ValueError(f"per-row bounds must have the same width in every row, got {w.tolist()}")
    return int(w[0]) if w.numel() else 0


def _cache_rows(cache: KVCache, batch: int, device) -> torch.Tensor:
    rows = getattr(cache, "rows", None)
    return torch.arange(batch, device=device) if rows is None else rows.to(device)


class CompiledRunner:
    def __init__(self, config, phases: dict, input_names: dict[str, list[str]], *, device="cpu",
                 dtype=torch.float32, sparse_retention: float | None = None, kind: str = "export"):
        missing = {"refresh", "reuse"} - set(phases)
        if missing:
            raise ValueError(f"compiled runner: missing phase program(s) {sorted(missing)}")
        self.config, self.phases, self.input_names = config, phases, input_names
        self.device, self.dtype = torch.device(device), dtype
        self.sparse_retention = sparse_retention
        self.kind = kind
        self.shift = config.logit_shift

    # --- inputs shared by both phases ------------------------------------------------------------------
    def _cfg(self, ids, pos, key_mask, s: Sampling, prompt_mask):
        return cfg_inputs(ids, pos, key_mask, s, prompt_mask, self.config.mask_id)

    def _decode_inputs(self, a: torch.Tensor, n: int, s: Sampling, fed: int) -> dict:
        """a [B] first decoded column per row (before the shift); fed = rows fed (2B with CFG)."""
        B, dev = a.shape[0], a.device
        rows = a - self.shift
        if fed != B:
            rows = torch.cat([rows, rows])
        d = {"out_index": rows[:, None] + torch.arange(n, device=dev),                 # [fed, N] absolute
             "cond_rows": torch.arange(B, device=dev),
             "un_rows": torch.arange(B, device=dev) + (fed - B),
             "cfg_weight": torch.tensor([s.cfg_scale + 1.0 if fed != B else 1.0], dtype=self.dtype, device=dev),
             "temperature": torch.tensor([float(s.temperature)], dtype=torch.float64, device=dev)}
        if s.temperature > 0:
            d["seeds"] = torch.randint(0, 2 ** 62, (B,), generator=s.generator, device=dev)
        else:
            d["seeds"] = torch.zeros(B, dtype=torch.long, device=dev)
        return d

    def _call(self, phase: str, feed: dict):
        args = [feed[n] for n in self.input_names[phase]]
        return list(self.phases[phase](*args))

    def _finish(self, x0, conf, s: Sampling):
        if s.remasking == "random":
            conf = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=s.generator)
        elif s.remasking != "low_confidence":
            raise ValueError(f"unknown remasking {s.remasking!r}")
        return x0, conf

    # --- the runner contract -------------------------------------------------------------------------
    @torch.no_grad()
    def full(self, ids, pos, key_mask, out, s: Sampling, prompt_mask=None):
        x0, conf, _ = self._refresh(ids, pos, key_mask, out, s, prompt_mask)
        return x0, conf

    @torch.no_grad()
    def refresh(self, ids, pos, key_mask, out, s: Sampling, prompt_mask=None, cache=None):
        x0, conf, res = self._refresh(ids, pos, key_mask, out, s, prompt_mask)
        k, v = res[0], res[1]                                                   # [nl, B2, Hkv, L, D]
        L = k.shape[3]
        if cache is None:
            cache = KVCache([k[i] for i in range(k.shape[0])], [v[i] for i in range(v.shape[0])])
        else:
            if cache.batch != k.shape[1] or cache.seq_len < L:
                raise ValueError(f"refresh: cache holds {cache.batch} rows x {cache.seq_len} columns, the batch "
                                 f"needs {k.shape[1]} x {L}")
            rows = _cache_rows(cache, k.shape[1], k.device)
            for i in range(k.shape[0]):
                cache.k[i][rows, :, :L] = k[i].to(cache.k[i].dtype)
                cache.v[i][rows, :, :L] = v[i].to(cache.v[i].dtype)
        if len(res) > 2:
            cache.dlc_head_scores = res[2]                                      # [nl, B2, Hkv, L]
        return x0, conf, cache

    def _refresh(self, ids, pos, key_mask, out, s, prompt_mask):
        B = ids.shape[0]
        a = _bound(out[0], B, ids.device)
        n = _width(a, out[1])
        ids2, pos2, km2 = self._cfg(ids, pos, key_mask, s, prompt_mask)
        feed = {"input_ids": ids2, "position_ids": pos2, "key_mask": km2,
                **self._decode_inputs(a, n, s, ids2.shape[0])}
        res = self._call("refresh", feed)
        x0, conf = self._finish(res[0], res[1], s)
        return x0, conf, res[-3:] if self.sparse_retention is not None else res[-2:]

    @torch.no_grad()
    def reuse(self, cache: KVCache, ids, pos, key_mask, q, out, s: Sampling, prompt_mask=None):
        B = ids.shape[0]
        a = _bound(out[0], B, ids.device)
        n = _width(a, out[1])
        qa = _bound(q[0], B, ids.device)
        if self.shift:                                                            # Dream: widen to row a - 1
            qa = torch.minimum(qa, a - self.shift)
        T = _width(qa, q[1])
        ids2, pos2, km2 = self._cfg(ids, pos, key_mask, s, prompt_mask)
        fed = ids2.shape[0]
        qa2 = torch.cat([qa, qa]) if fed != B else qa
        cols = qa2[:, None] + torch.arange(T, device=ids.device)                  # [fed, T]
        rows = _cache_rows(cache, fed, ids.device)
        k_cache = torch.stack([k[rows] for k in cache.k])                         # [nl, fed, Hkv, S, D]
        v_cache = torch.stack([v[rows] for v in cache.v])
        S = k_cache.shape[3]
        if km2.shape[1] < S:                                                      # slot pool longer than L
            km2 = torch.cat([km2, km2.new_zeros(fed, S - km2.shape[1])], 1)
        feed = {"q_ids": ids2.gather(1, cols), "q_pos": pos2.gather(1, cols), "q_start": qa2, "key_mask": km2,
                "k_cache": k_cache.to(self.dtype), "v_cache": v_cache.to(self.dtype),
                **self._decode_inputs(a, n, s, fed)}
        if self.sparse_retention is not None:
            feed["keep_idx"] = self._keep_idx(cache, cols, S)
        res = self._call("reuse", feed)
        k_new, v_new = res[-2], res[-1]                                           # [nl, fed, Hkv, T, D]
        for i in range(k_new.shape[0]):
            cache.k[i][rows[:, None], :, cols] = k_new[i].transpose(1, 2).to(cache.k[i].dtype)
            cache.v[i][rows[:, None], :, cols] = v_new[i].transpose(1, 2).to(cache.v[i].dtype)
        return self._finish(res[0], res[1], s)

    def _keep_idx(self, cache, cols: torch.Tensor, S: int) -> torch.Tensor:
        """Per-head kept columns [nl, fed, Hkv, K], ascending: the fed columns plus the top retention fraction
        of the others by the refresh's head scores."""
        scores = getattr(cache, "dlc_head_scores", None)
        if scores is None:
            raise ValueError("head-sparse reuse needs a cache filled by this runner's refresh (no head scores)")
        if scores.shape[-1] < S:
            scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], S - scores.shape[-1]), float("-inf"))], -1)
        return keep_columns(scores, cols, self.sparse_retention)
