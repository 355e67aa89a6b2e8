"""Where the decoding extras' sweep spends its time over the plain select sweep (issue 18).

At B = 1 on an H200 the fused decode with entropy (``select_extras.select_extras_triton``) takes ~0.34 ms a
step against ~0.25 ms for the plain select sweep (``logits.select_logits_triton``, low-confidence's decode),
which is what keeps entropy-bound, credit and logprobs near the 3% target on the served forward. This probe
splits that difference on the LLaDA-8B head (V = 126464, d = 4096, bf16) for R decoded rows:

* ``floor``: ``h @ W.T`` by cuBLAS (the head read, bf16 logits written);
* ``plain op`` / ``plain kernel``: the select op with its torch combine / the kernel launch alone;
* ``extras op`` / ``extras kernel``: the same for the extras sweep (entropy on, then entropy + top-5);
* per tile configuration (BV, BD, warps, stages, programs per SM) at ``--config-rows``: each kernel alone
  (the fastest few printed).

Each is captured ``--iters`` times back to back in one CUDA graph and replayed (device time per call, launch
gaps excluded), median of ``--reps`` replays; the variants alternate order between rounds.

    python3 -P bench/probes/extras_sweep.py --rows 32,1024 | tee extras_sweep.log
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

from dlc.kernels import logits as L
from dlc.kernels import select_extras as SE
from dlc.kernels._registry import launch

sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/probes (python3 -P adds no script dir)
from nccl_allreduce import captured, timed  # noqa: E402

V, D = 126464, 4096


def extras_kernel(h, w, entropy: bool, topk: int, BV=128, BD=64, num_warps=4, num_stages=3, pps=4, BN=None,
                  graph_plan=False):
    """``select_extras_triton``'s launch alone (no combine) -> a closure. ``graph_plan``: the tiles and split
    ``logits.plan`` picks for a symbolic row count (the op traced in a compiled graph: BN 64, split sized for
    one row tile), whatever the rows."""
    N = h.shape[0]
    BN, BV, n_split, cols = L.plan(64 if graph_plan else N, V, L._sm_count(h.device), BN, BV, pps)
    part = [torch.empty((N, n_split), dtype=torch.float32, device=h.device) for _ in range(3)]
    pi = torch.empty((N, n_split), dtype=torch.int32, device=h.device)
    kpad = 1 << max(0, (topk - 1).bit_length()) if topk else 1
    pe = torch.empty((N, n_split), dtype=torch.float32, device=h.device)
    ptv = torch.empty((N, n_split, kpad), dtype=torch.float32, device=h.device)
    pti = torch.empty((N, n_split, kpad), dtype=torch.int32, device=h.device)
    grid = (-(-N // BN) * n_split,)

    def call():
        launch(L._select_extras_kernel)[grid](
            h, w, *part, pi, pe, ptv, pti, N, V, D, n_split, cols, h.stride(0), w.stride(0),
            IEEE=False, ENTROPY=entropy, TOPK=topk, KPAD=kpad, BN=BN, BV=BV, BD=BD,
            num_warps=num_warps, num_stages=num_stages)
    return call, n_split


def plain_kernel(h, w, BV=128, BD=64, num_warps=4, num_stages=3, pps=4, BN=None, graph_plan=False):
    N = h.shape[0]
    BN, BV, n_split, cols = L.plan(64 if graph_plan else N, V, L._sm_count(h.device), BN, BV, pps)
    pm, ps, pb, pl = (torch.empty((N, n_split), dtype=torch.float32, device=h.device) for _ in range(4))
    pi = torch.empty((N, n_split), dtype=torch.int32, device=h.device)
    grid = (-(-N // BN) * n_split,)

    def call():
        launch(L._select_logits_kernel)[grid](
            h, w, h, h, h, pm, ps, pb, pi, pl, N, V, D, n_split, cols, h.stride(0), w.stride(0), h.stride(0),
            0.0, 0, SAMPLE=False, HAS_NOISE=False, TEMP_PTR=False, HAS_KEYS=False, IEEE=False,
            BN=BN, BV=BV, BD=BD, num_warps=num_warps, num_stages=num_stages)
    return call


def measure(variants: dict, iters: int, reps: int, rounds: int) -> dict:
    graphs = {}
    for name, fn in variants.items():
        try:
            graphs[name] = captured(lambda fn=fn: [fn() for _ in range(iters)])
        except Exception as e:                          # noqa: BLE001  (a config that does not compile)
            print(f"  {name}: failed: {repr(e)[:160]}", flush=True)
    ms = {n: [] for n in graphs}
    names = list(graphs)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            ms[n].append(timed(graphs[n], reps, warm=1) / iters)
    return {n: statistics.median(v) for n, v in ms.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="32,1024")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--graph-plan", action="store_true",
                    help="only the in-graph plan (BN 64, split for one row tile) at BD 64 vs 128 per row count")
    ap.add_argument("--config-rows", type=int, default=32,
                    help="rows of the tile-configuration sweep (0: none)")
    a = ap.parse_args()
    torch.manual_seed(0)
    w = (torch.randn(V, D, device="cuda") * 0.02).to(torch.bfloat16)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, head [{V}, {D}] bf16",
          flush=True)
    table = []
    for R in (int(r) for r in a.rows.split(",")):
        h = (torch.randn(R, D, device="cuda") * 2).to(torch.bfloat16)
        if a.graph_plan:           # BN 64 row tiles: the in-graph plan, and the eager one above 32 rows
            plans = [("in-graph", True)] + ([("eager", False)] if R > 32 else [])
            variants = {f"{kind}, {pn} plan, BD {bd}": (
                plain_kernel(h, w, BD=bd, BN=64, graph_plan=g) if kind == "plain kernel" else
                extras_kernel(h, w, True, 0, BD=bd, BN=64, graph_plan=g)[0])
                for pn, g in plans for kind in ("plain kernel", "extras kernel, entropy") for bd in (64, 128)}
            for n, v in measure(variants, a.iters, a.reps, a.rounds).items():
                table.append((R, n, v))
                print(f"R={R} {n}: {v:.4f} ms", flush=True)
            continue
        ek, n_split = extras_kernel(h, w, True, 0)
        base = {
            "floor: h @ W.T (cuBLAS)": lambda: h @ w.t(),
            "plain op (kernel + combine)": lambda: L.select_logits_triton(h, w),
            "plain kernel": plain_kernel(h, w),
            "extras op, entropy": lambda: SE.select_extras_triton(h, w, True, 0),
            "extras kernel, entropy": ek,
            "extras kernel, no entropy": extras_kernel(h, w, False, 0)[0],
            "extras op, entropy + top-5": lambda: SE.select_extras_triton(h, w, True, 5),
            "extras kernel, entropy + top-5": extras_kernel(h, w, True, 5)[0],
        }
        res = measure(base, a.iters, a.reps, a.rounds)
        for n, v in res.items():
            table.append((R, n, v))
            print(f"R={R} {n}: {v:.4f} ms (n_split {n_split})", flush=True)
        if R != a.config_rows:
            continue
        cfgs = {}
        for BV, BD, nw, ns, pps in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4), (2, 4, 8)):
            if BV == 128 and BD == 128 and ns == 4:
                continue                                # shared memory past the SM's
            cfgs[f"extras kernel, entropy, BV {BV} BD {BD} warps {nw} stages {ns} pps {pps}"] = \
                extras_kernel(h, w, True, 0, BV, BD, nw, ns, pps)[0]
        res = measure(cfgs, a.iters, a.reps, 1)
        for n, v in sorted(res.items(), key=lambda kv: kv[1])[:8]:
            table.append((R, n, v))
            print(f"R={R} {n}: {v:.4f} ms", flush=True)
        cfgs = {}
        for BV, BD, nw, ns, pps in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4), (2, 4, 8)):
            if BV == 128 and BD == 128 and ns == 4:
                continue
            cfgs[f"plain kernel, BV {BV} BD {BD} warps {nw} stages {ns} pps {pps}"] = \
                plain_kernel(h, w, BV, BD, nw, ns, pps)
        res = measure(cfgs, a.iters, a.reps, 1)
        for n, v in sorted(res.items(), key=lambda kv: kv[1])[:4]:
            table.append((R, n, v))
            print(f"R={R} {n}: {v:.4f} ms", flush=True)
    print("\n| rows | variant | device ms / call |\n|---|---|---|")
    for R, n, v in table:
        print(f"| {R} | {n} | {v:.4f} |")


if __name__ == "__main__":
    main()
