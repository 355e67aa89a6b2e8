"""One rank's CUDA-graph runner: ``GraphRunner`` over the rank's shard (issue 16, capture per rank).

Every rank holds one (rank 0 inside ``TensorParallelRunner``, the others in ``runner.worker_loop``) and gets
the same calls in the same order: ``bind_pool`` (each rank's own pool of its heads, the same scratch slot for
the padding rows), ``warmup`` (the same buckets captured in the same order), and per step the same StepBatch,
so every rank picks the same bucket (or the same eager fallback), stages it into its static buffers and
replays. The captured Reuse step holds the model's row-parallel all-reduces and the vocab-parallel embedding's
(NCCL on CUDA; on CPU, gloo and ``capture=False``: the same static-buffer step run uncaptured), and decodes
through the vocab-parallel combine (``vocab.py``: per-shard statistics, one small ``all_gather_into_tensor``;
no host sync, never [rows, vocab]), so the collectives stay in lockstep and every rank ends with the same
(x0, conf). NCCL communicators exist before any capture: ``GraphRunner._graph`` runs each step twice on a
side stream before capturing it, and those runs execute the collectives.

Decoding (``decode``, as ``GraphRunner``'s: ``fused`` on CUDA, ``exact`` on CPU): ``fused`` reduces the rank's
vocab shard at T = 0 by the fused selected-row logits sweep (``vocab.fused_stats``, kernels/shard_logits.py:
float32 logits as TP=1's ``fused`` graph runner, so tokens equal its on decisive models), ``exact`` and every
sampled or guided step by the shard's float64 chunks (``vocab.shard_stats``: tokens equal ``ShardRunner``'s,
which equal one process's on decisive fp32 models); the same small combine follows. Captured variants exist
for every extra ``GraphRunner`` captures (T > 0 sampling, logprobs, entropy; credit, smoothing and top-k
filters through ``shard_runner.rules_decode``: the core's chunk sweep per shard, ``vocab.combine_sweep``'s
all-gather and smoothing's all-reduce inside the captured step, its inputs in the variant's static buffers;
``fused`` at T = 0: credit and smoothing through ``shard_runner.fused_rules_decode``, one GPU's fused routes
per shard in float32, no float64 sweep); filters the merged candidates do not bound replay too, by the exact
bisection (``vocab_filters.exact_filters`` over ``kernels/filter_bisect.py``, its plan in the variant's key,
each halving's all_reduce captured like the model's), as on one GPU.
Block decoders' steps replay as on one GPU (one block as the prefix step; a block's first step as rows per
block; at T > 0 the rows divided by T before the shard's draw, filtered or not). Refresh, full forwards,
guidance and a long prefill run ``GraphRunner``'s eager fallbacks, decoded by the same combine.

Compiled blocks (``compile``, on by default on CUDA as for one GPU: ``engine.graph_runner_for``): each rank
runs ``GraphRunner._compile_blocks`` on its shard, so its transformer blocks run under ``torch.compile``
(Inductor, ``fullgraph``) with the row-parallel all-reduces inside (Dynamo traces ``dist.all_reduce`` into
the functional ``_c10d_functional.all_reduce_`` + ``wait_tensor``, which Inductor schedules among the fused
kernels), and the captured graphs replay that code. A call that compiles goes on to run the compiled code's
collectives, so every rank compiles in the same calls: the same messages (GRAPHS, WARMUP, steps) reach every
rank in the same order, and ranks that start from the same Dynamo state (a worker's process; rank 0's when
it holds no other compiled model) make the same static / dynamic choices. Where they differ (a bench's rank 0
beside a compiled TP=1 model), the kernels differ but the collectives, which follow the model code, do not.
``torch.compile`` wraps the model's blocks in place: once compiled they stay compiled (a runner built over
them later, after graphs were switched off and on, is ``compiled`` too). Steps big enough for the
two-micro-batch overlap (dlc.models.overlap, ``tp_overlap_tokens``; ``model_forward`` through the shard's
``ShardCollectives``) run each half's sublayer step as its own compiled function instead of the blocks
(compiled beside them here), and the captured step replays the interleaved halves.

Reuse steps from the frame (``reuse_frame``): every rank, rank 0 included, stages a compact Reuse step
straight from the control frame instead of rebuilding a StepBatch and gathering it into the static buffers:
the rows' pool slots, cache columns, decoded-row offsets and lengths go into the graph's host ``meta`` and the
fed ids beside them (one pinned host buffer, ``_Graph.inputs_host``), one host->device copy lands both, and
two kernels derive the positions (``start + arange(T)``) and key mask (``arange(S) < kv_len``) that the batch
path gathers (equal buffers: positions are ``arange(W)``, keys ``arange(W) < length``), and a step with credit
or smoothing its received rule tensors into the variant's static buffers (``GraphRunner._stage_credit`` /
``_stage_embed``; sampling filters keep the batch path: ``channel.frame_reuses``). Which steps may: the
first step of each ``frame_key`` (shape, flags, sampling, pool) takes the batch path and records whether it
replayed and with which captured variant; later steps of that key replay from the frame. Binding a pool (and a
new runner) forgets the record. ``DLC_TP_FRAME_STAGING=0`` (or ``frames = False``) keeps the batch path.
``stats`` adds the host seconds of staging (``stage_s``) and launching (``launch_s``: the replay call; without
capture the whole CPU forward) and ``frame_replays``; ``gpu_timing`` records CUDA events around each launch
(``gpu_s()``: the replays' device time, the all-reduce waits for the peer inside it)."""
from __future__ import annotations

import gc
import os
import time

import torch

from dlc.models.tensor_parallel import head_shard

from ..runners.graph import BUCKETS, GraphRunner, _Graph, tempered_rows
from ..step import StepBatch
from ..step_output import StepOutput
from .channel import (_B, _FLAGS, _NFED, _NOUT, _RULE_FLAGS, _TEMP, Compact, _float, frame_key, frame_rules,
                      frame_wants_extras, split_payload)
from .shard_runner import ShardRunner, extras_of, fused_rules_decode, rules_decode, vocab_decode
from .vocab import combine, fused_stats, shard_stats

_UNSEEN = object()


class ShardGraphRunner(GraphRunner):
    def __init__(self, shard: ShardRunner, buckets=BUCKETS, capture: bool | None = None, max_width: int = 128,
                 pool_attention: bool | None = None, compile: bool | str = False, decode: str | None = None):
        done = blocks_compiled(shard.model)           # compiled earlier (graphs off and on again): kept
        self.collectives = shard.collectives          # the shard's (its layers' all-reduce, split forward)
        super().__init__(shard.model, decode=decode, buckets=buckets, capture=capture,
                         compile=not done and compile, max_width=max_width, pool_attention=pool_attention)
        self.compiled = self.compiled or done
        self.config = shard.config       # the shard's heads (its KV pool) and the full vocabulary
        self.rank, self.world, self.group = shard.rank, shard.world, shard.group
        self.mix_iterations, self.mixes = "two", False   # the TP runner sends phase calls only (no mixed
                                                         # iterations)
        self.frames = os.environ.get("DLC_TP_FRAME_STAGING", "1") != "0"
        self._frames: dict = {}              # frame_key -> captured variant it replays, None: batch path
        self._aranges: dict = {}             # n -> arange(n) on the device (positions, key mask)
        self.stats.update(stage_s=0.0, launch_s=0.0, frame_replays=0)
        self.launched_ns = 0                 # monotonic clock at the last launch (rank timings)
        self.gpu_timing, self._events = False, []

    def compile_blocks(self, compile: bool | str = True) -> None:
        """Compile the blocks of this (running) graph runner: graphs captured over the uncompiled blocks are
        dropped and captured again on first use (every rank does the same: the GRAPHS message)."""
        if self.compiled:
            return
        self.release_graphs()
        self._compile_blocks("inductor" if compile is True else compile)
        self.compiled = True

    def _compile_blocks(self, backend: str) -> None:
        """GraphRunner's, and the two-micro-batch forward's half-steps (models/overlap.py)."""
        super()._compile_blocks(backend)
        self.collectives.compile(backend)

    def model_forward(self, ids, pos, key_mask, cache=None, start=0, embed_add=None) -> torch.Tensor:
        """The shard's forward (``ShardCollectives.forward``): captured steps record the split or not."""
        return self.collectives.forward(self.model, ids, pos, key_mask, cache, start, embed_add)

    def release_graphs(self) -> None:
        """GraphRunner's, and the frames' map of captured variants (rebuilt on the next steps)."""
        super().release_graphs()
        self._frames.clear()

    def eager(self) -> ShardRunner:
        """The eager shard runner over the same (shard) model."""
        return ShardRunner(self.model, self.config, self.rank, self.world, self.group, self.collectives)

    def bind_pool(self, kv, scratch: int | None = None) -> None:
        """GraphRunner's binding; ``scratch``: rank 0's padding slot, which a worker's pool uses too."""
        self._frames.clear()                 # which steps replay depends on the bound pool
        super().bind_pool(kv)
        if scratch is not None and self.pool is not None and self.scratch != scratch:
            self.pool.free(self.scratch)
            self.scratch = scratch

    # -- Reuse steps staged from the control frame -----------------------------------------------------------
    @torch.no_grad()
    def reuse_frame(self, msg: Compact, make_batch, answer: bool = True, rules: dict | None = None):
        """A compact Reuse step (``channel.frame_reuses``): replayed from the frame when an earlier step of
        its ``frame_key`` replayed, else ``reuse(make_batch())`` (recording whether it replays). ``answer``:
        return (x0, conf) or a StepOutput as ``reuse`` does; a worker passes False (its outputs are not
        read). ``rules``: the rule tensors the header flags (credit, smoothing's soft input), which a worker
        received beside the frame; None: read off ``make_batch()`` (rank 0's own batch)."""
        h = msg.head.tolist()
        key = frame_key(h)
        ex = self._frames.get(key, _UNSEEN) if self.frames else None
        if ex is _UNSEEN:
            batch = make_batch()
            ex = self._extras_key(batch)
            self._frames[key] = ex if self._eligible(batch, ex) else None
            return self.reuse(batch)
        if ex is None:
            return self.reuse(make_batch())
        B = h[_B]
        if rules is None and h[_FLAGS] & _RULE_FLAGS:
            rules = frame_rules(h, make_batch())
        with self._host_seconds("host_s"):
            g = self._stage_frame(h, msg.payload, ex, rules or {})
            tok, conf = self._launch(g)
            self.stats["replays"] += 1
            self.stats["frame_replays"] += 1
        if not answer:
            return None
        if not frame_wants_extras(h):
            return tok[:B].clone(), conf[:B].to(torch.float64)
        return StepOutput(tok[:B].clone(), conf[:B].to(torch.float64),
                          **{k: v[:B].clone() for k, v in g.extras.items()})

    def _stage_frame(self, h: list, payload: torch.Tensor, ex, rules: dict) -> _Graph:
        with self._host_seconds("stage_s"):
            self._ahead = None                         # restaged: a run ahead cannot go on
            g = self._graph(self.bucket(h[_B]), h[_NFED], h[_NOUT], ex)
            stage_frame(g, h, payload, self.scratch, self.config.logit_shift, self._arange)
            B = h[_B]
            if g.credit is not None:                   # credit: the received ids / values / alpha
                self._stage_credit(g, rules["credit_ids"], rules["credit_vals"], rules["credit_alpha"], B)
            if g.embed is not None:                    # smoothing: its delta on the decoded columns
                first = g.meta[2, :B] + self.config.logit_shift                    # out_start - q_start [B]
                self._stage_embed(g, rules.get("embed_delta"), first, B)
        return g

    def _arange(self, n: int) -> torch.Tensor:
        a = self._aranges.get(n)
        if a is None:
            a = self._aranges[n] = torch.arange(n, device=self.device)
        return a

    # -- timings of the batch path and the launches ---------------------------------------------------------
    def _stage(self, batch: StepBatch, ex: tuple = ()) -> _Graph:
        with self._host_seconds("stage_s"):
            g = super()._stage(batch, ex)
        return g

    def _launch(self, g: _Graph):
        t0 = time.perf_counter()
        self.launched_ns = time.monotonic_ns()
        if self.gpu_timing and g.graph is not None:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
            out = super()._launch(g)
            ev[1].record()
            self._events.append(ev)
        else:
            out = super()._launch(g)
        self.stats["launch_s"] += time.perf_counter() - t0
        return out

    def time_gpu(self, on: bool) -> None:
        """Record CUDA events around each replay from now on (``on``, where steps are captured), or not; the
        events so far are dropped."""
        self.gpu_timing, self._events = bool(on) and self.capture, []

    def gpu_s(self, reset: bool = False) -> tuple[float, int]:
        """(device seconds of the timed replays, their count): waits for them."""
        if self._events:
            self._events[-1][1].synchronize()
        total = sum(a.elapsed_time(b) for a, b in self._events) / 1e3
        n = len(self._events)
        if reset:
            self._events = []
        return total, n

    def decode(self, rows: torch.Tensor, batch: StepBatch):
        """Eager steps (Refresh, full, fallbacks): the vocab-parallel combine (the fused sweep where the
        graphs would fuse: ``fused`` mode, T = 0, no guidance)."""
        return vocab_decode(self, rows, batch, fused=self._fuses(batch))

    def _graph_decode(self, rows: torch.Tensor, g):
        """The captured step's decoding: rows [bb, N, d] -> this shard's statistics, combined over the ranks
        (tok [bb, N], conf [bb, N] float64; with extras ``g.ex`` the StepOutput keys)."""
        ex = g.ex
        w, v0 = head_shard(self.model, self.rank, self.world)
        ar = torch.arange(rows.shape[0], device=rows.device)
        one = torch.ones(1, dtype=rows.dtype, device=rows.device)
        temp, seeds = g.sampling if ex and ex.sampled else (0.0, torch.zeros_like(ar))
        if ex and ex.tempered:       # the eager shard's rows / T, drawn at T = 1
            rows, temp = tempered_rows(rows, temp)
        if ex and (ex.credit_width or ex.smooth_tau or ex.filtered):
            if self.decoding == "fused" and not ex.sampled:        # one GPU's fused route, per shard
                return fused_rules_decode(self, rows, ex, g.credit)
            return rules_decode(self, rows, ar, ar, one, temp, seeds, credit=g.credit,
                                soft_tau=ex.smooth_tau or None, soft_k=ex.smooth_k, filters=g.filters,
                                cover=ex.filtered or None, entropy=ex.entropy,
                                logprobs=None if ex.logprobs < 0 else ex.logprobs, filtered_conf=ex.tempered)
        k = max(ex.logprobs, 0) if ex else 0
        if self.decoding == "fused" and not (ex and ex.sampled):
            st = fused_stats(rows, w, v0, topk=k, entropy=bool(ex and ex.entropy))
        else:
            st = shard_stats(rows, w, v0, ar, ar, one, temp, seeds, self.config.vocab_size, topk=k,
                             entropy=bool(ex and ex.entropy))
        out = combine(st, self.group, topk=k)
        if not ex:
            return out["tokens"], out["confidence"]
        return extras_of(out, ex.logprobs >= 0, ex.entropy)


def stage_frame(g: _Graph, h: list, payload: torch.Tensor, scratch: int, shift: int, arange) -> None:
    """A compact Reuse step's rows (header ``h`` as a list, ``payload``) into graph ``g``'s static inputs, as
    ``GraphRunner._stage`` leaves them: meta and the fed ids through one host buffer and one copy, positions
    ``start + arange(T)`` and key mask ``arange(S) < kv_len`` on the device; padding rows [B, bb) read and
    write the ``scratch`` slot. ``arange(n)``: a device ``arange`` (cached by the caller)."""
    B, T = h[_B], h[_NFED]
    ids, seeds, lengths, out_start, q_start, slots, _ = split_payload(h, payload)
    m = g.meta_host                                                               # [5, bb] host
    m[0, :B] = slots
    m[1, :B] = q_start
    m[2, :B] = out_start - (q_start + shift)
    m[3, :B] = lengths
    if B < g.bb:                                                                  # padding: scratch slot
        m[0, B:], m[1:3, B:], m[3:5, B:] = scratch, 0, T
    g.inputs_host[5 * g.bb:5 * g.bb + B * T] = ids                                # ids [B, T] after meta
    g.inputs.copy_(g.inputs_host, non_blocking=True)                              # one host->device copy
    torch.add(g.start[:, None], arange(T), out=g.pos)                             # [bb, T]
    torch.lt(arange(g.key_mask.shape[1]), g.kv_len[:, None], out=g.key_mask)      # [bb, S]
    if g.sampling is not None:
        temp, sd = g.sampling
        temp.fill_(_float(h[_TEMP]))
        sd[:B].copy_(seeds, non_blocking=True)                                   # the frame: host
        sd[B:] = 0
    g.rows_used = B


def with_graphs(shard, on: bool, capture: bool | None = None, compile: bool | str = False,
                decode: str | None = None):
    """The rank's runner with CUDA graphs on (a ``ShardGraphRunner`` over the shard's model, its blocks
    compiled when ``compile``, decoding as ``decode`` says; None: the device's default) or off (the eager
    ``ShardRunner``); unchanged if it already is (a graph runner asked to compile compiles its blocks now and
    recaptures its graphs over them; another decoding mode makes a new graph runner over the same model)."""
    if not on:
        return shard.eager() if isinstance(shard, ShardGraphRunner) else shard
    if not isinstance(shard, ShardGraphRunner) or decode not in (None, shard.decoding):
        return ShardGraphRunner(shard, capture=capture, compile=compile, decode=decode)
    if compile:
        shard.compile_blocks(compile)
    return shard


def blocks_compiled(model) -> bool:
    """Whether ``torch.compile`` already wraps the model's blocks (``nn.Module.compile`` sets
    ``_compiled_call_impl``; batch_invariant.py reads it the same way)."""
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in model.blocks)


def release_before_leaving(runner) -> None:
    """Free what a rank holds on its process group before it leaves the group: its captured graphs (and
    their memory pool) and its symmetric all-reduce buffer. While a CUDA graph holding NCCL collectives is
    alive, ``destroy_process_group`` hangs on every rank, even when all enter it (measured on 2 x H100:
    bench/probes/nccl_graph_destroy.py); with the graphs freed it takes 0.5 s. The symmetric buffer is
    rendezvoused over the group: freed at garbage collection instead, it went at an arbitrary later point,
    after the group and its peers were gone (``ShardCollectives.release``)."""
    if isinstance(runner, ShardGraphRunner):
        runner.release_graphs()
    runner.collectives.release()
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
