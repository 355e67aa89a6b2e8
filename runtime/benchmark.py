"""The serving benchmark's method (`dlc bench serve`, bench/serve_bench.py): fair, repeated, warmed.

One run of the suite, for every policy on the same model, settings and seeded request mix:

1. warm-up: every policy serves a burst of the whole mix untimed (first calls, graph captures, compiles);
2. capacity: every policy serves the burst ``rounds`` more times, timed (order rotated); the capacity is the
   highest median saturated throughput (requests/s) among them (or ``capacity`` when given, then nothing is
   measured), and sets the rates of the load workloads:
   ``poisson-50`` / ``poisson-80`` / ``poisson-95`` (Poisson arrivals at that share of the capacity),
   ``osc`` (a Poisson process whose rate swings ``+-amplitude`` around ``osc_load`` x capacity), and
   ``burst`` (every request at t = 0);
3. with ``warmup="all"`` every policy serves each load workload once more untimed, so the timed rounds meet
   only shapes (Refresh lengths, batch buckets) a run of the same workload already met;
4. ``rounds`` timed rounds; in each, every workload runs under every policy, the policies' order rotated by
   one per round (round r starts with policy r mod n), so no policy always runs first (or after the same
   one).

Each metric is reported as the median over rounds and its spread (min-max): throughput (tokens/s and
requests/s over the run, first arrival to last completion), TTFT p50/p99 (first streamed block), end-to-end
latency p50/p99. Ratios of the issue's targets are computed per round (paired) and from the medians, with
PASS/MISS. With a driver that can see the runner (``EngineDriver``), the CUDA-graph captures and Dynamo
compiles that happened during the timed rounds are counted (expected 0).

Drivers: ``HttpDriver`` starts one `dlc serve` process per policy (kept for the whole suite) and streams
through HTTP; ``EngineDriver`` drives one in-process ``Engine`` (background loop thread, requests added at
their arrival times, the policy switched between runs with ``Engine.set_policy``), for machines without the
web stack (the GPU machine) and to share one model, KV pool and set of captured graphs between policies."""
from __future__ import annotations

import asyncio
import dataclasses
import statistics
import threading
import time

from .loadgen import Result, Workload, drive, free_port, start_server

LOADS = {"poisson-50": 0.5, "poisson-80": 0.8, "poisson-95": 0.95}
WORKLOADS = ("burst", *LOADS, "osc")
METRICS = ("tokens_per_s", "requests_per_s", "ttft_p50", "ttft_p99", "latency_p50", "latency_p99", "errors")
TARGETS = (  # (name, workload, policy, baseline, metric, ratio bound, "<=" or ">=")
    ("phase vs fcfs-continuous, poisson-80: TTFT p99", "poisson-80", "phase", "fcfs-continuous", "ttft_p99",
     0.5, "<="),
    ("phase vs fcfs-continuous, poisson-80: throughput", "poisson-80", "phase", "fcfs-continuous",
     "tokens_per_s", 1.0, ">="),
    ("phase vs fcfs, burst: throughput", "burst", "phase", "fcfs", "tokens_per_s", 1.8, ">="),
)


# -- drivers ------------------------------------------------------------------------------------------------
class EngineDriver:
    """One in-process Engine for every policy (its loop thread serves; this thread submits at arrival
    times)."""
    name = "engine"

    def __init__(self, engine, timeout_s: float = 600.0):
        self.engine, self.timeout_s = engine, timeout_s

    def prepare(self, policies: list[str]) -> None:
        bad = [p for p in policies if ":" in p]
        if bad:
            raise ValueError(f"policies {bad}: the engine driver serves one granularity (use --granularity)")
        for p in policies:
            dataclasses.replace(self.engine.cfg, policy=p)             # validates the name before any work
        self.engine.warmup()
        self.engine.start()

    def run(self, policy: str, reqs: list[dict]) -> dict:
        eng = self.engine
        eng.set_policy(policy)
        it0 = eng.metrics.counter("iterations_total")
        left, done, lock, made, res = [len(reqs)], threading.Event(), threading.Lock(), [], Result()

        def finished_one(*_):
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

        def on_output(r, new, finished):
            if finished:
                finished_one()
        t0 = time.monotonic()
        for q in reqs:
            time.sleep(max(0.0, t0 + q["t"] - time.monotonic()))
            try:
                r = eng.make_request(q["prompt"], {k: q[k] for k in ("gen_length", "block_length", "steps")}
                                     | {"kv_cache": "dual"})
                r.on_output, r.arrival = on_output, time.monotonic()
                eng.add_request(r)
                made.append(r)
            except Exception as e:               # noqa: BLE001 - refused (400 / 429 over HTTP): counted
                res.error(type(e).__name__, str(e))
                finished_one()
        if not done.wait(self.timeout_s):
            raise RuntimeError(f"engine driver: {left[0]} requests unfinished after {self.timeout_s:.0f} s")
        end = max((r.finish_time for r in made), default=t0)
        for r in made:
            if r.finish_reason == "error":
                res.error("request error", r.error or "")
                continue
            res.ttft.append((r.first_token_time or r.finish_time) - r.arrival)
            res.latency.append(r.finish_time - r.arrival)
            res.tokens += len(r.output_ids)
        res.seconds = end - t0
        return {**res.summary(), "iterations": eng.metrics.counter("iterations_total") - it0,
                "first_errors": res.first_errors}

    def counters(self) -> dict | None:
        """Graph captures of the engine's runner and Dynamo graphs compiled so far in this process."""
        from torch._dynamo.utils import counters
        r = self.engine.runner
        stats = getattr(r, "stats", None) or getattr(getattr(r, "graphs", None), "stats", None) or {}
        return {"graph_captures": int(stats.get("captures", 0)),
                "dynamo_graphs": int(counters["stats"]["unique_graphs"])}

    def close(self) -> None:
        self.engine.shutdown(drain=False, timeout=60)


class HttpDriver:
    """One `dlc serve` process per policy ("POLICY:elastic" adds --granularity elastic), kept for the
    suite."""
    name = "http"

    def __init__(self, model: str, server_args: list[str], port: int = 0):
        self.model, self.args, self.port = model, server_args, port
        self.servers: dict[str, tuple] = {}

    def prepare(self, policies: list[str]) -> None:
        for i, policy in enumerate(policies):
            pol, _, gran = policy.partition(":")
            port = self.port + i if self.port else free_port()
            extra = ["--granularity", gran] if gran else []
            proc = start_server(self.model, port, [*self.args, "--policy", pol, *extra])
            self.servers[policy] = (proc, f"http://127.0.0.1:{port}")

    def run(self, policy: str, reqs: list[dict]) -> dict:
        import httpx

        from .loadgen import _metric
        url = self.servers[policy][1]
        it0 = _metric(httpx.get(url + "/metrics", timeout=5).text, "dlc_iterations_total")
        res = asyncio.run(drive(url, self.model, reqs))
        it1 = _metric(httpx.get(url + "/metrics", timeout=5).text, "dlc_iterations_total")
        return {**res.summary(), "iterations": it1 - it0, "first_errors": res.first_errors}

    def counters(self) -> dict | None:
        return None                          # captures and compiles happen inside the servers: not visible

    def close(self) -> None:
        for proc, _ in self.servers.values():
            proc.terminate()
        for proc, _ in self.servers.values():
            proc.wait(60)


# -- the suite -------------------------------------------------------------------------------------------
def mix_text(wl: Workload) -> str:
    lo, hi = wl.prompt_len
    return (f"{wl.num_requests} requests per run; prompt {lo}-{hi} tokens (uniform), generation "
            f"{'/'.join(map(str, wl.gen_lens))} tokens (uniform choice), block {wl.block_length}, "
            f"{wl.tokens_per_step} tokens/step, dual cache, temperature 0")


def workloads_for(base: Workload, capacity: float, names, osc_load: float) -> dict[str, Workload]:
    out = {}
    for name in names:
        if name == "burst":
            out[name] = dataclasses.replace(base, pattern="burst")
        elif name in LOADS:
            out[name] = dataclasses.replace(base, pattern="poisson", rate=LOADS[name] * capacity)
        elif name == "osc":
            out[name] = dataclasses.replace(base, pattern="osc", rate=osc_load * capacity)
        else:
            raise ValueError(f"workload {name!r}: expected some of {WORKLOADS}")
    return out


def describe(w: Workload) -> dict:
    d = {"pattern": w.pattern, "rate": None if w.pattern == "burst" else w.rate}
    return {**d, "period": w.period, "amplitude": w.amplitude} if w.pattern == "osc" else d


def rotated(policies: list[str], rnd: int) -> list[str]:
    k = rnd % len(policies)
    return policies[k:] + policies[:k]


def run_suite(driver, base: Workload, policies: list[str], names=WORKLOADS, rounds: int = 3,
              capacity: float | None = None, osc_load: float = 0.8, warmup: str = "all", log=print) -> dict:
    """The method of the module docstring -> a JSON-able dict (method, capacity, runs, medians, targets)."""
    if rounds < 1 or not policies or warmup not in ("all", "burst"):
        raise ValueError(f"run_suite: rounds >= 1, some policies, warmup 'all' or 'burst' "
                         f"(got {rounds}, {policies}, {warmup!r})")
    if not osc_load > 0 or (capacity is not None and not capacity > 0):
        raise ValueError(f"run_suite: osc_load and capacity must be > 0 (got {osc_load}, {capacity})")
    names = list(names)
    workloads_for(base, 1.0, names, osc_load)                             # names checked before any work
    burst = dataclasses.replace(base, pattern="burst").requests()
    out = {"driver": driver.name, "policies": policies, "mix": mix_text(base), "rounds": rounds,
           "warmup": warmup, "order": [rotated(policies, r) for r in range(rounds)]}
    driver.prepare(policies)
    try:
        for p in policies:
            log(f"warm-up {p}: burst of the mix, untimed")
            _logged(driver.run(p, burst), p, log)
        measured = {} if capacity else measure_capacity(driver, policies, burst, rounds, log)
        cap = capacity or max(measured.values())
        if not cap > 0:
            raise ValueError("capacity: no request of the burst completed under any policy; "
                             "see the first errors above")
        out["capacity"] = {"requests_per_s": cap, "measured": measured,
                           "source": "given" if capacity else max(measured, key=measured.get)}
        log(f"capacity {cap:.2f} req/s ({out['capacity']['source']}; burst req/s per policy: "
            + ", ".join(f"{p} {v:.2f}" for p, v in measured.items()) + ")")
        wls = workloads_for(base, cap, names, osc_load)
        reqs = {n: w.requests() for n, w in wls.items()}
        out["workloads"] = {n: describe(w) for n, w in wls.items()}
        if warmup == "all":
            for n in (n for n in names if n != "burst"):
                for p in policies:
                    log(f"warm-up {p}: {n}, untimed")
                    _logged(driver.run(p, reqs[n]), p, log)
        before = driver.counters()
        runs = {n: {p: [] for p in policies} for n in names}
        for rnd in range(rounds):
            for n in names:
                for p in rotated(policies, rnd):
                    s = _logged(driver.run(p, reqs[n]), p, log)
                    runs[n][p].append(s)
                    log(f"  round {rnd + 1} {n:<10} {p:<16} {s['tokens_per_s']:8.1f} tok/s "
                        f"{s['requests_per_s']:6.2f} req/s  TTFT p99 {s['ttft_p99']:.3f} s  "
                        f"latency p99 {s['latency_p99']:.3f} s  errors {s['errors']}")
        after = driver.counters()
    finally:
        driver.close()
    out["timed_compiles"] = (None if before is None else {k: after[k] - before[k] for k in before})
    out["runs"] = runs
    out["results"] = {n: {p: spread(rs) for p, rs in by.items()} for n, by in runs.items()}
    out["targets"] = targets(runs, out["results"])
    return out


def measure_capacity(driver, policies, burst, rounds, log) -> dict[str, float]:
    """Saturated throughput per policy: the median requests/s of ``rounds`` timed bursts (order rotated)."""
    got: dict[str, list[float]] = {p: [] for p in policies}
    for rnd in range(rounds):
        for p in rotated(policies, rnd):
            got[p].append(_logged(driver.run(p, burst), p, log)["requests_per_s"])
    return {p: statistics.median(v) for p, v in got.items()}


def _logged(s: dict, policy: str, log) -> dict:
    for kind, msg in s.get("first_errors", {}).items():
        log(f"  {policy}: first error of kind {kind}: {msg}")
    return s


def spread(rs: list[dict]) -> dict:
    """metric -> {median, min, max} over rounds."""
    return {k: {"median": statistics.median(r[k] for r in rs), "min": min(r[k] for r in rs),
                "max": max(r[k] for r in rs)} for k in (*METRICS, "iterations")}


def _ratio(a: float, b: float) -> float:
    return a / b if b and a == a and b == b else float("nan")


def targets(runs: dict, results: dict) -> list[dict]:
    """The issue's target ratios (median of each policy, and the spread of per-round paired ratios)."""
    out = []
    for name, wl, pol, base, metric, bound, op in TARGETS:
        if wl not in runs or pol not in runs[wl] or base not in runs[wl]:
            continue
        med = _ratio(results[wl][pol][metric]["median"], results[wl][base][metric]["median"])
        per_round = [_ratio(a[metric], b[metric]) for a, b in zip(runs[wl][pol], runs[wl][base])]
        ok = med <= bound if op == "<=" else med >= bound
        out.append({"name": name, "ratio": med, "min": min(per_round), "max": max(per_round),
                    "target": f"{op} {bound:g}x", "status": "PASS" if ok else "MISS",
                    "miss_by": None if ok else abs(med - bound) / bound})
    return out


# -- the report ------------------------------------------------------------------------------------------
def _cell(d: dict, fmt: str = ".2f") -> str:
    return f"{d['median']:{fmt}} [{d['min']:{fmt}}-{d['max']:{fmt}}]"


def table(res: dict) -> str:
    """The report, printed last: method, the per-workload table (median [min-max]), the target rows."""
    cap = res["capacity"]
    warm = "every workload once untimed per policy" if res["warmup"] == "all" else "one burst per policy"
    lines = [f"driver {res['driver']}; {res['mix']}",
             f"capacity {cap['requests_per_s']:.2f} req/s ({cap['source']}); {res['rounds']} rounds, policy "
             f"order rotated per round ({' | '.join(','.join(o) for o in res['order'])}); warm-up: "
             f"{warm}",
             _compiles_text(res["timed_compiles"]), "",
             "| workload | rate req/s | policy | tok/s | req/s | TTFT p50 s | TTFT p99 s | latency p50 s | "
             "latency p99 s | errors |", "|" + "---|" * 10]
    for n, by in res["results"].items():
        w = res["workloads"][n]
        rate = "t=0" if w["rate"] is None else f"{w['rate']:.2f}" + (
            f" +-{w['amplitude']:.0%}/{w['period']:g}s" if w["pattern"] == "osc" else "")
        for p, m in by.items():
            lines.append(f"| {n} | {rate} | {p} | {_cell(m['tokens_per_s'], fmt='.1f')} | "
                         f"{_cell(m['requests_per_s'])} | {_cell(m['ttft_p50'], fmt='.3f')} | "
                         f"{_cell(m['ttft_p99'], fmt='.3f')} | {_cell(m['latency_p50'], fmt='.3f')} | "
                         f"{_cell(m['latency_p99'], fmt='.3f')} | {m['errors']['max']:g} |")
    if res["targets"]:
        lines += ["", "| target | ratio (medians) | per-round ratios | target | status |",
                  "|---|---|---|---|---|"]
        for t in res["targets"]:
            miss = f" by {t['miss_by']:.0%}" if t["miss_by"] is not None else ""
            lines.append(f"| {t['name']} | {t['ratio']:.2f}x | {t['min']:.2f}-{t['max']:.2f}x | "
                         f"{t['target']} | {t['status']}{miss} |")
    return "\n".join(lines)


def _compiles_text(c: dict | None) -> str:
    if c is None:
        return "graph captures / compiles during timed rounds: not visible through this driver"
    return ("graph captures / Dynamo compiles during timed rounds: "
            f"{c['graph_captures']} / {c['dynamo_graphs']}"
            + ("" if not any(c.values()) else " (NOT warm: the warm-up missed a shape)"))
