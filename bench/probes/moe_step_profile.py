"""Which kernels a MoE model's Reuse step spends its device time in (issue 16's MoE engines).

LLaDA-MoE-7B on an H200 (bench/RESULTS.md, 2026-11-29): the engine and the compiled runtime path reach the
floor-bound ceiling at B = 1 but 35% of it at B = 32 (~17 ms a forward of 32 x 32 tokens against a ~6 ms
floor). This probe splits one B-row dual-cache Reuse step of the preset's shape (random bf16 weights, the
runtime graph path: ``GraphRunner`` with compiled blocks, the serving default) by kernel, uncaptured (each
kernel with its own device time) and captured, so the grouped GEMMs, the routing (top-k, sort, scatter), the
attention and the head show their shares. Wall ms a step (captured replay) is printed beside the kernel sum.

    python3 -P bench/probes/moe_step_profile.py --preset llada-moe-7b --batches 1,32 | tee moe_profile.log
    python3 bench/probes/moe_step_profile.py --preset tiny-llada-moe --device cpu --dtype fp32 \
        --prompt 32 --gen 16 --block 8 --batches 2        # a smoke run (the CPU profiler's ops)
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))              # bench/
from engine_path import build  # noqa: E402
from tp_bench import ReuseProbe  # noqa: E402


def kernel_table(probe: ReuseProbe, steps: int, cuda: bool) -> tuple[list[tuple[str, float, int]], float]:
    """[(kernel (CPU: op) name, us per step, calls per step)] by time, and the total us per step."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(steps):
            probe.run()
        if cuda:
            torch.cuda.synchronize()
    us, calls = defaultdict(float), defaultdict(int)
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for ev in prof.events():
        if ev.device_type != want or (not cuda and ev.cpu_parent is not None):   # CPU: top-level ops only
            continue
        t = (getattr(ev, "device_time_total", None) or ev.cuda_time_total) if cuda else ev.cpu_time_total
        us[ev.name[:90]] += t
        calls[ev.name[:90]] += 1
    rows = sorted(((n, t / steps, calls[n] // steps) for n, t in us.items()), key=lambda r: -r[1])
    return rows, sum(t for _, t, _ in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-moe-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=16)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="compiled blocks (default: on CUDA, as dlc serve)")
    a = ap.parse_args()
    from dlc.runtime.runners.graph import GraphRunner
    cuda = a.device == "cuda"
    model = build(a.preset, a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    runner = GraphRunner(model, compile=cuda if a.compile is None else a.compile)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{a.preset} on {name}, torch {torch.__version__}, compiled blocks {runner.compiled}", flush=True)
    for B in (int(b) for b in a.batches.split(",")):
        for captured in ((False, True) if cuda else (False,)):
            runner.capture = captured
            probe = ReuseProbe(runner, a.prompt, a.gen, a.block, B, seed=B)
            wall = probe.median_ms(a.steps)
            rows, total = kernel_table(probe, a.steps, cuda)
            how = "captured" if captured else "uncaptured"
            print(f"\n### B={B}, {how}: wall {wall:.3f} ms a step (run_batch, host copy included), "
                  f"{total / 1e3:.3f} ms of {'kernels' if cuda else 'top-level ops'}\n")
            print("| kernel | us / step | calls / step | share |\n|---|---|---|---|")
            for n, t, c in rows[:a.top]:
                print(f"| `{n}` | {t:.1f} | {c} | {100 * t / max(total, 1e-9):.1f}% |")
            del probe


if __name__ == "__main__":
    main()
