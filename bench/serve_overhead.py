"""What the served path adds to one request, on CPU, with the device's pace emulated (issue 15, part 1).

The runner is ``paced_device.PacedRunner``: tiny-llada's eager runner whose Refresh and Reuse calls also take
fixed device time with the GIL released, and whose Reuse steps run ahead like the CUDA-graph runner's (one
host wait per landed step). So, as on a GPU, the device sets the pace and host work hides behind it; what the
server's threads, HTTP and the GIL add shows up as wall time over the in-process engine's.

Variants, alternating per round (medians of ``--rounds``), one ServeConfig for all (the server's defaults but
the sizes below):

* ``engine``: ``Engine.generate`` on the calling thread (serve_pace.py's in-process path);
* ``thread``: the engine's own loop thread (``Engine.start``), the requests added from another thread;
* ``http``: ``dlc serve``'s app (uvicorn on 127.0.0.1) and the official openai client, B concurrent requests.

For ``http`` it breaks each request down (bench/served.py): client send -> arrival, arrival -> admitted,
admitted -> last block, last block -> client, with the event loop's wake-ups and the collector's pauses.

    python -P bench/serve_overhead.py --rounds 5
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

from engine_path import build  # noqa: E402
from paced_device import H200_8B, PacedRunner  # noqa: E402
from served import Probe, Served, print_breakdown, run_threaded  # noqa: E402


def make_engine(model, args):
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.session import Session
    L = args.prompt + args.gen
    if args.cost == "fixed":
        runner = PacedRunner(model, args.step_ms * 1e-3, args.refresh_ms * 1e-3)
    else:                                   # the H200 cost model of LLaDA-8B, scaled (H100: --scale 1.06)
        runner = PacedRunner(model, **H200_8B, scale=args.scale)
    sc = ServeConfig(model="bench", device="cpu", max_batch_size=args.batch,
                     max_num_tokens=2 * args.batch * L, max_seq_len=L, kv_cache_mb=64, kv_cache="dual",
                     gen_length=args.gen, block_length=args.block, steps=args.gen,
                     lookahead_steps=args.lookahead)
    eng = Engine(Session(runner, None, model.config, False, "bench"), sc)
    eng.warmup()
    return eng


def prompts(args, cfg):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg.mask_id, (args.prompt,), generator=g).tolist() for _ in range(args.batch)]


def params(args) -> dict:
    return dict(gen_length=args.gen, block_length=args.block, steps=args.gen)


def device_s(eng) -> float:
    return eng.runner.stats["device_s"]


def time_engine(model, args) -> tuple[float, float]:
    eng = make_engine(model, args)
    eng.generate(prompts(args, model.config), params(args))
    t, d = time.perf_counter(), device_s(eng)
    idle0 = dict(eng.runner.stats["idle_s"])
    eng.generate(prompts(args, model.config), params(args))
    secs = time.perf_counter() - t
    print(json.dumps({"engine_idle_ms_before": {k: round((v - idle0.get(k, 0.0)) * 1e3, 1)
                                                for k, v in eng.runner.stats["idle_s"].items()}}))
    return secs, device_s(eng) - d


def time_thread(model, args) -> float:
    eng = make_engine(model, args)
    eng.start()
    try:
        run_threaded(eng, prompts(args, model.config), params(args))
        t, d = time.perf_counter(), device_s(eng)
        run_threaded(eng, prompts(args, model.config), params(args))
        return time.perf_counter() - t, device_s(eng) - d
    finally:
        eng.shutdown()


def time_http(model, args, rows: list) -> tuple[float, float]:
    import openai
    eng = make_engine(model, args)
    probe = Probe(eng)
    srv = Served(eng)
    client = openai.OpenAI(base_url=srv.base, api_key="x", max_retries=0, timeout=600)
    ps = prompts(args, model.config)

    def one(p):
        sent = time.monotonic()
        u = client.completions.create(model="bench", prompt=p, max_tokens=args.gen, temperature=0.0,
                                      extra_body=params(args)).usage.completion_tokens
        return u, sent, time.monotonic()
    try:
        with ThreadPoolExecutor(args.batch) as ex:
            list(ex.map(one, ps))
            n0, w0 = len(probe.added), srv.wakeups
            t, d = time.perf_counter(), device_s(eng)
            got = list(ex.map(one, ps))
            secs = time.perf_counter() - t
            dev = device_s(eng) - d
            woke = srv.wakeups - w0
        assert sum(g[0] for g in got) == args.batch * args.gen, got
        for r in probe.added[n0:]:
            _, sent, received = got[ps.index(r.prompt)]
            rows.append(probe.breakdown(r, sent, received, woke))
        return secs, dev
    finally:
        srv.stop()
        eng.shutdown()
        probe.close()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny-llada")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--step-ms", type=float, default=5.0, help="emulated device time of one Reuse step")
    p.add_argument("--refresh-ms", type=float, default=15.0, help="emulated device time of one Refresh")
    p.add_argument("--lookahead", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cost", choices=("fixed", "h200"), default="fixed",
                   help="device time: fixed --step-ms / --refresh-ms, or paced_device.H200_8B (per row, per "
                        "token) times --scale")
    p.add_argument("--scale", type=float, default=1.0, help="with --cost h200: multiplies every device time")
    p.add_argument("--variants", default="engine,thread,http", help="which variants to time (engine first)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = build(args.preset, "cpu", torch.float32)
    rows: list[dict] = []
    variants = {"engine": lambda: time_engine(model, args), "thread": lambda: time_thread(model, args),
                "http": lambda: time_http(model, args, rows)}
    variants = {k: variants[k] for k in args.variants.split(",")}
    res, dev = {k: [] for k in variants}, {k: [] for k in variants}
    for r in range(args.rounds):
        for k in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            gc.collect()
            secs, d = variants[k]()
            res[k].append(secs)
            dev[k].append(d)
            print(json.dumps({"round": r, "variant": k, "seconds": secs, "device_s": d}), flush=True)
    base = statistics.median(res["engine"])
    cost = (f"{args.step_ms} ms / Reuse step, {args.refresh_ms} ms / Refresh" if args.cost == "fixed" else
            f"the H200 LLaDA-8B cost model x {args.scale}")
    print(f"\n{args.preset} on CPU, device paced at {cost}; B={args.batch}, prompt {args.prompt}, gen "
          f"{args.gen}, block {args.block}, 1 token/step, lookahead {args.lookahead}; medians of "
          f"{args.rounds} rounds; device s: the emulated device's busy time in the timed generation, idle: "
          f"1 - device / wall")
    print(f"{'variant':<8} {'seconds':>8} {'x engine':>9} {'device s':>9} {'idle':>7} {'min s':>7} "
          f"{'max s':>7}")
    for k, v in res.items():
        med, d = statistics.median(v), statistics.median(dev[k])
        print(f"{k:<8} {med:>8.3f} {base / med:>9.3f} {d:>9.3f} {1 - d / med:>7.1%} {min(v):>7.3f} "
              f"{max(v):>7.3f}")
    print_breakdown(rows, "http: one request's time (loop_wakeups: the event loop's, all timed requests)")


if __name__ == "__main__":
    main()
