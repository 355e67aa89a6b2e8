"""Cost of each decoding rule per Reuse step (issue 18): time of one dual-cache Reuse step (runner call +
the decoding core's selection) with each rule vs low-confidence decoding, at B = 1 and B = 32, on an
LLaDA-8B-shaped model with random bf16 weights (random weights cannot show tokens per forward; this measures
what a rule adds to a step, target < 3%).

Per batch size: B prompts of ``--prompt`` tokens, gen ``--gen``, block ``--block``; one Refresh step fills the
dual cache, then the same Reuse step is timed ``--iters`` times from a copy of the states (so every rule times
the same step: same fed tokens, same cache). Reported per rule: runner ms (model + decoding with the rule's
extras), apply ms (host selection + state update: ``decoding.apply_batch`` over the call's rows, as the
engine applies them), total and the ratio to low-confidence on the same runner.
Rows:

* ``graph`` (default): every rule through the CUDA-graph runner, the serving default (``--graph-decode``:
  ``fused``, the serving default on a GPU; ``exact``: float64 decoding, tokens equal the eager runner's).
  Rules
  with decoding extras (entropy_bound, credit, logprobs, smoothing) replay their own captured variant
  (issue 18); ``eager_reuse`` counts the steps that still fell back to the eager runner (sampled steps, T > 0:
  the filters row), and such a row says so;
* ``eager`` (``--runners eager,graph``): every rule on the eager runner.

Each row prints as it is measured (flush), with PASS / MISS against the 3% target; a table follows.

    python3 -P bench/rule_cost.py --batches 1,32              # on the GPU (LLaDA-8B shape), graph runner
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
TARGET = 0.03                # a rule's overhead per Reuse step vs low-confidence (issue 18)


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
    from dlc.runtime.decoding import apply_batch
    from dlc.runtime.step import make_batch, run_batch
    states, slots, pool = reuse_states(runner, B, params, args, dev)
    stats = getattr(runner, "stats", {})
    eager0 = stats.get("eager_reuse", 0)
    t_run = t_apply = 0.0
    for it in range(args.warmup + args.iters):
        st = [copy.deepcopy(s) for s in states]
        sync(dev)
        t0 = time.perf_counter()
        out = run_batch(runner, make_batch(runner, st, slots, pool))
        sync(dev)
        t1 = time.perf_counter()
        apply_batch(st, out.x0, out.conf, out)              # the engine's one call per runner output
        t2 = time.perf_counter()
        if it >= args.warmup:
            t_run += t1 - t0
            t_apply += t2 - t1
    n = args.iters
    out = {"runner_ms": 1e3 * t_run / n, "apply_ms": 1e3 * t_apply / n,
           "total_ms": 1e3 * (t_run + t_apply) / n}
    if "eager_reuse" in stats:                 # graph runner: Reuse steps of this rule that ran eagerly
        out["eager_reuse"] = stats["eager_reuse"] - eager0
    return out


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
    ap.add_argument("--runners", default="graph", help="comma-separated: graph, eager")
    ap.add_argument("--graph-decode", default="fused", choices=["fused", "exact"])
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build(args.preset, args.device, dtype)
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    bad = [n for n in names if n not in RULES]
    if bad:
        ap.error(f"--rules: unknown {bad}; choose from {list(RULES)}")
    runners = make_runners(model, args)
    print(json.dumps({"device": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda"
                      else "cpu", "torch": torch.__version__, "runners": list(runners),
                      "graph_decode": args.graph_decode}), flush=True)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        for kind, runner in runners.items():
            base = None
            for name in names:
                r = time_rule(runner, B, RULES[name], args, args.device)
                base = base or r["total_ms"]
                ratio = r["total_ms"] / base
                row = {"runner": kind, "B": B, "rule": name, **{k: round(v, 3) for k, v in r.items()},
                       "vs_low_confidence": round(ratio, 4),
                       "target": "PASS" if ratio - 1 < TARGET else "MISS"}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n| runner | B | rule | runner ms | apply ms | total ms | vs low-confidence | < {TARGET:.0%} |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        note = f" ({r['eager_reuse']} eager steps)" if r.get("eager_reuse") else ""
        print(f"| {r['runner']} | {r['B']} | {r['rule']}{note} | {r['runner_ms']:.2f} | "
              f"{r['apply_ms']:.2f} | {r['total_ms']:.2f} | {100 * (r['vs_low_confidence'] - 1):+.1f}% | "
              f"{r['target']} |", flush=True)


def make_runners(model, args) -> dict:
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.runners.graph import GraphRunner
    kinds = [k.strip() for k in args.runners.split(",") if k.strip()]
    runners = {}
    for k in kinds:
        if k == "eager":
            runners[k] = EagerRunner(model)
        elif k == "graph":
            runners[k] = GraphRunner(model, decode=args.graph_decode)
        else:
            raise SystemExit(f"--runners: unknown {k!r} (graph, eager)")
    return runners


if __name__ == "__main__":
    main()
