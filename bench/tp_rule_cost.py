"""The cost of the decoding rules under tensor parallelism (issues 16, 18): one B-row Reuse step per rule,
TP=N against TP=1 in one process, LLaDA-8B shape (random bf16 weights: bench/tp_bench.py's checkpoint).

Per rule (``RULES``: plain, credit, smoothing, truncated smoothing, top-k + top-p at T > 0 over the merged
candidates, top-p alone at T > 0 through the exact bisection) both sides build the same Reuse batch over a
dual cache (tp_bench.ReuseProbe's prompt + masked block, its Refresh done) with the rule's fields set as the
decoding core sets them, warm it (capture), then time synchronous ``run_batch`` calls: per round the median
of ``--reps`` calls for TP=1 then TP=N, ``--rounds`` rounds alternating which side goes first; reported: the
median over rounds, the TP=N / TP=1 ratio, and each side's ratio to its own plain step (what the rule adds).
Timed path: the graph runner of each side (one GPU's ``GraphRunner``; a ``ShardGraphRunner`` per rank),
captured variants where they exist, the eager fallback otherwise (the table's ``path`` column, from the
runners' ``eager_reuse`` counts: top-p without a top-k replays the bisection's variant on both sides,
``kernels/filter_bisect.py``).

    python3 -P bench/tp_rule_cost.py --tp 2 --batch 8 --out $OUT/tp_rule_cost.json          # 2 GPUs
    python3 -P bench/tp_rule_cost.py --preset tiny-llada --device cpu --dtype fp32 --batch 2 --prompt 32 \\
        --gen 32 --block 8 --reps 2 --rounds 2                                              # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)

from tp_bench import ReuseProbe, latency_rounds, runner_of, say, write_checkpoint  # noqa: E402

HOT = 0.8
RULES = {                      # name -> the StepBatch fields the decoding core would set for every row
    "plain": {},
    "credit": {"credit": True},
    "smoothing": {"soft_tau": 1.0},
    "smoothing_top_k": {"soft_tau": 1.0, "soft_top_k": 8},
    "top_k_top_p": {"temperature": HOT, "filters": (50, 0.9, 0.0)},
    "top_p": {"temperature": HOT, "filters": (0, 0.9, 0.0)},
}


class RuleProbe(ReuseProbe):
    """tp_bench's Reuse step with one rule's fields on its batch (credit: each position's top-1 of two earlier
    steps, decayed; smoothing: a soft output asked, its soft input a small delta; filters at T > 0)."""

    def __init__(self, runner, rule: dict, P: int, G: int, block: int, B: int):
        self.rule = rule
        super().__init__(runner, P, G, block, B)

    def run(self) -> float:
        if not getattr(self, "_ruled", False):
            self._ruled = True
            _set_rule(self.batch, self.rule, self.runner)
        return super().run()


def _set_rule(b, rule: dict, runner) -> None:
    dev, B, N = runner.device, b.n_seqs, b.n_out
    if "temperature" in rule:
        b.temperature = rule["temperature"]
        b.seeds = torch.arange(1, B + 1, device=dev)
    if "filters" in rule:
        k, p, m = rule["filters"]
        b.top_k = torch.full((B,), k, dtype=torch.long, device=dev)
        b.top_p = torch.full((B,), p, dtype=torch.float64, device=dev)
        b.min_p = torch.full((B,), m, dtype=torch.float64, device=dev)
    if rule.get("credit"):
        g = torch.Generator().manual_seed(1)
        b.credit_ids = torch.randint(0, runner.config.vocab_size, (B, N, 2), generator=g).to(dev)
        b.credit_vals = torch.rand(B, N, 2, generator=g, dtype=torch.float64).to(dev)
        b.credit_alpha = torch.full((B,), 0.7, dtype=torch.float64, device=dev)
    if "soft_tau" in rule:
        b.soft_tau, b.soft_top_k = rule["soft_tau"], rule.get("soft_top_k", 0)
        b.embed_delta = torch.randn(b.fed, N, runner.config.d_model, device=dev).mul_(0.01).to(runner.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint directory written by an earlier run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from dlc.models.loading import DTYPES
    from dlc.runtime.session import open_model
    ckpt = write_checkpoint(args, DTYPES[args.dtype])
    one = runner_of(open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False), True)
    tp_session = open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False,
                            tensor_parallel_size=args.tp)
    tp = runner_of(tp_session, True)
    sides = {"tp1": one, f"tp{args.tp}": tp}
    res = {"preset": args.preset, "tp": args.tp, "batch": args.batch, "dtype": args.dtype,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rules": {}}
    try:
        for name in args.rules.split(","):
            eager0 = {k: r.stats["eager_reuse"] for k, r in sides.items()}
            probes = {k: RuleProbe(r, RULES[name], args.prompt, args.gen, args.block, args.batch)
                      for k, r in sides.items()}
            lat = latency_rounds(probes, args.rounds, args.reps)
            path = {k: "eager" if r.stats["eager_reuse"] > eager0[k] else "captured"
                    for k, r in sides.items()}
            res["rules"][name] = {"ms": lat, "path": path}
            say(f"{name}: {lat} ({path})")
            del probes
    finally:
        tp_session.runner.close()
    print(json.dumps(res, indent=2))
    print(table(res, f"tp{args.tp}"), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


def table(res: dict, n: str) -> str:
    plain = res["rules"].get("plain", {}).get("ms")
    rows = [f"| rule | TP=1 ms | {n} ms | {n} / TP=1 | TP=1 / plain | {n} / plain | path (TP=1, {n}) |",
            "|---|---|---|---|---|---|---|"]
    for name, r in res["rules"].items():
        a, b = r["ms"]["tp1"], r["ms"][n]
        rel = (f"{a / plain['tp1']:.2f}x | {b / plain[n]:.2f}x" if plain else "- | -")
        path = f"{r['path']['tp1']}, {r['path'][n]}"
        rows.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x | {rel} | {path} |")
    return "\n".join(rows) + f"\n(B={res['batch']} Reuse step, synchronous run_batch, medians of rounds; " \
                             f"{res['gpu']}, {res['dtype']})"


if __name__ == "__main__":
    main()
