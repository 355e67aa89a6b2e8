"""Where one GPU's filter-bisection decode spends its device time (top-p alone at T > 0, LLaDA-8B head shape):
torch.profiler's kernel table for one ``decode_rows_ext`` call with the bisection plan, and CUDA-event times
of that call against the sort (``candidates=False``) and the top-64 candidates' route (top-k 50 + top-p).

The bisection runs two ways in the same process: the fused Triton kernels (``filter_bisect.FUSED``, the
default) and the torch path (``FUSED = False``, the baseline; ``DLC_BISECT_TORCH=1`` makes it the default),
their calls alternated; each also replayed from a CUDA graph (the served Reuse step captures the decode), and
each one's device time (the profiler's sum of its kernels) printed with the ratio old / new.

    python3 -P bench/probes/bisect_profile.py --batch 8

``--plain``: a sampled step without filters (T = 0.8, no extras) instead, at B = 1 and B = 8: the device time
of one ``decode_rows_ext`` call on the fused unfiltered draw (``filter_bisect.plain_draw``, the default on
CUDA) vs the torch path's float64 sweep (``FUSED = False``: ``decode_rows``), and of the plain T = 0 decode
the captured step runs (``fused_select_logits``: the selected-row logits kernel), same process, the variants
alternated; the fused draw's kernel table at B = 8; whether the two paths' tokens are equal.

    python3 -P bench/probes/bisect_profile.py --plain
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dlc.kernels import filter_bisect as FB
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


def with_fused(fn, fused: bool):
    def run():
        saved, FB.FUSED = FB.FUSED, fused
        try:
            return fn()
        finally:
            FB.FUSED = saved
    return run


def captured(fn):
    """fn captured in a CUDA graph (warmed on a side stream first): its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def device_ms(fn, table: bool = False) -> float:
    """The sum of one call's kernel times (ms), from torch.profiler; ``table``: print its kernel table."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    if table:
        print(ka.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return sum(e.self_device_time_total for e in ka) / 1000.0


def plain(batches, N: int, V: int, reps: int) -> None:
    """``--plain``: the unfiltered sampled decode, fused draw vs torch sweep vs the T = 0 decode (ms)."""
    from dlc.kernels import fused_select_logits
    dev, d = "cuda", 4096
    torch.manual_seed(0)
    w = torch.randn(V, d, device=dev, dtype=torch.bfloat16) * 0.05
    temp = torch.full((1,), 0.8, dtype=torch.float64, device=dev)
    print(f"N={N} V={V} d={d} bf16, T=0.8 without filters: one decode call (device ms: the profiler's sum of "
          f"its kernels; graph: a CUDA-graph replay's CUDA-event ms; medians of 4 alternated rounds, graph "
          f"x {reps}); the fused route on (filter_bisect.plain_ok): {FB.plain_ok(w, temp, torch.float64)}")
    print("| B | T>0 fused draw | T>0 torch sweep | T=0 fused select | torch/fused | fused/T=0 "
          "| fused graph | torch graph | same tokens |")
    for B in batches:
        h = torch.randn(B, N, d, device=dev, dtype=torch.bfloat16)
        ar, one = torch.arange(B, device=dev), torch.ones(1, device=dev, dtype=torch.bfloat16)
        seeds = ar + 11

        def draw(h=h, ar=ar, one=one, seeds=seeds):
            return decode_rows_ext(h, w, ar, ar, one, temp, seeds, vocab=V, chunk=32768)

        def t0(h=h):                                     # the captured plain step's decode
            return fused_select_logits(h.reshape(-1, d), w)
        fns = {"fused": with_fused(draw, True), "torch": with_fused(draw, False), "t0": t0}
        same = torch.equal(fns["fused"]()["tokens"], fns["torch"]()["tokens"])
        replays = {k: captured(fns[k]) for k in ("fused", "torch")}
        dv, gr = {k: [] for k in fns}, {k: [] for k in replays}
        for i in range(4):                              # alternate the order of the compared variants
            order = list(fns) if i % 2 == 0 else list(fns)[::-1]
            for k in order:
                dv[k].append(device_ms(fns[k]))
                if k in replays:
                    gr[k].append(timed(replays[k], reps))
        med = {k: sorted(v)[len(v) // 2] for k, v in dv.items()}
        g = {k: sorted(v)[len(v) // 2] for k, v in gr.items()}
        print(f"| {B} | {med['fused']:.3f} | {med['torch']:.3f} | {med['t0']:.3f} | "
              f"{med['torch'] / med['fused']:.2f}x | {med['fused'] / med['t0']:.2f}x | {g['fused']:.3f} | "
              f"{g['torch']:.3f} | {same} |")
        if B == max(batches):
            print(f"\nfused unfiltered draw's kernels (B={B}):")
            device_ms(fns["fused"], table=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--plain", action="store_true", help="the unfiltered sampled decode at B = 1 and 8")
    a = ap.parse_args()
    if a.plain:
        plain((1, 8), a.n, a.vocab, a.reps)
        return
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
    fp, fkp, fk100 = filt(0, 0.9), filt(50, 0.9), filt(100, 0.9)
    kw = dict(vocab=V, chunk=32768)

    def bisection(f):
        plan = bisect_plan(*f)
        return lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, filters=f, candidates=plan, **kw)
    runs = {
        "plain T=0": lambda: decode_rows_ext(h, w, ar, ar, one, 0.0, seeds, **kw),
        "T=0.8 no filter": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, **kw),
        "top_k 50 top_p 0.9 (candidates)": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds,
                                                                   filters=fkp, candidates="filtered", **kw),
        "top_p 0.9 (sort)": lambda: decode_rows_ext(h, w, ar, ar, one, temp, seeds, filters=fp,
                                                    candidates=False, **kw),
    }
    pairs = {"top_p 0.9 (bisection)": bisection(fp), "top_k 100 top_p 0.9 (bisection)": bisection(fk100)}
    same = {k: torch.equal(with_fused(f, True)()["tokens"], with_fused(f, False)()["tokens"])
            for k, f in pairs.items()}
    sort_tok = runs["top_p 0.9 (sort)"]()["tokens"]
    same_sort = torch.equal(with_fused(pairs["top_p 0.9 (bisection)"], True)()["tokens"], sort_tok)
    res = {k: timed(f, a.reps) for k, f in runs.items()}
    rows = []
    for name, f in pairs.items():
        new, old = with_fused(f, True), with_fused(f, False)
        replays = {"new": captured(new), "old": captured(old)}
        t = {"new": [], "old": [], "gnew": [], "gold": []}
        for i in range(4):                              # alternate the order of the compared variants
            for tag in (("new", "old") if i % 2 == 0 else ("old", "new")):
                t[tag].append(timed(new if tag == "new" else old, a.reps))
                t["g" + tag].append(timed(replays[tag], a.reps))
        dv = {tag: device_ms(fn) for tag, fn in (("new", new), ("old", old))}
        med = {tag: sorted(v)[len(v) // 2] for tag, v in t.items()}
        rows.append((name, med, {"new": med["gnew"], "old": med["gold"]}, dv))
    print("fused bisection's kernels (top_p 0.9):")
    device_ms(with_fused(pairs["top_p 0.9 (bisection)"], True), table=True)
    print(f"\nB={B} N={N} V={V}: ms per decode call (CUDA events, median of {a.reps}; eager unless 'graph')")
    for k, v in res.items():
        print(f"| {k} | {v:.3f} |")
    print("\n| bisection | fused eager | torch eager | fused graph | torch graph | fused device "
          "| torch device | device old/new |")
    for name, med, g, dv in rows:
        print(f"| {name} | {med['new']:.3f} | {med['old']:.3f} | {g['new']:.3f} | {g['old']:.3f} | "
              f"{dv['new']:.3f} | {dv['old']:.3f} | {dv['old'] / dv['new']:.2f}x |")
    print(f"\ntokens: fused == torch path {same}; fused == sort (top_p) {same_sort}")


if __name__ == "__main__":
    main()
