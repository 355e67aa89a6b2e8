"""The serving engine: model (eager dir/preset or compiled engine dir) + KV slot pool + scheduler + loop.

An iteration (``step``) is schedule, run, postprocess: the scheduler picks the requests (it only chooses and
holds KV slots); the engine starts newly admitted requests' decoding states, groups the picked states
(runtime/step.py), runs one runner call per group, applies each result to its state and advances it
(runtime/decoding.py), then emits the tokens that became final.

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
naming the field (the server answers 400). ``max_tokens`` caps the output: the request keeps its
gen_length (the masked region is part of what a bidirectional model sees, so shrinking it would change the
tokens) and finishes as soon as max_tokens tokens are final, so its output is exactly the first max_tokens
tokens of the uncapped request.

This module imports no web framework (the GPU machine has none)."""
from __future__ import annotations

import logging
import secrets
import threading
import time

import torch

from .config import BLOCK_GEN_KEYS, GEN_KEYS, ServeConfig, model_generation_defaults
from .decoding import DecodeState, FieldError, GenerationConfig
from .generate import check_prompts
from .granularity import Granularity, measure_step_times
from .kv_cache import KVCacheManager
from .metrics import Metrics
from .request import CANCELLED, FINISHED, Request
from .runners.eager import EagerRunner
from .runners.graph import GraphRunner
from .scheduler import SCHEDULERS
from .step import check_runner, draw_seeds, group_states, make_batch, run_batch

REQUEST_FIELDS = GEN_KEYS + ("factor", "temperature", "seed", "cfg_scale") + BLOCK_GEN_KEYS
log = logging.getLogger("dlc.engine")


class QueueFull(RuntimeError):
    pass


def graph_runner_for(runner, cfg: ServeConfig):
    """The runner the engine uses: a GraphRunner over an eager model when cuda_graphs is on (default: on a CUDA
    device); compiled engines and explicit --no-cuda-graphs keep theirs."""
    if isinstance(runner, GraphRunner):
        return runner
    on = cfg.cuda_graphs
    if on is None:
        on = type(runner) is EagerRunner and runner.device.type == "cuda"
    if not on:
        return runner
    if type(runner) is not EagerRunner:
        raise ValueError("cuda_graphs needs an eager model (a checkpoint or preset); compiled engines run their "
                         "own programs")
    return GraphRunner(runner.model, decode=cfg.graph_decode, compile=cfg.compile)


class Engine:
    def __init__(self, session, cfg: ServeConfig):
        self.session, self.cfg = session, cfg
        check_runner(session.runner)
        self.runner, self.mc = graph_runner_for(session.runner, cfg), session.config
        self.max_seq = min(cfg.max_seq_len or self.mc.max_seq_len, self.runner.max_seq_len,
                           cfg.max_num_tokens)
        self.gen_defaults = {**model_generation_defaults(session.source, self.mc),   # the resolved directory
                             **{k: getattr(cfg, k) for k in GEN_KEYS if getattr(cfg, k) is not None}}
        GenerationConfig(**self.gen_defaults)   # the defaults must be valid themselves
        self.kv = KVCacheManager(self.mc, self.max_seq, int(cfg.kv_cache_mb * 2**20), self.runner.dtype,
                                 self.runner.device,
                                 max_slots=2 * cfg.max_batch_size + isinstance(self.runner, GraphRunner),
                                 head_scores=self.runner.sparse_retention is not None)
        if isinstance(self.runner, GraphRunner):
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

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "Engine":
        from .session import open_model
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(open_model(cfg.model, dtype=cfg.dtype, device=device, progress=False), cfg)

    # -- requests -------------------------------------------------------------------------------------------
    def make_request(self, prompt: list[int], params: dict | None = None, max_tokens: int | None = None,
                     rid: str = "") -> Request:
        params = dict(params or {})
        unknown = set(params) - set(REQUEST_FIELDS)
        if unknown:
            raise FieldError(sorted(unknown)[0], f"unknown generation fields {sorted(unknown)}")
        p = {**self.gen_defaults, **{k: v for k, v in params.items() if v is not None}}
        if p.get("seed") is None:         # unseeded: the server's --seed, else a fresh draw (samples differ)
            p["seed"] = self.cfg.seed if self.cfg.seed is not None else secrets.randbits(63)
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens <= 0):
            raise FieldError("max_tokens", f"max_tokens must be a positive integer, got {max_tokens!r}")
        gen = GenerationConfig(**{k: v for k, v in p.items() if k in REQUEST_FIELDS}, stop_at_eos=True)
        gen = gen.for_model(self.mc)
        check_prompts([prompt], gen.gen_length, self.mc, self.max_seq,
                      gen.block_length if gen.block_decoding else 0)
        state = DecodeState.new(list(prompt), gen, self.mc)
        usable = self.kv.n_slots - (self.runner.scratch is not None
                                    if isinstance(self.runner, GraphRunner) else 0)
        if state.cache_rows() > usable:
            raise FieldError("cfg_scale", f"cfg_scale > 0 with kv_cache {gen.kv_cache!r} needs "
                             f"{state.cache_rows()} KV slots; "
                             f"the pool has {usable} (raise kv_cache_mb or use kv_cache 'none')")
        return Request(state, max_tokens=max_tokens, rid=rid)

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

    def has_work(self) -> bool:
        with self.lock:
            return bool(self._incoming or self._aborts or self.scheduler.has_work())

    # -- one iteration: schedule, run, postprocess ----------------------------------------------------------
    def step(self) -> int:
        """Run one iteration; returns the number of rows stepped."""
        with self.lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
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
            results = self._run(batch)
            self._record(batch, time.perf_counter() - t0)
            for r in batch:
                if id(r) in results:
                    self._guard(r, lambda r=r: self._postprocess(r, *results[id(r)], n_running))
        self._update_gauges()
        return len(batch)

    def _postprocess(self, r: Request, x0, conf, n_running: int) -> None:
        r.state.apply(x0, conf)
        self._emit(r, r.state.advance(self.gran.width(r, n_running)))

    def _run(self, reqs: list[Request]) -> dict[int, tuple]:
        """One runner call per group -> {id(request): (x0 [K], conf [K]) on the host} for those that ran."""
        results: dict[int, tuple] = {}
        for idx in group_states([r.state for r in reqs], self.runner.max_batch_size):
            self._run_group([reqs[i] for i in idx], results)
        return results

    def _run_group(self, group: list[Request], results: dict, seeds: list[int] | None = None) -> None:
        states = [r.state for r in group]
        seeds = draw_seeds(states) if seeds is None else seeds     # a retry reuses the step's seeds
        try:
            batch = make_batch(self.runner, states, [r.slots for r in group], self.kv, seeds)
            x0, conf = run_batch(self.runner, batch)
        except Exception as e:             # noqa: BLE001 - whose data broke the call? run each request alone
            if len(group) == 1:
                self._fail(group[0], e)
                return
            self.metrics.inc("isolated_batches_total")
            for r, seed in zip(group, seeds):
                self._run_group([r], results, [seed])
            return
        for j, r in enumerate(group):
            results[id(r)] = (x0[j], conf[j])

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
        m.set("iteration_refresh_rows", sum(r.phase != "reuse" for r in batch))
        m.set("iteration_reuse_rows", sum(r.phase == "reuse" for r in batch))
        self.gran.observe(tokens["reuse"] or total, dt)

    def _emit(self, r: Request, new: list[int]) -> None:
        done = r.state.finished and not r.finished
        if r.max_tokens is not None:
            new = new[:max(0, r.max_tokens - len(r.output_ids))]
            if len(r.output_ids) + len(new) >= r.max_tokens and not r.finished:
                done = True
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
        r.finish_reason = "stop" if r.state.stopped and not capped else "length"
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
            self._tps_count, self._tps_t0 = 0, now

    # -- warm-up and the loop ---------------------------------------------------------------------------------
    def warmup(self) -> None:
        """One tiny forward (first-call costs), and in elastic mode the saturation measurement."""
        sizes = [8]
        if self.cfg.granularity == "elastic":
            sizes = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if n <= self.max_seq]
        timings = measure_step_times(self.runner, sizes, repeats=1 if len(sizes) == 1 else 3)
        if isinstance(self.runner, GraphRunner):      # capture the default block's Reuse step at every bucket
            blk = min(self.gen_defaults["block_length"], self.gen_defaults["gen_length"])
            self.runner.warmup([(blk + self.mc.logit_shift, blk)], self.cfg.max_batch_size)
        if self.cfg.granularity == "elastic":
            self.gran.calibrate(timings)
        self._update_gauges()

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: list[list[int]], params: dict | None = None) -> list[list[int]]:
        """Offline helper: all prompts through the scheduler, outputs in order."""
        reqs = [self.make_request(p, params) for p in prompts]
        for r in reqs:
            self.add_request(r)
        self.run_until_done()
        return [r.output_ids for r in reqs]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dlc-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not (self._incoming or self._aborts or self.scheduler.has_work()) and not self._stop:
                    self.lock.wait(0.5)
                    self._update_gauges()      # idle: tokens/s decays to 0
                if self._stop and not (self._incoming or self._aborts or self.scheduler.has_work()):
                    return
            try:
                self.step()
            except Exception as e:   # noqa: BLE001 - a bug outside any one request's work:
                                     # the server stays up
                self._fail_all(e)

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
