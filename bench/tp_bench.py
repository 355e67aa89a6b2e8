"""Tensor parallelism (issue 16): TP=N against TP=1 in one run, on an LLaDA-8B-shaped random checkpoint.

Writes the model (random weights in the bench dtype, head x4 as engine_path.build) to disk in dlc's LLaDA HF
layout, then for TP=1 (eager runner) and TP=N (``open_model(..., tensor_parallel_size=N)``, the ranks load
their slices of that checkpoint) measures, in this order:

1. Reuse step latency at B=1 (prompt 512 + gen 256, a 32-token block over a dual cache; median of ``--reps``
   ``run_batch`` calls after a Refresh; run_batch copies the result to the host, so each call is synchronous);
2. end-to-end tokens/s of ``generate`` at B=32 (gen 256, block 32, one token per step, dual cache);
3. token agreement of TP=N with TP=1 on the same prompts (B=32 run; identical is expected on fp32 tiny
   models, see tests/runtime/test_tensor_parallel.py; bf16 8B may differ where logits tie within rounding).

Targets (issue 16): Reuse latency TP=2 <= 0.6x TP=1 at B=1, tokens/s >= 1.7x at B=32. TP=1 runs first
(the TP group cannot be left and re-joined in one process).

    python3 -P bench/tp_bench.py --tp 2 --out $OUT/tp_bench.json          # GPUs
    python3 -P bench/tp_bench.py --preset tiny-llada --device cpu --batch 4 --prompt 32 --gen 32   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)


def reuse_latency(runner, P: int, G: int, block: int, reps: int) -> float:
    """Median seconds of a B=1 Reuse step (dual cache: the block fed, the rest read from the pool)."""
    from dlc.runtime.kv_cache import KVCacheManager
    from dlc.runtime.step import build_batch, run_batch
    mc = runner.config
    L = P + G
    seq = torch.randint(0, min(mc.vocab_size, 256), (L,))
    seq[P:] = mc.mask_id
    pool = KVCacheManager(mc, L, 1 << 62, runner.dtype, runner.device, max_slots=1)
    slots = [pool.allocate_n(1)]
    run_batch(runner, build_batch(runner, "refresh", [seq], [P], [P], block, slots=slots, pool=pool))
    batch = build_batch(runner, "reuse", [seq], [P], [P], block, spans=[(P, P + block)], slots=slots,
                        pool=pool)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_batch(runner, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[max(1, reps // 5):] or times)


def throughput(runner, B: int, P: int, G: int, block: int) -> tuple[float, list]:
    from dlc.runtime.generate import GenerationConfig, generate
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(runner.config.vocab_size, 256), (P,), generator=g).tolist()
               for _ in range(B)]
    cfg = GenerationConfig(gen_length=G, block_length=block, steps=G, kv_cache="dual")
    generate(runner, prompts[:1],
             GenerationConfig(gen_length=block, block_length=block, steps=2, kv_cache="dual"))
    t0 = time.perf_counter()
    res = generate(runner, prompts, cfg)
    dt = time.perf_counter() - t0
    return sum(len(t) for t in res.token_ids) / dt, res.token_ids


def measure(session, args) -> dict:
    lat = reuse_latency(session.runner, args.prompt, args.gen, args.block, args.reps)
    tps, tokens = throughput(session.runner, args.batch, args.prompt, args.gen, args.block)
    return {"reuse_b1_ms": lat * 1e3, "tokens_per_s": tps, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b", help="the shape (a preset's config; weights are random)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint directory written by an earlier run")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from dlc.models.loading import DTYPES, save_checkpoint
    from dlc.runtime.session import open_model
    from engine_path import build
    dtype = DTYPES[args.dtype]
    ckpt = Path(args.ckpt or tempfile.mkdtemp(prefix="dlc-tp-bench-"))
    if not (ckpt / "config.json").exists():
        t0 = time.perf_counter()
        model = build(args.preset, args.device if args.device != "cpu" else "cpu", dtype)
        save_checkpoint(model, ckpt, max_shard_bytes=2 << 30)
        del model
        print(f"checkpoint {ckpt} written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    one = measure(open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False), args)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    tp_session = open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False,
                            tensor_parallel_size=args.tp)
    load_s = time.perf_counter() - t0
    tp = measure(tp_session, args)
    tp_session.runner.close()
    same = sum(a == b for a, b in zip(one.pop("tokens"), tp.pop("tokens")))
    res = {"preset": args.preset, "tp": args.tp, "device": str(args.device), "dtype": args.dtype,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "tp1": one, f"tp{args.tp}": tp,
           "tp_load_s": round(load_s, 2), "reuse_b1_ratio": tp["reuse_b1_ms"] / one["reuse_b1_ms"],
           "tokens_per_s_ratio": tp["tokens_per_s"] / one["tokens_per_s"],
           "identical_sequences": f"{same}/{args.batch}"}
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
