"""The serving engine: model (eager dir/preset or compiled engine dir) + KV slot pool + scheduler + loop.

An iteration (``step``) is schedule, run, postprocess: the scheduler picks the requests (it only chooses and
holds KV slots); the engine starts newly admitted requests' decoding states, groups the picked states
(runtime/step.py), runs one runner call per group, applies each result to its state and advances it
(runtime/decoding.py), then emits the tokens that became final. An iteration that holds Refresh (or full)
rows beside Reuse rows runs all its groups as ONE forward when the runner mixes (``step.supports_mixed``:
``MixedBatch``, one pass over the weights, attention per row kind); other runners get one call per group.

Isolation: a runner call that raises is retried with each of its requests alone, so the request whose own
data breaks the call fails alone (finish_reason "error", the error recorded) and the others continue with
exactly their solo output (the retry reuses the step's sampling seeds; K/V are rewritten by it). An error
while applying or advancing one request fails that request only.

Threading: one engine thread runs ``step()`` in a loop; other threads only call ``add_request`` and
``abort``, which queue work under ``self.lock`` and wake the loop. All scheduling state (queues, slots,
request decoding state) is touched by the engine thread only, so a cancelled request's slot is freed at the
start of the next iteration, never under a running forward. Output reaches callers through each request's
``on_output(req, new_ids, finished)`` callback, called on the engine thread as blocks finalize.

Request parameters: ``make_request`` turns a prompt and the diffusion fields (gen_length, block_length, steps,
threshold, factor, remasking, kv_cache, temperature, seed, cfg_scale) into a validated ``Request``; missing
fields come from the model/engine directory's defaults; values that can never be served raise ValueError
naming the field (the server answers 400). ``max_tokens`` (OpenAI's) sets the generation length when the
request gives no explicit ``gen_length``: rounded up to whole blocks, within the maximum sequence, with
steps in the default steps-per-token ratio (``fit_length``); the output is then capped at max_tokens.
With an explicit gen_length, max_tokens only caps the output (finish_reason "length"). ``stop``
strings are matched on the detokenized output as blocks finish (runtime/stops.py): the request finishes
there with finish_reason "stop" and ``stop_text`` holds its text before the stop.

This module imports no web framework (the GPU machine has none)."""
from __future__ import annotations

import dataclasses
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import torch

from . import boundary
from .ahead_window import AheadWindow
from .batch_invariant import batch_invariant_mode
from .batch_invariant import check_runner as check_invariant_runner
from .compile_cache import CompileCache
from .config import BLOCK_GEN_KEYS, GEN_KEYS, ServeConfig, model_generation_defaults
from .decoding import DecodeState, FieldError, GenerationConfig, ahead_commit, apply_batch
from .distributed.runner import TensorParallelRunner
from .generate import check_prompts
from .granularity import Granularity, measure_step_times
from .kv_cache import KVCacheManager, slot_bytes
from .memory import plan_kv_budget
from .metrics import Metrics
from .request import CANCELLED, FINISHED, Request
from .runners.compiled import CompiledRunner
from .runners.eager import EagerRunner
from .runners.graph import GraphRunner
from .scheduler import SCHEDULERS
from .step import (MixedBatch, ahead_seeds, check_runner, draw_seeds, group_states, is_graphed,
                   is_mixed_iteration, make_batch, run_batch, run_mixed, runs_ahead, supports_mixed)
from .step_output import StepOutput
from .stops import StopStrings

REQUEST_FIELDS = GEN_KEYS + ("factor", "temperature", "seed", "cfg_scale", "stop_token_ids", "low_threshold",
                             "entropy_bound", "credit", "smoothing", "smoothing_top_k", "top_k", "top_p",
                             "min_p", "logprobs") + BLOCK_GEN_KEYS
RUN_MAX = 1 << 16                                   # a run ahead: the rest of its block's fixed schedule
log = logging.getLogger("dlc.engine")
stats_log = logging.getLogger("dlc.stats")          # the periodic throughput / queue line


class QueueFull(RuntimeError):
    pass


class ServerShutdown(RuntimeError):
    """Ends the requests still running when the server stops (drain limit, or a forced stop)."""


def compiled_blocks_default(device: torch.device) -> bool:
    """Do the graph runner's blocks compile when ``--compile`` is not given? On CUDA, where they pay: MoE
    models too, since compiled MoE blocks read the packed experts as they are and run the grouped GEMM
    (``models/llada_moe._packed``; before, every compiled forward re-stacked every expert's weights: 45.7 vs
    152 tok/s uncompiled at B = 1 on an H200). LLaDA-MoE-7B on an H200 (bench/RESULTS.md): compiled 233.8 vs
    uncompiled 152.1 tok/s at B = 1, 1665.9 vs 1237.8 at B = 32."""
    return device.type == "cuda"


def graph_runner_for(runner, cuda_graphs: bool | None = None, compile: bool | None = None,
                     decode: str | None = None, mix_iterations: str | None = None):
    """The runner serving (and ``dlc generate``) uses: a GraphRunner over an eager model when cuda_graphs is
    on (default: on a CUDA device), its blocks compiled when ``compile`` is on (default: with the graph
    runner on a CUDA device, ``compiled_blocks_default``; off on CPU). An engine keeps its runner: graphs of
    its Reuse program (default: on CUDA) and its export programs compiled by Inductor at load (``compile``,
    default: on CUDA); explicit --no-cuda-graphs keeps the runner as it is. Tensor parallel: the same
    defaults on every rank (graphs and compiled blocks on CUDA; distributed/shard_graph.py).
    ``mix_iterations``: how the graph runner runs a mixed iteration (runners/packed.py; others refuse a
    value)."""
    if isinstance(runner, GraphRunner):
        return runner
    # an eager model gets a GraphRunner where graphs are on (default: on a CUDA device)
    builds = type(runner) is EagerRunner and (runner.device.type == "cuda" if cuda_graphs is None
                                              else bool(cuda_graphs))
    if mix_iterations is not None and not builds:      # refused before any runner changes
        raise ValueError("mix_iterations: applies to the CUDA-graph runner of an eager model "
                         "(--cuda-graphs); leave it out")
    on = cuda_graphs
    if isinstance(runner, TensorParallelRunner):     # graphs (and compiled blocks) on every rank
        cuda = runner.device.type == "cuda"
        on = cuda if on is None else on
        if not on and compile:
            raise ValueError("compile: --compile compiles the CUDA-graph runner's blocks; add --cuda-graphs "
                             "(or leave --compile out)")
        default = compiled_blocks_default(runner.device)
        runner.enable_graphs(on, compile=on and (default if compile is None else compile), decode=decode)
        return runner
    if isinstance(runner, CompiledRunner):           # an engine: its programs compiled, graphs of its Reuse
        cuda = runner.device.type == "cuda"
        runner.enable_compile(cuda and runner.kind == "export" if compile is None else compile)
        runner.enable_graphs(cuda and runner.kv_inplace if on is None else on)
        if decode is not None:                       # how it decodes the programs' hidden rows at T = 0
            runner.decoding = decode
        return runner
    if on is None:
        on = builds
    if not on:
        if compile:
            raise ValueError("compile: --compile compiles the CUDA-graph runner's blocks; add --cuda-graphs "
                             "(or leave --compile out)")
        return runner
    if type(runner) is not EagerRunner:
        raise ValueError("cuda_graphs needs an eager model (a checkpoint or preset) or an engine")
    compile = compiled_blocks_default(runner.device) if compile is None else compile
    return GraphRunner(runner.model, decode=decode, compile=compile,
                       sparse_retention=runner.sparse_retention, mix_iterations=mix_iterations)


def sparse_runner_for(runner, retention: float | None):
    """The runner with head-sparse Reuse at ``retention`` (None: the runner as it is): an eager model's
    runner gets it (``EagerRunner(sparse_retention=...)``; graph runners inherit it); an engine must have
    been compiled with it."""
    if retention is None or runner.sparse_retention == retention:
        return runner
    if type(runner) is EagerRunner:
        return EagerRunner(runner.model, sparse_retention=retention)
    have = runner.sparse_retention
    raise ValueError(f"sparse_retention: this {type(runner).__name__} runs "
                     f"{'dense' if have is None else f'head-sparse at retention {have}'}; "
                     + ("recompile the engine with --sparse-retention" if isinstance(runner, CompiledRunner)
                        else "head-sparse needs an eager model or a head-sparse engine"))


@dataclass
class _OutRow:
    """One request's row ``j`` of a runner call's host ``StepOutput`` (the call's rows apply at once)."""
    out: StepOutput
    j: int


@dataclass
class _AheadRow:
    """One request's share of a run of steps ahead: row ``j`` of ``window`` (its counts: that row)."""
    window: AheadWindow
    j: int
    launched: float = 0.0          # perf_counter at the launch (the run's measured step time)
    bounded: bool = False          # rules whose block may end early: each launch within the rows' horizon
    bs: int | None = None          # the row's block start when the run began (steps after it: dropped)


class Engine:
    def __init__(self, session, cfg: ServeConfig):
        t_init = time.perf_counter()
        self.session, self.cfg = session, cfg
        check_runner(session.runner)
        runner = sparse_runner_for(session.runner, cfg.sparse_retention)
        self.runner = graph_runner_for(runner, cfg.cuda_graphs, False if cfg.batch_invariant else cfg.compile,
                                       cfg.graph_decode, cfg.mix_iterations)
        if cfg.batch_invariant:
            check_invariant_runner(self.runner)
        # an export engine compiled at load: Inductor's code kept in its directory (runtime/compile_cache.py)
        self.compile_cache = (CompileCache.for_engine(session.source, self.runner) if cfg.compile_cache
                              else None)
        if self.compile_cache is not None:
            self.compile_cache.load()
        self.mc = session.config
        self.max_seq = min(cfg.max_seq_len or self.mc.max_seq_len, self.runner.max_seq_len,
                           cfg.max_num_tokens)
        self.gen_defaults = {**model_generation_defaults(session.source, self.mc),   # the resolved directory
                             **{k: getattr(cfg, k) for k in GEN_KEYS if getattr(cfg, k) is not None}}
        GenerationConfig(**self.gen_defaults)   # the defaults must be valid themselves
        self.kv_budget = plan_kv_budget(cfg, self.runner, self.mc, self.max_seq,
                                        self.gen_defaults["block_length"])
        self.kv_budget.check_slot(slot_bytes(self.mc, self.max_seq, self.runner.dtype,
                                             self.runner.sparse_retention is not None), self.max_seq)
        try:
            self.kv = KVCacheManager(self.mc, self.max_seq, self.kv_budget.bytes, self.runner.dtype,
                                     self.runner.device,
                                     max_slots=2 * cfg.max_batch_size + is_graphed(self.runner),
                                     head_scores=self.runner.sparse_retention is not None)
        # the allocator's out-of-memory: one line, what to change
        except (RuntimeError, MemoryError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise ValueError(f"cannot allocate the KV slot pool ({self.kv_budget.bytes / 2**20:.0f} MiB on "
                             f"{self.runner.device}): {first}; lower --kv-cache-mb, --gpu-memory-utilization "
                             f"or --max-batch-size") from None
        if is_graphed(self.runner):
            self.runner.bind_pool(self.kv)             # one slot for the graphs' padding rows
        self.gran = Granularity(cfg.granularity, cfg.chunk_sizes)
        self.scheduler = SCHEDULERS[cfg.policy](cfg, self.mc, self.kv, self.gran, self.runner.device)
        self.metrics = Metrics()
        self.metrics.set("kv_cache_total_slots", self.kv.n_slots)
        self.lock = threading.Condition()
        self._incoming: list[Request] = []
        self._aborts: list[Request] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._tps_count, self._tps_t0 = 0, time.monotonic()
        self.idle_wakeups = 0                         # the loop's waits while idle (none while it sleeps)
        self._ahead_step_s: dict[int, float] = {}    # rows -> seconds per step run ahead (moving average)
        self._fail_msg: str | None = None             # fail_all(): every request ends with this error
        self._log_t0, self._log_tokens, self._log_done = time.monotonic(), 0, 0
        # startup seconds (runtime/startup.py): load_s (from_config), init_s (runner, pool), warmup_s
        self.timings = {"init_s": time.perf_counter() - t_init}

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Engine":
        from .session import open_model
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        session = open_model(cfg.model, dtype=cfg.dtype, device=device, progress=False,
                             tensor_parallel_size=cfg.tensor_parallel_size,
                             tp_all_reduce=cfg.tp_all_reduce, tp_overlap_tokens=cfg.tp_overlap_tokens)
        load_s = time.perf_counter() - t0
        engine = cls(session, cfg)
        engine.timings["load_s"] = load_s
        return engine

    # -- requests -------------------------------------------------------------------------------------------
    def make_request(self, prompt: list[int], params: dict | None = None, max_tokens: int | None = None,
                     rid: str = "", stop: tuple[str, ...] = ()) -> Request:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        unknown = set(params) - set(REQUEST_FIELDS)
        if unknown:
            raise FieldError(sorted(unknown)[0], f"unknown generation fields {sorted(unknown)}")
        p = {**self.gen_defaults, **params}
        if p.get("seed") is None:         # unseeded: the server's --seed, else a fresh draw (samples differ)
            p["seed"] = self.cfg.seed if self.cfg.seed is not None else secrets.randbits(63)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens <= 0):
            raise FieldError("max_tokens", f"max_tokens must be a positive integer, got {max_tokens!r}")
        if max_tokens is not None and "gen_length" not in params:
            p.update(self.fit_length(max_tokens, len(prompt), p, params))
        self._check_stop_ids(p.get("stop_token_ids", ()))
        gen = GenerationConfig(**{k: v for k, v in p.items() if k in REQUEST_FIELDS}, stop_at_eos=True)
        gen = gen.for_model(self.mc)
        check_prompts([prompt], gen.gen_length, self.mc, self.max_seq,
                      gen.block_length if gen.block_decoding else 0)
        if hasattr(self.runner, "check_generation"):        # what a runner cannot decode (compiled engines)
            self.runner.check_generation(gen)
        state = DecodeState.new(list(prompt), gen, self.mc)
        usable = self.kv.n_slots - is_graphed(self.runner)          # the graphs' scratch slot
        if state.cache_rows() > usable:
            raise FieldError("cfg_scale", f"cfg_scale > 0 with kv_cache {gen.kv_cache!r} needs "
                             f"{state.cache_rows()} KV slots; "
                             f"the pool has {usable} (raise kv_cache_mb or use kv_cache 'none')")
        if stop and self.session.tokenizer is None:
            raise FieldError("stop", "stop strings need the model's tokenizer; use stop_token_ids")
        return Request(state, max_tokens=max_tokens, rid=rid,
                       stop=StopStrings(self.session.tokenizer, stop) if stop else None)

    def fit_length(self, max_tokens: int, prompt_len: int, p: dict, params: dict) -> dict:
        """gen_length (and steps, unless the request set them) for ``max_tokens``: whole blocks, at most what
        fits the maximum sequence after the prompt; steps keep the defaults' steps per block width."""
        bl = p["block_length"]
        room = (self.max_seq - prompt_len) // bl * bl
        gen = min(-(-max_tokens // bl) * bl, room) if room >= bl else -(-max_tokens // bl) * bl
        out = {"gen_length": gen}
        if "steps" not in params:
            d = self.gen_defaults
            per_block = max(1, min(bl, round(bl * d["steps"] / d["gen_length"])))
            out["steps"] = per_block * (gen // bl)
        return out

    def _check_stop_ids(self, ids) -> None:
        for t in ids if isinstance(ids, (list, tuple)) else ():
            if isinstance(t, int) and not isinstance(t, bool) and (t == self.mc.mask_id
                                                                   or not 0 <= t < self.mc.vocab_size):
                raise FieldError("stop_token_ids", f"stop_token_ids must be token ids in [0, "
                                 f"{self.mc.vocab_size}) other than the mask id {self.mc.mask_id}, got {t}")

    def add_request(self, req: Request) -> None:
        with self.lock:
            if self._stop:
                raise RuntimeError("the engine is shutting down")
            if self.scheduler.num_waiting + len(self._incoming) >= self.cfg.max_queue:
                self.metrics.inc("rejected_total")
                raise QueueFull(f"the queue is full ({self.cfg.max_queue} waiting requests)")
            self._incoming.append(req)
            self.lock.notify_all()

    def abort(self, req: Request) -> None:
        with self.lock:
            if not req.finished:
                self._aborts.append(req)
                self.lock.notify_all()

    def fail_all(self, message: str) -> None:
        """End every queued and running request with an error (its caller sees it) at the next iteration."""
        with self.lock:
            self._fail_msg = message
            self.lock.notify_all()

    def has_work(self) -> bool:
        with self.lock:
            return bool(self._incoming or self._aborts or self.scheduler.has_work())

    # -- one iteration: schedule, run, postprocess ----------------------------------------------------------
    def step(self) -> int:
        """Run one iteration; returns the number of rows stepped."""
        with self.lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
            fail, self._fail_msg = self._fail_msg, None
        if fail is not None:
            for r in incoming + self.scheduler.requests():
                self._fail(r, ServerShutdown(fail))
            incoming = []
        for r in incoming:
            self.scheduler.add(r)
        for r in aborts:
            if not r.finished:
                self.scheduler.cancel(r)
                self.metrics.inc("requests_total", status="cancelled")
        picked = self.scheduler.schedule()
        n_running = self.scheduler.num_running
        for r in self.scheduler.take_preempted():                 # their cache is gone: rewind the block
            self.metrics.inc("preemptions_total")
            self._guard(r, lambda r=r: (r.state.restart_block(),
                                        r.state.advance(self.gran.width(r, n_running))))
        for r in picked:
            if not r.state.started:
                self._guard(r, lambda r=r: self._emit(r, r.state.advance(self.gran.width(r, n_running))))
        batch = [r for r in picked if not r.finished and r.phase is not None]
        if batch:
            t0 = time.perf_counter()
            with batch_invariant_mode(self.cfg.batch_invariant):
                results = self._run(batch)
            self._record(batch, time.perf_counter() - t0)
            self._postprocess_rows([r for r in batch if isinstance(results.get(id(r)), _OutRow)], results,
                                   n_running)
            ahead = [r for r in batch if isinstance(results.get(id(r)), _AheadRow)]
            if ahead:
                self._apply_ahead(ahead, results, n_running)
        self._update_gauges()
        return len(batch)

    def _postprocess_rows(self, rows: list[Request], results: dict, n_running: int) -> None:
        """Each runner call's rows through the decoding core at once (``apply_batch``: one selection per
        rule over the call's [B, K]), then each request's own bookkeeping. A state whose apply fails fails
        alone; if the batched selection itself raises, every request of that call applies on its own."""
        calls: dict[int, list[Request]] = {}
        for r in rows:
            calls.setdefault(id(results[id(r)].out), []).append(r)
        for group in calls.values():
            out = results[id(group[0])].out
            js = [results[id(r)].j for r in group]
            before = {id(r): r.state.x[r.state.bs:r.state.be].clone() for r in group if r.on_step is not None}
            try:
                sub = out if js == list(range(out.x0.shape[0])) else out.take(js)
                errs = apply_batch([r.state for r in group], sub.x0, sub.conf, sub)
            except Exception:              # noqa: BLE001 - nothing applied yet: request by request
                for r, j in zip(group, js):
                    self._guard(r, lambda r=r, j=j: self._postprocess(r, out.row(j), n_running))
                continue
            for r, err in zip(group, errs):
                self._guard(r, lambda r=r, err=err: self._after_apply(r, err, before.get(id(r)), n_running))

    def _postprocess(self, r: Request, out, n_running: int) -> None:
        st = r.state
        before = st.x[st.bs:st.be].clone() if r.on_step is not None else None     # [K]
        st.apply(out.x0, out.conf, out)
        self._after_apply(r, None, before, n_running)

    def _after_apply(self, r: Request, err: Exception | None, before, n_running: int) -> None:
        """A request's bookkeeping after its state applied a step (``err``: its apply failed)."""
        if err is not None:
            raise err
        st = r.state
        if before is not None:               # provisional tokens: what this step unmasked in the block
            pos = (st.x[st.bs:st.be] != before).nonzero()[:, 0]
            r.on_step(r, st.bs - st.P, pos.tolist(), st.x[st.bs + pos].tolist())
        self._emit(r, st.final_prefix() + st.advance(self.gran.width(r, n_running)))

    def _run(self, reqs: list[Request]) -> dict[int, tuple]:
        """One runner call per group; one ``mixed`` call for all groups of an iteration that holds Refresh (or
        full) rows beside Reuse rows; or, for a lone Reuse group while nothing waits, several fixed-schedule
        steps run ahead on the device -> {id(request): its row's StepOutput on the host, or its ``_AheadRow``}
        for those that ran."""
        results: dict[int, tuple] = {}
        split = isinstance(self.runner, GraphRunner)
        groups = [[reqs[i] for i in idx]
                  for idx in group_states([r.state for r in reqs], self.runner.max_batch_size,
                                          split_extras=split)]
        # one ragged forward attends through attend_ragged, not the mode's kernels: a row's numbers would
        # depend on whether its iteration mixed (bench/probes/invariance_timeline.py found it on an H100)
        if supports_mixed(self.runner) and not self.cfg.batch_invariant \
                and is_mixed_iteration([g[0].phase for g in groups]):
            self._run_mixed(groups, results)
            return results
        with self.lock:                               # steps ahead only while nothing waits for admission
            idle = not self._incoming and not self.scheduler.num_waiting
        cap = self._ahead_cap(len(groups[0])) if idle and len(groups) == 1 and runs_ahead(self.runner) else 1
        for group in groups:
            if not (cap > 1 and self._run_ahead(group, results, cap)):
                self._run_group(group, results)
        return results

    def _ahead_cap(self, rows: int) -> int:
        """Steps a run ahead keeps in flight (its window): ``lookahead_steps``, fewer where the measured step
        time of this many rows would make them last over ``lookahead_max_ms`` (a request arriving meanwhile
        waits for the steps in flight: at B=32 on an H100 16 steps last ~0.65 s of TTFT; bench/RESULTS.md)."""
        cap, step_s = self.cfg.lookahead_steps, self._ahead_step_s.get(rows)
        if self.cfg.lookahead_max_ms and step_s:
            cap = min(cap, max(2, int(self.cfg.lookahead_max_ms / 1000 / step_s)))
        return cap

    def _run_mixed(self, groups: list[list[Request]], results: dict) -> None:
        """Every group in one forward (``run_mixed``); if it raises, each group runs on its own with the
        step's seeds (``_run_group`` then isolates the request whose data breaks its call)."""
        seeds = [draw_seeds([r.state for r in g]) for g in groups]
        try:
            batch = MixedBatch(tuple(make_batch(self.runner, [r.state for r in g], [r.slots for r in g],
                                                self.kv, sd) for g, sd in zip(groups, seeds)))
            outs = run_mixed(self.runner, batch)
        except Exception:                  # noqa: BLE001 - retried group by group, then request by request
            self.metrics.inc("isolated_batches_total")
            for g, sd in zip(groups, seeds):
                self._run_group(g, results, sd)
            return
        self.metrics.inc("mixed_iterations_total")
        for g, out in zip(groups, outs):
            for j, r in enumerate(g):
                results[id(r)] = _OutRow(out, j)

    def _run_ahead(self, group: list[Request], results: dict, cap: int) -> bool:
        """Start a window of ``cap`` steps in flight over the group's remaining fixed-schedule Reuse steps of
        the block (``AheadWindow``; ``_apply_ahead`` keeps it full); False where it cannot (the one-step path
        runs it, and isolates a request whose data fails)."""
        counts = [r.state.lookahead(RUN_MAX) for r in group]
        n = min(len(c) for c in counts)
        if n < 2:
            return False
        states = [r.state for r in group]
        try:
            commit = ahead_commit(states, self.runner.device)      # None: the low-confidence schedule
            if commit is not None and not getattr(self.runner, "ahead_rules", False):
                return False
            seeds = ahead_seeds(states, n)            # sampled rows: each step's seed, drawn as it applies
            batch = make_batch(self.runner, states, [r.slots for r in group], self.kv,
                               [0] * len(states) if seeds is None else seeds[:, 0].tolist())
            if not (self.runner.can_run_ahead(batch) if commit is None
                    else self.runner.can_run_ahead(batch, commit=commit)):
                return False
            bounded = any(s.ahead_bounded() for s in states)
            # variable-count rules: 2 steps at first (the next launches see step 0 applied: ``_apply_ahead``)
            win = AheadWindow(self.runner, batch, torch.tensor([c[:n] for c in counts]), cap, commit,
                              min(2, self._horizon(states)) if bounded else None, seeds)
        except Exception as e:             # noqa: BLE001 - state untouched: run it one step at a time
            log.debug("steps ahead failed, one step instead: %s", e)
            return False
        t0 = time.perf_counter()
        for j, r in enumerate(group):
            results[id(r)] = _AheadRow(win, j, t0, bounded, r.state.bs)
        self.metrics.inc("lookahead_runs_total", rule="schedule" if commit is None else "rules")
        return True

    @staticmethod
    def _horizon(states: list, blocks: list | None = None) -> int:
        """Steps from the next one on worth launching for a run of these rows: the first row whose block ends
        ends the run (``DecodeState.ahead_horizon``); 0 once a row's is over (``blocks``: each row's block
        start in the run; a block decoder's next block is a Reuse step too)."""
        if any(s.phase != "reuse" for s in states) or (
                blocks is not None and any(s.bs != b for s, b in zip(states, blocks))):
            return 0
        return min(s.ahead_horizon() for s in states)

    def _arrivals(self) -> bool:
        """Whether a request (or an abort, a failure) waits for the loop: the window stops launching."""
        with self.lock:
            return bool(self._incoming or self._aborts or self._fail_msg or self.scheduler.num_waiting)

    def _apply_ahead(self, rows: list[Request], results: dict, n_running: int) -> None:
        """Apply steps run ahead as each lands, each through the decoding core; after each landing the window
        launches the next step (``AheadWindow.refill``) unless a request waits or a row was dropped, so the
        device runs the later steps meanwhile. A row stops where the core's own commit or schedule differs
        from what the device assumed for its next step (those steps are dropped and run again). A run of
        variable-count rules (``bounded``) launches after applying each landed step instead, within the rows'
        horizon as that step left them (``_horizon``), so that few steps launch past a block's end."""
        rows = sorted(rows, key=lambda r: results[id(r)].j)          # the run's row order
        win, live = results[id(rows[0])].window, list(rows)
        bounded = results[id(rows[0])].bounded
        s, pre, landed, launching = 0, False, (0.0, 0), True

        def may_launch() -> bool:      # every row still fed as the core, steps left, no request waiting
            return launching and len(live) == len(rows) and win.launched < win.n and not self._arrivals()
        while s < win.launched:
            win.wait(s)
            if not pre:                                # a Refresh launched ahead would count as steps
                landed = (time.perf_counter(), s + 1)
            if not bounded and may_launch():
                launching = self._refill(win)
            for r in list(live):
                if not self._fed_as_core(r, win, results[id(r)].j, s, results[id(r)].bs):
                    self.metrics.inc("lookahead_dropped_steps_total", win.launched - s)
                    # its block completed before these steps
                    if r.finished or r.state.phase != "reuse" or r.state.bs != results[id(r)].bs:
                        self.metrics.inc("lookahead_past_block_steps_total", win.launched - s)
                    live.remove(r)
                    continue
                out = win.output(s, results[id(r)].j)
                draw_seeds([r.state])                  # the seed step s ran with: the generator moves past it
                self._guard(r, lambda r=r, out=out: self._postprocess(r, out, n_running))
            if bounded and may_launch():
                launching = self._refill(win, s + 1 + self._horizon([r.state for r in live],
                                                                    [results[id(r)].bs for r in live]))
            if not pre and len(live) == len(rows) and self._block_ends_next(rows, win, results, s, bounded):
                pre = self._prelaunch(rows, win, n_running, close=bounded)     # see _prelaunch: why only now
                launching = launching and not pre          # nothing launches behind the Refresh
            s += 1
        self._time_steps(len(rows), (landed[0] - results[id(rows[0])].launched) / landed[1])
        self.metrics.set("lookahead_in_flight_max", win.max_in_flight)
        if pre:
            self._take_prelaunched(pre, win, n_running)

    def _refill(self, win: AheadWindow, upto: int | None = None) -> bool:
        """Launch the window's next step (none from step ``upto`` on: the rows' horizon); False (launch no
        more: the steps in flight still land and apply, the rest run the normal way) if the runner refuses."""
        try:
            win.refill(upto)
            return True
        except Exception as e:             # noqa: BLE001 - nothing of the states changed
            log.warning("run ahead: launching the next step failed, the rest of the block runs one step at "
                        "a time: %s", e)
            return False

    def _time_steps(self, rows: int, per_step: float) -> None:
        """Measured seconds per step run ahead at this many rows (a moving average): the window's bound."""
        old = self._ahead_step_s.get(rows)
        self._ahead_step_s[rows] = per_step if old is None else 0.7 * old + 0.3 * per_step

    @staticmethod
    def _fed_as_core(r: Request, win: AheadWindow, j: int, s: int, bs: int | None = None) -> bool:
        """Whether the device fed row j's step s what the core would: the core's state is at that step of
        the schedule, in the run's block (``bs``: its start when the run began), and its block equals the
        device's commit of step s - 1 (landed with step s - 1)."""
        st = r.state
        return not r.finished and (bs is None or st.bs == bs) and st.fed_ahead(int(win.counts[j, s])) and (
            s == 0 or torch.equal(st.x[st.bs:st.be], win.fed_block(s, j)))

    def _block_ends_next(self, rows: list[Request], win: AheadWindow, results: dict, s: int,
                         bounded: bool) -> bool:
        """Whether step s + 1 (launched, step s applied) ends every row's block: the fixed schedule's run
        ends there (its last step); a variable-count run (``bounded``) has one mask left in each row, which
        that step unmasks (every step unmasks one at least; steps launched after it commit nothing). Only
        small groups (``boundary.PRELAUNCH_MAX_ROWS``), every row fed step s + 1 as the core would."""
        if len(rows) > boundary.PRELAUNCH_MAX_ROWS or win.launched < s + 2:
            return False
        if bounded:
            if any(r.state.masks_left() != 1 for r in rows):
                return False
        elif not s == win.n - 2 == win.launched - 2:
            return False
        return all(self._fed_as_core(r, win, results[id(r)].j, s + 1, results[id(r)].bs) for r in rows)

    def _prelaunch(self, rows: list[Request], win: AheadWindow, n_running: int, close: bool = False):
        """The next block's Refresh launched behind the step that ends the rows' blocks (``_block_ends_next``;
        runtime/boundary.py) while nothing waits; False where it does not apply or fails (the Refresh then
        runs the normal way). ``close``: a variable-count run, whose block ends by its masks (the copies
        close it; their host tokens still hold the last mask). Only once every earlier step is applied and
        the last one is known to be fed what the core would feed it: the Refresh rewrites every column's K/V,
        which a row whose Reuse steps were dropped (run again in this block) would still read; after the last
        step a row either refreshes or finishes, so a dropped prelaunch is harmless."""
        if self._arrivals():
            return False
        try:
            with batch_invariant_mode(self.cfg.batch_invariant):
                return boundary.prelaunch(self.runner, rows, 1, win.last_block(), self.kv,
                                          lambda r: self.gran.width(r, n_running), close) or False
        except Exception as e:             # noqa: BLE001 - nothing of the states changed
            log.debug("refresh prelaunch failed: %s", e)
            return False

    def _take_prelaunched(self, pre: boundary.Prelaunched, win: AheadWindow, n_running: int) -> None:
        """Apply the launched Refresh where the core's states are the predicted ones; else drop it."""
        t0 = time.perf_counter()
        try:
            with batch_invariant_mode(self.cfg.batch_invariant):
                out = boundary.take(pre, self.runner, [win.fed_block(win.launched, j) for j in pre.index])
        except Exception as e:             # noqa: BLE001 - the normal Refresh runs next iteration
            log.debug("prelaunched refresh failed: %s", e)
            out = None
        self.metrics.inc("lookahead_refresh_prelaunched_total", status="dropped" if out is None else "used")
        if out is None:
            return
        draw_seeds([r.state for r in pre.rows])        # the Refresh's seeds (boundary.prelaunch drew alike)
        self._record(pre.rows, time.perf_counter() - t0)
        self._postprocess_rows(pre.rows, {id(r): _OutRow(out, j) for j, r in enumerate(pre.rows)}, n_running)

    def _run_group(self, group: list[Request], results: dict, seeds: list[int] | None = None) -> None:
        states = [r.state for r in group]
        seeds = draw_seeds(states) if seeds is None else seeds     # a retry reuses the step's seeds
        try:
            batch = make_batch(self.runner, states, [r.slots for r in group], self.kv, seeds)
            out = run_batch(self.runner, batch)
        except Exception as e:             # noqa: BLE001 - whose data broke the call? run each request alone
            if len(group) == 1:
                self._fail(group[0], e)
                return
            self.metrics.inc("isolated_batches_total")
            for r, seed in zip(group, seeds):
                self._run_group([r], results, [seed])
            return
        for j, r in enumerate(group):
            results[id(r)] = _OutRow(out, j)

    def _guard(self, r: Request, fn) -> None:
        """Run one request's own bookkeeping; an error there fails that request only."""
        try:
            fn()
        except Exception as e:             # noqa: BLE001
            self._fail(r, e)

    def _fail(self, r: Request, err: Exception) -> None:
        if r.finished:
            return
        self.scheduler.release(r, CANCELLED)
        r.finish_reason, r.error = "error", f"{type(err).__name__}: {err}"
        r.finish_time = time.monotonic()
        self.metrics.inc("requests_total", status="error")
        log.warning("failed %s after %.3f s: %s", r.rid, r.finish_time - r.arrival, r.error)
        if r.on_output is not None:
            r.on_output(r, [], True)

    def _record(self, batch, dt: float) -> None:
        m = self.metrics
        tokens = {"refresh": 0, "reuse": 0, "full": 0}
        for r in batch:
            tokens[r.phase] += r.cost()
        total = sum(tokens.values())
        for ph, n in tokens.items():
            if n:
                m.inc("phase_tokens_total", n, phase=ph)
        m.inc("iterations_total")
        m.observe("step_seconds", dt)
        m.set("phase_refresh_share", (tokens["refresh"] + tokens["full"]) / max(1, total))
        reuse_rows = sum(r.phase == "reuse" for r in batch)
        refresh_rows = len(batch) - reuse_rows
        m.set("iteration_refresh_rows", refresh_rows)
        m.set("iteration_reuse_rows", reuse_rows)
        if refresh_rows and reuse_rows:
            m.inc("phase_mixed_iterations_total")
        self.gran.observe(tokens["reuse"] or total, dt)

    def _emit(self, r: Request, new: list[int]) -> None:
        done = r.state.finished and not r.finished
        if r.max_tokens is not None:
            new = new[:max(0, r.max_tokens - len(r.output_ids))]
            if len(r.output_ids) + len(new) >= r.max_tokens and not r.finished:
                done = True
        if r.stop is not None and new and not r.finished:
            cut = r.stop.find(r.output_ids + new)
            if cut is not None:                      # a stop string: keep the tokens through it, end here
                new = new[:max(0, cut.n_tokens - len(r.output_ids))]
                r.stop_text, done = cut.text, True
        if new or done:
            now = time.monotonic()
            if r.first_token_time is None:
                r.first_token_time = now
                self.metrics.observe("ttft", now - r.arrival)
            r.output_ids += new
            self.metrics.inc("generated_tokens_total", len(new))
            self._tps_count += len(new)
        if done:
            self._finish(r)
        if (new or done) and r.on_output is not None:
            r.on_output(r, new, done)

    def _finish(self, r: Request) -> None:
        capped = r.max_tokens is not None and len(r.output_ids) >= r.max_tokens
        stopped = r.stop_text is not None or (r.state.stopped and not capped)
        r.finish_reason = "stop" if stopped else "length"
        self.scheduler.release(r, FINISHED)
        r.finish_time = time.monotonic()
        self.metrics.inc("requests_total", status="finished")
        self.metrics.observe("latency", r.finish_time - r.arrival)
        log.info("finished %s: %d prompt + %d completion tokens, %d forwards, %.3f s, %s", r.rid, r.P,
                 len(r.output_ids), r.forwards, r.finish_time - r.arrival, r.finish_reason)

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.scheduler
        with self.lock:
            m.set("queue_length", s.num_waiting + len(self._incoming))
        m.set("running_requests", s.num_running)
        m.set("kv_cache_used_slots", self.kv.num_used)
        m.set("kv_cache_usage_ratio", self.kv.usage())
        m.set("granularity_chunk", self.gran.last_chunk)
        m.set("saturation_tokens", self.gran.saturation or 0)
        now = time.monotonic()
        if now - self._tps_t0 >= 1.0:   # tokens/s over windows of about a second
            m.set("tokens_per_second", self._tps_count / (now - self._tps_t0))
            self._log_tokens += self._tps_count
            self._tps_count, self._tps_t0 = 0, now
        self._log_load(now)

    def _log_load(self, now: float) -> None:
        """vLLM-style console line every log_interval_s while requests run or wait (or just finished)."""
        dt, s = now - self._log_t0, self.scheduler
        if not self.cfg.log_interval_s or dt < self.cfg.log_interval_s:
            return
        busy = s.num_running or s.num_waiting
        if busy or self._log_tokens:
            stats_log.info("throughput %.1f tokens/s; running %d, waiting %d requests; KV slots %d/%d used",
                     self._log_tokens / dt, s.num_running, s.num_waiting, self.kv.num_used, self.kv.n_slots)
        self._log_t0, self._log_tokens = now, 0

    def set_policy(self, policy: str) -> None:
        """Switch the scheduler policy of an idle engine (the serving benchmark times every policy over one
        model, KV pool and set of captured graphs)."""
        cfg = dataclasses.replace(self.cfg, policy=policy)          # validates the name
        with self.lock:
            if self._incoming or self.scheduler.has_work():
                raise RuntimeError("set_policy: the engine has requests in flight")
            self.cfg = cfg
            self.scheduler = SCHEDULERS[policy](cfg, self.mc, self.kv, self.gran, self.runner.device)

    # -- warm-up and the loop --------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One tiny forward (first-call costs), the graphs' capture (and compilation), and in elastic mode the
        saturation measurement; ``timings["warmup_s"]`` records how long it took."""
        with batch_invariant_mode(self.cfg.batch_invariant):   # graphs capture the mode's kernels
            self._warmup()

    def _warmup(self) -> None:
        t0 = time.perf_counter()
        sizes = [8]
        if self.cfg.granularity == "elastic":
            sizes = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if n <= self.max_seq]
        timings = measure_step_times(self.runner, sizes, repeats=1 if len(sizes) == 1 else 3)
        if is_graphed(self.runner):                   # capture the default block's Reuse step at every bucket
            blk = min(self.gen_defaults["block_length"], self.gen_defaults["gen_length"])
            self.runner.warmup([(blk + self.mc.logit_shift, blk)], self.cfg.max_batch_size)
        if self.cfg.granularity == "elastic":
            self.gran.calibrate(timings)
        self._update_gauges()
        self.timings["warmup_s"] = time.perf_counter() - t0
        if self.compile_cache is not None:
            self.compile_cache.save()

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def run_requests(self, items: list[tuple[list[int], dict | None]]) -> list[Request]:
        """Offline: ``items`` [(prompt ids, request params)] through the scheduler to completion -> the
        finished requests, in order (each with its output or its error)."""
        reqs = [self.make_request(p, params) for p, params in items]
        for r in reqs:
            self.add_request(r)
        self.run_until_done()
        return reqs

    def generate(self, prompts: list[list[int]], params: dict | None = None) -> list[list[int]]:
        """Offline helper: all prompts through the scheduler, outputs in order."""
        return [r.output_ids for r in self.run_requests([(p, params) for p in prompts])]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dlc-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self._incoming or self._aborts or self.scheduler.has_work()
                           or self._fail_msg) and not self._stop:
                    self.idle_wakeups += 1
                    self.lock.wait(self._idle_timeout())
                    self._update_gauges()      # idle: tokens/s decays to 0
                if self._stop and not (self._incoming or self._aborts or self.scheduler.has_work()):
                    return
            try:
                self.step()
            except Exception as e:   # noqa: BLE001 - a bug outside any one request's work:
                                     # the server stays up
                self._fail_all(e)

    def _idle_timeout(self) -> float | None:
        """How long the idle loop sleeps: 0.5 s while the tokens/s gauge or the load line still owe the last
        work's figures (they decay to 0), then until a request, an abort or a stop notifies it: an idle
        engine never polls, and ``add_request``'s notify wakes it at once."""
        owed = (self._tps_count or self.metrics.gauges["tokens_per_second"]
                or (self.cfg.log_interval_s and self._log_tokens))
        return 0.5 if owed else None

    def _fail_all(self, err: Exception) -> None:
        """Last resort (an error in scheduling itself, not in a request's call or bookkeeping)."""
        for r in self.scheduler.requests():
            self._fail(r, err)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work; with ``drain`` finish in-flight requests first."""
        with self.lock:
            self._stop = True
            if not drain:
                self._aborts += self._incoming + self.scheduler.requests()
                self._incoming = []
            self.lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.compile_cache is not None:            # the shapes compiled while serving, for the next start
            self.compile_cache.save()
