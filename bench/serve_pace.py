"""Is the served path as fast as the best hand-built loop? (issue 15's pace targets, one process, one GPU)

LLaDA-8B shape, random bf16 weights, prompt 512, gen 256, block 32, one token per step, dual cache. Variants,
timed in alternating order over ``--rounds`` rounds (medians reported), every shape warmed first:

* ``hand``: the hand-built optimized loop (``gpu_bench.FastDual``: compiled-free eager Refresh + fused logits,
  each Reuse step one CUDA graph that unmasks its token in place; no host sync until the end);
* ``engine-la1``: ``dlc.runtime.Engine`` + GraphRunner, one host round trip per step (``lookahead_steps=1``);
* ``engine-la<N>``: the same with fixed-schedule Reuse steps run ahead on the device (``lookahead_steps=N``);
* ``thread``: the same engine on its own loop thread (``Engine.start``, as the server runs it), the requests
  added from the main thread: what the thread costs apart from HTTP;
* ``http``: ``dlc serve``'s app (uvicorn on 127.0.0.1, server defaults, the startup heap frozen as `dlc serve`
  does) driven by the official openai client: one request at B=1, B concurrent requests otherwise (token-id
  prompts; the model has no tokenizer, so detokenizing costs nothing here).

Every engine variant uses one ServeConfig (the server's defaults, policy ``--policy``, warmed by
``Engine.warmup`` as ``dlc serve`` does) and differs only in ``lookahead_steps`` and how requests reach it.
After the table, each http request's time is broken down (bench/served.py): client send -> arrival, arrival
-> admitted, admitted -> last block, last block -> client, the event loop's wake-ups, the collector's pauses.

Prints JSON lines and a table last: tok/s per variant and its ratio to ``hand`` and to the floor-bound
ceiling (bench/floors.py at this GPU's measured copy bandwidth and matmul rate); GraphRunner host ms per
replay; the GPU idle share at B=1 estimated as 1 - (GPU-timed Reuse step x replays + Refresh x blocks) / wall.

    python3 -P bench/serve_pace.py --batches 1,32 --rounds 3 | tee serve_pace.log
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import engine_path  # noqa: E402
import floors  # noqa: E402
import gpu_bench  # noqa: E402
from served import Probe, Served, print_breakdown, run_threaded  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts_for(cfg, B, P):
    g = torch.Generator().manual_seed(B)
    return [torch.randint(0, cfg.vocab_size - 512, (P,), generator=g).tolist() for _ in range(B)]


def make_engine(runner, B, args, **over):
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.session import Session
    cfg, L = runner.config, args.prompt + args.gen
    mib = slot_bytes(cfg, L, torch.bfloat16) * (B + 2) / 2**20 + 1
    sc = ServeConfig(model="bench", device=str(runner.device), max_batch_size=B, max_num_tokens=2 * B * L,
                     max_seq_len=L, kv_cache_mb=mib, max_queue=4096, kv_cache="dual", gen_length=args.gen,
                     block_length=args.block, steps=args.gen, policy=args.policy, **over)
    eng = Engine(Session(runner, None, cfg, False, "bench"), sc)
    eng.warmup()                                                       # as `dlc serve` does
    return eng


def settle():
    """Free what earlier variants left (engines hold reference cycles) before anything captures a graph:
    pinned host buffers freed by the collector during a capture would invalidate it."""
    gc.collect()
    sync()


def time_hand(model, B, args):
    from types import SimpleNamespace
    a = SimpleNamespace(prompt=args.prompt, block=args.block, graphs=True)
    cfg = model.config
    x0 = torch.full((B, args.prompt + args.gen), cfg.mask_id, dtype=torch.long, device="cuda")
    x0[:, :args.prompt] = torch.tensor(prompts_for(cfg, B, args.prompt), device="cuda")
    fast = gpu_bench.FastDual(model, x0.clone(), a, torch.device("cuda"))
    fast.run(x0.clone())                                              # warm: every block's graph replayed
    x = x0.clone()
    sync()
    t = time.perf_counter()
    fast.run(x)
    sync()
    secs = time.perf_counter() - t
    del fast
    torch.cuda.empty_cache()
    return secs


def time_engine(runner, B, args, lookahead):
    eng = make_engine(runner, B, args, lookahead_steps=lookahead)
    prompts = prompts_for(runner.config, B, args.prompt)
    eng.generate(prompts, dict(gen_length=2 * args.block, block_length=args.block, steps=2 * args.block))
    st0 = dict(runner.stats)
    sync()
    t = time.perf_counter()
    outs = eng.generate(prompts, dict(gen_length=args.gen, block_length=args.block, steps=args.gen))
    sync()
    secs = time.perf_counter() - t
    assert all(len(o) == args.gen for o in outs), [len(o) for o in outs]
    n = runner.stats["replays"] - st0["replays"]
    host = (runner.stats["host_s"] - st0["host_s"]) / max(n, 1) * 1e3
    del eng
    torch.cuda.empty_cache()
    return secs, host, n


def time_thread(runner, B, args, lookahead):
    eng = make_engine(runner, B, args, lookahead_steps=lookahead)
    prompts = prompts_for(runner.config, B, args.prompt)
    eng.start()
    try:
        run_threaded(eng, prompts, dict(gen_length=2 * args.block, block_length=args.block,
                                        steps=2 * args.block))
        sync()
        t = time.perf_counter()
        reqs = run_threaded(eng, prompts, dict(gen_length=args.gen, block_length=args.block, steps=args.gen))
        secs = time.perf_counter() - t
    finally:
        eng.shutdown()
    assert all(len(r.output_ids) == args.gen for r in reqs)
    del eng
    torch.cuda.empty_cache()
    return secs


def time_http(runner, B, args, lookahead, rows: list):
    import openai
    eng = make_engine(runner, B, args, lookahead_steps=lookahead)
    probe = Probe(eng)
    srv = Served(eng)
    client = openai.OpenAI(base_url=srv.base, api_key="x", max_retries=0, timeout=600)
    prompts = prompts_for(runner.config, B, args.prompt)

    def one(p, gen):
        sent = time.monotonic()
        r = client.completions.create(model="bench", prompt=p, max_tokens=gen, temperature=0.0,
                                      extra_body=dict(gen_length=gen, block_length=args.block, steps=gen))
        return r.usage.completion_tokens, sent, time.monotonic()

    try:
        with ThreadPoolExecutor(B) as ex:                              # warm: the timed shapes
            list(ex.map(lambda p: one(p, 2 * args.block), prompts))
            sync()
            n0, w0 = len(probe.added), srv.wakeups
            t = time.perf_counter()
            got = list(ex.map(lambda p: one(p, args.gen), prompts))
            secs = time.perf_counter() - t
            woke = srv.wakeups - w0
    finally:
        srv.stop()
        probe.close()
    toks = sum(g[0] for g in got)
    assert toks == B * args.gen, toks
    for r in probe.added[n0:]:
        _, sent, received = got[prompts.index(r.prompt)]
        rows.append({"B": B, **probe.breakdown(r, sent, received, woke)})
    del eng, probe
    torch.cuda.empty_cache()
    return secs


def graph_step_ms(runner, args):
    """GPU time of one captured Reuse step at B=1 (CUDA events over replays): the floor of the engine's
    step."""
    eng = make_engine(runner, 1, args, lookahead_steps=1)
    eng.generate(prompts_for(runner.config, 1, args.prompt), dict(gen_length=args.block,
                                                                  block_length=args.block, steps=args.block))
    g = next(g for g in runner.graphs.values() if g.graph is not None)
    for _ in range(3):
        g.graph.replay()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        g.graph.replay()
    e1.record()
    sync()
    reuse_ms = e0.elapsed_time(e1) / 20
    x = torch.randint(0, 1000, (1, args.prompt + args.gen), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            runner.model(x)
        e0.record()
        for _ in range(5):
            runner.model(x)
        e1.record()
    sync()
    del eng
    return reuse_ms, e0.elapsed_time(e1) / 5


def profile_engine(runner, args, lookahead):
    """Where an Engine generation's wall time goes at B=1 (wrappers around the engine's and runner's calls;
    wall ms summed over the timed generation): Refresh calls (to the host copy), run-ahead launches (the
    window's first steps, then one per landed step), waits for steps to land, Refreshes launched behind a
    block's last step and the reads of their outputs, the core's applies, the rest of the engine step."""
    from dlc.runtime import boundary
    from dlc.runtime import engine as engine_mod
    from dlc.runtime.step import AheadSteps
    acc = {}

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[key] = acc.get(key, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)
        return fn

    eng = make_engine(runner, 1, args, lookahead_steps=lookahead)
    prompts = prompts_for(runner.config, 1, args.prompt)
    eng.generate(prompts, dict(gen_length=2 * args.block, block_length=args.block, steps=2 * args.block))
    saved = [(engine_mod, "run_batch", wrap(engine_mod, "run_batch", "one-step calls (run_batch, synced)")),
             (eng, "_postprocess", wrap(eng, "_postprocess", "core apply+advance+emit")),
             (AheadSteps, "wait", wrap(AheadSteps, "wait", "waits for landed steps")),
             (runner, "reuse_ahead", wrap(runner, "reuse_ahead", "run-ahead launches")),
             (runner, "continue_ahead", wrap(runner, "continue_ahead", "window launches (continue_ahead)")),
             (boundary, "prelaunch", wrap(boundary, "prelaunch", "Refresh launched behind a last step")),
             (boundary, "take", wrap(boundary, "take", "its outputs read (waits for the Refresh)")),
             (engine_mod, "make_batch", wrap(engine_mod, "make_batch", "make_batch"))]
    sync()
    t = time.perf_counter()
    eng.generate(prompts, dict(gen_length=args.gen, block_length=args.block, steps=args.gen))
    sync()
    wall = time.perf_counter() - t
    for obj, name, fn in saved:
        if obj is eng or obj is runner:
            delattr(obj, name) if name in vars(obj) else None
        else:
            setattr(obj, name, fn)
    pre = {st: eng.metrics.counter("lookahead_refresh_prelaunched_total", status=st)
           for st in ("used", "dropped")}
    print(json.dumps({"profile_lookahead": lookahead, "wall_s": wall,
                      **{k: round(v * 1e3, 2) for k, v in acc.items()}, "refresh_prelaunched": pre}),
          flush=True)
    del eng


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llada-8b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lookahead", type=int, default=16)
    p.add_argument("--no-http", action="store_true")
    p.add_argument("--policy", default="phase", help="every engine variant's scheduler policy (the server's "
                                                     "default: phase)")
    p.add_argument("--compile", action="store_true",
                   help="GraphRunner with compiled blocks (the hand loop's too)")
    p.add_argument("--profile", action="store_true", help="only the B=1 wall-time breakdown of the Engine")
    args = p.parse_args(argv)
    from dlc.runtime.runners.graph import GraphRunner
    model = engine_path.build(args.preset, "cuda")
    runner = GraphRunner(model, compile=args.compile)                  # fuses q|k|v, gate|up (hand too)
    step_ms, refresh_ms = graph_step_ms(runner, args)
    bw, rate = floors.measure("cuda")
    print(json.dumps({"graph_step_ms_B1": step_ms, "refresh_ms_B1": refresh_ms}), flush=True)
    if args.profile:
        for la in (1, args.lookahead, 1, args.lookahead):
            profile_engine(runner, args, la)
        return
    rows, http_rows = [], []
    for B in (int(b) for b in args.batches.split(",")):
        variants = {"hand": lambda: (time_hand(model, B, args), None, None),
                    "engine-la1": lambda: time_engine(runner, B, args, 1),
                    f"engine-la{args.lookahead}": lambda: time_engine(runner, B, args, args.lookahead)}
        if not args.no_http:
            variants["thread"] = lambda: (time_thread(runner, B, args, args.lookahead), None, None)
            variants["http"] = lambda: (time_http(runner, B, args, args.lookahead, http_rows), None, None)
        res = {k: [] for k in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for k in order:
                settle()
                secs, host, n = variants[k]()
                res[k].append((secs, host, n))
                print(json.dumps({"B": B, "round": r, "variant": k, "seconds": secs,
                                  "host_ms_per_replay": host, "replays": n}), flush=True)
        hand = statistics.median(s for s, _, _ in res["hand"])
        for k, v in res.items():
            med = statistics.median(s for s, _, _ in v)
            hosts = [h for _, h, _ in v if h is not None]
            reps = [n for _, _, n in v if n is not None]
            idle = None
            if B == 1 and reps:
                gpu_s = (step_ms * statistics.median(reps) + refresh_ms * args.gen // args.block) * 1e-3
                idle = 1 - gpu_s / med                                       # wall not spent on the GPU
            ceil = floors.e2e_ceiling_tok_s(model.config, B, args.prompt, args.gen, args.block, args.block,
                                            bw, rate)
            rows.append((B, k, B * args.gen / med, hand / med, B * args.gen / med / ceil,
                         statistics.median(hosts) if hosts else None, idle, min(s for s, _, _ in v),
                         max(s for s, _, _ in v)))
    print(f"\nLLaDA-8B shape bf16, prompt {args.prompt} gen {args.gen} block {args.block}, 1 "
          f"token/step, dual cache; {torch.cuda.get_device_name()} torch {torch.__version__}; medians of "
          f"{args.rounds} rounds; B=1 GPU: graph Reuse step {step_ms:.2f} ms, Refresh forward "
          f"{refresh_ms:.2f} ms; floors (bench/floors.py) at {bw / 1e12:.2f} TB/s, {rate / 1e12:.0f} TFLOP/s")
    print(f"{'B':>3} {'variant':<14} {'tok/s':>8} {'x hand':>7} {'x ceiling':>9} {'host ms/replay':>15} "
          f"{'GPU idle':>16} {'min s':>7} {'max s':>7}")
    for B, k, tps, ratio, of_ceil, host, idle, lo, hi in rows:
        host = '' if host is None else f'{host:.3f}'
        print(f"{B:>3} {k:<14} {tps:>8.1f} {ratio:>7.3f} {of_ceil:>9.3f} {host:>15} "
              f"{'' if idle is None else f'{idle:.1%}':>16} {lo:>7.2f} {hi:>7.2f}")
    for B in sorted({r["B"] for r in http_rows}):
        print_breakdown([{k: v for k, v in r.items() if k != "B"} for r in http_rows if r["B"] == B],
                        f"B={B} http: each request's time (loop_wakeups: the event loop's, per round)")


if __name__ == "__main__":
    main()
