"""Served cost of each decoding rule through a compiled engine (issues 18 / 15; the engine is the product).

On an LLaDA-8B-shaped checkpoint with random bf16 weights (bench/engine_path.py's ``build``), this script
builds the export engine for this GPU with ``--decode-extras`` (its programs return the decoded rows' hidden
states; the runner decodes the rules' extras from them), opens it as ``dlc serve`` does (Inductor at load,
Reuse replayed as CUDA graphs, ``--lookahead`` steps ahead) and serves one request set of B requests per
(rule, row decoding) through ``dlc.runtime.Engine``, interleaved, the order reversed every other iteration
(bench/rule_cost.py's method and request sets: prompt 512, gen 256, block 32, dual cache). Row decoding:
``fused`` (``CompiledRunner.decoding``: the graph runner's kernels, the CUDA default) vs ``exact`` (the eager
runner's float64 sweep, what every GPU-lowered engine ran before). Per row: median ms per forward and its
ratio to low-confidence under the same decoding (target < 3%, issue 18).

    python3 -P bench/engine_rule_cost.py --batches 1 --iters 3 | tee engine_rules.log
    python bench/engine_rule_cost.py --device cpu --preset tiny-llada --prompt 16 --gen 16 --block 8 --iters 1
"""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
from rule_cost import RULES, Clock, count_ahead, serve_set  # noqa: E402

DEFAULT_RULES = "low_confidence,entropy_bound 0.1,credit 0.9,smoothing 0.9,logprobs 5"
MODES = ("fused", "exact")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_engine_dir(work: Path, args) -> Path:
    """The 8B checkpoint (random bf16) and its export engine with --decode-extras for this GPU."""
    from dlc.compiler.build import compile_model
    from dlc.models.loading import save_checkpoint
    from engine_path import build
    ckpt, out = work / "ckpt", work / "engine"
    shutil.rmtree(work, ignore_errors=True)
    ckpt.mkdir(parents=True)
    model = build(args.preset, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)
    save_checkpoint(model, ckpt)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    target = "cpu" if args.device == "cpu" else "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    t = time.perf_counter()
    compile_model(str(ckpt), target, str(out), backend="export", dtype="bf16" if target != "cpu" else "fp32",
                  max_batch_size=max(int(b) for b in args.batches.split(",")),
                  max_seq_len=args.prompt + args.gen,
                  block_length=args.block, decode_extras=True, echo=log,
                  logprobs=5 if target == "cpu" else 0)   # GPU-lowered builds decode logprobs from the rows
    log(f"compiled the export engine (--decode-extras, target {target}) in {time.perf_counter() - t:.0f} s")
    gc.collect()
    torch.cuda.empty_cache()
    return out


def make_engine(session, B: int, args):
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    L = args.prompt + args.gen
    sc = ServeConfig(model="bench", device=args.device, max_batch_size=B, max_num_tokens=2 * B * L,
                     max_seq_len=L, kv_cache_mb=None if args.device == "cuda" else 64,
                     gpu_memory_utilization=0.85, max_queue=4096, kv_cache="dual",
                     gen_length=args.gen, block_length=args.block, steps=args.gen,
                     lookahead_steps=args.lookahead, policy="fcfs")
    eng = Engine(session, sc)
    eng.warmup()
    if not hasattr(eng.runner, "stats"):          # a compiled runner: its Reuse graphs' counters
        eng.runner.stats = eng.runner.graphs.stats if eng.runner.graphs is not None else {}
    count_ahead(eng.runner)
    return eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--work", default="/tmp/dlc-engine-rules")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--lookahead", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run (tiny preset, target cpu)")
    ap.add_argument("--rules", default=DEFAULT_RULES,
                    help="comma-separated names of bench/rule_cost.py's RULES")
    ap.add_argument("--modes", default=",".join(MODES), help=f"row decodings to time, of {MODES}")
    args = ap.parse_args()
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {MODES}, got {args.modes!r}")
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    bad = [n for n in names if n not in RULES]
    if bad:
        ap.error(f"--rules: unknown {bad}; choose from {list(RULES)}")
    from dlc.runtime.session import open_model
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"device": name, "torch": torch.__version__, "iters": args.iters,
                      "lookahead": args.lookahead, "path": "compiled export engine, --decode-extras"}),
          flush=True)
    eng_dir = build_engine_dir(Path(args.work), args)
    t = time.perf_counter()
    session = open_model(str(eng_dir), device=args.device, progress=False)
    log(f"opened the engine in {time.perf_counter() - t:.0f} s")
    rows = []
    for B in (int(b) for b in args.batches.split(",")):
        t = time.perf_counter()
        eng = make_engine(session, B, args)
        log(f"B={B}: engine warmed in {time.perf_counter() - t:.0f} s (runner {type(eng.runner).__name__}, "
            f"decoding {eng.runner.decoding}, rows-only Reuse program: {'reuse_rows' in eng.runner.phases})")
        clock = Clock(args.device)
        g = torch.Generator().manual_seed(B)
        hi = min(session.config.vocab_size, session.config.mask_id) - 1
        prompts = [torch.randint(0, hi, (args.prompt,), generator=g).tolist() for _ in range(B)]
        params = {n: dict(gen_length=args.gen, block_length=args.block, steps=args.gen, kv_cache="dual",
                          seed=1, **RULES[n]) for n in names}
        cells = [(m, n) for m in modes for n in names]
        for m, n in cells:                                  # warm every (decoding, rule) once
            eng.runner.decoding = m
            serve_set(eng, prompts, params[n], clock)
        samples = {c: [] for c in cells}
        for it in range(args.iters):
            for m, n in (cells if it % 2 == 0 else cells[::-1]):
                eng.runner.decoding = m
                samples[m, n].append(serve_set(eng, prompts, params[n], clock))
        for m in modes:
            base = statistics.median(x["s"] / x["forwards"] for x in samples[m, names[0]])
            for n in names:
                sm = samples[m, n]
                ms = 1e3 * statistics.median(x["s"] / x["forwards"] for x in sm)
                ahead = sum(x["ahead"] for x in sm) / max(1, sum(x["replays"] for x in sm))
                row = {"B": B, "decoding": m, "rule": n, "ms_per_forward": round(ms, 3),
                       "vs": round(ms / (1e3 * base) - 1, 4), "ahead_share": round(ahead, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        eng.runner.bind_pool(None)
        del eng
        gc.collect()
        torch.cuda.empty_cache()
    print("\n| B | row decoding | rule | ms / forward | vs low-conf | run ahead |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['decoding']} | {r['rule']} | {r['ms_per_forward']:.3f} | "
              f"{100 * r['vs']:+.1f}% | {r['ahead_share']:.0%} |")


if __name__ == "__main__":
    main()
