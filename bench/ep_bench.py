"""Expert-parallel MoE layer timing: one MoE block of a preset's shape, EP = world vs EP = 1 in the same run.

Spawns ``--world`` ranks (NCCL on GPUs, one per rank; gloo on CPU), builds the same seeded MoE block on every
rank (random weights, ``--dtype``), and times, at each token count (a Reuse step of B sequences feeds B x 32
tokens; a Refresh step B x L):

* EP 1: the unsharded block on rank 0 alone (the others wait at a barrier);
* EP N: ``dlc.models.expert_parallel.shard_moe_layer`` on every rank (E / N experts each, one all-reduce);

and prints one table (median ms, the ratio EP N / EP 1, the largest |EP N - EP 1| over the output's scale).
Every number comes from this process group in this run.

    python bench/ep_bench.py                                  # 2 GPUs, llada-moe-7b's MoE block, bf16
    python bench/ep_bench.py --preset llada2-mini --world 4   # LLaDA2 (group-limited routing, shared expert)
    python bench/ep_bench.py --smoke                          # CPU, gloo, the tiny preset: checks the script
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def moe_block(preset: str, dtype: torch.dtype, device: str):
    from dlc.models import build_model
    from dlc.models.expert_parallel import MOE_BLOCKS
    from dlc.models.loading import init_weights
    from dlc.models.presets import preset_config

    c = preset_config(preset)
    c.n_layers = min(c.n_layers, c.first_dense_layers + 1)       # only one MoE layer is timed
    torch.manual_seed(0)
    with torch.device(device):
        m = build_model(c)
    init_weights(m, 0, 0.02)
    block = next(mod for mod in m.modules() if isinstance(mod, MOE_BLOCKS))
    return block.to(dtype).eval(), c


def timed(fn, iters: int, sync) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_rank(rank: int, args, init: str) -> None:
    from dlc.models.expert_parallel import shard_moe_layer

    cuda = args.backend == "nccl"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(args.backend, init_method=init, rank=rank, world_size=args.world,
                            timeout=timedelta(seconds=300))
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)  # noqa: E731
    dtype = getattr(torch, args.dtype)
    block, c = moe_block(args.preset, dtype, device)
    rows = []
    with torch.no_grad():
        xs = {n: torch.randn(1, n, c.d_model, generator=torch.Generator().manual_seed(n)).to(device, dtype)
              for n in args.tokens}                                    # [1, T, d]
        refs = {}
        for n, x in xs.items():
            ms1 = timed(lambda: block(x), args.iters, sync) if rank == 0 else 0.0
            refs[n] = (block(x).float(), ms1)
            dist.barrier()
        shard = shard_moe_layer(block, rank, args.world, None)
        del block
        for n, x in xs.items():
            msn = timed(lambda: shard(x), args.iters, sync)
            ref, ms1 = refs[n]
            err = ((shard(x).float() - ref).abs().max() / ref.abs().max()).item()
            rows.append({"tokens": n, "ep1_ms": round(ms1, 3), f"ep{args.world}_ms": round(msn, 3),
                         "ratio": round(msn / ms1, 3) if ms1 else None, "rel_err": f"{err:.2e}"})
    if rank == 0:
        head = {"preset": args.preset, "world": args.world, "backend": args.backend, "dtype": args.dtype,
                "experts": c.n_experts, "top_k": c.n_experts_per_tok, "torch": torch.__version__,
                "device": torch.cuda.get_device_name(0) if cuda else "cpu"}
        print(json.dumps(head))
        print(f"{'tokens':>7} {'EP 1 ms':>9} {f'EP {args.world} ms':>9} {'ratio':>7} {'max rel err':>12}")
        for r in rows:
            print(f"{r['tokens']:>7} {r['ep1_ms']:>9.3f} {r[f'ep{args.world}_ms']:>9.3f} "
                  f"{r['ratio'] if r['ratio'] is not None else '-':>7} {r['rel_err']:>12}")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-moe-7b")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", default="32,1024,8192", help="token counts (B x fed width) to time")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny-llada-moe, fp32, 2 ranks")
    args = ap.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.smoke:
        args.preset, args.dtype, args.backend, args.tokens, args.iters = \
            "tiny-llada-moe", "float32", "gloo", [8, 64], 3
    if args.backend == "nccl" and torch.cuda.device_count() < args.world:
        raise SystemExit(f"--world {args.world} needs {args.world} GPUs; this host has "
                         f"{torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'init')}"
        torch.multiprocessing.spawn(run_rank, args=(args, init), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
