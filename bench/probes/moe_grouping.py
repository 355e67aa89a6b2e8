"""One MoE block's fused forward with its rows grouped by a counting sort vs by ``sort`` (the MoE engines).

``moe_fused`` groups the (token, slot) rows by expert before its two grouped GEMMs. It sorted them; the
LLaDA-MoE-7B Reuse step profile (bench/probes/moe_step_profile.py, H200) showed the sort's segmented radix
kernel at 16% of the kernels at B = 1 and 7% at B = 32. ``expert_offsets`` now counts (an [N, E] count, a
scan over tokens, a gather and a scatter); ``sort_offsets`` below is the sort it replaced. This probe times
one block of each preset's shape (random bf16 weights, random hidden states, the block's own router) both
ways, in one process: each variant compiled (``torch.compile``, as the runtime's compiled blocks and the
engines' Inductor programs run it) and captured in a CUDA graph, replays alternated, medians. Output rows are checked equal between variants.

    python3 -P bench/probes/moe_grouping.py --presets llada-moe-7b,llada2-mini --rows 32,1024
"""
from __future__ import annotations

import argparse
import statistics

import torch

from dlc.models import llada_moe
from dlc.models.llada_moe import SparseMoeBlock
from dlc.models.presets import preset_config


COUNT_OFFSETS = llada_moe.expert_offsets


def sort_offsets(idx: torch.Tensor, n_experts: int):
    """The grouping ``moe_fused`` ran before: a stable sort, the ends by searchsorted, the inverse by scatter."""
    ids, order = idx.reshape(-1).sort(stable=True)                                   # [M], [M]
    ends = torch.arange(1, n_experts + 1, device=idx.device, dtype=ids.dtype)       # [E]
    rows = torch.arange(order.numel(), device=idx.device, dtype=order.dtype)
    return order, torch.empty_like(order).scatter_(0, order, rows), torch.searchsorted(ids, ends, out_int32=True)


def variant(block: SparseMoeBlock, x: torch.Tensor, counting: bool, dynamic: bool = False):
    """A CUDA graph of the compiled block with one grouping, and its output."""
    llada_moe.expert_offsets = COUNT_OFFSETS if counting else sort_offsets
    torch._dynamo.reset()
    fn = torch.compile(block, dynamic=dynamic)
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(x)
    g.replay()
    torch.cuda.synchronize()
    return g, out.clone()


def time_graph(g: torch.cuda.CUDAGraph, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / reps                                 # us a forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="llada-moe-7b,llada2-mini")
    ap.add_argument("--rows", default="32,1024", help="tokens a forward (B x block)")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--dynamic", action="store_true",
                    help="compile with symbolic shapes, as an engine's programs are traced")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    table = []
    for preset in args.presets.split(","):
        c = preset_config(preset)
        block = SparseMoeBlock(c).to("cuda", torch.bfloat16)
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.02)
        llada_moe.pack_experts(block.experts)
        block.impl = "fused"
        for n in map(int, args.rows.split(",")):
            x = torch.randn(1, n, c.d_model, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                (gc, oc), (gs, os_) = variant(block, x, True, args.dynamic), variant(block, x, False, args.dynamic)
            torch.testing.assert_close(oc, os_, rtol=0, atol=0)                 # same rows, same GEMMs
            us = {True: [], False: []}
            for r in range(args.rounds):
                for counting in ((True, False) if r % 2 else (False, True)):
                    us[counting].append(time_graph(gc if counting else gs, args.reps))
            cnt, srt = statistics.median(us[True]), statistics.median(us[False])
            table.append((preset, n, srt, cnt))
            print(f"{preset} rows={n}: sort {srt:.1f} us, count {cnt:.1f} us", flush=True)
    print("\n| preset | rows (B x block) | sort us / block | count us / block | count / sort |")
    print("|---|---|---|---|---|")
    for preset, n, srt, cnt in table:
        print(f"| {preset} | {n} | {srt:.1f} | {cnt:.1f} | {cnt / srt:.3f} |")


if __name__ == "__main__":
    main()
