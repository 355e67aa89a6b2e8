"""Why the two-micro-batch overlap made a TP=2 B=32 step slower (issue 16 probe).

bench/tp_bench.py --overlap-ab measured (2 x H200, 2026-11-28) served B=32 at 0.96x with models/overlap.py's
split on. This probe takes one compiled, captured B=32 Reuse step on a TP rank (tp_bench.ReuseProbe) with the
split off and on (``step_times(overlap_tokens=...)``, every rank), and reports per side the synchronous wall
time per step, the device time of rank 0's kernels (``torch.profiler``), and the kernels whose time differs
most between the two sides; then the same step's wall time in alternating rounds.

    python3 -P bench/probes/tp_overlap_profile.py --ckpt /tmp/tpck --batch 32
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))              # bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))                  # bench/probes/
from tp_bench import ReuseProbe, runner_of, say, write_checkpoint  # noqa: E402
from tp_kernel_profile import kernel_table, show  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--overlap-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()
    from dlc.models.loading import DTYPES
    from dlc.runtime.session import open_model
    ckpt = write_checkpoint(argparse.Namespace(ckpt=args.ckpt, preset=args.preset, device=args.device),
                            DTYPES[args.dtype])
    session = open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False,
                         tensor_parallel_size=args.tp)
    tp = runner_of(session, True, compile=True)
    sides = {"off": 0, "on": args.overlap_tokens}
    tables, walls = {}, {k: [] for k in sides}
    try:
        probe = None
        for name, n in sides.items():
            tp.step_times(reset=True, overlap_tokens=n)               # every rank; graphs captured again
            probe = ReuseProbe(tp, 512, 256, 32, args.batch, seed=1)
            rows, total = kernel_table(probe, args.steps)
            tables[name] = ({r[0]: (r[1], r[2]) for r in rows}, total)
            split = [x["overlap"] and x["overlap"]["split_forwards"] for x in tp.step_times()]
            show(f"TP={args.tp} rank 0, B={args.batch}, overlap {name} (split forwards per rank {split})",
                 rows, total, args.top)
            del probe
        for r in range(args.rounds):                                  # wall per step, alternating sides
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                tp.step_times(overlap_tokens=sides[name])
                probe = ReuseProbe(tp, 512, 256, 32, args.batch, seed=1)
                walls[name].append(probe.median_ms(args.reps))
                del probe
            say(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in walls.items()))
    finally:
        session.runner.close()
    off, on = tables["off"][0], tables["on"][0]
    diff = [((on.get(n, (0, 0))[0] - off.get(n, (0, 0))[0]), n, off.get(n, (0, 0)), on.get(n, (0, 0)))
            for n in set(off) | set(on)]
    diff.sort(key=lambda d: -abs(d[0]))
    print("\n### kernels whose device time differs most (us / step, calls / step)\n")
    print("| kernel | off us | off calls | on us | on calls | on - off us |\n|---|---|---|---|---|---|")
    for d, n, (t0, c0), (t1, c1) in diff[:args.top]:
        print(f"| `{n}` | {t0:.1f} | {c0} | {t1:.1f} | {c1} | {d:+.1f} |")
    print(f"\n### summary (B={args.batch} Reuse step, TP={args.tp}, compiled + captured)\n")
    print("| overlap | wall ms / step (median of rounds) | kernels ms / step |\n|---|---|---|")
    for name in sides:
        print(f"| {name} | {statistics.median(walls[name]):.3f} | {tables[name][1] / 1e3:.3f} |")


if __name__ == "__main__":
    main()
