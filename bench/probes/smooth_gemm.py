"""Where does a smoothing step's extra time go at B = 1? (issue 18 probe, one GPU)

Iteration smoothing's served cost at B = 1 on an H200 is +4.4% a forward (bench/RESULTS.md), against a floor
of ~2.9%: reading the input embedding W_e (126464 x 4096 bf16, 1.04 GB) once a step for
``softmax(l) @ W_e``. That GEMM is [R, V] @ [V, d] with R = 32 rows (B = 1, a 32-token block), V = 126464,
d = 4096: a tiny output and a huge reduction, a shape where one cuBLAS call may not keep the memory system
busy. This probe times, in CUDA graphs (median of ``--reps`` sets of ``--iters`` replays each):

* ``lm_head``: the logits GEMM ``x @ W^T`` alone (what every rule pays);
* ``select``: ``dlc.kernels.smoothing.smooth_stats`` with ``top_k`` 0 (the served smoothing decode: the
  chunk's selection and exponentials by ``split_stats``' two Triton launches);
* ``select_torch``: the same with torch's ``max`` / ``sub_`` / ``exp_`` / ``sum`` (the form before);
* ``soft_mm``: the second GEMM alone, ``e @ W_e`` as the kernel runs it;
* ``soft_splitS``: the same product as S batched slices of the reduction (``bmm`` over [S, R, V/S] x
  [S, V/S, d], then a sum over S);
* ``topk8``: the truncated variant's sweep (``top_k`` 8).

Each line prints ms and the bandwidth of W_e's (or W's) bytes over that time, so ``soft_*`` read against the
GPU's ~4.8 TB/s. The split variants are checked against ``soft_mm`` (float32, relative 1e-2).

    python3 -P bench/probes/smooth_gemm.py --rows 32,1024 | tee smooth.log
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dlc.kernels import smoothing
from dlc.kernels.smoothing import chunk_columns, smooth_stats

sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/probes (python3 -P adds no script dir)
from nccl_allreduce import captured, timed  # noqa: E402

V, D = 126464, 4096
SPLITS = (4, 8, 16, 32, 64)


def graphed(fn, iters: int, torch_passes: bool = False):
    """fn captured ``iters`` times back to back in one CUDA graph (``nccl_allreduce.captured``) -> replay().
    ``torch_passes``: with smoothing's Triton split kernels off during the capture."""
    keep = smoothing.HAS_TRITON
    smoothing.HAS_TRITON = keep and not torch_passes
    try:
        return captured(lambda: [fn() for _ in range(iters)])
    finally:
        smoothing.HAS_TRITON = keep


def time_ms(replay, iters: int, reps: int) -> float:
    """Median ms per call of ``replay`` (``iters`` calls each; ``nccl_allreduce.timed``'s CUDA events)."""
    return timed(replay, reps, warm=1) / iters


def split_mm(e: torch.Tensor, we: torch.Tensor, splits: int) -> torch.Tensor:
    """e [R, V] @ we [V, d] as ``splits`` batched slices of V, summed in float32."""
    R, Vn = e.shape
    k = Vn // splits
    head = torch.bmm(e[:, :k * splits].view(R, splits, k).transpose(0, 1),     # [S, R, k]
                     we[:k * splits].view(splits, k, we.shape[1]))             # [S, k, d]
    out = head.sum(0, dtype=torch.float32)                                     # [R, d]
    if k * splits < Vn:
        out += (e[:, k * splits:] @ we[k * splits:]).float()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,1024", help="decoded rows R (B x 32)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    dt = torch.bfloat16
    w = (torch.randn(V, D, device="cuda") * 0.02).to(dt)
    we = (torch.randn(V, D, device="cuda") * 0.02).to(dt)
    gb = w.numel() * 2 / 1e9
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}; W and W_e {gb:.2f} GB each")
    rows_out = []
    for R in (int(r) for r in a.rows.split(",")):
        x = torch.randn(R, D, device="cuda", dtype=dt)
        e = torch.softmax(torch.randn(R, V, device="cuda"), -1).to(dt)
        chunk = chunk_columns(R, V, 8192)
        ref = (e @ we).float()
        variants = {
            "lm_head": lambda: F.linear(x, w),
            "select": lambda: smooth_stats(x, w, we, vocab=V, chunk=chunk),
            "select_torch": lambda: smooth_stats(x, w, we, vocab=V, chunk=chunk),
            "soft_mm": lambda: e @ we,
            "topk8": lambda: smooth_stats(x, w, we, vocab=V, chunk=chunk, top_k=8),
        }
        for s in SPLITS:
            got = split_mm(e, we, s)
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (s, err)
            variants[f"soft_split{s}"] = (lambda s=s: split_mm(e, we, s))
        replays = {k: graphed(fn, a.iters, k == "select_torch") for k, fn in variants.items()}
        times = {k: [] for k in replays}
        for rnd in range(3):                       # alternate the order between rounds
            order = list(replays) if rnd % 2 == 0 else list(reversed(replays))
            for k in order:
                times[k].append(time_ms(replays[k], a.iters, a.reps))
        for k, ts in times.items():
            ms = statistics.median(ts)
            rows_out.append((R, k, ms, gb / (ms / 1e3)))
            print(f"R={R} {k}: {ms:.4f} ms  ({gb / (ms / 1e3):.0f} GB/s of one 1.04 GB matrix)", flush=True)
        del replays
        torch.cuda.empty_cache()
    print("\n| R | variant | ms | GB/s of one matrix |\n|---|---|---|---|")
    for R, k, ms, bw in rows_out:
        print(f"| {R} | {k} | {ms:.4f} | {bw:.0f} |")


if __name__ == "__main__":
    main()
