"""The served path inside a bench process (bench/serve_pace.py on a GPU, bench/serve_overhead.py on CPU):
``dlc serve``'s app on uvicorn in a thread, and where one request's time goes through it.

``Served(engine)`` starts the app (the engine's loop thread with it) on 127.0.0.1 and counts its event loop's
wake-ups (each return of the selector); ``Probe(engine)`` stamps each request's admission and the collector's
pauses; ``Probe.breakdown(req, sent, received)`` splits one request: client send -> arrival (HTTP, validation,
tokenizing, make_request), arrival -> admitted (the engine learns of it), admitted -> last block (decoding),
last block -> the client has the response; plus the event loop's wake-ups and the collector's pauses (count,
ms, the longest) over that span."""
from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time


class Served:
    def __init__(self, engine, name: str = "bench", freeze: bool = True):
        import uvicorn

        from dlc.runtime.server import build_app
        from dlc.runtime.startup import freeze_heap
        self.engine, self.wakeups, self.wakes_sent, self.frozen = engine, 0, 0, freeze
        if freeze:                                   # as `dlc serve` does after warm-up (undone by stop)
            freeze_heap()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(build_app(engine, name), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        sel = getattr(loop, "_selector", None)       # the count needs the loop's selector (asyncio's loop)
        select = sel.select

        def counted(timeout=None):
            events = select(timeout)
            self.wakeups += 1
            return events
        sel.select = counted
        threadsafe = loop.call_soon_threadsafe

        def sent(*a, **k):                           # wake-ups the engine thread sends (call_soon_threadsafe)
            self.wakes_sent += 1
            return threadsafe(*a, **k)
        loop.call_soon_threadsafe = sent
        loop.run_until_complete(self.server.serve())

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        if self.frozen:
            gc.unfreeze()


class Probe:
    """Stamps admissions (a wrapper over the scheduler's ``admit``) and the collector's pauses."""

    def __init__(self, engine):
        self.engine, self.admitted, self.added, self.pauses = engine, {}, [], []
        admit, add = engine.scheduler.admit, engine.add_request

        def admit_stamped(r):
            ok = admit(r)
            if ok:
                self.admitted[id(r)] = time.monotonic()
            return ok
        engine.scheduler.admit = admit_stamped
        engine.add_request = lambda r: (self.added.append(r), add(r))[1]
        self._t0 = None
        gc.callbacks.append(self._gc)

    def _gc(self, phase, info) -> None:
        if phase == "start":
            self._t0 = time.monotonic()
        elif self._t0 is not None:
            self.pauses.append((self._t0, time.monotonic() - self._t0, info["generation"]))

    def close(self) -> None:
        gc.callbacks.remove(self._gc)

    def breakdown(self, req, sent: float, received: float, wakeups: int) -> dict:
        """One request's time (s, ``time.monotonic`` stamps of the client's send and receipt)."""
        adm = self.admitted[id(req)]
        gcs = [(d, g) for t, d, g in self.pauses if sent <= t <= received]
        return {"send_to_arrival": req.arrival - sent, "arrival_to_admitted": adm - req.arrival,
                "admitted_to_last_block": req.finish_time - adm,
                "last_block_to_client": received - req.finish_time,
                "loop_wakeups": wakeups, "gc_pauses": len(gcs), "gc_ms": sum(d for d, _ in gcs) * 1e3,
                "gc_max_ms": max((d for d, _ in gcs), default=0.0) * 1e3,
                "gc_full": sum(g == 2 for _, g in gcs)}


def run_threaded(engine, prompts: list[list[int]], params: dict, timeout: float = 600) -> list:
    """The prompts through a started engine's loop thread (added from this thread, as a server's handlers
    add them); returns the finished requests."""
    left, done = [len(prompts)], threading.Event()

    def on_output(r, new, finished):
        if finished:
            left[0] -= 1
            if not left[0]:
                done.set()
    reqs = [engine.make_request(p, params) for p in prompts]
    for r in reqs:
        r.on_output = on_output
        engine.add_request(r)
    if not done.wait(timeout):
        raise RuntimeError(f"run_threaded: {left[0]} requests unfinished after {timeout:.0f} s")
    return reqs


def print_breakdown(rows: list[dict], title: str) -> None:
    import statistics
    if not rows:
        return
    print(f"\n{title} (median, max over {len(rows)} requests; seconds in ms):")
    for key in rows[0]:
        scale = 1 if key in ("loop_wakeups", "gc_pauses", "gc_full") or key.endswith("_ms") else 1e3
        vals = [r[key] * scale for r in rows]
        print(f"  {key:<24} {statistics.median(vals):10.2f} {max(vals):10.2f}")
