"""Where one GPU's filter-bisection decode spends its device time (top-p alone at T > 0, LLaDA-8B head shape):
torch.profiler's kernel table for one ``decode_rows_ext`` call with the bisection plan, and CUDA-event times of
that call against the sort (``candidates=False``) and the top-64 candidates' route (top-k 50 + top-p).

    python3 -P bench/probes/bisect_profile.py --batch 8
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dlc.kernels.filter_bisect import bisect_plan
from dlc.kernels.sampling import decode_rows_ext


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ts = []
    for _ in range(reps):
        ev[0].record()
        fn()
        ev[1].record()
        torch.cuda.synchronize()
        ts.append(ev[0].elapsed_time(ev[1]))
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=126464)
    a = ap.parse_args()
    dev, B, N, V, d = "cuda", a.batch, a.n, a.vocab, 4096
    torch.manual_seed(0)
    h = torch.randn(B, N, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(V, d, device=dev, dtype=torch.bfloat16) * 0.05
    ar, one = torch.arange(B, device=dev), torch.ones(1, device=dev, dtype=torch.bfloat16)
    temp = torch.full((1,), 0.8, dtype=torch.float64, device=dev)
    seeds = torch.arange(B, device=dev) + 11

    def filt(k, p):
        return (torch.full((B,), k, device=dev), torch.full((B,), p, dtype=torch.float64, device=dev),
                torch.zeros(B, dtype=torch.float64, device=dev))
    fp, fkp = filt(0, 0.9), filt(50, 0.9)
    plan = bisect_plan(*fp)
    kw = dict(vocab=V, chunk=32768)
    runs = {
        "plain T=0": lambda: decode_rows_ext(h, w, ar, ar, one, 0.0, seeds, **kw),
        "T=0.8 no filter": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, **kw),
        "top_k 50 top_p 0.9 (candidates)": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, filters=fkp,
                                                                   candidates="filtered", **kw),
        "top_p 0.9 (bisection)": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, filters=fp,
                                                         candidates=plan, **kw),
        "top_p 0.9 (sort)": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, filters=fp,
                                                    candidates=False, **kw),
    }
    res = {k: timed(f) for k, f in runs.items()}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runs["top_p 0.9 (bisection)"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    print(f"\nB={B} N={N} V={V}: ms per decode call (CUDA events, median of 10)")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |")


if __name__ == "__main__":
    main()
