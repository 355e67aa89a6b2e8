"""What a sampled step's decoding costs per filter route on one GPU, LLaDA-8B head shape (random bf16 rows and
head, B sequences x N decoded rows): the plain sampled sweep (no filter), top-k + top-p over the sweep's 64
candidates, top-p alone through the eager sort (``sampling._decode_full``: what a step without a top-k ran
before) and through the bisection (``filter_bisect``, captured: bf16 keys, 16 halvings), min-p alone, and
top-p with credit (float64 keys, 64 halvings). Timed: ``decode_rows_ext`` captured in a CUDA graph (the sort:
eager, as it ran), device ms per call, the median of ``--rounds`` rounds of ``--iters`` calls, the variants
alternating order per round; the bisection's tokens are checked equal to the sort's.

    python3 -P bench/probes/filter_bisect_cost.py [--batch 8] [--rows 32]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from dlc.kernels.sampling import decode_rows_ext, filter_route
from dlc.runtime.runners.graph import capture_graph


def graph_fn(fn):
    """fn captured as the runtime captures its steps (``runners.graph.capture_graph``) -> (replay, out)."""
    g, out, _, _ = capture_graph(fn, None)
    return g.replay, out


def ms(call, iters: int) -> float:
    call()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        call()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    dev, B, N, V = "cuda", a.batch, a.rows, a.vocab
    torch.manual_seed(0)
    h = torch.randn(B, N, a.d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(V, a.d, device=dev, dtype=torch.bfloat16) * 0.05      # logits ~ N(0, 3.2)
    ar, one = torch.arange(B, device=dev), torch.ones(1, device=dev, dtype=torch.bfloat16)
    seeds = torch.arange(B, device=dev) * 7 + 1
    temp = torch.full((1,), 0.8, dtype=torch.float64, device=dev)
    credit = (torch.randint(0, V, (B, N, 8), device=dev),
              torch.rand(B, N, 8, dtype=torch.float64, device=dev),
              torch.full((B,), 0.7, dtype=torch.float64, device=dev))

    def filt(k, p, m):
        return (torch.full((B,), k, device=dev), torch.full((B,), p, dtype=torch.float64, device=dev),
                torch.full((B,), m, dtype=torch.float64, device=dev))

    def dec(filters=None, route=None, cred=None):
        return lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, vocab=V, chunk=32768, credit=cred,
                                       filters=filters, candidates=route)
    top_p, min_p, topk = filt(0, 0.9, 0.0), filt(0, 1.0, 0.05), filt(50, 0.9, 0.0)
    variants = {
        "plain": graph_fn(dec()),
        "top_k_top_p (candidates)": graph_fn(dec(topk, filter_route(*topk))),
        "top_p sort (eager)": (dec(top_p, False), None),
        "top_p bisect": graph_fn(dec(top_p, filter_route(*top_p))),
        "min_p bisect": graph_fn(dec(min_p, filter_route(*min_p))),
        "credit top_p bisect (f64 keys)": graph_fn(dec(top_p, filter_route(*top_p, credit=True), credit)),
    }
    for name, (call, out) in variants.items():
        if out is not None and "bisect" in name:
            call()
            torch.cuda.synchronize()
            cred = credit if "credit" in name else None
            f = top_p if "top_p" in name else min_p
            want = decode_rows_ext(h, w, ar, ar, one, temp, seeds, vocab=V, chunk=32768, credit=cred,
                                   filters=f, candidates=False)["tokens"]
            print(f"{name}: tokens equal the sort's: {torch.equal(out['tokens'], want)}", flush=True)
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(a.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            call, _ = variants[name]
            times[name].append(ms(call, a.iters))
    base = statistics.median(times["plain"])
    print(f"B={B} N={N} V={V} d={a.d}: device ms per decode (median of {a.rounds} rounds x {a.iters})")
    for name in names:
        m = statistics.median(times[name])
        print(f"  {name:32s} {m:8.3f} ms  {m / base:6.2f}x plain")


if __name__ == "__main__":
    main()
