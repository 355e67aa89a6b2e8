"""Rank 0's runner (the ``PhaseRunner`` the engine and ``generate`` drive) and the workers' loop.

``TensorParallelRunner.full/refresh/reuse(batch)`` broadcasts the batch to the workers (channel.py), runs its
own shard on it and returns (x0, conf) (every rank computes them; rank 0's are the answer). Decoding rules
stay on rank 0: workers run forwards, and the device-side commits of steps run ahead that rank 0's decoding
core sends them (ahead_rules.py). A rank that dies makes the runner fail fast: the process watchdog
(spawned workers), a failed or timed-out collective, or a failed idle ping marks it dead with one line naming
the rank; every later call raises ``RankFailure`` at once, and the failure callbacks (``dlc serve``'s: end
every request, stop the server) run once."""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dlc.runtime.step import AheadSteps

from . import step_times
from .ahead_rules import decode_commit, encode_commit
from .channel import (_FLAGS, _RULE_FLAGS, AHEAD, BIND, GRAPHS, MORE, PING, STATS, STEP, STOP, WARMUP,
                      Channel, Compact, commit_words, frame_reuses, pool_for, pool_key, read_batch,
                      recv_rule_tensors)
from .launch import TIMEOUT_S
from .shard_graph import ShardGraphRunner, release_before_leaving, with_graphs

log = logging.getLogger("dlc.tp")


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the whole group is unusable."""


class TensorParallelRunner:
    sparse_retention = None
    max_batch_size = None

    def __init__(self, shard, channel: Channel, procs: list | None = None, ping_s: float = 2.0):
        self.shard, self.channel, self.procs = shard, channel, procs or []
        self.world = shard.world
        self._lock = threading.Lock()                  # one message + forward at a time (steps, pings)
        self._fail_lock = threading.Lock()             # the failure is recorded (and announced) once
        self._dead: str | None = None
        self._bound = None                             # weakref to the pool the graphs are bound to
        self.timeout_s = float(os.environ.get("DLC_TP_TIMEOUT_S", TIMEOUT_S))
        self._callbacks: list = []
        self._closed = False
        self.loop = step_times.new_loop()              # rank 0's step timings (step_times.py)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ping_loop, args=(ping_s,), name="dlc-tp-ping",
                                          daemon=True)]
        if self.procs:
            self._threads.append(threading.Thread(target=self._watch_procs, name="dlc-tp-watch", daemon=True))
        for t in self._threads:
            t.start()

    config = property(lambda self: self.shard.config)
    device = property(lambda self: self.shard.device)
    dtype = property(lambda self: self.shard.dtype)
    max_seq_len = property(lambda self: self.shard.max_seq_len)

    def full(self, batch):
        return self._run(batch)

    def refresh(self, batch):
        return self._run(batch)

    def reuse(self, batch):
        return self._run(batch)

    def _run(self, batch):
        """Send first (the workers' path to their launch is the longer one), then run rank 0's share: a
        compact Reuse step on graph runners replays from the frame sent (``ShardGraphRunner.reuse_frame``)."""
        t0 = step_times.now_ns()
        sent = []

        def run():
            msg = sent[0]
            if msg is not None and self.graphed and frame_reuses(msg.head.tolist()):
                res = self.shard.reuse_frame(msg, lambda: batch)
            else:
                res = getattr(self.shard, batch.phase)(batch)
            t1 = step_times.now_ns()
            res = self._settled(res)
            self._timed(t0, t1)
            return res
        return self._call(lambda: sent.append(self.channel.send_batch(STEP, batch)), run)

    def _timed(self, t0: int, t1: int) -> None:
        """Rank 0's step timings: entry -> launch, launch call returned -> result ready (``step_times``)."""
        lp, launched = self.loop, getattr(self.shard, "launched_ns", 0)
        lp["steps"] += 1
        lp["wait_s"] += (step_times.now_ns() - t1) / 1e9
        if launched >= t0:                                 # a replay (or captured-path launch) this step
            lp["launches"] += 1
            lp["to_launch_s"] += (launched - t0) / 1e9

    def step_times(self, reset: bool = False, frames: bool | None = None,
                   gpu_timing: bool | None = None, all_reduce: str | None = None,
                   overlap_tokens: int | None = None) -> list[dict]:
        """Every rank's per-step host timings (``step_times.report``: means in microseconds since the last
        reset), rank 0 first. ``frames`` / ``gpu_timing``: switch every rank's frame staging
        (``ShardGraphRunner.frames``) and CUDA-event timing of the replays from now on (None: unchanged);
        ``all_reduce``: every rank's all-reduce backend and ``overlap_tokens``: every rank's two-micro-batch
        threshold (``tp_overlap_tokens``, 0: off): each rank's ``ShardCollectives.tune`` (benches; the graphs
        are captured again on their next use)."""
        self.shard.collectives.check(all_reduce, overlap_tokens)   # refused here, before any rank switches
        opts = {"reset": reset, "frames": frames, "gpu_timing": gpu_timing, "all_reduce": all_reduce,
                "overlap_tokens": overlap_tokens}

        def gather():
            own = step_times.report(0, self.loop, self.shard, self.channel, reset)
            _tune(self.shard, opts)                        # after the report: it reads the timings so far
            out = [None] * self.world
            dist.gather_object(own, out, dst=0, group=self.channel.group)
            return out
        return self._call(lambda: self.channel.send(STATS, opts), gather)

    def _settled(self, res):
        """Captured steps on CUDA: wait for rank 0's device work with a bound. A collective inside a CUDA
        graph has no NCCL timeout and the host sync that follows would wait forever for a dead peer: poll
        instead, ending at once when a rank is found dead (watchdog) or after DLC_TP_TIMEOUT_S."""
        if not self.capture:
            return res
        done = torch.cuda.Event()
        done.record()
        self._poll(done)
        return res

    def _poll(self, done) -> None:
        """Wait for a CUDA event: RankFailure once a rank is dead or after DLC_TP_TIMEOUT_S."""
        deadline = time.monotonic() + self.timeout_s
        while not done.query():
            if self._dead is not None:
                raise RankFailure(self._dead)
            if time.monotonic() > deadline:
                raise self._fail(f"a captured step did not finish within {self.timeout_s:.0f} s "
                                 f"(DLC_TP_TIMEOUT_S)")
            time.sleep(0)                              # let other threads (HTTP, watchdog) run

    # -- CUDA graphs on every rank (shard_graph.py) ---------------------------------------------------------
    @property
    def graphed(self) -> bool:
        """step.GraphedRunner: every rank replays its captured Reuse steps (``enable_graphs``)."""
        return isinstance(self.shard, ShardGraphRunner)

    @property
    def stats(self) -> dict | None:
        """Rank 0's graph statistics (replays, captures, eager fallbacks; every rank does the same)."""
        return self.shard.stats if self.graphed else None

    capture = property(lambda self: self.graphed and self.shard.capture)
    compiled = property(lambda self: self.graphed and self.shard.compiled)    # every rank's blocks compiled

    def enable_graphs(self, on: bool = True, capture: bool | None = None, compile: bool | str = False,
                      decode: str | None = None) -> None:
        """Every rank's runner becomes a ``ShardGraphRunner`` (``on``; captured on CUDA, ``capture=False``
        runs the same static-buffer steps uncaptured; ``compile``: its blocks under torch.compile, Inductor
        or the backend named; ``decode``: "fused" / "exact", None: the device's default) or the eager
        ``ShardRunner`` again."""
        def swap():
            new = with_graphs(self.shard, on, capture, compile, decode)
            if new is not self.shard:
                self.shard, self._bound = new, None
        self._call(lambda: self.channel.send(GRAPHS, (on, capture, compile, decode)), swap)

    def bind_pool(self, kv) -> None:
        """Rank 0 binds its pool (taking the padding rows' scratch slot), then each worker its own pool of the
        same shape, with the same scratch slot."""
        if not self.graphed or (self._bound is not None and self._bound() is kv):
            return                                          # bound already: every rank keeps its graphs
        self.shard.bind_pool(kv)                            # graphs cleared: every rank recaptures alike
        self._bound = weakref.ref(kv)
        self._call(lambda: self.channel.send(BIND, (pool_key(kv), self.shard.scratch)), lambda: None)

    def warmup(self, widths: list[tuple[int, int]], max_batch: int) -> None:
        """Every rank captures the same buckets, in the same order."""
        if self.graphed:
            self._call(lambda: self.channel.send(WARMUP, (widths, max_batch)),
                       lambda: self.shard.warmup(widths, max_batch))

    ahead_rules = True     # every rank runs the core's commit of the rows' rules (ahead_rules.py: the frame)

    def can_run_ahead(self, batch, commit=None) -> bool:
        """A batch the rank's graph runner runs ahead; with the core's ``commit``, one whose rules the AHEAD
        frame carries (``encode_commit``: every rule of the registry, with credit and smoothing)."""
        if commit is not None and encode_commit(commit) is None:
            return False
        return self.graphed and self.shard.can_run_ahead(batch, commit)

    def reuse_ahead(self, batch, counts, commit=None, seeds=None):
        """step.LookaheadRunner: the workers run the same steps ahead (the same commits on the device: every
        rank's combine ends with the same tokens, entropy and logprobs, and each rank rebuilds the core's
        ``commit`` from the rules the AHEAD frame carries), so their fed ids stay equal to rank 0's. A
        sampled run's per-step ``seeds`` travel as the frame's columns after the counts
        (``ahead_columns``)."""
        words = encode_commit(commit)
        if commit is not None and words is None:
            raise ValueError("tensor parallel: this commit cannot run ahead on every rank "
                             "(see can_run_ahead)")
        steps = self._call(lambda: self.channel.send_batch(AHEAD, batch, ahead_columns(counts, seeds), words),
                           lambda: self.shard.reuse_ahead(batch, counts, commit=commit, seeds=seeds))
        return self._bounded(steps)

    def continue_ahead(self, steps, counts, seeds=None):
        """step.LookaheadRunner: every rank launches ``counts.shape[1]`` more steps of its latest run (a MORE
        message: the counts, and a sampled run's seeds; each worker goes on from its own last run, in the
        same order)."""
        steps = self._call(lambda: self.channel.send(MORE, ahead_columns(counts, seeds)),
                           lambda: self.shard.continue_ahead(steps, counts, seeds=seeds))
        return self._bounded(steps)

    def _bounded(self, steps: AheadSteps) -> AheadSteps:
        if steps.events is None:
            return steps
        return _BoundedSteps(**vars(steps), poll=self._poll)

    def _call(self, send, run):
        """Send the workers their message, then run rank 0's share; a failed collective fails the group."""
        with self._lock:
            self._check()
            try:
                send()
                return run()
            except dist.DistError as e:
                raise self._fail(f"a tensor-parallel collective failed ({_first_line(e)})") from None
            except RuntimeError as e:          # gloo reports a closed peer as a plain RuntimeError
                if self._dead is None and not _is_comm_error(e):
                    raise
                raise self._fail(f"a tensor-parallel collective failed ({_first_line(e)})") from None

    # -- liveness --------------------------------------------------------------------------------------------
    @property
    def failure(self) -> str | None:
        return self._dead

    def add_failure_callback(self, fn) -> None:
        """``fn(message)`` once, when a rank is found dead (now, if it already is)."""
        self._callbacks.append(fn)
        if self._dead is not None:
            fn(self._dead)

    def _check(self) -> None:
        if self._dead is not None:
            raise RankFailure(self._dead)

    def _fail(self, why: str) -> RankFailure:
        with self._fail_lock:
            first = self._dead is None
            if first:
                self._dead = self._describe(why)
        if first:
            log.error("%s", self._dead)
            for fn in self._callbacks:
                try:
                    fn(self._dead)
                except Exception:           # noqa: BLE001 - a callback must not hide the failure
                    log.exception("tensor-parallel failure callback")
        return RankFailure(self._dead)

    def _describe(self, why: str) -> str:
        """One line: the dead ranks by pid and exit code where the watchdog sees them, else ``why``."""
        for p in self.procs:                               # a killed peer's exit code lands a moment later
            if p.exitcode is None:
                p.join(0.3)
        dead = [f"rank {r} (pid {p.pid}) died (exit code {p.exitcode})" for r, p in enumerate(self.procs, 1)
                if p.exitcode is not None]
        return (f"tensor-parallel {'; '.join(dead)}; the group of {self.world} ranks is down" if dead
                else f"tensor-parallel group of {self.world} ranks is down: {why}")

    def _ping_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            if self._dead is not None or not self._lock.acquire(blocking=False):
                continue                                   # busy: the step's own collectives are the ping
            try:
                if self._dead is None and not self._closed:
                    self.channel.send(PING)
            except Exception as e:                         # noqa: BLE001
                self._fail(f"rank 0 could not reach the workers ({_first_line(e)})")
            finally:
                self._lock.release()

    def _watch_procs(self) -> None:
        while not self._stop.wait(0.2):
            if self._dead is None and not self._closed and any(p.exitcode is not None for p in self.procs):
                self._fail("a worker exited")

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers (a STOP message, then join; terminate what is left) and leave the group."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        with self._lock:
            if self._dead is None:
                try:
                    self.channel.send(STOP)
                except Exception:                          # noqa: BLE001
                    pass
        deadline = time.monotonic() + (timeout if self._dead is None else 0.5)   # dead group: no STOP sent
        release_before_leaving(self.shard)                 # NCCL's destroy hangs while graphs hold it
        if self._dead is None:
            # NCCL's destroy is collective: every rank must enter it, so rank 0 leaves the group while the
            # workers leave it after STOP, before joining them (destroying after a worker has gone hangs)
            _leave_group(timeout)
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.terminate()
                p.join(2)
            if p.exitcode is None:                         # a stopped (SIGSTOP) rank ignores SIGTERM
                p.kill()
                p.join(2)


def _leave_group(timeout: float) -> None:
    """``destroy_process_group`` bounded by ``timeout``: a peer that never enters it (NCCL waits for every
    rank) leaves this process in the group rather than hung."""
    def destroy():
        try:
            dist.destroy_process_group()
        except Exception:                                  # noqa: BLE001
            pass
    t = threading.Thread(target=destroy, name="dlc-tp-leave", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        log.warning("tensor parallel: leaving the process group timed out after %.0f s", timeout)


@dataclass
class _BoundedSteps(AheadSteps):
    """Steps run ahead whose ``wait`` is bounded like a captured step (``TensorParallelRunner._poll``)."""
    poll: object = None

    def wait(self, s: int) -> None:
        self.poll(self.events[s])


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _is_comm_error(e: Exception) -> bool:
    s = str(e).lower()
    return any(w in s for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def worker_loop(shard, channel: Channel, make_pool) -> None:
    """A worker: run every message's work on its shard until STOP (or until rank 0 is gone: the receive
    fails or times out, and the caller exits). Work that raises a plain error raises on rank 0 too (same
    batch, same code): the worker goes on."""
    pools: dict = {}
    loop = step_times.new_loop()
    while True:
        kind, msg = channel.recv()
        if kind == STOP:
            release_before_leaving(shard)                  # before the caller leaves the group
            return
        if kind == PING:
            continue
        if kind == STATS:
            own = step_times.report(shard.rank, loop, shard, reset=msg["reset"])
            _tune(shard, msg)
            dist.gather_object(own, None, dst=0, group=channel.group)
            continue
        try:
            if kind == STEP and isinstance(msg, Compact):
                _run_step(shard, msg, channel, loop, pools, make_pool)
                continue
            shard = _work(shard, kind, msg, pools, make_pool, channel.device_group)
        except dist.DistError:
            raise
        except RuntimeError as e:
            if _is_comm_error(e):
                raise
            log.warning("rank %d: step failed as on rank 0: %s", shard.rank, _first_line(e))
        except Exception as e:                             # noqa: BLE001
            log.warning("rank %d: step failed as on rank 0: %s", shard.rank, _first_line(e))


def _tune(shard, opts: dict) -> None:
    """A STATS message's switches on this rank: its collectives' (all-reduce backend, two-micro-batch
    threshold: ``ShardCollectives.tune``; captured graphs that hold the old choice are dropped, every rank
    recaptures) and its graph runner's frame staging and GPU timing."""
    stale = shard.collectives.tune(opts.get("all_reduce"), opts.get("overlap_tokens"))
    if isinstance(shard, ShardGraphRunner):
        if stale:
            shard.release_graphs()
        if opts.get("frames") is not None:
            shard.frames = bool(opts["frames"])
        if opts.get("gpu_timing") is not None:
            shard.time_gpu(opts["gpu_timing"])


def _run_step(shard, msg: Compact, channel: Channel, loop: dict, pools: dict, make_pool) -> None:
    """A worker's compact STEP: a graph runner's Reuse replays from the frame (``reuse_frame``), anything else
    rebuilds the StepBatch and runs the phase; the step's timings go to ``loop`` (``step_times``)."""
    h = msg.head.tolist()
    sent, arrived = channel.sent_ns, channel.arrived_ns
    rebuilt = []
    # first: rank 0 broadcast the rule tensors right after the frame, whatever fails below on this rank
    rules = (recv_rule_tensors(h, channel.device_group, shard.config.d_model, shard.device)
             if h[_FLAGS] & _RULE_FLAGS and channel.device_group is not None else None)

    def batch():
        b = read_batch(msg, shard.config, shard.device, pools, make_pool, channel.device_group, rules)[0]
        rebuilt.append(step_times.now_ns())
        return b
    if isinstance(shard, ShardGraphRunner) and frame_reuses(h):
        start = step_times.now_ns()
        shard.reuse_frame(msg, batch, answer=False, rules=rules or {})
    else:
        b = batch()
        start = rebuilt[0]
        getattr(shard, b.phase)(b)
    launched = getattr(shard, "launched_ns", 0)
    loop["steps"] += 1
    loop["latency_s"] += (arrived - sent) / 1e9
    loop["rebuild_s"] += ((rebuilt[0] if rebuilt else start) - arrived) / 1e9     # frame path: parsing only
    if launched >= arrived:
        loop["launches"] += 1
        loop["to_launch_s"] += (launched - sent) / 1e9


def ahead_columns(counts: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
    """A run ahead's per-step columns as one [B, n] int64 tensor for the AHEAD / MORE messages: the counts,
    then (a sampled run: [B, 2n]) each step's seeds; ``split_columns`` on the worker."""
    return counts if seeds is None else torch.cat([counts, seeds], 1)


def split_columns(cols: torch.Tensor, sampled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ahead_columns``' (counts, seeds or None)."""
    if not sampled:
        return cols, None
    n = cols.shape[1] // 2
    return cols[:, :n], cols[:, n:]


def _work(shard, kind: int, msg, pools: dict, make_pool, group=None):
    """One message's work on this rank -> its runner (GRAPHS replaces it). ``pools`` also keeps the rank's
    latest run ahead (``"ahead"``), which a MORE message goes on with; ``group``: the model's (a compact
    step's rule tensors)."""
    if kind == GRAPHS:
        return with_graphs(shard, *msg)
    if kind == BIND:
        key, scratch = msg                                 # always a fresh pool (and graphs), as rank 0
        pools.clear()
        pools["bound"] = (key, pool_for(pools, key, make_pool))
        shard.bind_pool(pools["bound"][1], scratch)
    elif kind == WARMUP:
        shard.warmup(*msg)
    elif kind == MORE:                                     # the latest run goes on (rank 0's order)
        if "ahead" not in pools:
            raise ValueError("tensor parallel: MORE steps without a run ahead on this rank")
        counts, seeds = split_columns(msg, pools["ahead"].run.seed_buf is not None)
        pools["ahead"] = shard.continue_ahead(pools["ahead"], counts, seeds=seeds)
    elif kind in (STEP, AHEAD):
        batch, counts = read_batch(msg, shard.config, shard.device, pools, make_pool, group)
        if kind == AHEAD:
            words = commit_words(msg)              # rank 0's rules: the same commit on this rank's device
            commit = None if words is None else decode_commit(words, batch.n_seqs, shard.config.mask_id,
                                                              shard.device)
            counts, seeds = split_columns(counts, batch.temperature > 0)
            pools["ahead"] = shard.reuse_ahead(batch, counts, commit=commit, seeds=seeds)
        else:
            getattr(shard, batch.phase)(batch)
    return shard
