"""Served cost of a block-diffusion model's forwards (SDAR-8B shape, random bf16 weights) through
``dlc.runtime.Engine``, three ways:

* ``eager``: the eager runner (``cuda_graphs`` off): every step launches its kernels from Python, one host
  round trip per step;
* ``graphs la1``: the CUDA-graph runner, one step at a time: every step of a block after its first replays
  the ordinary captured Reuse step (``step.block_as_prefix``), and so does a block's first step, which feeds
  the finished block too, as one row per fed block (``step.block_rows_as_prefix``);
* ``graphs la16``: the same with 16 steps run ahead of the host (the block threshold's device-side commit,
  ``BlockThresholdRule.select_ahead``, bounded by ``DecodeState.ahead_horizon``);
* ``la16 first eager``: ``graphs la16`` with every block's first step (and the prefill) on the eager path, as
  before ``block_rows_as_prefix`` (the runner's ``warm_rows`` set to 0 for those sets).

B requests of ``--prompt`` tokens (default 512), gen ``--gen`` (256), ``--block`` (32) with
``--steps-per-block`` steps (default: as many as the block's tokens; fewer commit block / steps tokens a step
whatever the threshold, the regime of a trained model's parallel decoding), the block decoder's default
threshold (the family's: SDAR 0.9), exact block cache, all in one FCFS
batch. Per variant and batch size: the median over ``--iters`` request sets of ms per forward (the set's wall
time / its mean forwards per request) and tokens per forward (random weights commit about one token a step, so
ms per forward is the comparable figure). Method: every variant warmed first at the timed shapes (graphs
captured, first-call costs); then each iteration runs every variant once, the order reversed every other
iteration; ratios are against ``eager`` measured in the same process on the same GPU. The graph variants share
one engine (one KV pool, one set of captured graphs; only ``lookahead_steps`` changes between them); blocks
are not compiled (``--compile`` compiles them as ``dlc serve`` does, which adds minutes of warm-up).

Each measured set prints (JSON) as it ends; the table comes last.

    python3 -P bench/block_cost.py                                   # H200: SDAR-8B shape, B = 1 and 8
    python3 bench/block_cost.py --preset tiny-sdar --device cpu --prompt 16 --gen 32 --block 8 --iters 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
from engine_path import build, eager_runner, sync  # noqa: E402  (the random-weight model every bench times)

VARIANTS = ("eager", "la16 first eager", "graphs la1", "graphs la16")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="sdar-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="bf16 (default on CUDA) or fp32 (default on CPU)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=None, help="default: the family's")
    ap.add_argument("--steps-per-block", type=int, default=None, help="default: --block (one token a step)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compile the graph runner's blocks (slow warm-up)")
    return ap.parse_args(argv)


def make_engine(model, args, max_b: int, graphs: bool, lookahead: int = 1):
    """A warmed dlc.runtime.Engine over ``model`` for up to ``max_b`` requests of ``args.prompt`` +
    ``args.gen`` tokens in blocks of ``args.block``: the eager runner, or (``graphs``) the CUDA-graph runner
    with ``args.compile``'s blocks (bench/block_diffusion.py times it too)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.session import Session
    cfg = model.config
    L = -(-(args.prompt + args.gen) // args.block) * args.block             # the canvas: whole blocks
    runner = eager_runner(model)
    mib = slot_bytes(cfg, L, runner.dtype) * (max_b + 2) / 2**20 + 1
    sc = ServeConfig(model="bench", device=args.device, max_batch_size=max_b, max_num_tokens=2 * max_b * L,
                     max_seq_len=L, kv_cache_mb=mib, max_queue=4096, policy="fcfs", cuda_graphs=graphs,
                     compile=args.compile if graphs else False, lookahead_steps=lookahead,
                     lookahead_max_ms=0.0, block_length=args.block, gen_length=args.gen)
    eng = Engine(Session(runner, None, cfg, False, "bench"), sc)
    eng.warmup()
    return eng


def make_engines(model, args, max_b: int) -> dict:
    """{variant: (engine, lookahead)}: one eager engine, one graph engine shared by the graph variants."""
    engines = {graphs: make_engine(model, args, max_b, graphs) for graphs in (False, True)}
    rows = engines[True].runner.warm_rows
    return {"eager": (engines[False], 1, 0), "la16 first eager": (engines[True], 16, 0),
            "graphs la1": (engines[True], 1, rows), "graphs la16": (engines[True], 16, rows)}


def serve_set(eng, lookahead: int, rows: int, prompts, params, dev) -> dict:
    """One request set: wall seconds, mean forwards and tokens per request, the graph runner's counters.
    ``rows``: the graph runner's ``warm_rows`` for the set (0: steps over several blocks run eagerly)."""
    eng.cfg = dataclasses.replace(eng.cfg, lookahead_steps=lookahead)      # the engine reads it per run
    if hasattr(eng.runner, "warm_rows"):
        eng.runner.warm_rows = rows
    st = dict(getattr(eng.runner, "stats", {}))
    reqs = [eng.make_request(p, params) for p in prompts]
    sync(dev)
    t0 = time.perf_counter()
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    sync(dev)
    secs = time.perf_counter() - t0
    bad = [r.error for r in reqs if r.error]
    if bad:
        raise SystemExit(f"a request failed: {bad[0]}")
    now = getattr(eng.runner, "stats", {})
    delta = {k: now.get(k, 0) - st.get(k, 0) for k in ("replays", "eager_reuse", "ahead_calls", "block_rows")}
    return {"s": secs, "forwards": statistics.mean(r.state.forwards for r in reqs),
            "tokens": statistics.mean(len(r.output_ids) for r in reqs), **delta}


def measure(model, args, B: int, engines: dict, params: dict) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(B)
    hi = min(cfg.vocab_size, cfg.mask_id) - 1
    prompts = [torch.randint(0, hi, (args.prompt,), generator=g).tolist() for _ in range(B)]
    for v in VARIANTS:                                          # warm: captures, first calls at these shapes
        serve_set(*engines[v], prompts, params, args.device)
    samples = {v: [] for v in VARIANTS}
    for it in range(args.iters):
        for v in (VARIANTS if it % 2 == 0 else VARIANTS[::-1]):
            x = serve_set(*engines[v], prompts, params, args.device)
            samples[v].append(x)
            print(json.dumps({"B": B, "variant": v, "iter": it, "ms_per_forward": round(1e3 * x["s"] /
                                                                                       x["forwards"], 3),
                              "forwards": x["forwards"], "replays": x["replays"],
                              "eager_reuse": x["eager_reuse"], "block_rows": x["block_rows"],
                              "ahead_calls": x["ahead_calls"]}), flush=True)
    out = {}
    for v, sm in samples.items():
        out[v] = {"ms": statistics.median(1e3 * x["s"] / x["forwards"] for x in sm),
                  "tpf": statistics.median(x["tokens"] / x["forwards"] for x in sm),
                  "replayed": sum(x["replays"] for x in sm) / max(1, sum(x["replays"] + x["eager_reuse"]
                                                                         for x in sm)),
                  "ahead_calls": sum(x["ahead_calls"] for x in sm) / len(sm)}
    return out


def main(argv=None) -> None:
    args = parse(argv)
    t0 = time.perf_counter()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    model = build(args.preset, args.device, dtype)
    cfg = model.config
    if not cfg.block_diffusion:
        raise SystemExit(f"--preset: {args.preset} is not a block-diffusion model")
    from dlc.runtime.config import family_generation_defaults
    thr = args.threshold if args.threshold is not None else family_generation_defaults(cfg).get("threshold")
    params = dict(gen_length=args.gen, block_length=args.block,
                  steps_per_block=args.steps_per_block or args.block, threshold=thr,
                  kv_cache="block", decoder="llada2", seed=1)
    batches = [int(b) for b in args.batches.split(",")]
    dev = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "cpu"
    print(json.dumps({"bench": "block_cost", "device": dev, "preset": args.preset, "dtype": str(dtype),
                      "prompt": args.prompt, "gen": args.gen, "block": args.block, "threshold": thr,
                      "steps_per_block": params["steps_per_block"],
                      "iters": args.iters, "compile": args.compile, "torch": torch.__version__}), flush=True)
    engines = make_engines(model, args, max(batches))
    print(json.dumps({"progress": "engines warmed", "s": round(time.perf_counter() - t0, 1)}), flush=True)
    rows = {}
    for B in batches:
        rows[B] = measure(model, args, B, engines, params)
        print(json.dumps({"progress": f"B={B} done", "s": round(time.perf_counter() - t0, 1)}), flush=True)
    print(f"\nblock-diffusion served cost ({args.preset}, random weights, {dtype}, prompt {args.prompt}, gen "
          f"{args.gen}, block {args.block}, {params['steps_per_block']} steps a block, threshold {thr}); "
          f"medians over {args.iters} interleaved sets; replayed = share of the graph runner's Reuse calls "
          f"replayed (the rest eager)")
    print("\n| B | variant | ms / forward | vs eager | tokens / forward | replayed | runs ahead / set |")
    print("|---|---|---|---|---|---|---|")
    for B, res in rows.items():
        base = res["eager"]["ms"]
        for v in VARIANTS:
            r = res[v]
            rep = "-" if v == "eager" else f"{100 * r['replayed']:.0f}%"
            print(f"| {B} | {v} | {r['ms']:.3f} | {base / r['ms']:.2f}x | {r['tpf']:.2f} | {rep} | "
                  f"{r['ahead_calls']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
