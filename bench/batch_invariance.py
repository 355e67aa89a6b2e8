"""Batch invariance on the serving path (issue 17, item 8): does a request's output depend on what else runs?

A random LLaDA-shaped checkpoint (GPU default: d 2048, 16 layers, 16 heads, MLP 5632, vocab 126464, bf16,
~1.3 B parameters, LM head x4 so outputs are decisive) runs through ``dlc.runtime.Engine`` built exactly as
``dlc serve`` builds it (``ServeConfig`` defaults: phase policy, on CUDA the CUDA-graph runner with compiled
blocks, fused decoding and steps run ahead of the host). Per mode:

1. ``--probes`` prompts of varied lengths run one at a time (each alone in the engine);
2. the same probes again, submitted over time between background requests (other prompt lengths, generation
   lengths, KV modes, rules and temperatures) that arrive every few iterations, so the probes run in batches
   of many sizes (different CUDA-graph buckets), beside Refresh rows and Reuse rows (mixed iterations), with
   and without steps run ahead.

Modes: T = 0 at 1 and 4 tokens per step, T = 0 with the threshold rule, seeded T = 0.8. A probe's tokens must
be identical in both runs; the table counts probes whose tokens differ and the first differing position
(minimum over them), the largest batch and the mixed (Refresh + Reuse) iterations the mixed run saw. It
asserts the model is decisive enough to matter (the solo outputs vary across prompts).

``--batch-invariant`` runs the engine in the batch-invariant mode (``ServeConfig.batch_invariant``:
runtime/batch_invariant.py), ``--batch-invariant both`` the invariant engine then the default one over the
same model and probes (that order: the default engine compiles the model's blocks in place); each row
carries the solo runs' tokens/s, and with both a line compares them (the mode's cost). ``--modes`` /
``--probes`` / ``--background`` shrink a run to fit a time limit.

    python3 -P bench/batch_invariance.py                 # GPU, ~1.3 B bf16 (about 4 minutes on one H100)
    python3 -P bench/batch_invariance.py --batch-invariant both --modes greedy-1,sampled --probes 40
    python3 -P bench/batch_invariance.py --tiny          # CPU smoke run: tiny-llada shape, fp32

A log (text and JSON) goes to ``$OUT`` when it is set (``--out`` otherwise)."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time

import torch

from dlc.runtime.runners.graph import BUCKETS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # bench/ (python3 -P does not add it)
from engine_path import construct  # noqa: E402  (every bench's random model starts there)

MODES = {   # name -> the probes' own generation fields (gen_length / block_length come from the scale)
    "greedy-1": dict(temperature=0.0, tokens_per_step=1),                 # T = 0, 1 token per step
    "greedy-4": dict(temperature=0.0, tokens_per_step=4),                 # T = 0, 4 tokens per step
    "threshold": dict(temperature=0.0, tokens_per_step=1, threshold=0.9),  # T = 0, threshold rule 0.9
    "sampled": dict(temperature=0.8, tokens_per_step=1),                  # seeded T = 0.8
}
# scale -> (prompt lengths lo..hi, probe gen length, block, background gen lengths)
SCALES = {"gpu": (8, 320, 64, 32, (32, 64, 128)), "tiny": (3, 40, 16, 8, (8, 16, 32))}
LINES: list[str] = []


def log(msg: str) -> None:
    LINES.append(msg)
    print(msg, flush=True)


def model_config(tiny: bool):
    from dlc.models.presets import preset_config
    if tiny:
        return preset_config("tiny-llada")
    return dataclasses.replace(preset_config("llada-8b"), d_model=2048, n_layers=16, n_heads=16,
                               n_kv_heads=16, mlp_hidden=5632, max_seq_len=1024)


def build(cfg, dev: str, dtype):
    """Random weights made on ``dev`` in ``dtype``: normal with std 2 / sqrt(d) (attention logits of order 4
    at any width: the prompt steers every masked position; loading.TINY_INIT_STD at d 64), output projections
    std / sqrt(2 n_layers), norms at 1, then the LM head x4 (engine_path.build's decisive head)."""
    model = construct(cfg, dev, dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    std = 2 / math.sqrt(cfg.d_model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0 if "norm" in name or name.endswith("ln_f.weight") else 0.0)
            else:
                out = name.endswith(("attn_out.weight", "o_proj.weight", "down_proj.weight"))
                p.normal_(0.0, std / math.sqrt(2 * cfg.n_layers) if out else std, generator=g)
        model.head_weight().mul_(4.0)
    return model


def make_engine(model, dev: str, max_seq: int, max_batch: int, graphs: bool | None = None,
                batch_invariant: bool = False, **serve):
    """The serving Engine over an eager model, every runner choice left to ServeConfig's defaults (the
    batch-invariant mode keeps compile off itself) but those ``serve`` names (ServeConfig fields)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.session import Session
    cfg = model.config
    mib = slot_bytes(cfg, max_seq, next(model.parameters()).dtype) * (2 * max_batch + 2) / 2**20 + 1
    fields = {**dict(cuda_graphs=graphs, compile=graphs, batch_invariant=batch_invariant), **serve}
    sc = ServeConfig(model="bench", device=dev, max_batch_size=max_batch, max_seq_len=max_seq,
                     kv_cache_mb=mib, max_queue=4096, log_interval_s=0, **fields)
    eng = Engine(Session(EagerRunner(model), None, cfg, False, "bench"), sc)
    eng.warmup()
    return eng


def prompt(cfg, g: torch.Generator, lo: int, hi: int) -> list[int]:
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    top = min(cfg.vocab_size, cfg.mask_id, cfg.eos_id) - 1                # ordinary ids only
    return torch.randint(0, top, (n,), generator=g).tolist()


def probe_params(mode: dict, gen: int, block: int, seed: int) -> dict:
    p = dict(gen_length=gen, block_length=block, steps=gen // mode["tokens_per_step"],
             temperature=mode["temperature"], seed=seed)
    if mode.get("threshold") is not None:
        p["threshold"] = mode["threshold"]
    return p


def background(cfg, g: torch.Generator, n: int, scale) -> list[tuple[list[int], dict]]:
    """Other traffic: varied prompts, generation lengths, blocks, KV modes, rules and temperatures."""
    lo, hi, _, block, gens = scale
    out = []
    for i in range(n):
        gen = gens[i % len(gens)]
        bl = block if i % 4 else block // 2
        p = dict(gen_length=gen, block_length=bl, steps=gen // (1, 2, 4)[i % 3],
                 kv_cache=("dual", "prefix", "dual", "none")[i % 4], seed=5000 + i,
                 temperature=0.8 if i % 5 == 2 else 0.0)
        if i % 7 == 3:
            p.update(threshold=0.5, steps=gen)
        out.append((prompt(cfg, g, lo, 2 * hi), p))
    return out


def solo(eng, probes) -> list[list[int]]:
    outs = []
    for p, params in probes:
        r = eng.make_request(p, params)
        eng.add_request(r)
        eng.run_until_done()
        check(r)
        outs.append(r.output_ids)
    return outs


def check(r) -> None:
    if r.finish_reason == "error":
        raise SystemExit(f"request {r.rid} failed: {r.error}")


def mixed(eng, probes, others, g: torch.Generator) -> tuple[list[list[int]], dict]:
    """Probes and background requests interleaved, arriving 0-2 iterations apart, stepped to completion.
    -> (the probes' outputs, what the iterations looked like)."""
    items = [("probe", i, *pr) for i, pr in enumerate(probes)] + [("bg", i, *o) for i, o in enumerate(others)]
    order = torch.randperm(len(items), generator=g).tolist()
    gaps = torch.randint(0, 3, (len(items),), generator=g).tolist()
    arrivals, it = [], 0
    for k, gap in zip(order, gaps):
        it += gap if arrivals else 0
        arrivals.append((it, items[k]))
    reqs, seen = {}, dict(iterations=0, max_batch=0, mixed_iterations=0, batch_sizes=set(), buckets=set())
    it, nxt, held = 0, 0, eng.kv.num_used        # a graph runner holds one scratch slot for padding rows
    while nxt < len(arrivals) or eng.has_work():
        while nxt < len(arrivals) and arrivals[nxt][0] <= it:
            kind, i, p, params = arrivals[nxt][1]
            reqs[(kind, i)] = eng.make_request(p, params)
            eng.add_request(reqs[(kind, i)])
            nxt += 1
        n = eng.step()
        it += 1
        if n:
            gauges = eng.metrics.gauges
            seen["iterations"] += 1
            seen["max_batch"] = max(seen["max_batch"], n)
            seen["batch_sizes"].add(n)
            refresh, reuse = gauges["iteration_refresh_rows"], gauges["iteration_reuse_rows"]
            seen["mixed_iterations"] += bool(refresh and reuse)
            if reuse:                            # the CUDA-graph batch bucket its Reuse rows replay at
                seen["buckets"].add(next((b for b in BUCKETS if b >= reuse), BUCKETS[-1]))
    for r in reqs.values():
        check(r)
    assert eng.kv.num_used == held, f"slots left in use: {eng.kv.num_used} (held before: {held})"
    return [reqs[("probe", i)].output_ids for i in range(len(probes))], seen


def compare(a: list[list[int]], b: list[list[int]]) -> tuple[int, int | None, list[dict]]:
    """-> (requests whose tokens differ, first differing position over them, per-request details)."""
    diffs = []
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            pos = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            diffs.append(dict(probe=i, first_diff=pos, solo_len=len(x), mixed_len=len(y)))
    first = min((d["first_diff"] for d in diffs), default=None)
    return len(diffs), first, diffs


def run_mode(eng, cfg, name: str, mode: dict, args, scale) -> dict:
    lo, hi, gen, block, _ = scale
    g = torch.Generator().manual_seed(args.seed)
    probes = [(prompt(cfg, g, lo, hi), probe_params(mode, gen, block, 1000 + i)) for i in range(args.probes)]
    others = background(cfg, g, args.background, scale)
    t = time.perf_counter()
    alone = solo(eng, probes)
    t_solo = time.perf_counter() - t
    distinct = len({tuple(o) for o in alone})
    assert distinct >= 0.9 * len(alone), f"{name}: {distinct} distinct outputs only (not decisive)"
    t = time.perf_counter()
    together, seen = mixed(eng, probes, others, g)
    t_mixed = time.perf_counter() - t
    n_diff, first, diffs = compare(alone, together)
    res = dict(mode=name, batch_invariant=eng.cfg.batch_invariant, requests=len(probes), differing=n_diff,
               first_diff=first, distinct_solo=distinct,
               solo_tokens_per_s=round(sum(map(len, alone)) / t_solo, 1),
               max_batch=seen["max_batch"], mixed_iterations=seen["mixed_iterations"],
               iterations=seen["iterations"], batch_sizes=sorted(seen["batch_sizes"]),
               reuse_buckets=sorted(seen["buckets"]), background=len(others),
               solo_s=round(t_solo, 2), mixed_s=round(t_mixed, 2), diffs=diffs[:20])
    log(json.dumps(res))
    return res


def runner_name(eng) -> str:
    r = eng.runner
    parts = [type(r).__name__]
    for attr in ("compiled", "capture", "decode"):
        v = getattr(r, attr, None)
        if isinstance(v, (bool, str)):
            parts.append(f"{attr}={v}")
    return " ".join(parts)


def table(rows: list[dict]) -> str:
    head = ("| mode | requests | differing | first diff pos | max batch seen | mixed iterations seen | "
            "batch sizes seen | Reuse graph buckets | batch-invariant | solo tok/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['mode']} | {r['requests']} | {r['differing']} | "
        f"{'-' if r['first_diff'] is None else r['first_diff']} | {r['max_batch']} | "
        f"{r['mixed_iterations']} of {r['iterations']} | {len(r['batch_sizes'])} | "
        f"{','.join(map(str, r['reuse_buckets'])) or '-'} | {'on' if r['batch_invariant'] else 'off'} | "
        f"{r['solo_tokens_per_s']} |\n"
        for r in rows)


def cost_lines(rows: list[dict]) -> list[str]:
    """Per mode run both ways: the solo runs' tokens/s with the batch-invariant mode off and on."""
    by = {(r["mode"], r["batch_invariant"]): r["solo_tokens_per_s"] for r in rows}
    return [f"cost of --batch-invariant, {m}: solo {by[(m, False)]} -> {by[(m, True)]} tokens/s "
            f"({by[(m, True)] / by[(m, False)]:.2f}x)"
            for m in dict.fromkeys(r["mode"] for r in rows) if (m, False) in by and (m, True) in by]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny-llada shape (fp32)")
    p.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    p.add_argument("--probes", type=int, default=100)
    p.add_argument("--background", type=int, default=60, help="background requests per mixed run")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eager", action="store_true", help="the eager runner (no CUDA graphs, no compile)")
    p.add_argument("--batch-invariant", nargs="?", const="on", default="off", choices=("off", "on", "both"),
                   help="the engine's batch-invariant mode: on, off, or both (invariant engine first) [off]")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for the log [$OUT]")
    a = p.parse_args(argv)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; known: {list(MODES)}")
    return a


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    dev = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    scale = SCALES["tiny" if args.tiny else "gpu"]
    cfg = model_config(args.tiny)
    t = time.perf_counter()
    model = build(cfg, dev, dtype)
    max_seq = 2 * scale[1] + max(scale[4])
    gpu = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    rows = []
    # both: the invariant engine first (the default one compiles the model's blocks in place)
    for bi in {"off": (False,), "on": (True,), "both": (True, False)}[args.batch_invariant]:
        eng = make_engine(model, dev, max_seq, args.max_batch_size, False if args.eager else None, bi)
        log(f"# batch invariance: {cfg.num_parameters() / 1e9:.2f} B params (d {cfg.d_model}, {cfg.n_layers} "
            f"layers, vocab {cfg.vocab_size}), {dtype}, {gpu}, torch {torch.__version__}; "
            f"runner {runner_name(eng)}; batch-invariant {'on' if bi else 'off'}; policy {eng.cfg.policy}, "
            f"lookahead {eng.cfg.lookahead_steps}, max batch {args.max_batch_size}; "
            f"ready in {time.perf_counter() - t:.1f} s")
        rows += [run_mode(eng, cfg, m, MODES[m], args, scale) for m in args.modes]
        del eng                                          # its KV pool and graphs go before the next engine
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
    log("\n" + table(rows))
    for line in cost_lines(rows):
        log(line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "batch_invariance.log"), "w") as f:
            f.write("\n".join(LINES) + "\n")
        with open(os.path.join(args.out, "batch_invariance.json"), "w") as f:
            json.dump(dict(device=gpu, torch=torch.__version__, argv=sys.argv, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
