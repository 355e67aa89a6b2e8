"""Probe the pieces of one LLaDA-8B Reuse step on the GPU (where issue 5's Reuse B=1 target is lost).

Prints, for M = B x 32 rows: each weight GEMM of a layer (cuBLAS as the model issues it, q|k|v and gate|up
concatenated, Inductor max-autotune, a skinny split-N Triton kernel) against its weight-read time at the
measured copy bandwidth, and attention of a 32-token block over 768 cached keys per SDPA backend.

    python bench/probe_reuse.py            # on the H200 (about 3 minutes, autotuning included)
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
import floors  # noqa: E402


def ms(fn, iters=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(iters // 10):
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 10)
    ts.sort()
    return ts[len(ts) // 2]


def copy_bw():
    return floors.copy_bandwidth("cuda", 2**31)              # the benches' one measurement (bench/floors.py)


def triton_skinny():
    import triton
    import triton.language as tl

    @triton.jit
    def kern(X, W, Y, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        rm = tl.arange(0, BM)
        rn = pid * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            x = tl.load(X + rm[:, None] * K + (k + rk)[None, :], mask=rm[:, None] < M, other=0.0)
            w = tl.load(W + rn[:, None] * K + (k + rk)[None, :])
            acc += tl.dot(x, tl.trans(w))
        tl.store(Y + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=rm[:, None] < M)

    def run(x, w, BN, BK, warps, stages):
        M, K = x.shape
        N = w.shape[0]
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        BM = max(16, triton.next_power_of_2(M))
        kern[(N // BN,)](x, w, y, M, N, K, BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
        return y
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="32,256,1024")
    p.add_argument("--autotune", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    bw = copy_bw()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    d, f, H, D, S = 4096, 12288, 32, 128, 768
    shapes = {"q": (d, d), "qkv": (3 * d, d), "o": (d, d), "gate": (f, d), "gateup": (2 * f, d),
              "down": (d, f)}
    W = {k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02 for k, (n, kk) in shapes.items()}
    sk = triton_skinny()
    for M in [int(r) for r in a.rows.split(",")]:
        print(f"\n## GEMMs M={M}")
        print("| weight | read floor us | cuBLAS us | ratio | best triton us | cfg | ratio | "
              "max-autotune us |")
        print("|---|---|---|---|---|---|---|---|")
        tot = {"cublas7": 0.0, "cublas4": 0.0, "best4": 0.0, "floor4": 0.0}
        for name, w in W.items():
            x = torch.randn(M, w.shape[1], device="cuda", dtype=torch.bfloat16)
            floor = w.numel() * 2 / bw * 1e6
            t_cb = ms(lambda: F.linear(x, w)) * 1e3
            best, cfg = float("inf"), None
            if M <= 64:
                ref = F.linear(x, w).float()
                for BN, BK, warps, stages in itertools.product((16, 32, 64), (64, 128, 256), (4,), (3, 4, 5)):
                    if w.shape[0] % BN:
                        continue
                    try:
                        y = sk(x, w, BN, BK, warps, stages)
                        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                        if err > 2e-2:
                            continue
                        t = ms(lambda: sk(x, w, BN, BK, warps, stages)) * 1e3
                    except Exception as e:                               # noqa: BLE001
                        print(f"  cfg {(BN, BK, warps, stages)} failed: {type(e).__name__}")
                        continue
                    if t < best:
                        best, cfg = t, (BN, BK, warps, stages)
            t_at = float("nan")
            if a.autotune and M <= 64:
                torch._inductor.config.max_autotune_gemm_backends = "TRITON,ATEN"
                fn = torch.compile(lambda xx, ww: F.linear(xx, ww), mode="max-autotune-no-cudagraphs",
                                   dynamic=False)
                try:
                    t_at = ms(lambda: fn(x, w)) * 1e3
                except Exception as e:                                   # noqa: BLE001
                    print(f"  max-autotune failed: {e!r}"[:200])
            print(f"| {name} {tuple(w.shape)} | {floor:.1f} | {t_cb:.1f} | {t_cb / floor:.2f} | "
                  f"{best:.1f} | {cfg} | {best / floor:.2f} | {t_at:.1f} |")
            if name in ("q", "o", "gate", "down"):
                tot["cublas7"] += t_cb * (3 if name == "q" else 2 if name == "gate" else 1)
            if name in ("qkv", "o", "gateup", "down"):
                tot["cublas4"] += t_cb
                tot["best4"] += min(best, t_cb)
                tot["floor4"] += floor
        print(f"per layer: cuBLAS 7 products {tot['cublas7']:.0f} us, cuBLAS fused 4 "
              f"{tot['cublas4']:.0f} us, best-of fused 4 {tot['best4']:.0f} us, floor {tot['floor4']:.0f} us "
              f"(x32 layers: {tot['cublas7'] * 32e-3:.2f} / {tot['cublas4'] * 32e-3:.2f} / "
              f"{tot['best4'] * 32e-3:.2f} / {tot['floor4'] * 32e-3:.2f} ms)")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print("\n## attention: 32 queries over S keys, 32 heads, D=128")
    print("| B | S | backend | us | KV read floor us |")
    print("|---|---|---|---|---|")
    for B in (1, 8, 32):
        q = torch.randn(B, H, 32, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, H, S + 32, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        floor = 2 * k.numel() * 2 / bw * 1e6
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(be):
                    t = ms(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3
            except Exception as e:                                       # noqa: BLE001
                t = float("nan")
                print(f"  {be} failed: {type(e).__name__}")
            print(f"| {B} | {S + 32} | {be.name} | {t:.1f} | {floor:.1f} |")
        try:
            import dlc.kernels as K
            t = ms(lambda: K.sparse_attention(q, k[:, :, :S], v[:, :, :S], k[:, :, S:], v[:, :, S:])) * 1e3
            print(f"| {B} | {S + 32} | dlc.sparse_attention dense | {t:.1f} | {floor:.1f} |")
        except Exception as e:                                           # noqa: BLE001
            print(f"  dlc sparse_attention failed: {e!r}"[:200])


if __name__ == "__main__":
    main()
