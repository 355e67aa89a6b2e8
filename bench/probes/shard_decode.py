"""A TP rank's decoding of the selected rows alone, on one GPU (issue 16 probe): device time per step of

* TP=1 ``fused``: ``dlc.kernels.fused_select_logits`` over the whole LM head (GraphRunner's captured decode);
* a TP rank ``fused``: ``dlc.kernels.fused_shard_stats`` over its 1 / tp of the head, then the combine's
  arithmetic (``vocab.merge``) over the rank's statistics repeated tp times (the all_gather itself is not in
  it: bench/probes/nccl_allreduce.py measures collectives);
* a TP rank ``exact``: the float64 ``vocab.shard_stats`` over its shard, then the same merge,

each captured in a CUDA graph and replayed (no launch overhead), LLaDA-8B's head (126464 x 4096, bf16), for
B x 32 decoded rows. Prints one markdown table.

    python3 -P bench/probes/shard_decode.py [--tp 2] [--batches 1,32] [--iters 50]
"""
from __future__ import annotations

import argparse
import math

import torch


def graph_ms(fn, iters: int) -> float:
    """Device ms per replay of ``fn`` captured in a CUDA graph (warmed up on a side stream first)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("shard_decode: needs a CUDA GPU")
    import dlc.kernels as K
    from dlc.models.tensor_parallel import vocab_range
    from dlc.runtime.distributed.vocab import STATS, merge, shard_stats
    V, d, N = 126464, 4096, 32
    w = (torch.randn(V, d, device="cuda") / math.sqrt(d) * 4).bfloat16()
    v0, v1 = vocab_range(V, 0, args.tp)
    ws = w[v0:v1].contiguous()
    print(f"| B (rows) | TP=1 fused ms | TP={args.tp} rank fused ms | TP={args.tp} rank exact (float64) ms |")
    print("|---|---|---|---|")
    for B in (int(b) for b in args.batches.split(",")):
        h = torch.randn(B, N, d, device="cuda").bfloat16()
        ar, one = torch.arange(B, device="cuda"), torch.ones(1, device="cuda", dtype=torch.bfloat16)
        z = torch.zeros(B, dtype=torch.int64, device="cuda")

        def tp1():
            return K.fused_select_logits(h.view(B * N, d), w)

        def rank(fused: bool):
            def step():
                if fused:
                    st = {k: v.view(B, N) for k, v in K.fused_shard_stats(h.view(B * N, d), ws, v0).items()}
                else:
                    st = shard_stats(h, ws, v0, ar, ar, one, 0.0, z, V)
                mine = torch.stack([st[k] for k in STATS])
                return merge(torch.stack([mine] * args.tp))
            return step
        t1, tf, te = (graph_ms(f, args.iters) for f in (tp1, rank(True), rank(False)))
        print(f"| {B} ({B * N}) | {t1:.3f} | {tf:.3f} | {te:.3f} |", flush=True)


if __name__ == "__main__":
    main()
