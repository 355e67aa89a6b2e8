"""Where the decoding rules' extra cost goes under tensor parallelism (issues 16, 18 probe).

bench/tp_rule_cost.py measured (2 x H200, 2026-11-28, B=8) credit at 1.32x and smoothing at 1.53x of a TP=2
plain Reuse step, against ~1.0x on one GPU. This probe takes the same steps (tp_rule_cost.RuleProbe) and per
(side, rule) reports the synchronous wall time per step, the device time of its kernels (``torch.profiler``,
CUDA activity, rank 0 for TP) and the kernels the rule adds over the plain step (device us per step by name),
so the extra can be told apart: kernels, or host work and waits between them.

    python3 -P bench/probes/tp_rule_profile.py --tp 2 --batch 8 --ckpt /tmp/tpck
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))              # bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))                  # bench/probes/
from tp_bench import runner_of, say, write_checkpoint  # noqa: E402
from tp_kernel_profile import kernel_table  # noqa: E402
from tp_rule_cost import RULES, RuleProbe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--rules", default="plain,credit,smoothing")
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()
    from dlc.models.loading import DTYPES
    from dlc.runtime.session import open_model
    ckpt = write_checkpoint(args, DTYPES[args.dtype])
    one = runner_of(open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False), True)
    tp_session = open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False,
                            tensor_parallel_size=args.tp)
    tp = runner_of(tp_session, True)
    summary, kernels = [], {}
    try:
        for side, runner in (("TP=1", one), (f"TP={args.tp} rank 0", tp)):
            for name in args.rules.split(","):
                probe = RuleProbe(runner, RULES[name], args.prompt, args.gen, args.block, args.batch)
                probe.run()                                           # the rule's fields set, captured
                wall = statistics.median(probe.run() for _ in range(args.reps)) * 1e3
                rows, total = kernel_table(probe, args.steps)
                kernels[(side, name)] = {n: (t, c) for n, t, c in rows}
                summary.append((side, name, wall, total / 1e3, sum(c for _, _, c in rows)))
                say(f"{side} {name}: wall {wall:.3f} ms, kernels {total / 1e3:.3f} ms")
                del probe
    finally:
        tp_session.runner.close()
    for side in dict.fromkeys(s for s, *_ in summary):
        base = kernels[(side, "plain")]
        for name in args.rules.split(","):
            if name == "plain":
                continue
            extra = []
            for n, (t, c) in kernels[(side, name)].items():
                t0, c0 = base.get(n, (0.0, 0))
                if t - t0 > 1.0 or c != c0:
                    extra.append((t - t0, c - c0, n))
            extra.sort(reverse=True)
            print(f"\n### {side}, {name}: kernels added over plain (device us / step, calls / step)\n")
            print("| kernel | +us / step | +calls / step |\n|---|---|---|")
            for dt, dc, n in extra[:args.top]:
                print(f"| `{n}` | {dt:.1f} | {dc:+d} |")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n### summary (B={args.batch} Reuse step, captured graph runners, {gpu})\n")
    print("| side | rule | wall ms / step | kernels ms / step | kernel launches / step | wall - kernels ms |")
    print("|---|---|---|---|---|---|")
    for side, name, wall, k, launches in summary:
        print(f"| {side} | {name} | {wall:.3f} | {k:.3f} | {launches} | {wall - k:.3f} |")


if __name__ == "__main__":
    main()
