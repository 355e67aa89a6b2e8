"""The engine section of issue 13, measured at 8B: is the compiled engine the fastest way to run a model?

On an LLaDA-8B-shaped model with random bf16 weights (head x4, as bench/gpu_bench.py), written to disk in
dlc's LLaDA HF layout, this script:

1. ``dlc compile CKPT --target <this GPU> --backend export`` in-process: compile wall time, engine size on
   disk vs the weight bytes (target <= 1.05x);
2. opens the engine on the GPU: load time (sha256 verification of every file included on the first open, and
   again with the verification cached), device memory after load vs the weight bytes (target <= 1.05x);
3. end-to-end tokens/s through ``dlc.runtime.Engine`` (FCFS, all B requests in one batch; prompt 512, gen 256,
   block 32, one token per step, dual cache) for two paths in this process, alternating their order per batch:
   ``engine`` = the compiled engine as ``dlc serve`` runs it on CUDA (phase programs with the runtime's
   kernels, compiled by Inductor at load (the code generation AOTI does ahead of time; CUDA AOTI packages
   cannot load on the bench image), Reuse replayed as CUDA graphs over the serving pool, K/V written in
   place) and ``runtime`` = the eager model + compiled blocks + GraphRunner (CUDA graphs). Target: engine >=
   1.0x runtime at B=1 and B=32. ``--uncompiled`` first times the engine's programs as loaded.
   Each B also gets its floor-bound ceiling (bench/floors.py at this GPU's measured copy bandwidth and
   matmul rate) and each path its share.

Block-diffusion presets (``--preset llada2-mini``, ``sdar-8b``) run LLaDA2's decoder with one token a step
(``steps_per_block`` = block, no threshold: the static schedule) over the exact block cache on both paths,
against the block-diffusion floor (``floors.bd_floor_s``: the prompt's prefill once, no whole-sequence
Refresh a block). ``--device cpu`` is a smoke run of a tiny preset (fp32, target cpu; timings meaningless).

    python3 -P bench/engine_bench.py --out $OUT/engine_bench.json
    python3 -P bench/engine_bench.py --preset llada2-mini --batches 1,32 --once --repeats 3
    python bench/engine_bench.py --device cpu --preset tiny-llada2 --prompt 16 --gen 16 --block 8 --batches 2
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
import floors  # noqa: E402
from engine_path import build, run_session, sync  # noqa: E402

DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}     # as dlc compile's default for the target


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dir_bytes(path: Path, skip=()) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name not in skip)


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def allocated(dev: torch.device) -> int:
    """Device bytes allocated (0 on the CPU, where the smoke run does not measure memory)."""
    return torch.cuda.memory_allocated() if dev.type == "cuda" else 0


def build_checkpoint(ckpt: Path, preset: str, dev: torch.device) -> tuple[int, float]:
    from dlc.models.loading import save_checkpoint
    model = build(preset, dev.type, DTYPES[dev.type])            # random weights, head x4
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    t = time.perf_counter()
    save_checkpoint(model, ckpt)
    secs = time.perf_counter() - t
    del model
    free(dev)
    return weight_bytes, secs


def build_engine(ckpt: Path, eng_dir: Path, target: str, res: dict, args) -> None:
    """The checkpoint, then ``dlc compile`` of it: the build half of the table (res gets its numbers)."""
    from dlc.compiler.build import compile_model
    shutil.rmtree(ckpt.parent, ignore_errors=True)
    ckpt.mkdir(parents=True)
    dev = torch.device(args.device)
    log(f"building {args.preset} (random {DTYPES[dev.type]}) -> {ckpt}")
    res["weight_bytes"], res["save_s"] = build_checkpoint(ckpt, args.preset, dev)
    log(f"weights {res['weight_bytes'] / 1e9:.2f} GB written in {res['save_s']:.1f}s")

    L = args.prompt + args.gen
    t = time.perf_counter()
    compile_model(str(ckpt), target, str(eng_dir), backend="export", max_batch_size=max(    # target's dtype
        int(b) for b in args.batches.split(",")), max_seq_len=L, block_length=args.block, echo=log,
        **({"moe_impl": args.moe_impl} if args.moe_impl != "auto" else {}))
    res["compile_s"] = time.perf_counter() - t
    free(dev)
    res["engine_bytes"] = dir_bytes(eng_dir)
    res["engine_over_weights"] = res["engine_bytes"] / res["weight_bytes"]
    log(f"compile {res['compile_s']:.1f}s, engine {res['engine_bytes'] / 1e9:.2f} GB "
        f"({res['engine_over_weights']:.3f}x weights)")


def run(session, B: int, args, compile: bool | None = None) -> dict:
    """engine_path.run_session (the same Engine timing loop), then free the engine's KV pool."""
    res = run_session(session, B, args, compile)
    getattr(session.runner, "bind_pool", lambda kv: None)(None)   # an engine runner outlives its pool
    free(torch.device(args.device))
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llada-8b")
    p.add_argument("--work", default="/tmp/dlc-engine-bench")
    p.add_argument("--target", default=None,
                   help="dlc target of this GPU (default: h200 on an H200, else h100)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--once", action="store_true", help="open the engine once (no cached-verification load)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the checkpoint and engine a previous run left in --work")
    p.add_argument("--moe-impl", default="auto", choices=["auto", "fused", "stacked"],
                   help="MoE presets: the expert forward the engine traces (dlc compile --moe-impl)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of a tiny preset (fp32, target cpu)")
    p.add_argument("--uncompiled", action="store_true",
                   help="also time the engine's programs interpreted (no Inductor at load), first")
    args = p.parse_args()
    from dlc.runtime.session import open_model

    work = Path(args.work)
    ckpt, eng_dir = work / "ckpt", work / "engine"
    dev = torch.device(args.device)
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    target = args.target or ("cpu" if dev.type == "cpu" else "h200" if "H200" in gpu else "h100")
    res = {"gpu": gpu, "torch": torch.__version__, "target": target}
    res["copy_bw"], res["matmul_rate"] = floors.measure(dev.type)
    log(f"copy bandwidth {res['copy_bw'] / 1e12:.2f} TB/s, bf16 matmul {res['matmul_rate'] / 1e12:.0f} "
        f"TFLOP/s")
    if args.reuse and (eng_dir / "dlc_engine.json").exists():
        log(f"reusing {ckpt} and {eng_dir} (--reuse: no build or compile timed)")
        res["weight_bytes"] = dir_bytes(eng_dir, skip=("refresh.pt2", "reuse.pt2")) or 1
        res["compile_s"], res["engine_bytes"], res["engine_over_weights"] = 0.0, dir_bytes(eng_dir), 1.0
    else:
        build_engine(ckpt, eng_dir, target, res, args)
    base = allocated(dev)
    t = time.perf_counter()
    engine = open_model(str(eng_dir), device=dev.type, progress=False)
    sync(dev)
    res["load_s"] = time.perf_counter() - t
    res["moe"] = json.loads((eng_dir / "dlc_engine.json").read_text())["build"].get("moe", "-")
    res["engine_device_bytes"] = allocated(dev) - base
    res["device_over_weights"] = res["engine_device_bytes"] / res["weight_bytes"]
    res["load_cached_s"] = float("nan")
    if not args.once:
        del engine
        free(dev)
        t = time.perf_counter()
        engine = open_model(str(eng_dir), device=dev.type, progress=False)   # verification cached now
        sync(dev)
        res["load_cached_s"] = time.perf_counter() - t
    log(f"load {res['load_s']:.1f}s (verified), {res['load_cached_s']:.1f}s (cached); device "
        f"{res['engine_device_bytes'] / 1e9:.2f} GB ({res['device_over_weights']:.3f}x weights)")
    t = time.perf_counter()
    runtime = open_model(str(ckpt), device=dev.type, dtype=DTYPES[dev.type], progress=False)
    res["runtime_load_s"] = time.perf_counter() - t

    res["e2e"] = []
    batches = [int(b) for b in args.batches.split(",")]
    if args.uncompiled:                    # the interpreted programs (before enable_compile changes them)
        for B in batches:
            log(f"e2e engine-interpreted B={B}")
            r = run(engine, B, args, compile=False)
            r["path"] = "engine-interpreted"
            r["ceiling_tok_s"] = floors.e2e_ceiling_tok_s(engine.config, B, args.prompt, args.gen, args.block,
                                                          args.block, res["copy_bw"], res["matmul_rate"])
            res["e2e"].append(r)
            log(json.dumps(r))
    for i, B in enumerate(batches):
        order = [("engine", engine), ("runtime", runtime)]
        for name, sess in (order if i % 2 == 0 else order[::-1]):
            log(f"e2e {name} B={B}")
            r = run(sess, B, args)
            r["path"] = name
            r["ceiling_tok_s"] = floors.e2e_ceiling_tok_s(sess.config, B, args.prompt, args.gen, args.block,
                                                          args.block, res["copy_bw"], res["matmul_rate"])
            res["e2e"].append(r)
            log(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print("\n| path | B | tok/s | s (median of %d) | host ms/replay | warm-up s | ratio to runtime | "
          "floor-bound ceiling tok/s | of ceiling |" % args.repeats)
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["path"], r["B"]): r for r in res["e2e"]}
    for (name, B), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ratio = r["tok_s"] / max(by[("runtime", B)]["tok_s"], 1e-9)      # 0: the runtime run failed
        print(f"| {name} | {B} | {r['tok_s']:.1f} | {r['seconds']:.2f} | {r['host_ms_per_replay']:.2f} | "
              f"{r['warmup_s']:.1f} | {ratio:.3f} | {r['ceiling_tok_s']:.0f} | "
              f"{r['tok_s'] / r['ceiling_tok_s']:.0%} |")
    print("engine = export engine, programs compiled by Inductor at load (the AOTI code generation; "
          "CUDA AOTI loading crashes on this image), Reuse as CUDA graphs; runtime = eager model + compiled "
          "blocks + CUDA graphs; engine-interpreted = the exported programs as loaded")
    print(f"\npreset {args.preset}; engine MoE forward: {res.get('moe', '-')}; "
          f"compile {res['compile_s']:.0f}s; engine {res['engine_bytes'] / 1e9:.2f} GB = "
          f"{res['engine_over_weights']:.3f}x weights; device after load {res['device_over_weights']:.3f}x "
          f"weights; load {res['load_s']:.1f}s verified / {res['load_cached_s']:.1f}s cached; "
          f"GPU {res['gpu']}")


if __name__ == "__main__":
    main()
