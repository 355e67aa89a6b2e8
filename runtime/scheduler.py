"""Schedulers: which requests take a step in the next iteration.

Every running request is in one phase per step: Refresh (a forward over its whole sequence that refills its
cache; also every step of kv_cache none, ``full``) or Reuse (a forward over its block only, over the cached
K/V). Refresh is compute-bound, Reuse bandwidth-bound. ``schedule()`` returns the requests of one iteration;
the engine runs them (grouped into runner calls) and feeds the results back.

``PhaseScheduler`` (policy ``phase``, the default) builds each iteration under a token budget
(``max_num_tokens``; Refresh costs the sequence, Reuse the query slice) and at most ``max_batch_size`` rows:

1. ageing first: a request left ready-but-unscheduled for ``age_iters`` iterations goes first, whatever its
   phase (an aged block start is never crowded out by Reuse rows when the budget binds); while an aged request
   waits for admission nothing younger is admitted, and if the slot pool is the obstacle the youngest running
   request is preempted by recompute (its slot is freed; it restarts its current block later with identical
   output);
2. Reuse steps of running requests (cheap, they keep the bandwidth-bound work flowing), those on the TTFT
   path first (``on_ttft_path``: no block committed yet);
3. Refresh steps fill at most ``refresh_share`` of the budget, so a burst of block starts is spread over
   several iterations and later block boundaries stay staggered; within the share the TTFT path goes first:
   first-block Refreshes, then admissions, then the running requests' later blocks. While some request's first
   block runs, a later block's Refresh also waits up to ``ttft_defer_iters`` iterations (default 0: it does
   not), which keeps the first blocks' iterations short at the cost of the later blocks' latency;
4. admission needs a free KV slot (prefix/dual caches) and room in the budget; a request that does not fit
   is skipped, not waited on, so it does not stall smaller ones (no head-of-line blocking);
5. the first Refresh of an iteration (highest priority first) is always allowed, even past the share, so
   a sequence longer than the share is never starved and an iteration is never empty while work is ready.

A request's time to first token is its admission wait plus its first block's iterations, and an iteration is
as long as what shares it: under a binding budget the TTFT-path order admits and steps a new request before
older requests' later blocks (continuous FCFS steps the older ones first and admits with what is left).

``FCFSScheduler`` (policy ``fcfs``) is the static-batching baseline: when nothing runs it admits waiting
requests in arrival order up to the batch and token limits, stopping at the first that does not fit; that
batch runs to completion (every request steps every iteration) before anything else is admitted.

``ContinuousFCFSScheduler`` (policy ``fcfs-continuous``) is iteration-level FCFS, the continuous batching of
vLLM's default scheduler: at *every* iteration the running requests step in arrival order while they fit
the token budget and ``max_batch_size`` (the oldest always steps), then waiting requests are admitted in
arrival order while the iteration's budget, ``max_batch_size`` running requests and a free KV slot allow,
stopping at the first that does not fit. Each admitted request runs to completion (no preemption).

How the three differ (same budget, batch limit and slot pool; tokens identical under all three):

- admission: ``fcfs`` only when nothing runs; ``fcfs-continuous`` and ``phase`` at every iteration;
- admission order: both FCFS policies take arrival order and stop at the first request that does not fit;
  ``phase`` takes aged requests first and skips a misfit (no head-of-line blocking);
- rows of an iteration: ``fcfs`` every running request; ``fcfs-continuous`` the running requests oldest first
  while the budget lasts, whatever phase each needs; ``phase`` Reuse rows first, then Refresh rows under
  ``refresh_share`` (staggered block starts);
- starvation: the FCFS policies by arrival order (an admitted request runs to completion); ``phase`` by
  ageing and preemption by recompute.

So ``fcfs`` vs ``fcfs-continuous`` isolates continuous admission, and ``fcfs-continuous`` vs ``phase``
isolates phase multiplexing (and skipping misfits).

No policy changes tokens: each request decodes through its own state (runtime/decoding.py). Schedulers
only choose: they take and free KV slots, but never advance or apply decoding state. A preempted request is
listed in ``preempted`` for the engine, which rewinds its block (``DecodeState.restart_block``)."""
from __future__ import annotations

from collections import deque

from .request import CANCELLED, FINISHED, RUNNING, WAITING, Request


def on_ttft_path(req: Request) -> bool:
    """Whether the request's first block is still to come or running (waiting, or running before its first
    block closed): its first tokens stream within that block (``DecodeState.final_prefix``), so the block
    stays first until it closes, whatever has streamed of it (the order does not depend on the streaming)."""
    return req.state.done == 0


class BaseScheduler:
    def __init__(self, cfg, model_config, kv, granularity, device):
        self.cfg, self.mc, self.kv, self.gran, self.device = cfg, model_config, kv, granularity, device
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.preempted: list[Request] = []      # preempted since the engine last took them
                                                # (their cache is gone)

    # -- bookkeeping --------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = WAITING
        self.waiting.append(req)

    def needs_slot(self, req: Request) -> bool:
        return req.state.cache_rows() > 0

    def admit(self, req: Request) -> bool:
        """Take the request's KV slots (when it needs any); False when the pool has too few free."""
        need = req.state.cache_rows()
        if need and not req.slots:
            slots = self.kv.allocate_n(need)
            if slots is None:
                return False
            req.slots = slots
        req.status, req.waited = RUNNING, 0
        self.waiting.remove(req)
        self.running.append(req)
        return True

    def _free_slots(self, req: Request) -> None:
        for slot in req.slots:
            self.kv.free(slot)
        req.slots = ()

    def release(self, req: Request, status: str = FINISHED) -> None:
        self._free_slots(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        req.status = status

    def cancel(self, req: Request) -> None:
        self.release(req, CANCELLED)

    def preempt(self, req: Request) -> None:
        """Preemption by recompute: free the slots, requeue at the front (the engine rewinds the block)."""
        self._free_slots(req)
        self.preempted.append(req)
        req.preemptions += 1
        self.preemptions += 1
        self.running.remove(req)
        req.status = WAITING
        self.waiting.appendleft(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def requests(self) -> list[Request]:
        """Every request the scheduler holds, running first."""
        return list(self.running) + list(self.waiting)

    def take_preempted(self) -> list[Request]:
        out, self.preempted = self.preempted, []
        return out

    def _aged(self, req: Request) -> bool:
        return req.waited >= self.cfg.age_iters

    def _age(self, ready: list[Request], chosen: list[Request]) -> None:
        picked = {id(r) for r in chosen}
        for r in ready:
            r.waited = 0 if id(r) in picked else r.waited + 1


class PhaseScheduler(BaseScheduler):
    def schedule(self) -> list[Request]:
        cfg = self.cfg
        budget, cap = cfg.max_num_tokens, cfg.refresh_share * cfg.max_num_tokens
        prio = lambda r: (not self._aged(r), not on_ttft_path(r), r.seq)             # noqa: E731
        chosen: list[Request] = []
        used = {"all": 0, "refresh": 0}

        def take(r, refresh: bool) -> bool:
            c = r.L if r.status == WAITING else r.cost()           # admission is a Refresh / full forward
            if len(chosen) >= cfg.max_batch_size or used["all"] + c > budget:
                return False
            if refresh and used["refresh"] and used["refresh"] + c > cap:
                return False
            chosen.append(r)
            used["all"] += c
            used["refresh"] += c if refresh else 0
            return True

        def admit(r) -> bool:
            if len(self.running) >= cfg.max_batch_size or not take(r, True):
                return False
            if self.admit(r):
                return True
            chosen.pop()
            used["all"] -= r.L
            used["refresh"] -= r.L
            return False

        blocked = False
        for r in sorted((r for r in self.waiting if self._aged(r)), key=prio):   # 0. starving requests first
            if self.needs_slot(r) and self.kv.num_free == 0:
                self._preempt_for(r)
            if not admit(r):
                blocked = True                                    # it reserves the next free capacity
                break
        ready = sorted((r for r in self.running if not r.state.finished and r not in chosen), key=prio)
        for r in ready:                                           # 1. aged rows, whatever their phase
            if self._aged(r):
                take(r, r.phase != "reuse")
        for r in ready:                                           # 2. Reuse
            if r.phase == "reuse" and r not in chosen:
                take(r, False)
        later = [r for r in ready if r.phase != "reuse" and r not in chosen]
        for r in later:                                           # 3. Refresh on the TTFT path
            if on_ttft_path(r):
                take(r, True)
        if not blocked:                                           # 4. admission, no head-of-line blocking
            for r in sorted(self.waiting, key=prio):
                admit(r)
        ttft_live = any(on_ttft_path(r) for r in chosen)
        for r in later:                                           # 5. later blocks' Refresh
            if not on_ttft_path(r) and (not ttft_live or r.waited >= cfg.ttft_defer_iters):
                take(r, True)
        self._age(ready + list(self.waiting), chosen)            # waiting requests age as well
        return chosen

    def _preempt_for(self, aged: Request) -> None:
        """Free a slot for an aged request: preempt the youngest running request younger than it."""
        victims = [r for r in self.running if r.slots and not self._aged(r) and r.seq > aged.seq]
        if victims:
            self.preempt(max(victims, key=lambda r: r.seq))


class FCFSScheduler(BaseScheduler):
    def schedule(self) -> list[Request]:
        cfg = self.cfg
        if not self.running:
            used = 0
            while self.waiting and len(self.running) < cfg.max_batch_size:
                r = self.waiting[0]
                if used + r.L > cfg.max_num_tokens or not self.admit(r):
                    break                                          # head-of-line: stop at the first misfit
                used += r.L
        return [r for r in self.running if not r.state.finished]


class ContinuousFCFSScheduler(BaseScheduler):
    def schedule(self) -> list[Request]:
        cfg = self.cfg
        chosen: list[Request] = []
        used = 0
        for r in sorted((r for r in self.running if not r.state.finished), key=lambda r: r.seq):
            if chosen and (len(chosen) >= cfg.max_batch_size or used + r.cost() > cfg.max_num_tokens):
                return chosen                    # budget spent: the rest step next iteration, in order
            chosen.append(r)
            used += r.cost()
        while self.waiting and len(self.running) < cfg.max_batch_size:
            r = self.waiting[0]                  # admission is a Refresh / full forward: costs the sequence
            if len(chosen) >= cfg.max_batch_size or used + r.L > cfg.max_num_tokens or not self.admit(r):
                break                            # head-of-line: stop at the first misfit
            chosen.append(r)
            used += r.L
        return chosen


SCHEDULERS = {"phase": PhaseScheduler, "fcfs": FCFSScheduler, "fcfs-continuous": ContinuousFCFSScheduler}
