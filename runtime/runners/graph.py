"""CUDA-graph Reuse steps at bucketed batch sizes, behind the runner contract (dInfer / vLLM style).

A Reuse step feeds one block per row through every layer. At small batch its cost is reading the weights
(~4 ms for LLaDA-8B on an H200), and launching the ~15 kernels per layer from Python costs about as much
again. ``GraphRunner`` captures the whole Reuse step (embedding, every layer with its in-place K/V write into
the serving slot pool, final norm, decoding of the block's rows) once per (batch bucket, fed width, decoded
width) and replays it:

* batch buckets: a call with B rows replays the smallest bucket >= B (``BUCKETS``); padding rows read and
  write a scratch slot of the pool that no request owns (``bind_pool`` takes it from the KV manager);
* per call the host only copies the rows' inputs into the graph's static buffers and replays: host time per
  call is counted in ``stats`` (``host_s``: preparing + launching; ``replays``), the GPU time is not;
* decoding inside the graph: ``fused`` (``dlc.kernels.fused_select_logits``: no [B, N, V] logits, float32
  confidence; the GPU default) or ``exact`` (the eager runner's float64 ``decode_rows``, so tokens equal
  ``EagerRunner``'s; the CPU default, which the CPU tests run without capture);
* decoding extras (issue 18): a batch that wants them replays a variant of its bucket's step captured for
  that combination (``_extras_key``: entropy, logprobs k, credit, smoothing, sampling, filters; captured on
  first use, the plain step untouched). At T = 0 ``fused`` computes entropy and logprobs in the
  selected-row logits kernel's one vocab sweep, credit as a sparse correction of it
  (``dlc.kernels.fused_select_extras``);
  a smoothing step selects and builds its soft embedding from one pass of model-dtype logits
  (``dlc.kernels.smoothing``), smoothing beside other extras and ``exact`` decode with ``decode_rows_ext``.
  Credit and smoothing inputs,
  temperature, seeds and filters live in static buffers of the variant. Sampled steps (T > 0) decode in
  float64 with the eager runner's hash noise in every mode (the fused kernel's noise is another hash); on
  CUDA one without filters or other extras by ``filter_bisect.plain_draw`` (a Triton kernel per vocab chunk
  over the model-dtype logits instead of the float64 sweep: the same tokens), top-k
  filters over the sweep's candidates (``sampling.candidates_cover``), the filters those do not bound (top-p /
  min-p without a top-k, a top-k over 64, filters with credit) by the exact bisection on the survivors'
  threshold (``kernels/filter_bisect.py``: fixed passes, no host read; the eager sort's tokens), the
  variant's key holding its ``bisect_plan`` (``sampling.filter_route`` reads the filters once);
* everything else runs through ``EagerRunner``'s forwards (decoded as the graphs decode, ``decode``):
  Refresh and full forwards (compute-bound: launch overhead is noise there), classifier-free guidance, fed
  widths over ``max_width``, batches over the largest bucket, caches that are not the bound pool, and
  decoding no variant holds (tempered confidences of block decoders at T > 0 with extras other than
  sampling filters, a soft input without a soft output), and a block decoder's step over several blocks
  that does not fit two views (below). ``stats["eager_reuse"]`` counts those fallbacks.
* block diffusion (LLaDA2.x, SDAR: ``StepBatch.block_size``): with the exact block cache every step of a
  block after its first feeds exactly the block [bs, be), whose queries see keys [0, be) under the
  block-causal mask: the ordinary Reuse step's attention over the prefix up to be. Such a batch replays the
  ordinary captured step (``step.block_as_prefix``: lengths be, keys past be masked; ``_graphed_view``) and
  runs ahead like any Reuse step. A block's first step (the finished block and the new one, truly
  block-causal; a prefill of the prompt's complete blocks too) replays the same captured step with one fed
  row per block, the rows of a sequence sharing its KV slot (``step.block_rows_as_prefix``, ``_block_rows``:
  each row writes its block's K/V before any row attends, so block j's queries see the blocks before it);
  warm-up captures buckets up to twice the batch for these models, and a step needing more than
  ``MAX_BLOCK_VIEWS`` replays (a long prefill of a large batch) runs eagerly. At T = 0 the block decoders'
  tempered confidence is the plain softmax probability (``EagerRunner._tempered`` scales nothing at T = 0),
  which every variant computes;
  sampled block steps (confidence under softmax(logits / T)) replay a sampled variant that divides the rows
  by T as ``_tempered`` does and draws at temperature 1 (``ExtrasKey.tempered``), top-k / top-p / min-p
  filters too (the confidence renormalised over the survivors, the eager runner's ``filtered_conf``); with
  other extras they stay eager (TP shards alike: ``ShardGraphRunner._graph_decode``). Random remasking needs
  nothing from a runner (the decoding core draws it).
* a mixed iteration (Refresh rows beside Reuse rows): ``mix_iterations`` (runners/packed.py) says how:
  two calls (the default with capture), one eager ragged forward, one packed forward through the
  compiled blocks, or (``captured``) that packed forward with the varlen pool attention kernel captured as a
  CUDA graph per token bucket (``_packed_graph``: static ids, positions, embedding adds and the kernel's
  tile / write tables; the decoding runs after the replay, as the eager steps decode).

Attention: with ``pool_attention`` (the CUDA default) each layer attends inside the slot pool through
``dlc.kernels.pool_attention`` (pool rows by index, keys ``[0, kv_len)``; split-KV at small batch) instead of
gathering the batch's rows out of the pool for SDPA, which at batch 32 copied more bytes than the attention
reads. Each row's keys are a prefix of its cache row (the runtime's layout):
``StepBatch.lengths`` on the host.

Head-sparse Reuse (``sparse_retention``; ``EagerRunner`` says what it computes): the captured step attends
per KV head over the batch's kept columns ``keep_idx`` through ``pool_attention(..., cols, n_cols)``, which
reads only those K/V rows of the pool. The kept count varies with the rows' lengths, so each graph holds a
kept-column buffer [n_layers, bb, Hkv, K_max] for the longest row the pool allows
(K_max = T + ceil(retention x (S_max - T))) and the step's count per row (``meta`` row 4): the kernel's loops
stop at the count, so a replay reads the kept K/V only and one graph per (bucket, fed width, decoded width)
serves every cache length. The buffers cost 8 bytes x n_layers x bb x Hkv x K_max per graph (LLaDA-8B,
bucket 32, S_max 4096, retention 0.5: 0.5 GiB).

``compile=True`` additionally runs each transformer block under ``torch.compile`` (one code object for all
layers; a string names another torch.compile backend) before capture (``_compile_blocks`` says how every
batch bucket shares it); ``fuse=True`` concatenates q|k|v and gate|up weights in place (``fuse_projections_``:
same parameters, one GEMM instead of three / two)."""
from __future__ import annotations

import gc
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from dlc.kernels.logits import decode_rows
from dlc.kernels.sampling import decode_rows_ext, filter_route
from dlc.kernels.packed_attn import table_rows, tile_table, write_table
from dlc.models.common import KVCache, fuse_projections_, pack_parts, unpack_parts
from dlc.models.packed import PackedCache, packable

from dlc.models.sparse_heads import kept_counts

from ..decoding import MAX_LOGPROBS
from ..step import MixedBatch, StepBatch, block_as_prefix, block_rows_as_prefix, take_rows
from ..step_output import StepOutput
from .ahead import AheadRun, decoded_cols, resume, run_ahead
from .eager import VOCAB_CHUNK, EagerRunner, scatter_delta
from .packed import MIX_ITERATIONS, TOKEN_BUCKETS, packed_seqs, run_packed, token_bucket

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
MAX_BLOCK_VIEWS = 2      # replays of a block decoder's step over several blocks, at most (``_block_rows``)
LOGPROB_BUCKETS = (0, 1, 2, 5, 10, MAX_LOGPROBS)   # top alternatives a variant returns (rows take their k)
DECODE = ("fused", "exact")


class ExtrasKey(NamedTuple):
    """The decoding extras a captured Reuse variant holds (``GraphRunner._extras_key``, in its graph key)."""
    entropy: bool
    logprobs: int          # top alternatives returned (a LOGPROB_BUCKETS entry), -1: no logprobs
    credit_width: int      # credit ids per position (0: no credit)
    smooth_tau: float      # smoothing's temperature (0.0: no smoothing)
    sampled: bool          # T > 0
    filtered: str | bool   # sampling.filter_route: over the sweep's candidates ("filtered" / "mixed"), or
                           # the exact bisection ("bisect..." plan); False: no filters
    smooth_k: int = 0      # truncated smoothing: the soft embedding over each row's top k (0: all tokens)
    tempered: bool = False  # block decoders at T > 0: rows / T decoded at temperature 1 (eager ``_tempered``)


def tempered_rows(rows: torch.Tensor, temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A captured step's tempered decoding (block decoders at T > 0), as the eager runner's ``_tempered``:
    rows / T (a float32 0-dim divisor, as its Python float: the rows' dtype, opmath float32) and the
    temperature 1 to draw at -> (rows, ones like ``temp`` [1])."""
    return rows / temp.to(torch.float32)[0], torch.ones_like(temp)


def capture_graph(step, mempool) -> tuple:
    """``step()`` run twice on a side stream (warm-up: compiles, lazy inits, cuBLAS workspaces), then captured
    as a CUDA graph into ``mempool`` (created when None: a runner's graphs share one pool, as they replay one
    at a time with their outputs copied out) -> (graph, the captured call's outputs, the pool, the
    perf_counter when the warm-up ended)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    warmed = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    mempool = torch.cuda.graph_pool_handle() if mempool is None else mempool
    # No cyclic collection while capturing: a dead runner's CUDAGraph freed by the collector mid-capture
    # resets itself, which CUDA refuses during a capture and which invalidates this one (seen on an H200:
    # "operation not permitted when stream is capturing (function reset)", then every later capture of the
    # pool failed); torch no longer collects before a capture (``force_cudagraph_gc``).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=mempool):
            out = step()
    finally:
        if collecting:
            gc.enable()
    return graph, out, mempool, warmed


def fused_route(ex: ExtrasKey) -> str:
    """How ``fused`` decoding computes a T = 0 variant ``ex`` (one home for the choice: one GPU's
    ``GraphRunner._decode_extras`` and a tensor-parallel rank's ``shard_runner.fused_rules_decode``, which
    takes the same route over its vocab shard): "smooth", smoothing alone at tau 1 (selection and soft
    embedding from one pass of model-dtype logits, ``dlc.kernels.smoothing``); "sweep", smoothing beside
    other extras or at another tau (the decoding core's chunk sweep in float32: the soft embedding is a
    second vocabulary GEMM no kernel holds with them); "extras", everything else (entropy, logprobs, credit:
    the selected-row logits sweep, credit as its sparse correction, ``dlc.kernels.fused_select_extras``)."""
    if ex.smooth_tau == 1.0 and not (ex.entropy or ex.logprobs >= 0 or ex.credit_width):
        return "smooth"
    return "sweep" if ex.smooth_tau else "extras"


def t0_extras_key(batch: StepBatch) -> ExtrasKey:
    """The T = 0 extras of ``batch`` (no filters, no guidance) as an ``ExtrasKey`` for
    ``fused_extras_decode``, logprobs with exactly the batch's k (uncaptured decoding: no bucket)."""
    return ExtrasKey(bool(batch.entropy), -1 if batch.logprobs is None else batch.logprobs,
                     0 if batch.credit_ids is None else batch.credit_ids.shape[-1],
                     float(batch.soft_tau or 0.0), False, False,
                     batch.soft_top_k if batch.soft_tau is not None else 0)


def fuses_t0(batch: StepBatch) -> bool:
    """Does ``fused`` decoding take this batch: T = 0, no guidance, and extras (if any) that a captured
    variant holds (``GraphRunner._extras_key``)? One predicate for the graph runner's eager decodes and a
    compiled engine's row decoding."""
    return (batch.temperature == 0 and batch.fed == batch.n_seqs
            and GraphRunner._extras_key(batch) is not None)                  # T = 0: no host reads


def fused_extras_decode(rows: torch.Tensor, head: torch.Tensor, embed: torch.Tensor, ex: ExtrasKey,
                        credit: tuple | None) -> dict:
    """``fused`` decoding at T = 0 of rows [B, N, d] with the extras ``ex`` over the LM head and input
    embedding (both [vocab, d]) -> decode_rows_ext's dict (one home: the graph runner's captured and eager
    steps, and a compiled engine's row decoding on CUDA, ``CompiledRunner._decode_outputs``). The route is
    ``fused_route``'s: ``smooth`` (``dlc.kernels.smoothing.smooth_select``), ``sweep`` (``decode_rows_ext``
    in float32), ``extras`` (``dlc.kernels.fused_select_extras``, credit as its sparse correction)."""
    B, N = rows.shape[:2]
    V = head.shape[0]
    route = fused_route(ex)
    if route == "smooth":
        from dlc.kernels.smoothing import chunk_columns, smooth_select    # one pass of bf16 logits
        return smooth_select(rows, head, embed, vocab=V, chunk=chunk_columns(B * N, V, VOCAB_CHUNK),
                             top_k=ex.smooth_k)
    if route == "sweep":
        ar = torch.arange(B, device=rows.device)
        one = torch.ones(1, dtype=rows.dtype, device=rows.device)
        return decode_rows_ext(rows, head, ar, ar, one, 0.0, torch.zeros_like(ar), vocab=V, chunk=VOCAB_CHUNK,
                               topk=max(ex.logprobs, 0), logprobs=ex.logprobs >= 0, entropy=ex.entropy,
                               credit=credit, soft=(embed, ex.smooth_tau, ex.smooth_k), acc=torch.float32)
    from dlc.kernels import fused_select_extras
    cargs = () if credit is None else (credit[0].flatten(0, 1), credit[1].flatten(0, 1),
                                       credit[2][:, None].expand(B, N).reshape(-1))          # [B * N] each
    out = fused_select_extras(rows.flatten(0, 1), head, ex.entropy, max(ex.logprobs, 0), *cargs)
    return {key: v.view(B, N, *v.shape[1:]) for key, v in out.items()}


@dataclass
class _PackedGraph:
    """Static buffers of one captured packed mixed forward (a token bucket of ``n_pad`` tokens): inputs and
    the varlen kernel's tables (``packed_attn.tile_table`` / ``write_table``), output h [1, n_pad, d]."""
    ids: torch.Tensor           # [1, n_pad] packed tokens (padding: the mask id)
    pos: torch.Tensor           # [1, n_pad] their positions
    add: torch.Tensor           # [1, n_pad, d] embedding adds (zero where a part adds none)
    tiles: torch.Tensor         # [n_rows, 4] int64: header (entries used), then (first, end, slot, keys)
    dst: torch.Tensor           # [n_pad, 2] int64 (slot, column) each token's K/V goes to; -1 padding
    h: torch.Tensor | None = None
    graph: object = None
    adds: bool = False          # ``add`` holds a part's adds (zeroed before a call without)


@dataclass
class _Graph:
    """Static buffers of one captured Reuse step: inputs [bb, ...] and outputs tok/conf [bb, N]."""
    bb: int
    T: int
    N: int
    ids: torch.Tensor           # [bb, T] fed tokens
    pos: torch.Tensor           # [bb, T] their positions
    key_mask: torch.Tensor      # [bb, S] attended cache columns
    # meta [5, bb]: pool slot, cache column of ids[:, 0], first decoded row in the slice, valid keys,
    # kept columns used (head-sparse); meta_host: its staging copy on the host (pinned on CUDA)
    meta: torch.Tensor
    meta_host: torch.Tensor
    keep: torch.Tensor | None = None   # head-sparse: [n_layers, bb, Hkv, K_max] kept columns per head
    ex: tuple = ()                     # decoding extras variant: () plain, else an ExtrasKey
    credit: tuple | None = None         # (ids [bb, N, M] int64, vals [bb, N, M] float64, alpha [bb] float64)
    embed: torch.Tensor | None = None   # smoothing: [bb, T, d] added to the fed columns' input embedding
    sampling: tuple | None = None       # T > 0: (temperature [1] float64, seeds [bb] int64)
    filters: tuple | None = None        # (top_k [bb] int64, top_p [bb] float64, min_p [bb] float64)
    tok: torch.Tensor | None = None
    conf: torch.Tensor | None = None
    extras: dict | None = None          # the variant's static extras outputs ([bb, N] / [bb, N, k])
    graph: object = None
    rows_used: int = 0          # real rows of the last call (padding rows past it are already reset)
    inputs: torch.Tensor | None = None       # [5 * bb + bb * T] int64: meta | ids, one buffer (the TP worker
    inputs_host: torch.Tensor | None = None  # stages both with one copy; its host twin holds meta_host)

    rows = property(lambda self: self.meta[0])
    start = property(lambda self: self.meta[1])
    off = property(lambda self: self.meta[2])
    kv_len = property(lambda self: self.meta[3])
    n_keep = property(lambda self: self.meta[4])


class GraphRunner(EagerRunner):
    graphed = True                           # step.GraphedRunner: binds a scratch pool slot, warms up

    def __init__(self, model, *, decode: str | None = None, buckets=BUCKETS, capture: bool | None = None,
                 compile: bool | str = False, fuse: bool | None = None, max_width: int = 128,
                 pool_attention: bool | None = None, sparse_retention: float | None = None,
                 mix_iterations: str | None = None, token_buckets=TOKEN_BUCKETS):
        super().__init__(model, sparse_retention)
        cuda = self.device.type == "cuda"
        self.pool_attention = cuda if pool_attention is None else pool_attention
        self.decoding = decode or ("fused" if cuda else "exact")
        if self.decoding not in DECODE:
            raise ValueError(f"graph runner: decode must be one of {DECODE}, got {self.decoding!r}")
        if capture and not cuda:
            raise ValueError("graph runner: capture=True needs the model on a CUDA device")
        self.capture = cuda if capture is None else capture
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError(f"graph runner: buckets must be positive integers, got {buckets}")
        self.max_width = max_width
        self.warm_rows = self.buckets[-1]        # rows per view of a step over several blocks: the largest
                                                 # bucket warm-up captured (``_block_rows``)
        self.pool = self.scratch = self._mempool = None
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.packed_graphs: dict[int, _PackedGraph] = {}       # token bucket -> captured packed forward
        self._ahead: AheadRun | None = None     # the latest run of steps ahead (continue_ahead goes on)
        self.stats = {"replays": 0, "eager_reuse": 0, "captures": 0, "host_s": 0.0, "capture_s": 0.0,
                      "ahead_calls": 0, "ahead_continued": 0,
                      "block_rows": 0,  # block decoders' steps over several blocks, replayed row per block
                      "warm_s": 0.0}    # first runs of each captured shape (compilation, with compile)
        if fuse if fuse is not None else cuda:
            fuse_projections_(model)
        self.compiled = bool(compile)
        self.mix_iterations = self._mix_iterations(mix_iterations)
        self.mixes = self.mix_iterations != "two"              # step.MixedRunner
        self.token_buckets = tuple(sorted(int(b) for b in token_buckets))
        if compile:
            self._compile_blocks("inductor" if compile is True else compile)

    def _mix_iterations(self, mode: str | None) -> str:
        """How a mixed iteration runs (runners/packed.py ``MIX_ITERATIONS``). Default: with capture ``two``
        (an eager ragged forward lost to compiled Refresh + captured Reuse on an H100, 0.82x-1.01x:
        bench/RESULTS.md), else ``eager``. ``compiled`` (one packed forward through the compiled blocks)
        is opt-in: on an H200 it was 0.92x / 0.48x / 0.92x the two calls at 2x768+30x32 / 1x768+7x32 /
        4x768+60x32 (bench/mixed_iteration.py ``graph2/graph_packed``, bench/RESULTS.md: each part's
        attention launched per layer outside any graph). ``captured`` (compiled blocks or not): the packed
        forward with the varlen attention kernel, captured per token bucket: 1.00x / 1.03x / 0.96x the two
        calls at the same mixes (H200, bench/RESULTS.md: parity, so two calls stay the default)."""
        mode = mode or ("two" if self.capture else "eager")
        if mode not in MIX_ITERATIONS:
            raise ValueError(f"graph runner: mix_iterations must be one of {MIX_ITERATIONS}, got {mode!r}")
        if mode == "compiled" and not self.compiled:
            raise ValueError("graph runner: mix_iterations='compiled' runs the compiled blocks; "
                             "needs compile")
        return mode

    def _compile_blocks(self, backend: str) -> None:
        """Compile each transformer block once for every batch bucket: the batch dimension is dynamic.

        Dynamo compiles the first bucket with static shapes; the next bucket's guard fails on the batch size
        only, so it recompiles once with that dimension symbolic (automatic dynamic shapes), and every larger
        bucket reuses that code: two compilations per fed width, whatever the bucket list. Per-bucket static
        compiles would cost one compilation per bucket (``len(BUCKETS)`` = 11 > Dynamo's default limit of
        8 with ``fullgraph=True``: the ``FailOnRecompileLimitHit`` that stopped ``--compile`` at
        ``--max-batch-size 64``) for kernels that matter little here (GEMMs are cuBLAS calls either way).
        CUDA-graph capture stays valid: a symbolic size is a host-side integer that each capture records as
        the bucket's concrete launch sizes, and the compiled code allocates from the capture's pool.
        Python inside the blocks must therefore never pin the batch size (``kernels/pool_attn.validate``
        formats sizes only on failure).

        The blocks also run every eager forward (Refresh, full, Reuse fallbacks, guidance), each kind with its
        own guards and a static, a dynamic and a batch-1 entry: mixed traffic needs more than Dynamo's
        default 8 entries (a request would fail with ``FailOnRecompileLimitHit``). So the recompile limit is
        raised: 32 for those kinds, plus two per bucket, so that if some change pins the batch size again
        each bucket compiles once (slower warm-up) instead of failing at startup
        (tests/runtime/test_compile_buckets.py counts the compilations, so such a change fails there)."""
        import torch._dynamo

        from dlc.models.llada_moe import pack_model_experts
        pack_model_experts(self.model)           # MoE: compiled blocks read the packed experts as they are
        cfg = torch._dynamo.config
        need = 2 * len(self.buckets) + len(self.token_buckets) + 32
        if getattr(cfg, "recompile_limit", need) < need:
            cfg.recompile_limit = need
        for b in self.model.blocks:
            b.compile(fullgraph=True, backend=backend)

    # -- the pool --------------------------------------------------------------------------------------------
    def release_graphs(self) -> None:
        """Drop every captured graph and their memory pool (a fresh pool next time: reusing one whose graphs
        died trips the caching allocator's use_count assert, torch 2.11)."""
        self.graphs.clear()
        self.packed_graphs.clear()
        self._mempool = None
        self._ahead = None

    def bind_pool(self, kv) -> None:
        """Take one slot of the serving KV pool (``KVCacheManager``) for the padding rows; a pool of one slot
        leaves graphs off (every Reuse step runs eagerly)."""
        if kv is self.pool:
            return
        self.pool = self.scratch = None
        self.release_graphs()                # captured over another pool's tensors
        if kv.n_slots < 2:
            return
        self.pool, self.scratch = kv, kv.allocate()
        if self.scratch is None:
            raise ValueError("graph runner: bind_pool needs a free KV slot for padding rows")

    @staticmethod
    def _extras_key(batch: StepBatch) -> tuple | None:
        """The captured variant a batch replays: () for a plain T = 0 step; else (entropy, logprobs k or -1,
        credit width M, smoothing tau or 0.0, sampled, filtered), one variant per combination, captured on
        first use; ``filtered`` is ``sampling.filter_route``'s answer (reads the [B] filters on the host):
        over the sweep's top candidates, or the exact bisection on the survivors' threshold (a
        ``filter_bisect.bisect_plan`` route: top-p / min-p without a top-k, a top-k over 64, filters with
        credit). Block decoders at T > 0 (``tempered``: confidences from rows / T) replay the plain draw or
        the filters, whose confidence is then renormalised over the survivors (``filtered_conf``, the eager
        runner's); with other extras they stay eager, as does a soft input without a soft output (None)."""
        sampled = batch.temperature > 0
        if not batch.wants_extras() and not sampled:
            return ()
        tempered = sampled and batch.tempered_conf   # block decoders: the draw, filtered or not
        if ((batch.embed_delta is not None and batch.soft_tau is None)
                or (tempered and batch.wants_extras(filters=False))):
            return None
        filtered = False
        if batch.top_k is not None and sampled:      # the candidates or the bisection (sampling.filter_route)
            filtered = filter_route(batch.top_k, batch.top_p, batch.min_p, filtered_conf=tempered,
                                    credit=batch.credit_ids is not None)
        M = 0
        if batch.credit_ids is not None:
            M = batch.n_out                          # a block's credit grows by one id a step: <= N steps
            if batch.credit_ids.shape[-1] > M:
                return None
        k = -1 if batch.logprobs is None else next(b for b in LOGPROB_BUCKETS if b >= batch.logprobs)
        return ExtrasKey(bool(batch.entropy), k, M, float(batch.soft_tau or 0.0), sampled, filtered,
                         batch.soft_top_k if batch.soft_tau is not None else 0, tempered)

    def _eligible(self, batch: StepBatch, ex: tuple | None) -> bool:
        c = batch.cache
        # ``ex``: the batch's ``_extras_key`` (None: decoding the captured variants lack, eager)
        return (self.pool is not None and c is not None and c.k[0] is self.pool.k[0] and batch.cfg_scale <= 0
                and ex is not None and batch.n_seqs <= self.buckets[-1] and batch.n_fed <= self.max_width
                and not batch.block_size          # block-causal over several blocks: ``_block_rows``
                and batch.width <= self.pool.s_max
                and (batch.keep_idx is not None) == (self.sparse_retention is not None))

    def kept_max(self, T: int) -> int:
        """Head-sparse: the most columns a row of fed width T keeps (its cache as long as the pool's)."""
        return kept_counts([self.pool.s_max], T, self.sparse_retention)[0]

    def bucket(self, B: int) -> int:
        return next(b for b in self.buckets if b >= B)

    # -- capture ---------------------------------------------------------------------------------------------
    def _graph(self, bb: int, T: int, N: int, ex: tuple = ()) -> _Graph:
        key = (bb, T, N) + ((ex,) if ex else ())
        if key in self.graphs:
            return self.graphs[key]
        t0 = time.perf_counter()
        dev, S = self.device, self.pool.s_max
        inputs = torch.full((5 * bb + bb * T,), self.config.mask_id, dtype=torch.long, device=dev)
        meta, ids = inputs[:5 * bb].view(5, bb), inputs[5 * bb:].view(bb, T)        # [5, bb], [bb, T]
        meta.zero_()
        meta[0], meta[3], meta[4] = self.scratch, T, T
        host = inputs.cpu().pin_memory() if dev.type == "cuda" else inputs.clone()
        g = _Graph(bb, T, N, ids=ids,
                   pos=torch.arange(T, device=dev).repeat(bb, 1),
                   key_mask=torch.zeros(bb, S, dtype=torch.bool, device=dev),
                   meta=meta, meta_host=host[:5 * bb].view(5, bb), ex=ex, inputs=inputs, inputs_host=host)
        g.key_mask[:, :T] = True
        if ex and ex.sampled:                          # temperature, seeds, filters (padding rows: off)
            g.sampling = (torch.ones(1, dtype=torch.float64, device=dev), torch.zeros(bb, dtype=torch.long,
                                                                                      device=dev))
            if ex.filtered:
                g.filters = (torch.zeros(bb, dtype=torch.long, device=dev),
                             torch.ones(bb, dtype=torch.float64, device=dev),
                             torch.zeros(bb, dtype=torch.float64, device=dev))
        if ex and ex.smooth_tau:                       # smoothing's soft inputs: none until staged
            g.embed = torch.zeros(bb, T, self.config.d_model, dtype=self.dtype, device=dev)
        if ex and ex.credit_width:                     # credit inputs: neutral (alpha 0) until staged
            M = ex.credit_width
            g.credit = (torch.zeros(bb, N, M, dtype=torch.long, device=dev),
                        torch.zeros(bb, N, M, dtype=torch.float64, device=dev),
                        torch.zeros(bb, dtype=torch.float64, device=dev))
        if self.sparse_retention is not None:          # padding rows keep columns [0, T): their own block
            mc = self.config
            g.keep = torch.arange(self.kept_max(T), device=dev).repeat(mc.n_layers, bb, mc.n_kv_heads, 1)
        if self.capture:
            g.graph, res = self._capture(lambda: self._step(g), t0)
            g.tok, g.conf, g.extras = self._split(res)
        else:                       # no capture (CPU): one run, so warm-up still compiles every bucket
            self._step(g)           # (padding rows: the scratch slot only)
            self.stats["warm_s"] += time.perf_counter() - t0
        self.graphs[key] = g
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - t0
        return g

    def _capture(self, step, t0: float) -> tuple:
        """``capture_graph`` into the runner's one memory pool; the warm-up's seconds since ``t0`` go to
        ``stats["warm_s"]`` -> (the CUDA graph, the captured call's outputs)."""
        graph, out, self._mempool, warmed = capture_graph(step, self._mempool)
        self.stats["warm_s"] += warmed - t0
        return graph, out

    @staticmethod
    def _split(res):
        """A step's result -> (tok, conf, extras dict or None)."""
        if isinstance(res, dict):
            return res["tokens"], res["confidence"], {k: v for k, v in res.items()
                                                      if k not in ("tokens", "confidence")}
        return res[0], res[1], None

    @torch.no_grad()
    def _step(self, g: _Graph):
        """The captured computation: static inputs -> (tok [bb, N], conf [bb, N]), or with extras (``g.ex``)
        ``_decode_extras``' dict."""
        if g.keep is not None:                         # head-sparse: the kept columns, read in the pool
            cache = KVCache(self.pool.k, self.pool.v, g.rows, g.kv_len, keep=g.keep, n_keep=g.n_keep)
        else:
            cache = KVCache(self.pool.k, self.pool.v, g.rows, g.kv_len if self.pool_attention else None)
        h = self.model_forward(g.ids, g.pos, g.key_mask, cache, g.start, g.embed)               # [bb, T, d]
        return self._graph_decode(take_rows(h, g.off, g.N), g)                   # rows [bb, N, d]

    def _graph_decode(self, rows: torch.Tensor, g: _Graph):
        """The captured step's decoding of rows [bb, N, d] (a tensor-parallel shard overrides it with the
        vocab-parallel combine: runtime/distributed/shard_graph.py)."""
        if g.ex:
            return self._decode_extras(rows, g.ex, g.credit, g.sampling, g.filters)
        if self.decoding == "exact":
            return self._exact(rows)
        from dlc.kernels import fused_select_logits
        tok, conf = fused_select_logits(rows.reshape(-1, rows.shape[-1]), self.model.head_weight())
        return tok.view(g.bb, g.N), conf.view(g.bb, g.N)

    def _decode_extras(self, rows: torch.Tensor, ex: tuple, credit: tuple | None,
                       sampling: tuple | None = None, filters: tuple | None = None) -> dict:
        """Rows [B, N, d] with the extras ``ex`` (``_extras_key``) -> decode_rows_ext's dict. ``exact``, and
        every sampled step (T > 0: ``sampling`` = (temperature [1], seeds [B]); ``filters`` over the sweep's
        candidates): the eager runner's float64 ``decode_rows_ext`` (tokens equal EagerRunner's: the same hash
        noise); ``fused`` at T = 0: the selected-row logits kernel with the extras in its one vocab sweep
        (``fused_select_extras``); a smoothing step (its soft embedding is a second GEMM over the vocabulary,
        which the kernel does not hold) ``dlc.kernels.smoothing.smooth_select`` (selection and soft embedding
        from one pass of model-dtype logits), with other extras beside it ``decode_rows_ext`` in float32."""
        entropy, k, M, tau, sampled, filtered, smooth_k, tempered = ex
        topk = max(k, 0)
        if tempered:
            rows, temp = tempered_rows(rows, sampling[0])
            sampling = (temp, sampling[1])
        B, N = rows.shape[:2]
        V = self.config.vocab_size
        head = self.model.head_weight()[:V]
        embed = self.model.embed.weight[:V]
        if self.decoding == "fused" and not sampled:
            return fused_extras_decode(rows, head, embed, ex, credit)
        ar = torch.arange(B, device=rows.device)
        one = torch.ones(1, dtype=rows.dtype, device=rows.device)
        soft = (embed, tau, smooth_k) if tau else None
        temp, seeds = sampling if sampled else (0.0, torch.zeros_like(ar))
        return decode_rows_ext(rows, head, ar, ar, one, temp, seeds, vocab=V, chunk=VOCAB_CHUNK,
                               topk=topk, logprobs=k >= 0, entropy=entropy, credit=credit, soft=soft,
                               filters=filters, acc=torch.float64, candidates=filtered or None,
                               filtered_conf=tempered)

    def _exact(self, rows: torch.Tensor):
        """The eager runner's decoding of rows [bb, N, d] at T = 0 (tokens equal EagerRunner's)."""
        bb = rows.shape[0]
        ar = torch.arange(bb, device=rows.device)
        one = torch.ones(1, dtype=rows.dtype, device=rows.device)
        return decode_rows(rows, self.model.head_weight(), ar, ar, one, 0.0, torch.zeros_like(ar),
                           vocab=self.config.vocab_size, chunk=VOCAB_CHUNK, topk=0)

    def _fuses(self, b: StepBatch) -> bool:
        """Decoded as the captured steps decode: ``fused`` mode, T = 0, no guidance, extras (if any) that the
        fused sweep computes."""
        return self.decoding == "fused" and fuses_t0(b)

    def _fused(self, rows: list[torch.Tensor]) -> list:
        """Rows [B_i, N_i, d] of one or more parts through the Triton selected-row logits in one pass over the
        LM head (no [B, N, V] logits, no float64 softmax) -> [(x0 [B_i, N_i], conf float64)]."""
        from dlc.kernels import fused_select_logits
        tok, conf = fused_select_logits(torch.cat([r.flatten(0, 1) for r in rows]), self.model.head_weight())
        sizes = [r.shape[0] * r.shape[1] for r in rows]                      # [B_i * N_i] each
        return [(t.view(r.shape[:2]), c.view(r.shape[:2]).to(torch.float64))
                for t, c, r in zip(tok.split(sizes), conf.split(sizes), rows)]

    def decode(self, rows: torch.Tensor, batch: StepBatch):
        """Eager steps (Refresh, full, Reuse fallbacks) decode as the graphs do (``_fuses``), else as the
        eager runner."""
        if not self._fuses(batch):
            return super().decode(rows, batch)
        ex = self._extras_key(batch)
        if not ex:
            return self._fused([rows])[0]
        return StepOutput.from_decode(self._decode_extras(rows, ex, batch.credit()))

    # -- the runner contract (full / refresh: EagerRunner's) -----------------------------------------------
    @contextmanager
    def _host_seconds(self, key: str):
        """Adds the host seconds of the block to ``stats[key]``, less a capture run inside it (a first call's
        capture counts in ``capture_s``, not as host time per call)."""
        t0, c0 = time.perf_counter(), self.stats["capture_s"]
        yield
        self.stats[key] += time.perf_counter() - t0 - (self.stats["capture_s"] - c0)

    @torch.no_grad()
    def reuse(self, batch: StepBatch):
        graphed = self._graphed_view(batch)
        ex = self._extras_key(graphed)
        if self._eligible(graphed, ex):
            with self._host_seconds("host_s"):
                res = self._replay(graphed, ex)
                self.stats["replays"] += 1
            return res
        views = self._block_rows(batch)
        if views is not None:
            with self._host_seconds("host_s"):
                for view, ex in views[:-1]:            # finished blocks the last view's rows read
                    self._launch(self._stage(view, ex))
                res = self._replay(*views[-1])        # (x0, conf), or a StepOutput with sampling filters
                self.stats["replays"] += 1
                self.stats["block_rows"] += 1
            B = batch.n_seqs
            return res.map(lambda t: t[:B]) if isinstance(res, StepOutput) else (res[0][:B], res[1][:B])
        self.stats["eager_reuse"] += 1
        return super().reuse(batch)

    def _block_rows(self, batch: StepBatch) -> list | None:
        """A block decoder's step over several whole blocks (a block's first step feeds the finished block
        too; a prefill feeds the prompt's complete blocks) as one captured Reuse row per (sequence, block)
        (``step.block_rows_as_prefix``), in views of at most the largest warmed bucket's rows -> [(view, its
        variant)], or None: not such a step, a view the captured steps cannot run, or more than
        ``MAX_BLOCK_VIEWS`` views (a long prefill of many rows: compute-bound, where the eager forward's one
        pass over the weights beats many replays that each read them)."""
        if not batch.block_size or self.pool is None:
            return None
        views = block_rows_as_prefix(batch, self.warm_rows, self.config.logit_shift)
        if views is None or len(views) > MAX_BLOCK_VIEWS:
            return None
        ex = self._extras_key(views[0])           # the views hold the same sequences: one variant (one read
        out = [(v, ex) for v in views]            # of the filters on the host)
        return out if all(self._eligible(v, ex) for v in views) else None

    @staticmethod
    def _graphed_view(batch: StepBatch) -> StepBatch:
        """The batch as the captured steps run it: a block-causal Reuse step over one block as the ordinary
        Reuse step over the prefix up to the block's end (``step.block_as_prefix``: the same attention);
        every other batch as it is (a block's first step, which feeds the finished block too, stays
        block-causal: ``_eligible`` refuses it, and ``reuse`` replays it as rows per block:
        ``_block_rows``)."""
        return (block_as_prefix(batch) or batch) if batch.block_size else batch

    def _replay(self, batch: StepBatch, ex: tuple):
        B = batch.n_seqs
        g = self._stage(batch, ex)
        tok, conf = self._launch(g)
        if not batch.wants_extras():                   # plain (x0, conf), sampled steps too
            return tok[:B].clone(), conf[:B].to(torch.float64)
        return StepOutput(tok[:B].clone(), conf[:B].to(torch.float64),
                          **{k: v[:B].clone() for k, v in g.extras.items()})

    def _stage(self, batch: StepBatch, ex: tuple = ()) -> _Graph:
        """Copy the batch's rows into its bucket's static inputs (capturing the bucket's variant ``ex`` on
        first use)."""
        B, T, N, W, S = batch.n_seqs, batch.n_fed, batch.n_out, batch.width, self.pool.s_max
        self._ahead = None                             # a run ahead cannot go on over restaged inputs
        g = self._graph(self.bucket(B), T, N, ex)
        m = g.meta_host                                                           # [4, bb] on the host
        m[0, :B] = batch.slots
        m[1, :B] = batch.q_start
        m[2, :B] = batch.out_start - self.config.logit_shift - batch.q_start
        m[3, :B] = batch.lengths
        m[0, B:], m[1:3, B:], m[3:5, B:] = self.scratch, 0, T                 # padding rows: scratch slot
        if g.keep is not None:
            m[4, :B] = batch.keep_idx.shape[-1]
            self._stage_keep(g, batch.keep_idx, B, T)
        g.meta.copy_(m, non_blocking=True)
        if g.credit is not None:
            self._stage_credit(g, batch.credit_ids, batch.credit_vals, batch.credit_alpha, B)
        if g.sampling is not None:
            self._stage_sampling(g, batch, B)
        if g.embed is not None:                        # smoothing: the fed span's input delta, padding none
            d = batch.embed_delta
            first = None if d is None else batch.out_start.to(d.device) - batch.q_start_dev      # [B]
            self._stage_embed(g, d, first, B)
        cols = g.start[:B, None] + torch.arange(T, device=batch.ids.device)       # [B, T]
        torch.gather(batch.ids, 1, cols, out=g.ids[:B])
        torch.gather(batch.pos, 1, cols, out=g.pos[:B])
        g.key_mask[:B, :W].copy_(batch.key_mask)
        if W < S:
            g.key_mask[:B, W:] = False
        # rows that were real last call
        if g.rows_used > B:
            g.key_mask[B:g.rows_used] = False
            g.key_mask[B:g.rows_used, :T] = True
        g.rows_used = B
        return g

    @staticmethod
    def _stage_sampling(g: _Graph, batch: StepBatch, B: int) -> None:
        """T > 0: the temperature, the rows' seeds and filters; padding rows seed 0, no filter."""
        temp, seeds = g.sampling
        temp.fill_(batch.temperature)
        seeds[:B].copy_(batch.seeds)
        seeds[B:] = 0
        if g.filters is not None:
            for buf, src, off in zip(g.filters, (batch.top_k, batch.top_p, batch.min_p), (0, 1.0, 0.0)):
                buf[:B].copy_(src)
                buf[B:] = off

    @staticmethod
    def _stage_credit(g: _Graph, credit_ids, credit_vals, credit_alpha, B: int) -> None:
        """The rows' credit (ids / values [B, N, M_b], alpha [B]) into the graph's [bb, N, M] buffers (ids /
        values past M_b: zero, no credit); padding rows get alpha 0."""
        ids, vals, alpha = g.credit
        Mb = credit_ids.shape[-1]
        ids[:B, :, :Mb].copy_(credit_ids)
        vals[:B, :, :Mb].copy_(credit_vals)
        ids[:B, :, Mb:] = 0
        vals[:B, :, Mb:] = 0
        alpha[:B].copy_(credit_alpha)
        alpha[B:] = 0

    @staticmethod
    def _stage_embed(g: _Graph, delta: torch.Tensor | None, first: torch.Tensor | None, B: int) -> None:
        """Smoothing's soft inputs: ``delta`` [B, N, d] on the fed columns [first, first + N) ([B] on the
        device) of the graph's static embedding input [bb, T, d], zeros elsewhere; None (the block's first
        step: no soft input yet) and padding rows: zeros."""
        if delta is None:
            g.embed[:B] = 0
        else:
            scatter_delta(g.embed[:B], delta, first)
        g.embed[B:] = 0

    @staticmethod
    def _stage_keep(g: _Graph, keep: torch.Tensor, B: int, T: int) -> None:
        """keep [n_layers, B, Hkv, K] into the graph's kept-column buffer; rows that were real last call and
        are padding now go back to columns [0, T) (their scratch-slot block)."""
        if keep.shape[-1] > g.keep.shape[-1]:
            raise ValueError(f"graph runner: {keep.shape[-1]} kept columns > the graph's {g.keep.shape[-1]}")
        g.keep[:, :B, :, :keep.shape[-1]].copy_(keep)
        if g.rows_used > B:
            g.keep[:, B:g.rows_used, :, :T] = torch.arange(T, device=g.keep.device)

    def _launch(self, g: _Graph):
        """Replay (or, without capture, run) the step over the static inputs -> its static (tok, conf)."""
        if g.graph is not None:
            g.graph.replay()
            return g.tok, g.conf
        g.tok, g.conf, g.extras = self._split(self._step(g))
        return g.tok, g.conf

    # -- steps ahead of the host (step.LookaheadRunner) --------------------------------------------------
    ahead_rules = True              # takes the decoding core's commit of any rule it runs ahead (AheadCommit)

    def can_run_ahead(self, batch: StepBatch, commit=None) -> bool:
        """A Reuse batch the graphs take; with the core's ``commit`` (rules beyond low-confidence, or extras)
        also the entropy, credit, logprobs and smoothing extras (their captured variant; the commit carries
        credit and smoothing's soft input in the variant's static inputs). Sampled batches too (their
        variant's static temperature and filters hold for the run; ``reuse_ahead`` stages each step's
        seeds)."""
        batch = self._graphed_view(batch)
        return (batch.phase == "reuse" and (commit is not None or not batch.wants_extras(filters=False))
                and self._eligible(batch, self._extras_key(batch)))

    @torch.no_grad()
    def reuse_ahead(self, batch: StepBatch, counts: torch.Tensor, commit=None, seeds=None):
        """``counts.shape[1]`` Reuse steps back to back: after each, the step's commit (``commit_ahead``, or
        the core's ``commit``: ``decoding.AheadCommit``) writes the block's new tokens into the graph's static
        ids, which the next replay reads (and carries credit in the variant's static credit inputs, writes
        smoothing's next soft input into its static ``embed`` at the decoded columns); a sampled batch's
        ``seeds`` [B, n] go into the variant's static seeds step by step. The host launches them all at
        once, and each step's outputs are copied back as it ends (``AheadSteps``)."""
        if not self.can_run_ahead(batch, commit):
            raise ValueError("graph runner: this batch cannot run steps ahead (see can_run_ahead)")
        B, n = batch.n_seqs, counts.shape[1]
        batch = self._graphed_view(batch)                   # block-causal over one block: the prefix step
        with self._host_seconds("host_s"):                                      # until launched
            g = self._stage(batch, self._extras_key(batch))
            cols = decoded_cols(batch, self.device)                                 # [B, N] in the fed span
            out = run_ahead(lambda: (*self._launch(g), g.extras), g.ids[:B], cols,
                            counts.to(self.device, non_blocking=True), self.config.mask_id, commit, g.credit,
                            None if g.embed is None else (g.embed, cols),
                            (None if g.sampling is None else g.sampling[1],       # sampled: static seeds
                             None if seeds is None else seeds.to(self.device, non_blocking=True)))
            self._ahead = out.run
            self.stats["replays"] += n
            self.stats["ahead_calls"] += 1
        return out

    @torch.no_grad()
    def continue_ahead(self, steps, counts: torch.Tensor, seeds=None):
        """``counts.shape[1]`` more steps of the latest run, from the commits its last launch left in the
        graph's static ids (step.LookaheadRunner); a sampled run's ``seeds`` [B, n] likewise."""
        run = resume(self._ahead, steps, type(self).__name__)
        with self._host_seconds("host_s"):
            out = run.steps(counts.to(self.device, non_blocking=True),
                            None if seeds is None else seeds.to(self.device, non_blocking=True))
            self.stats["replays"] += counts.shape[1]
            self.stats["ahead_continued"] += 1
        return out

    @torch.no_grad()
    def mixed(self, batch: MixedBatch) -> list:
        """A mixed iteration as one forward, its Reuse rows attending inside the bound pool
        (``pool_attention``: keys [0, length), no gather), decoded as the graphs decode (``decode_parts``):
        ``mix_iterations`` ``compiled``: one packed forward through the compiled blocks (``run_packed``;
        ``stats["mixed_packed"]``), ``captured``: that forward replayed as a CUDA graph (``_packed``), else
        (or for parts it cannot pack) one eager ragged forward
        (``EagerRunner.mixed``; compiled blocks run eagerly there)."""
        self.stats["mixed"] = self.stats.get("mixed", 0) + 1
        if self.pool_attention and self.pool is not None:
            batch = MixedBatch(tuple(self._in_pool(b) for b in batch.parts))
        if self.mix_iterations in ("compiled", "captured"):
            out = self._packed(batch)
            if out is not None:
                self.stats["mixed_packed"] = self.stats.get("mixed_packed", 0) + 1
                return out
        if not self.compiled:
            return super().mixed(batch)
        with torch.compiler.set_stance("force_eager"):      # compiled blocks: no recompile per ragged shape
            return super().mixed(batch)

    @property
    def max_packed_rows(self) -> int:
        """Rows (sequences) a captured packed forward's tile table holds: guidance doubles a batch's rows."""
        return 2 * self.buckets[-1]

    def _packed(self, batch: MixedBatch) -> list | None:
        """A packed mixed iteration: ``captured``, the bucket's captured forward (``_packed_graph``) when
        every part reads the bound pool through the varlen kernel (``packed_seqs``) and the rows fit its
        tables, else (and for ``compiled``) the uncaptured packed forward (``run_packed``); None: not
        packable."""
        if self.mix_iterations != "captured" or self.pool is None:
            return run_packed(self, batch, self.token_buckets, self.max_packed_rows)
        parts = [self.inputs(b) for b in batch.parts]
        pool = packable(parts)
        seqs = None if pool is None else packed_seqs(batch.parts, parts)
        if seqs is None or len(seqs) > self.max_packed_rows \
                or pool.k[0].untyped_storage().data_ptr() != self.pool.k[0].untyped_storage().data_ptr():
            return run_packed(self, batch, self.token_buckets, self.max_packed_rows)
        n = sum(p.ids.numel() for p in parts)
        g = self._packed_graph(token_bucket(n, self.token_buckets))
        with self._host_seconds("host_s"):
            self._stage_packed(g, parts, seqs, n)
            if g.graph is not None:
                g.graph.replay()
                h = g.h
            else:                                                   # no capture (CPU): the same forward
                h = self._packed_step(g)
        self.stats["mixed_captured"] = self.stats.get("mixed_captured", 0) + 1
        hs = unpack_parts(h[0], parts)                                             # [r_i, c_i, d]
        return self.decode_parts([self.decoded_rows(x, b) for x, b in zip(hs, batch.parts)], batch.parts)

    def _stage_packed(self, g: _PackedGraph, parts, seqs, n: int) -> None:
        """The mix's packed inputs and tables into the bucket's static buffers."""
        n_pad = g.ids.shape[1]
        ids, pos, add = pack_parts(parts, self.config.d_model, n_pad - n, self.config.mask_id)
        g.ids.copy_(ids)
        g.pos.copy_(pos)
        if add is not None:
            g.add.copy_(add)
        elif g.adds:
            g.add.zero_()
        g.adds = add is not None
        g.tiles.copy_(tile_table(seqs, g.tiles.shape[0]))
        g.dst.copy_(write_table(seqs, n_pad))

    @torch.no_grad()
    def _packed_step(self, g: _PackedGraph) -> torch.Tensor:
        """The captured computation: static packed inputs -> h [1, n_pad, d] (K/V written into the pool)."""
        cache = PackedCache(self.pool, (g.tiles, g.dst))
        return self.model(g.ids, g.pos, None, cache=cache, embed_add=g.add)

    def _packed_graph(self, n_pad: int) -> _PackedGraph:
        """The token bucket's static buffers, captured on first use (warm-up runs have empty tables: they
        write no K/V and attend nowhere)."""
        if n_pad in self.packed_graphs:
            return self.packed_graphs[n_pad]
        t0 = time.perf_counter()
        dev = self.device
        g = _PackedGraph(ids=torch.full((1, n_pad), self.config.mask_id, dtype=torch.long, device=dev),
                         pos=torch.zeros(1, n_pad, dtype=torch.long, device=dev),
                         add=torch.zeros(1, n_pad, self.config.d_model, dtype=self.dtype, device=dev),
                         tiles=torch.zeros(table_rows(n_pad, self.max_packed_rows), 4, dtype=torch.long,
                                           device=dev),
                         dst=torch.full((n_pad, 2), -1, dtype=torch.long, device=dev))
        if self.capture:
            g.graph, g.h = self._capture(lambda: self._packed_step(g), t0)
            self.stats["captures"] += 1
        self.packed_graphs[n_pad] = g
        self.stats["capture_s"] += time.perf_counter() - t0
        return g

    def decode_parts(self, rows: list[torch.Tensor], parts) -> list:
        """One fused pass when every part decodes as the graphs do (``_fuses``); else the eager runner's."""
        if all(self._fuses(b) and not b.wants_extras() for b in parts):
            return self._fused(rows)
        return super().decode_parts(rows, parts)

    def _in_pool(self, b: StepBatch) -> StepBatch:
        c = b.cache
        if b.phase != "reuse" or b.block_size or c is None or c.k[0] is not self.pool.k[0]:
            return b
        kv_len = b.lengths.to(self.device, non_blocking=True)                     # [fed] valid keys
        return replace(b, cache=c.with_(kv_len=kv_len))

    def warmup(self, widths: list[tuple[int, int]], max_batch: int) -> None:
        """Capture every bucket up to ``max_batch`` for each (fed width, decoded width) before serving."""
        if self.pool is None:
            return
        top = 2 * max_batch if self.config.block_diffusion else max_batch   # a block's first step: 2 rows
        for T, N in widths:                                                 # per sequence (``_block_rows``)
            for bb in self.buckets:
                self._graph(bb, T, N)
                if bb >= top:
                    break
            self.warm_rows = bb
        if self.compiled and widths:
            self._warm_eager(widths[0][1])
        elif self.mix_iterations == "captured" and widths:       # capture the first token buckets' forwards
            self._warm_packed(widths[0][1])

    @torch.no_grad()
    def _warm_eager(self, blk: int) -> None:
        """With compiled blocks, the eager forwards (full, Refresh, Reuse fallbacks) compile on their first
        shapes: a static entry, one with the changed dimensions dynamic, one for batch 1 at a new width.
        Run each kind at those three shapes here, over the scratch slot, so serving does not stall on them."""
        from ..step import build_batch
        mc, S = self.config, self.pool.s_max
        blocks = mc.block_diffusion
        for B, W in ((1, blk + 8), (2, 2 * blk + 8), (1, 3 * blk + 8)):
            W = min(W, S)
            n = min(blk, W - 1 - mc.logit_shift)               # decoded columns after a prompt of >= 1
            if n < 1:
                continue
            p = W - n
            seqs = [torch.full((W,), mc.mask_id, dtype=torch.long)] * B
            for phase in ("full", "refresh", "reuse"):
                batch = build_batch(self, phase, seqs, [p] * B, [p] * B, n, [(p, W)] * B,
                                    [(self.scratch,)] * B, self.pool, block_size=blk if blocks else 0)
                getattr(EagerRunner, phase)(self, batch)
            if B == 2:                    # rows of unequal length: a Refresh with a key mask (else none)
                batch = build_batch(self, "refresh", [seqs[0], seqs[1][:-1]], [p] * B, [p] * B, n, None,
                                    [(self.scratch,)] * B, self.pool, block_size=blk if blocks else 0)
                EagerRunner.refresh(self, batch)
        if self.mix_iterations in ("compiled", "captured"):
            self._warm_packed(blk)

    @torch.no_grad()
    def _warm_packed(self, blk: int) -> None:
        """The packed mixed forward compiles at its first two token buckets (static shapes, then the token
        dimension symbolic): run a full part beside a Reuse row (the per-part op's forward: parts without a
        cache) and a Refresh part beside it (the varlen kernel's forward; not for block diffusion models,
        whose parts attend block-causally) over the scratch slot at two buckets; ``captured`` captures the
        varlen forward's buckets."""
        from ..step import MixedBatch, build_batch
        mc = self.config
        W = min(2 * blk + 8, self.pool.s_max)
        n = min(blk, W - 1 - mc.logit_shift)
        if n < 1:
            return
        p, bs = W - n, blk if mc.block_diffusion else 0
        seq = torch.full((W,), mc.mask_id, dtype=torch.long)
        first = token_bucket(W + n, self.token_buckets)
        for rows in (1, -(-(first + 1 - n) // W)):                   # the second total in a larger bucket
            firsts = [build_batch(self, "full", [seq] * rows, [p] * rows, [p] * rows, n, block_size=bs)]
            if not bs:
                firsts.append(build_batch(self, "refresh", [seq] * rows, [p] * rows, [p] * rows, n, None,
                                          [(self.scratch,)] * rows, self.pool))
            reuse = build_batch(self, "reuse", [seq], [p], [p], n, [(p, W)], [(self.scratch,)], self.pool,
                                block_size=bs)
            if self.pool_attention:
                reuse = self._in_pool(reuse)
            for first in firsts:
                self._packed(MixedBatch((first, reuse)))
