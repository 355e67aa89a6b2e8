"""A compiled engine's row decoding per step: float64 sweep vs the graph runner's kernels (issues 18 / 15).

A GPU-lowered ``--decode-extras`` engine (the serving build on CUDA) returns the decoded rows' hidden states
and the runner decodes every extra from them (``CompiledRunner._decode_rows``). Until now that was the eager
runner's ``decode_step_extras`` (``decode_rows_ext`` in float64), while the graph runner decoded the same
extras with its fused kernels; now both use ``graph.fused_extras_decode`` on CUDA. This probe times the two on
the LLaDA-8B head (V = 126464, d = 4096, bf16) for B x 32 decoded rows, per rule: entropy (entropy-bound),
logprobs 5, credit (32 ids a position), smoothing, smoothing + logprobs, two ways: ``device`` = the call
captured in a CUDA graph (5 back to back) and replayed (the GPU's own time: what a step run ahead pays, its
launches hidden behind earlier steps); ``uncaptured`` = CUDA events around one plain call (launch gaps
included: what a synchronous step pays). Medians of ``--reps``, the two paths alternated. ``agree``: the
share of tokens the two give alike (the sweep takes the argmax of bf16-rounded
logits, the kernels of their float32 accumulation: near-ties may order otherwise, as between the graph
runner's ``fused`` and ``exact`` modes).

    python3 -P bench/probes/row_decode_cost.py --batches 1,32 | tee row_decode.log
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dlc.runtime.runners.eager import decode_step_extras
from dlc.runtime.runners.graph import fused_extras_decode, t0_extras_key
from dlc.runtime.step import StepBatch

sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/probes (python3 -P adds no script dir)
from smooth_gemm import graphed, time_ms  # noqa: E402

V, D, N = 126464, 4096, 32
RULES = {"entropy": dict(entropy=True), "logprobs 5": dict(logprobs=5), "credit": dict(credit=True),
         "smoothing": dict(soft_tau=1.0), "smoothing + logprobs 1": dict(soft_tau=1.0, logprobs=1)}


def batch_for(B: int, dev, entropy=False, logprobs=None, credit=False, soft_tau=None) -> StepBatch:
    z = torch.zeros(B, 1, dtype=torch.long, device=dev)
    ar = torch.arange(B, device=dev)
    kw = {}
    if credit:
        g = torch.Generator(device=dev).manual_seed(1)
        kw = dict(credit_ids=torch.randint(0, V, (B, N, N), device=dev, generator=g),
                  credit_vals=torch.rand(B, N, N, device=dev, dtype=torch.float64, generator=g),
                  credit_alpha=torch.full((B,), 0.7, dtype=torch.float64, device=dev))
    one = torch.ones(B, dtype=torch.long)
    return StepBatch("reuse", B, z, z, z.bool(), one, one * 0, N, ar * 0, None, None, N, None, None, 0.0, 0.0,
                     torch.zeros_like(ar), ar, ar, entropy=entropy, logprobs=logprobs, soft_tau=soft_tau,
                     **kw)


def timed(fn, reps: int) -> float:
    """ms of one call: CUDA events (``smooth_gemm.time_ms`` over a plain call), on the CPU wall time."""
    if not torch.cuda.is_available():                   # --device cpu smoke run
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return time_ms(fn, 1, reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run at V = 1000, d = 64")
    a = ap.parse_args()
    dev = torch.device(a.device)
    global V, D
    if dev.type == "cpu":
        V, D = 1000, 64
    torch.manual_seed(0)
    head = (torch.randn(V, D, device=dev) * 0.02).to(torch.bfloat16)
    embed = (torch.randn(V, D, device=dev) * 0.02).to(torch.bfloat16)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"# {name} torch {torch.__version__}; V {V}, d {D}, {N} rows a sequence")
    rows_out = []
    for B in (int(b) for b in a.batches.split(",")):
        rows = (torch.randn(B, N, D, device=dev) * 2).to(torch.bfloat16)
        for name, kw in RULES.items():
            batch = batch_for(B, dev, **kw)
            credit = None if batch.credit_ids is None else (batch.credit_ids, batch.credit_vals,
                                                            batch.credit_alpha)
            exact = lambda: decode_step_extras(rows, head, embed, V, batch)          # noqa: E731
            fused = lambda: fused_extras_decode(rows, head, embed, t0_extras_key(batch), credit)  # noqa: E731
            t_e, t_f = exact(), fused()
            agree = (t_e.x0 == t_f["tokens"]).float().mean().item()
            fns = {"exact": exact, "fused": fused}
            if dev.type == "cuda":
                fns.update({f"{k} device": graphed(fn, 5) for k, fn in list(fns.items())})
            times = {k: [] for k in fns}
            for rnd in range(4):
                for k in (list(fns) if rnd % 2 == 0 else list(reversed(fns))):
                    times[k].append(timed(fns[k], a.reps) / (5 if k.endswith("device") else 1))
            med = {k: statistics.median(v) for k, v in times.items()}
            dv = (med.get("exact device", 0.0), med.get("fused device", 0.0))
            rows_out.append((B, name, *dv, med["exact"], med["fused"], agree))
            print(f"B={B} {name}: device {dv[0]:.3f} -> {dv[1]:.3f} ms, uncaptured {med['exact']:.3f} -> "
                  f"{med['fused']:.3f} ms, tokens alike {agree:.1%}", flush=True)
    print("\n| B | rule | device ms: float64 sweep (before) | fused kernels (now) | ratio | uncaptured ms: "
          "before | now | tokens alike |\n|---|---|---|---|---|---|---|---|")
    for B, name, de, df, e, f, agree in rows_out:
        ratio = f"{de / df:.1f}x" if df else "-"
        print(f"| {B} | {name} | {de:.3f} | {df:.3f} | {ratio} | {e:.3f} | {f:.3f} | {agree:.1%} |")


if __name__ == "__main__":
    main()
