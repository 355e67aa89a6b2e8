"""One MoE block's fused forward, the ways ``moe_fused`` has grouped and combined its rows (the MoE engines).

``moe_fused`` groups the (token, slot) rows by expert before its two grouped GEMMs and combines each token's k
rows after them. The LLaDA-MoE-7B Reuse step profile (bench/probes/moe_step_profile.py, H200) showed the
stable sort's segmented radix kernel at 16% of the kernels at B = 1 and 7% at B = 32, and the combine's
batched [1, k] x [k, d] product at 11% at B = 32 (~0.5 TB/s). Variants, each a copy of the forward with one
grouping and one combine: ``sort+bmm`` (before 14cdb78), ``count+bmm`` (14cdb78: ``expert_offsets``' counting
sort), ``count+sum`` (``moe_fused`` now: the weighted fp32 sum over k, fused with the gather back). Each
preset's block shape (random bf16 weights, random hidden states, the block's own router), in one process:
every variant compiled (``torch.compile``, as the runtime's compiled blocks and the engines' Inductor
programs run it) and captured in a CUDA graph, replays alternated (order rotated each round), medians.
Outputs are checked against the first variant (equal grouping: bit for bit; another combine: bf16 rounding).

    python3 -P bench/probes/moe_grouping.py --presets llada-moe-7b,llada2-mini --rows 32,1024
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from dlc.models import llada_moe
from dlc.models.llada_moe import SparseMoeBlock
from dlc.models.presets import preset_config


def sort_offsets(idx: torch.Tensor, n_experts: int):
    """The grouping ``moe_fused`` ran before 14cdb78: a stable sort, the ends by searchsorted, the inverse."""
    ids, order = idx.reshape(-1).sort(stable=True)                                   # [M], [M]
    ends = torch.arange(1, n_experts + 1, device=idx.device, dtype=ids.dtype)       # [E]
    rows = torch.arange(order.numel(), device=idx.device, dtype=order.dtype)
    inverse = torch.empty_like(order).scatter_(0, order, rows)
    return order, inverse, torch.searchsorted(ids, ends, out_int32=True)


def fused_with(offsets, combine: str):
    """``moe_fused``'s body with one grouping and one combine (``bmm``: the batched product of before)."""
    def forward(x, w, idx, experts):
        w_gu, w_down = llada_moe._packed(experts)
        (N, k), (E, H, d) = idx.shape, w_down.shape
        order, dest, offs = offsets(idx, E)
        gu = torch._grouped_mm(x[order // k], w_gu.transpose(-2, -1), offs=offs)     # [N * k, 2H]
        ys = torch._grouped_mm(F.silu(gu[:, :H]) * gu[:, H:], w_down, offs=offs)     # [N * k, d]
        y = ys[dest].view(N, k, d)
        if combine == "bmm":
            return torch.bmm(w.to(x.dtype)[:, None, :], y)[:, 0]
        return (y * w[:, :, None]).sum(1).to(x.dtype)
    return forward


VARIANTS = {"sort+bmm": fused_with(sort_offsets, "bmm"),
            "count+bmm": fused_with(llada_moe.expert_offsets, "bmm"),
            "count+sum": llada_moe.moe_fused}


def variant(block: SparseMoeBlock, x: torch.Tensor, name: str, dynamic: bool = False):
    """A CUDA graph of the compiled block running one variant, and its output."""
    llada_moe.MOE_IMPLS["probe"] = VARIANTS[name]
    block.impl = "probe"
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
        for n in map(int, args.rows.split(",")):
            x = torch.randn(1, n, c.d_model, device="cuda", dtype=torch.bfloat16)
            with torch.no_grad():
                graphs = {v: variant(block, x, v, args.dynamic) for v in VARIANTS}
            ref = graphs["sort+bmm"][1]
            torch.testing.assert_close(graphs["count+bmm"][1], ref, rtol=0, atol=0)   # same rows, same GEMMs
            torch.testing.assert_close(graphs["count+sum"][1], ref, rtol=2e-2, atol=2e-3)
            us = {v: [] for v in VARIANTS}
            names = list(VARIANTS)
            for r in range(args.rounds):
                for v in names[r % len(names):] + names[:r % len(names)]:
                    us[v].append(time_graph(graphs[v][0], args.reps))
            med = {v: statistics.median(t) for v, t in us.items()}
            table.append((preset, n, med))
            print(f"{preset} rows={n}: " + ", ".join(f"{v} {t:.1f} us" for v, t in med.items()), flush=True)
    print("\n| preset | rows (B x block) | " + " | ".join(f"{v} us / block" for v in VARIANTS)
          + " | count+bmm / sort+bmm | count+sum / sort+bmm |")
    print("|---|---|" + "---|" * (len(VARIANTS) + 2))
    for preset, n, med in table:
        base = med["sort+bmm"]
        print(f"| {preset} | {n} | " + " | ".join(f"{med[v]:.1f}" for v in VARIANTS)
              + f" | {med['count+bmm'] / base:.3f} | {med['count+sum'] / base:.3f} |")


if __name__ == "__main__":
    main()
