"""Cost of each decoding rule per Reuse step (issue 18): time of one dual-cache Reuse step (runner call +
the decoding core's selection) with each rule vs low-confidence decoding, at B = 1 and B = 32, on an
LLaDA-8B-shaped model with random bf16 weights (random weights cannot show tokens per forward; this measures
what a rule adds to a step, target < 3%).

Per batch size: B prompts of ``--prompt`` tokens, gen ``--gen``, block ``--block``, in one KV pool that every
rule shares (a Reuse step writes only its fed columns, so the rules' steps do not disturb one another); per
rule one Refresh step fills the cache, then the same Reuse step runs from a copy of its states (every rule
times the same step: same fed tokens, same cache).

Method (so that a rule's few percent are not drowned by drift, clocks or the order of runs): every rule is
warmed first (captures its graph variant); then each of ``--iters`` iterations runs every rule once, round
robin, the order reversed every other iteration; each part is the MEDIAN over the iterations. Per step:

* ``gpu ms``: the runner call's device time between two CUDA events around it (the graph replay and its
  output copies on the stream; on the CPU, the runner call's wall time: there the device is the host);
* ``host ms``: the host's own work, with the device idle or already done: ``make_batch`` (states -> StepBatch,
  the extras' staging) + the runner call's launch (host time until it returns) + the copy back to the host
  (``to_host``, after the device finished) + ``decoding.apply_batch`` (``apply ms``, also shown alone);
* ``total ms``: the step's wall time, all of it one after the other (make_batch, launch, device, copy, apply),
  as a serving step without overlap pays it.

Each is compared with low-confidence (the first rule) on the same runner: ``vs`` columns, and PASS / MISS of
the total against the 3% target. Rows:

* ``graph`` (default): every rule through the CUDA-graph runner, the serving default (``--graph-decode``:
  ``fused``, the serving default on a GPU; ``exact``: float64 decoding, tokens equal the eager runner's).
  Rules with decoding extras (entropy_bound, credit, logprobs, smoothing) replay their own captured variant
  (issue 18); ``eager_reuse`` counts the steps that still fell back to the eager runner (sampled steps, T > 0:
  the filters row), and such a row says so;
* ``eager`` (``--runners eager,graph``): every rule on the eager runner.

``--path engine`` measures the served cost instead (issues 15 / 18): one request set of B requests per rule
through ``dlc.runtime.Engine`` with the graph runner (compiled blocks on CUDA, as ``dlc serve``; runs before
2026-11-29 timed it without: ``--no-compile``) and ``--lookahead`` steps run ahead (the serving default,
16), every rule's set run once per iteration, interleaved, the order reversed every other iteration; per rule
the median seconds per forward (the set's wall time / its mean forwards per request), its ratio to
low-confidence, tokens per forward, steps run ahead (``ahead`` replays / all Reuse replays) and the steps the
core dropped (of those: launched after the row's block had completed). On random weights a threshold rule
accepts about one token per step, so seconds per forward compare. ``--paced h200`` serves through
bench/paced_device.py's emulated H200 (LLaDA-8B costs; its eager runner, no graphs) instead of the graph
runner, so a CPU run meets the GPU's pacing.

Each row prints (JSON) as it is measured; the table comes last.

    python3 -P bench/rule_cost.py --batches 1,32              # on the GPU (LLaDA-8B shape), graph runner
    python3 bench/rule_cost.py --preset tiny-llada --device cpu --batches 1,4 --prompt 16 --gen 32 --block 8
    python3 -P bench/rule_cost.py --path engine --batches 1,32 --iters 5      # served cost, on the GPU
    python3 bench/rule_cost.py --path engine --preset tiny-llada --device cpu --dtype fp32 --batches 1,4 \
        --prompt 16 --gen 32 --block 8 --iters 3 [--paced h200]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
from engine_path import build  # noqa: E402  (the random LLaDA-shaped model every bench times)

RULES = {
    "low_confidence": dict(),
    "threshold 0.9": dict(threshold=0.9),
    "hierarchical 0.9/0.3": dict(threshold=0.9, low_threshold=0.3),
    "entropy_bound 0.1": dict(entropy_bound=0.1),
    "credit 0.9": dict(threshold=0.9, credit=True),
    "smoothing 0.9": dict(threshold=0.9, smoothing=True),
    "smoothing_top_k 8 (opt-in)": dict(threshold=0.9, smoothing=True, smoothing_top_k=8),
    "logprobs 5": dict(logprobs=5),
    "sampled (T 0.8)": dict(temperature=0.8),                    # no filter: the plain Gumbel draw
    "top_k 50 top_p 0.9 (T 0.8)": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p 0.9 (T 0.8)": dict(temperature=0.8, top_p=0.9),      # no top-k: the exact bisection's variant
    "min_p 0.05 (T 0.8)": dict(temperature=0.8, min_p=0.05),
}
TARGET = 0.03                # a rule's overhead per Reuse step vs low-confidence (issue 18)


def reuse_states(runner, B, params, args, pool, slots):
    """B states after their block's Refresh step (in ``slots`` of the shared ``pool``), phase reuse."""
    from dlc.runtime.decoding import DecodeState, GenerationConfig
    from dlc.runtime.step import make_batch, run_batch
    cfg = runner.config
    gen = GenerationConfig(gen_length=args.gen, block_length=args.block, steps=args.gen, kv_cache="dual",
                           seed=1, **params)
    g = torch.Generator().manual_seed(B)                   # the same prompts for every rule
    hi = min(cfg.vocab_size, cfg.mask_id) - 1                                   # ids below the specials
    states = [DecodeState.new(torch.randint(0, hi, (args.prompt,), generator=g).tolist(), gen, cfg)
              for _ in range(B)]
    for s in states:
        s.advance(args.block)
    out = run_batch(runner, make_batch(runner, states, slots, pool))          # the Refresh
    for i, s in enumerate(states):
        s.apply(out.x0[i], out.conf[i], out.row(i))
        s.advance(args.block)
    # force a Reuse step even where the rule finished the block (peaked random logits)
    for s in states:
        if s.phase != "reuse":
            s.x[s.bs + 1:s.be] = cfg.mask_id
            s.phase, s.has_cache, s.n_now = "reuse", True, max(1, s.n_now)
    return states


class Clock:
    """Device time between two points of the stream (CUDA events) or, on the CPU, host wall time."""

    def __init__(self, dev):
        self.cuda = torch.device(dev).type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b)
        return 1e3 * (b - a)

    def wait(self):
        if self.cuda:
            torch.cuda.synchronize()


def time_step(runner, states, slots, pool, clock) -> dict:
    """One Reuse step from a copy of ``states``: its parts in ms (see the module docstring)."""
    from dlc.runtime.decoding import apply_batch
    from dlc.runtime.step import _checked, make_batch
    st = [copy.deepcopy(s) for s in states]
    clock.wait()
    t0 = time.perf_counter()
    batch = make_batch(runner, st, slots, pool)
    t1 = time.perf_counter()
    e0 = clock.mark()
    res = runner.reuse(batch)                         # launches (a CPU runner computes here)
    t2 = time.perf_counter()
    e1 = clock.mark()
    dev_ms = clock.ms(e0, e1)                         # waits for the device
    t3 = time.perf_counter()
    out = _checked(runner, "reuse", batch, res)       # run_batch's copy back to the host
    t4 = time.perf_counter()
    apply_batch(st, out.x0, out.conf, out)            # the engine's one call per runner output
    t5 = time.perf_counter()
    launch = 0.0 if not clock.cuda else t2 - t1       # on the CPU the call is the device part
    host = (t1 - t0) + launch + (t4 - t3) + (t5 - t4)
    return {"gpu_ms": dev_ms, "host_ms": 1e3 * host, "apply_ms": 1e3 * (t5 - t4), "total_ms": 1e3 * (t5 - t0)}


def time_rules(runner, B, names, args) -> dict:
    """{rule: {part: median ms}} of the rules interleaved: warmed each, then round robin, order alternated."""
    from dlc.runtime.kv_cache import KVCacheManager
    pool = KVCacheManager(runner.config, args.prompt + args.gen, 1 << 62, runner.dtype, runner.device,
                          max_slots=B + 1)
    if hasattr(runner, "bind_pool"):
        runner.bind_pool(pool)
    slots = [pool.allocate_n(1) for _ in range(B)]
    clock = Clock(args.device)
    states = {n: reuse_states(runner, B, RULES[n], args, pool, slots) for n in names}
    stats = getattr(runner, "stats", {})
    eager = {n: 0 for n in names}
    for n in names:                                   # warm-up: captures, allocator, caches
        for _ in range(args.warmup):
            time_step(runner, states[n], slots, pool, clock)
    samples = {n: [] for n in names}
    for it in range(args.iters):
        t_it = time.perf_counter()
        for n in (names if it % 2 == 0 else names[::-1]):
            e0 = stats.get("eager_reuse", 0)
            samples[n].append(time_step(runner, states[n], slots, pool, clock))
            eager[n] += stats.get("eager_reuse", 0) - e0
        if out_of_time(args, time.perf_counter() - t_it):
            break
    res = {}
    for n in names:
        res[n] = {k: statistics.median(s[k] for s in samples[n]) for k in samples[n][0]}
        if "eager_reuse" in stats:             # graph runner: Reuse steps of this rule that ran eagerly
            res[n]["eager_reuse"] = eager[n]
    return res


START = time.perf_counter()        # --time-limit counts from here (the model build included)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds from the start: no iteration (every rule once) starts that would end later; "
                         "the table prints with the iterations done (sets per row in the JSON)")
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated names of RULES")
    ap.add_argument("--runners", default="graph", help="comma-separated: graph, eager")
    ap.add_argument("--graph-decode", default=None, choices=["fused", "exact"],
                    help="graph runner decoding [step path: fused; engine path: the runner's default]")
    ap.add_argument("--path", default="step", choices=["step", "engine"],
                    help="step: one Reuse step per rule; engine: whole requests served (Engine, run ahead)")
    ap.add_argument("--lookahead", type=int, default=16, help="--path engine: steps run ahead in flight")
    ap.add_argument("--paced", default=None, choices=["h200"],
                    help="--path engine: serve through bench/paced_device.py's emulated device")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="--path engine: compiled blocks (default: on CUDA, as dlc serve)")
    ap.add_argument("--smooth-passes", default="triton", choices=["triton", "torch"],
                    help="a smoothing step's per-chunk selection and exponentials: dlc.kernels.smoothing's "
                         "split kernels (the default on CUDA) or torch's max / exp / sum (the form before)")
    args = ap.parse_args()
    if args.smooth_passes == "torch":
        from dlc.kernels import smoothing
        smoothing.HAS_TRITON = False
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    bad = [n for n in names if n not in RULES]
    if bad:
        ap.error(f"--rules: unknown {bad}; choose from {list(RULES)}")
    model = build(args.preset, args.device, dtype)
    if args.path == "engine":
        return engine_main(model, names, args)
    runners = make_runners(model, args)
    print(json.dumps({"device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
                      else "cpu", "torch": torch.__version__, "runners": list(runners),
                      "graph_decode": args.graph_decode or "fused", "iters": args.iters}), flush=True)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        for kind, runner in runners.items():
            res = time_rules(runner, B, names, args)
            base = res[names[0]]
            for name in names:
                r = res[name]
                vs = {f"vs_{k}": round(r[k] / base[k] - 1, 4) for k in PARTS}
                row = {"runner": kind, "B": B, "rule": name, "cpu": torch.device(args.device).type == "cpu",
                       **{k: round(v, 3) for k, v in r.items()}, **vs,
                       "target": "PASS" if vs["vs_total_ms"] < TARGET else "MISS"}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(rows)


PARTS = ("gpu_ms", "host_ms", "total_ms")


def print_table(rows: list) -> None:
    print(f"\nmedians of each part (they need not add up to the total's median); vs = the ratio to "
          f"low-confidence on the same runner and B, - 1; target < {TARGET:.0%} on the total")
    if rows and rows[0].get("cpu"):
        print("cpu: gpu ms is the runner call's wall time (the device is the host)")
    print("\n| runner | B | rule | gpu ms | vs | host ms | vs | (apply ms) | total ms | vs | target |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" ({r['eager_reuse']} eager steps)" if r.get("eager_reuse") else ""
        pct = {k: f"{100 * r['vs_' + k]:+.1f}%" for k in PARTS}
        print(f"| {r['runner']} | {r['B']} | {r['rule']}{note} | {r['gpu_ms']:.2f} | {pct['gpu_ms']} | "
              f"{r['host_ms']:.2f} | {pct['host_ms']} | {r['apply_ms']:.2f} | {r['total_ms']:.2f} | "
              f"{pct['total_ms']} | {r['target']} |", flush=True)


def make_runners(model, args) -> dict:
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.runners.graph import GraphRunner
    kinds = [k.strip() for k in args.runners.split(",") if k.strip()]
    runners = {}
    for k in kinds:
        if k == "eager":
            runners[k] = EagerRunner(model)
        elif k == "graph":
            runners[k] = GraphRunner(model, decode=args.graph_decode or "fused")
        else:
            raise SystemExit(f"--runners: unknown {k!r} (graph, eager)")
    return runners


# ------------------------------------------------------------------------------------ --path engine
def model_on_cuda(model) -> bool:
    return next(model.parameters()).device.type == "cuda"


def make_engine(model, B: int, args):
    """An Engine as ``dlc serve`` builds one (graph runner, warmed), dual cache, ``--lookahead`` steps ahead;
    ``--paced``: the emulated device's runner instead."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.session import Session
    cfg, L = model.config, args.prompt + args.gen
    runner = None
    if args.paced:
        from paced_device import H200_8B, PacedRunner
        runner = PacedRunner(model, **H200_8B)
    else:
        from dlc.runtime.runners.graph import GraphRunner
        # compiled blocks as ``dlc serve`` builds them on CUDA (``graph_runner_for``); --no-compile: without
        # (the runs of this bench before 2026-11-29 timed that one)
        runner = GraphRunner(model, decode=args.graph_decode,
                             compile=args.compile if args.compile is not None else model_on_cuda(model))
    mib = slot_bytes(cfg, L, runner.dtype) * (B + 2) / 2**20 + 1
    sc = ServeConfig(model="bench", device=str(runner.device), max_batch_size=B, max_num_tokens=2 * B * L,
                     max_seq_len=L, kv_cache_mb=mib, max_queue=4096, kv_cache="dual", gen_length=args.gen,
                     block_length=args.block, steps=args.gen, lookahead_steps=args.lookahead,
                     policy="fcfs")
    eng = Engine(Session(runner, None, cfg, False, "bench"), sc)
    eng.warmup()
    count_ahead(eng.runner)
    return eng


def serve_set(eng, prompts, params, clock) -> dict:
    """One request set through the engine: wall seconds, mean forwards and tokens per request, the runner's
    Reuse replays run ahead / in all, the core's dropped steps (and of those past a block's end)."""
    st, m = getattr(eng.runner, "stats", {}), eng.metrics
    before = (st.get("replays", 0), ahead_replays(st), counter(m, "lookahead_dropped_steps_total"),
              counter(m, "lookahead_past_block_steps_total"))
    reqs = [eng.make_request(p, params) for p in prompts]
    clock.wait()
    t0 = time.perf_counter()
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    clock.wait()
    secs = time.perf_counter() - t0
    fwd = statistics.mean(r.state.forwards for r in reqs)
    toks = statistics.mean(len(r.output_ids) for r in reqs)
    after = (st.get("replays", 0), ahead_replays(st), counter(m, "lookahead_dropped_steps_total"),
             counter(m, "lookahead_past_block_steps_total"))
    rep, ahead, dropped, past = (a - b for a, b in zip(after, before))
    return {"s": secs, "forwards": fwd, "tokens": toks, "replays": rep, "ahead": ahead, "dropped": dropped,
            "past_block": past}


def counter(metrics, name: str) -> float:
    """An engine counter, 0 where this checkout does not have it."""
    return metrics.counters.get(name, {}).get((), 0.0)


def ahead_replays(stats: dict) -> int:
    """Reuse steps launched by runs ahead so far (``count_ahead``; runners count them in ``replays`` too)."""
    return stats.get("bench_ahead_steps", 0)


def count_ahead(runner) -> None:
    """Counts the steps each run ahead launches into ``runner.stats["bench_ahead_steps"]`` (the bench's own
    wrapper: older checkouts' runners count no such thing)."""
    for name in ("reuse_ahead", "continue_ahead"):
        fn = getattr(runner, name, None)
        if fn is None:
            continue

        def counted(first, counts, *a, fn=fn, **kw):
            runner.stats["bench_ahead_steps"] = runner.stats.get("bench_ahead_steps", 0) + counts.shape[1]
            return fn(first, counts, *a, **kw)
        setattr(runner, name, counted)


def engine_rules(model, B: int, names: list, args) -> dict:
    """{rule: medians} of the rules' request sets, interleaved (warmed each first)."""
    t = time.perf_counter()
    eng = make_engine(model, B, args)
    print(f"[engine] B={B}: warmed in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    cfg, clock = model.config, Clock(args.device)
    g = torch.Generator().manual_seed(B)
    hi = min(cfg.vocab_size, cfg.mask_id) - 1
    prompts = [torch.randint(0, hi, (args.prompt,), generator=g).tolist() for _ in range(B)]
    params = {n: dict(gen_length=args.gen, block_length=args.block, steps=args.gen, kv_cache="dual", seed=1,
                      **RULES[n]) for n in names}
    for n in names:
        for _ in range(max(1, args.warmup)):
            serve_set(eng, prompts, params[n], clock)
    samples = {n: [] for n in names}
    for it in range(args.iters):
        t_it = time.perf_counter()
        for n in (names if it % 2 == 0 else names[::-1]):
            samples[n].append(serve_set(eng, prompts, params[n], clock))
            print(f"[engine] B={B} iter {it} {n}: {json.dumps(samples[n][-1])}", file=sys.stderr, flush=True)
        if out_of_time(args, time.perf_counter() - t_it):
            print(f"[engine] B={B}: --time-limit: {it + 1} of {args.iters} sets", file=sys.stderr, flush=True)
            break
    res = {}
    for n in names:
        sm = samples[n]
        res[n] = {"s_per_forward": statistics.median(x["s"] / x["forwards"] for x in sm),
                  "tokens_per_forward": statistics.median(x["tokens"] / x["forwards"] for x in sm),
                  "forwards": statistics.median(x["forwards"] for x in sm),
                  "ahead_share": sum(x["ahead"] for x in sm) / max(1, sum(x["replays"] for x in sm)),
                  "dropped": sum(x["dropped"] for x in sm) / len(sm),
                  "past_block": sum(x["past_block"] for x in sm) / len(sm), "sets": len(sm)}
    return res


def out_of_time(args, last_iteration_s: float) -> bool:
    """Whether another iteration (every rule once) would end past ``--time-limit`` seconds from the start:
    the run stops with whole iterations, so the interleaving stays balanced and the table still prints."""
    limit = getattr(args, "time_limit", None)
    return limit is not None and time.perf_counter() - START + last_iteration_s > limit


def engine_main(model, names: list, args) -> None:
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(json.dumps({"path": "engine", "device": name,
                      "paced": args.paced, "lookahead": args.lookahead, "graph_decode": args.graph_decode,
                      "iters": args.iters, "torch": torch.__version__, "smooth_passes": args.smooth_passes,
                      "compiled_blocks": args.compile if args.compile is not None else dev.type == "cuda"}),
          flush=True)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        res = engine_rules(model, B, names, args)
        base = res[names[0]]["s_per_forward"]
        for n in names:
            row = {"B": B, "rule": n, **{k: round(v, 6 if k == "s_per_forward" else 3)
                                         for k, v in res[n].items()},
                   "vs": round(res[n]["s_per_forward"] / base - 1, 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    sets = sorted({r["sets"] for r in rows})
    print(f"\nserved cost per forward (Engine, lookahead {args.lookahead}"
          f"{', paced ' + args.paced if args.paced else ''}); medians over {'/'.join(map(str, sets))} "
          f"interleaved sets (of {args.iters} asked; per B); "
          f"ahead = share of Reuse steps run ahead; dropped (past block) = steps the core dropped per set")
    print("\n| B | rule | ms / forward | vs low-conf | tokens / forward | ahead | dropped (past block) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['rule']} | {1e3 * r['s_per_forward']:.3f} | {100 * r['vs']:+.1f}% | "
              f"{r['tokens_per_forward']:.2f} | {100 * r['ahead_share']:.0f}% | {r['dropped']:.1f} "
              f"({r['past_block']:.1f}) |", flush=True)


if __name__ == "__main__":
    main()
