"""Cost of each decoding rule per Reuse step (issue 18): time of one dual-cache Reuse step (runner call +
the decoding core's selection) with each rule vs low-confidence decoding, at B = 1 and B = 32, on an
LLaDA-8B-shaped model with random bf16 weights (random weights cannot show tokens per forward; this measures
what a rule adds to a step, target < 3%).

Per batch size: B prompts of ``--prompt`` tokens, gen ``--gen``, block ``--block``; one Refresh step fills the
dual cache, then the same Reuse step is timed ``--iters`` times from a copy of the states (so every rule times
the same step: same fed tokens, same cache). Reported per rule: runner ms (model + decoding with the rule's
extras), apply ms (host selection + state update), total and the ratio to low-confidence on the same runner.
Rows:

* ``eager``: every rule on the eager runner (the runner rules with extras run on, also inside the serving
  engine: the graph runner falls back to it for them);
* ``graph``: rules without extras (low-confidence, threshold, hierarchical) through the CUDA-graph runner, the
  serving default for them, vs its own low-confidence.

    python3 bench/rule_cost.py --batches 1,32                 # on the GPU (LLaDA-8B shape)
    python3 bench/rule_cost.py --preset tiny-llada --device cpu --batches 1,4 --prompt 16 --gen 32 --block 8
"""
from __future__ import annotations

import argparse
import copy
import json
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
    "logprobs 5": dict(logprobs=5),
    "top_k 50 top_p 0.9 (T 0.8)": dict(temperature=0.8, top_k=50, top_p=0.9),
}
GRAPH_RULES = ("low_confidence", "threshold 0.9", "hierarchical 0.9/0.3")


def sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def reuse_states(runner, B, params, args, dev):
    """B states after their block's Refresh step, phase reuse, and the pool holding their rows."""
    from dlc.runtime.decoding import DecodeState, GenerationConfig
    from dlc.runtime.kv_cache import KVCacheManager
    from dlc.runtime.step import make_batch, run_batch
    cfg = runner.config
    L = args.prompt + args.gen
    gen = GenerationConfig(gen_length=args.gen, block_length=args.block, steps=args.gen, kv_cache="dual",
                           seed=1, **params)
    g = torch.Generator().manual_seed(B)
    hi = min(cfg.vocab_size, cfg.mask_id) - 1                                   # ids below the specials
    states = [DecodeState.new(torch.randint(0, hi, (args.prompt,), generator=g).tolist(), gen, cfg)
              for _ in range(B)]
    pool = KVCacheManager(cfg, L, 1 << 62, runner.dtype, runner.device, max_slots=B + 1)
    if hasattr(runner, "bind_pool"):
        runner.bind_pool(pool)
    slots = [pool.allocate_n(1) for _ in states]
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
    return states, slots, pool


def time_rule(runner, B, params, args, dev) -> dict:
    from dlc.runtime.step import make_batch, run_batch
    states, slots, pool = reuse_states(runner, B, params, args, dev)
    t_run = t_apply = 0.0
    for it in range(args.warmup + args.iters):
        st = [copy.deepcopy(s) for s in states]
        sync(dev)
        t0 = time.perf_counter()
        out = run_batch(runner, make_batch(runner, st, slots, pool))
        sync(dev)
        t1 = time.perf_counter()
        for i, s in enumerate(st):
            s.apply(out.x0[i], out.conf[i], out.row(i))
        t2 = time.perf_counter()
        if it >= args.warmup:
            t_run += t1 - t0
            t_apply += t2 - t1
    n = args.iters
    return {"runner_ms": 1e3 * t_run / n, "apply_ms": 1e3 * t_apply / n,
            "total_ms": 1e3 * (t_run + t_apply) / n}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated names of RULES")
    args = ap.parse_args()
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.runners.graph import GraphRunner
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build(args.preset, args.device, dtype)
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    rows = []
    runners = {"eager": EagerRunner(model)}
    if torch.device(args.device).type == "cuda":
        runners["graph"] = GraphRunner(model, decode="exact")
    for B in [int(b) for b in args.batches.split(",")]:
        for kind, runner in runners.items():
            base = None
            for name in names:
                if kind == "graph" and name not in GRAPH_RULES:
                    continue
                r = time_rule(runner, B, RULES[name], args, args.device)
                base = base or r["total_ms"]
                row = {"runner": kind, "B": B, "rule": name, **{k: round(v, 3) for k, v in r.items()},
                       "vs_low_confidence": round(r["total_ms"] / base, 4)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| runner | B | rule | runner ms | apply ms | total ms | vs low-confidence |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['runner']} | {r['B']} | {r['rule']} | {r['runner_ms']:.2f} | {r['apply_ms']:.2f} | "
              f"{r['total_ms']:.2f} | {100 * (r['vs_low_confidence'] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
