"""What a compiled MoE program copies every forward, with and without ``fold_weight_stacks`` (CPU probe).

Before the pass, a traced MoE forward stacked / concatenated every expert's weights each call (the packed
``w_gu`` / ``w_down`` of ``models/llada_moe.py``). Two measurements:

* ``--count``: per preset, the bytes the program's constant ``stack`` / ``cat`` nodes write per forward (the
  copies, from the traced shapes on the meta device: no weights allocated), without and with the pass;
* timing: the Refresh program (``cache_kv_reuse`` applied, functional K/V) of a ``--preset`` shape cut to
  ``--layers`` layers, fp32 on this machine's CPU, without vs with the pass, on ``--tokens`` tokens;
  interleaved, medians of ``--reps``; outputs compared (same numbers).

    python bench/probes/moe_fold.py --count llada-moe-7b,llada2-mini
    python bench/probes/moe_fold.py --preset llada-moe-7b --layers 1 --tokens 32 --reps 5
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

from dlc.compiler.export import trace_forward
from dlc.models.presets import preset_config
from dlc.passes.fold_weight_stacks import constant_nodes
from dlc.passes.pipeline import PassContext, run_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # bench/ (python3 -P adds no script dir)
from engine_path import construct  # noqa: E402

COPIES = (torch.ops.aten.stack.default, torch.ops.aten.cat.default)


def copied_bytes(gm) -> int:
    """Bytes written per forward by constant stack / cat nodes (their outputs' sizes from the trace)."""
    const = constant_nodes(gm)
    total = 0
    for n in gm.graph.nodes:
        if n in const and n.op == "call_function" and n.target in COPIES:
            v = n.meta.get("val")
            total += v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0
    return total


def programs(model, passes_before: list[str]):
    base = trace_forward(model)
    out = {}
    for name, names in (("plain", passes_before), ("folded", ["fold_weight_stacks"] + passes_before)):
        ctx = PassContext(config=model.config, kv_inplace=False)
        out[name] = run_pipeline(base, ctx, names)["refresh"]
    return out


def count(presets: list[str]) -> None:
    print("| preset | constant stack / cat bytes a forward: plain | with fold_weight_stacks |")
    print("|---|---|---|")
    for p in presets:
        cfg = preset_config(p)
        model = construct(cfg, "meta", torch.bfloat16)
        t = time.perf_counter()
        pr = programs(model, ["mask_blocks"] if getattr(cfg, "block_diffusion", False) else [])
        gib = {k: copied_bytes(v) / 2**30 for k, v in pr.items()}
        print(f"| {p} (bf16) | {gib['plain']:.2f} GiB | {gib['folded']:.2f} GiB |  "
              f"(traced in {time.perf_counter() - t:.0f} s)", flush=True)


def timing(args) -> None:
    cfg = dataclasses.replace(preset_config(args.preset), n_layers=args.layers)
    model = construct(cfg, "cpu", torch.float32)
    pr = programs(model, [])
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(cfg.vocab_size, cfg.mask_id), (1, args.tokens), generator=g)
    pos = torch.arange(args.tokens)[None]
    km = torch.ones(1, args.tokens, dtype=torch.bool)
    outs, ms = {}, {k: [] for k in pr}
    with torch.no_grad():
        for k, gm in pr.items():                                     # warm
            outs[k] = gm(ids, pos, km)[0]
        for r in range(args.reps):
            for k in (list(pr) if r % 2 == 0 else list(pr)[::-1]):
                t = time.perf_counter()
                gm = pr[k]
                gm(ids, pos, km)
                ms[k].append(1e3 * (time.perf_counter() - t))
    diff = (outs["plain"] - outs["folded"]).abs().max().item()
    copies = copied_bytes(pr["plain"]) / 2**30
    print(f"{args.preset} cut to {args.layers} layer(s), fp32, CPU ({torch.get_num_threads()} threads), "
          f"Refresh of {args.tokens} tokens; plain program copies {copies:.2f} GiB a forward; "
          f"max |plain - folded| = {diff:.2e}")
    print("| program | ms a forward (median) | runs |\n|---|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {statistics.median(v):.1f} | {len(v)} |")
    print(f"ratio plain / folded: {statistics.median(ms['plain']) / statistics.median(ms['folded']):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", default="", help="comma-separated presets: copied bytes a forward (meta)")
    ap.add_argument("--preset", default="llada-moe-7b")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    if a.count:
        count([p.strip() for p in a.count.split(",") if p.strip()])
    else:
        timing(a)


if __name__ == "__main__":
    main()
