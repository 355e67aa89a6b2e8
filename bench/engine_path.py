"""End-to-end tokens/s of the product's runtime path (dlc.runtime.Engine: eager Refresh + GraphRunner Reuse
in CUDA graphs over the slot pool) on an LLaDA-8B-shaped model with random bf16 weights.

Schedule: prompt 512, gen 256, block 32, one token per step, dual cache, all B requests in one FCFS batch;
a warm-up generation of the timed request captures the graphs and compiles first. It uses only the
Engine's public API, so the same script times two checkouts of dlc in alternating processes (``--label`` names
the one on PYTHONPATH):

    python3 -P bench/engine_path.py --label new --batches 1,32
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def eager_runner(model):
    try:
        from dlc.runtime.runners.eager import EagerRunner
    except ImportError:                                     # checkouts before the runners package
        from dlc.runtime.model_runner import EagerRunner
    return EagerRunner(model)


def construct(cfg, dev: str, dtype=torch.bfloat16):
    """dlc.models' model of ``cfg`` created on ``dev`` in ``dtype`` (never materialised on the host), its
    default random init, in eval mode without grads: every bench's model starts here."""
    from dlc.models import build_model
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = build_model(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def build(preset: str, dev: str, dtype=torch.bfloat16):
    """The preset's model with random weights, head x4 (logits peaked, argmax stable), as gpu_bench's;
    rule_cost.py and engine_bench.py build theirs here too. Needs only dlc.models: the script must also run
    against older checkouts, whose dlc lacks what gpu_bench imports."""
    from dlc.models.presets import preset_config
    model = construct(preset_config(preset), dev, dtype)
    with torch.no_grad():
        model.head_weight().mul_(4.0)
    return model


def run(model, B: int, args) -> dict:
    from dlc.runtime.session import Session
    compile = {"default": None, "on": True, "off": False}[getattr(args, "compile", "default")]
    res = run_session(Session(eager_runner(model), None, model.config, False, "bench"), B, args, compile)
    return {"label": args.label, "compile": args.compile, **res}


def sync(dev) -> None:
    """Wait for the device's queued work (``dev``: a torch.device or its name; a no-op off CUDA). The benches
    that import engine_path time with it."""
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def schedule_params(cfg, args) -> dict:
    """One token a step, a fixed number of forwards on every path: full attention, ``steps`` = gen (dual
    cache); a block-diffusion model, LLaDA2's decoder with ``steps_per_block`` = block and no threshold (its
    static low-confidence schedule, ``ScheduleRule``) over the exact block cache."""
    if cfg.block_diffusion:
        return dict(gen_length=args.gen, block_length=args.block, steps_per_block=args.block, threshold=None,
                    decoder="llada2", kv_cache="block")
    return dict(gen_length=args.gen, block_length=args.block, steps=args.gen)


def run_session(session, B: int, args, compile: bool | None = None) -> dict:
    """One batch of B requests through dlc.runtime.Engine on ``session`` (an eager model or an engine
    directory; ``compile``: ServeConfig.compile, None = the serving default): median seconds of
    ``args.repeats`` generations after a capture run (bench/engine_bench.py too)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    cfg, L = session.config, args.prompt + args.gen
    dev = torch.device(getattr(args, "device", "cuda"))
    mib = slot_bytes(cfg, L, getattr(session.runner, "dtype", torch.bfloat16)) * (B + 2) / 2**20 + 1
    sc = ServeConfig(model="bench", policy="fcfs", device=dev.type, max_batch_size=B,
                     max_num_tokens=2 * B * L, max_seq_len=L, kv_cache_mb=mib, max_queue=4096,
                     kv_cache="block" if cfg.block_diffusion else "dual", compile=compile)
    eng = Engine(session, sc)
    g = torch.Generator().manual_seed(B)
    top = cfg.vocab_size - min(512, cfg.vocab_size // 4)          # below the special ids (tiny vocabularies)
    prompts = [torch.randint(0, top, (args.prompt,), generator=g).tolist() for _ in range(B)]
    params = schedule_params(cfg, args)
    t = time.perf_counter()
    eng.generate(prompts, params)          # warm-up at the timed shapes: captures, compiles (sequence length)
    sync(dev)
    warm = time.perf_counter() - t
    secs = []
    for _ in range(args.repeats):
        sync(dev)
        t = time.perf_counter()
        outs = eng.generate(prompts, params)
        sync(dev)
        secs.append(time.perf_counter() - t)
    toks = sum(len(o) for o in outs)
    med = statistics.median(secs)
    r = eng.runner
    stats = getattr(getattr(r, "graphs", None), "stats", None) or getattr(r, "stats", {})
    return {"B": B, "seconds": med, "all_seconds": secs, "tokens": toks, "tok_s": toks / med,
            "replays": stats.get("replays"),
            "host_ms_per_replay": 1e3 * stats.get("host_s", 0) / max(1, stats.get("replays") or 1),
            "first_tokens": outs[0][:8], "warmup_s": warm, "schedule": params}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--label", default="dlc")
    p.add_argument("--preset", default="llada-8b")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compile", default="default", choices=["default", "on", "off"],
                   help="the blocks compiled (ServeConfig.compile; default: the serving default)")
    args = p.parse_args()
    model = build(args.preset, "cuda")
    for B in (int(b) for b in args.batches.split(",")):
        print(json.dumps(run(model, B, args)), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
