"""Which kernels a tensor-parallel Reuse step spends its GPU time in, vs one GPU (issue 16 probe).

bench/probes/tp_step_breakdown.py showed (2 x H200, 2026-11-28) a TP=2 rank's captured B=1 Reuse step taking
~7.3 ms of device time against 5.3 ms for the whole TP=1 step, and bench/probes/nccl_allreduce.py that the
step's projections and all-reduces alone take 2.9 ms on a TP=2 rank (3.9 ms at TP=1). This probe profiles
rank 0's steps (``torch.profiler``, CUDA activity; the worker runs the same kernels) and TP=1's, uncaptured
(TP=1: the graph runner's step uncaptured; TP: the eager shard runner; every kernel visible with its own
device time) and captured, and prints per (TP, B) the kernels by
device time per step. ``--tp-decode exact`` profiles the ranks' float64 vocab-shard decoding instead of the
default fused per-shard sweep (kernels/shard_logits.py).

``--compile`` (the serving default on CUDA) runs both sides' blocks under torch.compile, every TP rank's with
its all-reduces inside (runtime/distributed/shard_graph.py); ``--no-compile`` neither side (the TP=2 numbers
measured before compiled ranks existed had TP=1 compiled and TP=2 not).

    python3 -P bench/probes/tp_kernel_profile.py --ckpt /tmp/tpck | tee tp_kernels.log
    python3 -P bench/probes/tp_kernel_profile.py --ckpt /tmp/tpck --no-compile --batches 1
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))              # bench/
sys.path.insert(0, str(Path(__file__).resolve().parent))                  # bench/probes/
from tp_bench import ReuseProbe, say  # noqa: E402
from tp_step_breakdown import write_checkpoint  # noqa: E402


def kernel_table(probe: ReuseProbe, steps: int) -> tuple[list[tuple[str, float, int]], float]:
    """[(kernel name, device us per step, calls per step)] by time, and the total device us per step."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        probe.run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            probe.run()
        torch.cuda.synchronize()
    us, calls = defaultdict(float), defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:90]
            us[name] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
            calls[name] += 1
    rows = sorted(((n, t / steps, calls[n] // steps) for n, t in us.items()), key=lambda r: -r[1])
    return rows, sum(t for _, t, _ in rows)


def show(title: str, rows, total: float, top: int) -> None:
    print(f"\n### {title}: {total / 1e3:.3f} ms of kernels per step\n")
    print("| kernel | us / step | calls / step | share |\n|---|---|---|---|")
    for n, t, c in rows[:top]:
        print(f"| `{n}` | {t:.1f} | {c} | {100 * t / total:.1f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="compiled blocks on both sides (TP=1 and every TP rank)")
    ap.add_argument("--tp-decode", default=None, choices=["fused", "exact"],
                    help="the TP ranks' captured decoding [fused: kernels/shard_logits.py; exact: float64]")
    args = ap.parse_args()
    from dlc.runtime.engine import graph_runner_for
    from dlc.runtime.session import open_model
    P, G, blk = 512, 256, 32
    ckpt = write_checkpoint("llada-8b", None, "cuda", torch.bfloat16, args.ckpt)
    one = graph_runner_for(open_model(str(ckpt), dtype="bf16", device="cuda", progress=False).runner, True,
                           args.compile)
    session = open_model(str(ckpt), dtype="bf16", device="cuda", progress=False, tensor_parallel_size=args.tp)
    tp = graph_runner_for(session.runner, True, args.compile)
    say(f"loaded (blocks {'compiled on both sides' if args.compile else 'not compiled'})")
    try:
        for B in (int(b) for b in args.batches.split(",")):
            for name, runner in (("TP=1", one), (f"TP={args.tp} rank 0", tp)):
                for captured in (False, True):
                    if runner is one:              # TP=1: the graph runner's static-buffer step, uncaptured
                        one.capture = captured
                    else:                          # TP: the eager ShardRunner, or the ShardGraphRunner
                        tp.enable_graphs(captured, True if captured else None, compile=args.compile,
                                         decode=args.tp_decode)
                    probe = ReuseProbe(runner, P, G, blk, B, seed=B)
                    rows, total = kernel_table(probe, args.steps)
                    how = ("captured" if captured else "uncaptured") + (", compiled" if args.compile else "")
                    show(f"{name}, B={B}, {how}", rows, total, args.top)
                    del probe
    finally:
        session.runner.close()


if __name__ == "__main__":
    main()
