"""CUDA graphs of an engine's Reuse program at bucketed batch sizes (the engine path's launch-free step).

A Reuse step at small batch is bound by reading the weights; launching an interpreted program's hundreds of
kernels from Python costs as much again. ``ProgramGraphs`` captures one call of the program per (batch bucket,
fed width, decoded width) over static input buffers and replays it: the program writes K/V into the serving
slot pool in place (the pool tensors are the static inputs themselves) and decodes in the graph (guidance-free
rows, the step seeds' hash noise: sampled tokens equal the uncaptured program's).

Padding rows of a bucket read and write a scratch pool slot no request owns (``bind_pool`` takes it). Calls
that are not graphable run the program directly: classifier-free guidance, batches over the largest bucket,
another pool, and head-sparse steps with a row as long as the pool (see below).

Head-sparse engines (``keep_idx`` [n_layers, B, Hkv, K] input): the program's kept width K is a shape, so
graphs are also keyed by a kept-width bucket (``keep_bucket``: 64, 96, 128, 192, ... up to the pool width)
and the list is padded to it with column S - 1, a padding key of every row shorter than the pool (masked by
the key mask; ``keep_columns_rows`` pads shorter rows the same way): a batch with a row as long as the pool
runs uncaptured. Padding rows keep columns [0, K). Graphs of a kept bucket are captured on first use
(``warmup`` takes the smallest); the program reads what its lowering reads (GPU lowering: the kept columns
by index).
``stats`` counts replays, captures, host time per replay and the fallbacks."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .ahead import AheadRun, resume, run_ahead
from .graph import BUCKETS, capture_graph   # the batch buckets every captured runner shares
BATCHED = ("q_ids", "q_pos", "q_start", "key_mask", "rows", "out_index", "cond_rows", "un_rows", "seeds",
           "credit_ids", "credit_vals", "credit_alpha", "embed_delta")
# (credit, smoothing's embed_delta: neutral zeros in padding rows)
KEEP = "keep_idx"             # head-sparse: [n_layers, B, Hkv, K] (batch on dim 1), padded to keep_bucket


def keep_bucket(K: int, S: int) -> int:
    """The kept width a graph is captured for: the smallest of 64, 96, 128, 192, 256, ... >= K, at most S."""
    b = 64
    while b < K:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3          # 64 -> 96 -> 128 -> 192 -> 256 ...
    return min(b, S)


class GraphKey(NamedTuple):
    """What one captured Reuse graph is for: batch bucket, fed width, decoded width, pool length, head-sparse
    kept-column bucket (0: dense), credit width (0: no credit inputs; 1 or N: ``CompiledRunner._credit_n``)
    and whether the graph replays the rows-only program (``CompiledRunner``'s ``reuse_rows``: no in-graph
    decode, for batches the runner decodes from the hidden rows). Named so readers (tests, stats) never depend
    on the fields' order."""
    batch: int
    fed: int
    decoded: int
    pool: int
    kept: int
    credit: int
    rows_only: bool = False


@dataclass
class _Captured:
    static: dict            # input name -> static device buffer [bb, ...] (pool, weights: the real tensors)
    outs: list              # the program's outputs in the graph's memory
    graph: object
    rows_only: bool = False  # the call this graph holds: ``call(static, rows_only)``


class ProgramGraphs:
    """Graphs of ``call(feed, rows_only) -> outputs`` for one runner's Reuse program (``rows_only``: its
    rows-only variant, keyed apart)."""

    def __init__(self, call, names: list[str], mask_id: int, buckets=BUCKETS, capture: bool = True,
                 embed: tuple[int, torch.dtype] = (0, torch.float32)):
        self.call, self.names, self.mask_id = call, names, mask_id
        self.embed = embed                  # (d_model, dtype) of the embed_delta input (--decode-extras)
        self.capture = capture              # False: the same static-buffer path, the program called directly
                                            # (CPU tests of the staging and of steps run ahead)
        self.buckets = tuple(sorted(buckets))
        self.pool = self.scratch = None
        self.graphs: dict[tuple, _Captured] = {}
        self._mempool = None
        self._ahead: AheadRun | None = None     # the latest run of steps ahead (continue_ahead goes on)
        self.stats = {"replays": 0, "direct": 0, "captures": 0, "host_s": 0.0, "capture_s": 0.0,
                      "ahead_calls": 0, "ahead_continued": 0}

    def bind_pool(self, kv) -> None:
        """Capture over ``kv`` (a KVCacheManager) from now on; None lets the graphs and the pool go."""
        if kv is self.pool:
            return
        self.graphs.clear()
        self._ahead = None
        self.pool = self.scratch = self._mempool = None       # graphs and their memory pool go together
        if kv is None or kv.n_slots < 2:
            return
        self.pool, self.scratch = kv, kv.allocate()
        if self.scratch is None:
            raise ValueError("engine graphs: bind_pool needs a free KV slot for padding rows")

    def eligible(self, feed: dict, B: int, guided: bool, sparse: bool, full_row: bool = False) -> bool:
        """``full_row``: some row is as long as the pool (head-sparse: no padding key to pad the list
        with)."""
        # credit: staged N columns wide (CompiledRunner._credit_n); wider cannot be
        credit = "credit_ids" in feed and feed["credit_ids"].shape[-1] > feed["out_index"].shape[1]
        return (self.pool is not None and not guided and not (sparse and full_row) and not credit
                and B <= self.buckets[-1] and feed["k_pool"] is self.pool.k_all)

    def warmup(self, widths: list[tuple[int, int]], max_batch: int, extra: dict) -> None:
        """Capture every bucket up to ``max_batch`` for each (fed width T, decoded width N) over inert rows in
        the scratch slot. ``extra``: the non-batch inputs (cfg_weight, temperature)."""
        if self.pool is None:
            return
        dev, S = self.pool.k_all.device, self.pool.s_max
        for T, N in widths:
            for bb in self.buckets:
                ar = torch.arange(bb, device=dev)
                km = torch.zeros(bb, S, dtype=torch.bool, device=dev)
                km[:, :T] = True
                feed = {"q_ids": torch.full((bb, T), self.mask_id, device=dev),
                        "q_pos": torch.arange(T, device=dev).expand(bb, -1), "q_start": torch.zeros_like(ar),
                        "key_mask": km,
                        "rows": torch.full_like(ar, self.scratch), "out_index": torch.arange(N, device=dev)
                        .expand(bb, -1), "cond_rows": ar, "un_rows": ar, "seeds": torch.zeros_like(ar),
                        "k_pool": self.pool.k_all, "v_pool": self.pool.v_all, **extra}
                if KEEP in self.names:                               # head-sparse: the smallest kept bucket
                    nl, hkv = self.pool.k_all.shape[0], self.pool.k_all.shape[2]
                    feed[KEEP] = torch.arange(keep_bucket(T, S), device=dev).repeat(nl, bb, hkv, 1)
                if "credit_ids" in self.names:                       # engines built with --decode-extras
                    dt = extra["temperature"].dtype
                    feed.update(credit_ids=torch.zeros(bb, N, 1, dtype=torch.long, device=dev),
                                credit_vals=torch.zeros(bb, N, 1, dtype=dt, device=dev),
                                credit_alpha=torch.zeros(bb, dtype=dt, device=dev))
                if "embed_delta" in self.names:
                    feed["embed_delta"] = torch.zeros(bb, N, self.embed[0], dtype=self.embed[1], device=dev)
                self.run(feed, bb, T, N)
                if bb >= max_batch:
                    break

    def bucket(self, B: int) -> int:
        return next(b for b in self.buckets if b >= B)

    def _pad(self, name: str, t: torch.Tensor, bb: int) -> torch.Tensor:
        """A [B, ...] batch input padded to bb rows with inert values (scratch slot, masks, arange rows)."""
        B = t.shape[0]
        pad = bb - B
        if name == "rows":
            fill = torch.full((pad,), self.scratch, dtype=t.dtype, device=t.device)
        elif name in ("cond_rows", "un_rows"):
            fill = torch.arange(B, bb, dtype=t.dtype, device=t.device)
        elif name == "q_ids":
            fill = torch.full((pad, *t.shape[1:]), self.mask_id, dtype=t.dtype, device=t.device)
        elif name in ("q_pos", "out_index"):
            fill = torch.arange(t.shape[1], device=t.device).expand(pad, -1).to(t.dtype)
        elif name == "key_mask":
            fill = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype, device=t.device)
            fill[:, 0] = True                                         # one real key: a finite softmax
        else:                                                         # q_start, seeds: zeros
            fill = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype, device=t.device)
        return torch.cat([t, fill]) if pad else t

    def run(self, feed: dict, B: int, T: int, N: int, rows_only: bool = False) -> list:
        """Replay (capturing first if needed) the graph of bucket(B) with this call's inputs
        -> outputs [B, ...]."""
        t0, c0 = time.perf_counter(), self.stats["capture_s"]
        outs = self.launch(self.stage(feed, B, T, N, rows_only))
        self.stats["replays"] += 1
        self.stats["host_s"] += time.perf_counter() - t0 - (self.stats["capture_s"] - c0)   # capture excluded
        return [o[:B] for o in outs]

    def stage(self, feed: dict, B: int, T: int, N: int, rows_only: bool = False) -> _Captured:
        """Copy this call's inputs into the static buffers of bucket(B) (capturing it on first use)."""
        self._ahead = None                             # a run ahead cannot go on over restaged inputs
        bb = self.bucket(B)
        S = feed["key_mask"].shape[1]
        kb = keep_bucket(feed[KEEP].shape[-1], S) if KEEP in feed else 0
        key = GraphKey(bb, T, N, S, kb, feed["credit_ids"].shape[-1] if "credit_ids" in feed else 0,
                       bool(rows_only))
        cap = self.graphs.get(key)
        if cap is None:
            cap = self._capture(key, {n: feed[n] if n in ("k_pool", "v_pool") else
                                      (self._pad_keep(feed[n], bb, kb, S) if n == KEEP else
                                       self._pad(n, feed[n], bb) if n in BATCHED else feed[n]).clone()
                                      for n in self.names})
        for n, buf in cap.static.items():
            src = feed[n]
            if n == KEEP:
                self._stage_keep(buf, src, S)
            elif src is not buf:                                      # the pool is its own static buffer
                buf.copy_(self._pad(n, src, bb) if n in BATCHED else src, non_blocking=True)
        return cap

    @staticmethod
    def _pad_keep(keep: torch.Tensor, bb: int, kb: int, S: int) -> torch.Tensor:
        """keep [nl, B, Hkv, K] -> a new [nl, bb, Hkv, kb] buffer staged by ``_stage_keep``."""
        nl, _, hkv, _ = keep.shape
        out = torch.empty(nl, bb, hkv, kb, dtype=keep.dtype, device=keep.device)
        ProgramGraphs._stage_keep(out, keep, S)
        return out

    @staticmethod
    def _stage_keep(buf: torch.Tensor, keep: torch.Tensor, S: int) -> None:
        """keep [nl, B, Hkv, K] into buf [nl, bb, Hkv, kb]: real rows padded with column S - 1 (masked),
        padding rows keeping columns [0, kb)."""
        B, K = keep.shape[1], keep.shape[-1]
        buf[:, :B, :, :K].copy_(keep, non_blocking=True)
        buf[:, :B, :, K:] = S - 1
        buf[:, B:] = torch.arange(buf.shape[-1], device=buf.device)

    def launch(self, cap: _Captured) -> list:
        """One step over the static inputs -> the program's outputs [bb, ...] (static while captured)."""
        if cap.graph is None:
            return self.call(cap.static, cap.rows_only)
        cap.graph.replay()
        return cap.outs

    def run_ahead(self, feed: dict, B: int, T: int, N: int, cols: torch.Tensor, counts: torch.Tensor,
                  commit=None, decode=None, credit: tuple | None = None, seeds: torch.Tensor | None = None,
                  rows_only: bool = False):
        """``counts.shape[1]`` steps back to back (runners/ahead.py): the commits (``commit``: the decoding
        core's ``AheadCommit``, None: the low-confidence schedule) land in the static q_ids. ``decode(outputs,
        credit)``: the step's (tok, conf) or StepOutput with the extras the commit reads (None: the first two
        outputs). The commit carries credit in the static credit inputs (programs without them: ``credit``,
        the run's own [B, N, N] buffers ``decode`` reads) and writes smoothing's next soft input into the
        static ``embed_delta`` [bb, N, d] (its columns: the decoded ones). A sampled run's ``seeds`` [B, n]
        (device) go into the static seeds step by step."""
        t0, c0 = time.perf_counter(), self.stats["capture_s"]
        cap = self.stage(feed, B, T, N, rows_only)
        st = cap.static
        if "credit_ids" in st and credit is not None:
            credit = (st["credit_ids"], st["credit_vals"], st["credit_alpha"])
        embed = None
        if "embed_delta" in st and commit is not None and commit.smooth_on is not None:
            embed = (st["embed_delta"], torch.arange(N, device=cols.device).expand(B, N))
        if decode is None:
            def launch():
                return self.launch(cap)[:2]
        else:
            def launch():
                return decode(self.launch(cap), credit)
        out = run_ahead(launch, st["q_ids"][:B], cols, counts, self.mask_id, commit, credit, embed,
                        None if seeds is None else (st["seeds"], seeds))
        self._ahead = out.run
        self.stats["replays"] += counts.shape[1]
        self.stats["ahead_calls"] += 1
        self.stats["host_s"] += time.perf_counter() - t0 - (self.stats["capture_s"] - c0)
        return out

    def continue_ahead(self, steps, counts: torch.Tensor, seeds: torch.Tensor | None = None):
        """More steps of the latest run, from the commits its last launch left in the static q_ids (a sampled
        run's ``seeds`` [B, n] on the device likewise)."""
        run = resume(self._ahead, steps, "engine graphs")
        t0 = time.perf_counter()
        out = run.steps(counts, seeds)
        self.stats["replays"] += counts.shape[1]
        self.stats["ahead_continued"] += 1
        self.stats["host_s"] += time.perf_counter() - t0
        return out

    def _capture(self, key, static: dict) -> _Captured:
        t0 = time.perf_counter()
        if not self.capture:
            cap = self.graphs[key] = _Captured(static, [], None, key.rows_only)
            self.stats["captures"] += 1
            return cap
        graph, outs, self._mempool, _ = capture_graph(lambda: self.call(static, key.rows_only), self._mempool)
        cap = _Captured(static, outs, graph, key.rows_only)
        self.graphs[key] = cap
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        return cap
