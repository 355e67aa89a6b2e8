"""One mixed iteration (Refresh rows beside Reuse rows) as ONE ragged forward vs the two runner calls it
replaces (issue 15, item 2), on an LLaDA-8B-shaped model with random weights (engine_path.build).

A mix ``RxL+UxK`` is R Refresh rows of L tokens (whole sequence, K/V written to their pool slots) and U Reuse
rows of one K-token block over cached K/V of the same length L (dual cache). Timed per mix, each a wall time
of one iteration (the runner's forward(s) + decoding to the host, device synchronised):

* ``two``: ``runner.refresh`` then ``runner.reuse`` on the eager runner (two passes over the weights);
* ``mixed``: ``EagerRunner.mixed`` over the ``MixedBatch`` of both (one ragged forward, the same decoding):
  ``two/mixed`` isolates what one pass over the weights saves (both with the blocks run eagerly:
  ``set_stance("force_eager")``, as the blocks are compiled in place for the graph variants);
* the served GPU path (``GraphRunner`` with its blocks compiled by Inductor, as ``dlc serve`` builds it;
  on CPU the same code without capture and with the "eager" Dynamo backend, a smoke run): ``graph2`` =
  the runner's compiled Refresh + its captured Reuse step (two calls, ``mix_iterations="two"``, the served
  default), ``graph_mixed`` = ``GraphRunner.mixed`` as one eager ragged forward (``"eager"``), and
  ``graph_packed`` = one packed forward through the compiled blocks, tokens padded to a token bucket
  (``"compiled"``, runners/packed.py), its attention one varlen kernel launch per layer
  (``dlc.kernels.packed_pool_attention``); ``graph_packed_ops`` = the same forward with the attention part by
  part in the opaque op (the packed path before the varlen kernel: ``packed_seqs`` switched off for it);
  ``graph_captured`` = the varlen packed forward captured as a CUDA graph per token bucket and replayed
  (``"captured"``): ``graph2/graph_*`` and ``graph_packed_ops/graph_captured``.

Variants alternate order every repeat, every variant is warmed (and the graphs captured) before timing, and
each figure is the median of ``--repeats`` (>= 5) with the spread (min-max); ``same`` is the share of equal
tokens. The table ends with the ratios (> 1: the mixed forward is faster).

    python3 bench/mixed_iteration.py                     # GPU: llada-8b shape, bf16, mixes 2x768+30x32, ...
                                                         # (Inductor compiles ~2 min of it on an H200)
    python3 bench/mixed_iteration.py --tiny              # CPU smoke run: tiny-llada, fp32, small mixes
    python3 -P bench/mixed_iteration.py --variants graph2,graph_packed_ops,graph_packed,graph_captured
                                                         # issue 15 item 2: the captured packed forward
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
from engine_path import build, sync  # noqa: E402  (the random LLaDA-shaped model every bench times)

GPU_MIXES = "2x768+30x32,1x768+7x32,4x768+60x32"
TINY_MIXES = "2x64+30x8,1x64+7x8,4x64+60x8"


def parse_mix(s: str) -> tuple[int, int, int, int]:
    """'2x768+30x32' -> (R, L, U, K)."""
    try:
        ref, reu = s.split("+")
        (R, L), (U, K) = (map(int, ref.split("x")), map(int, reu.split("x")))
    except ValueError:
        raise SystemExit(f"--mixes: {s!r} is not RxL+UxK (e.g. 2x768+30x32)") from None
    if min(R, L, U, K) < 1 or K > L:
        raise SystemExit(f"--mixes: {s!r} needs positive counts and a block K <= L")
    return R, L, U, K


def batches(runner, pool, R: int, L: int, U: int, K: int, g: torch.Generator):
    """The Refresh and Reuse StepBatches of one mix: prompts of L / 2 tokens, the rest masked but for a few
    decoded columns; Refresh rows decode their first block, Reuse rows a block further on."""
    from dlc.runtime.step import build_batch
    mc = runner.config
    P = L // 2

    def seqs(n):
        out = []
        for _ in range(n):
            x = torch.full((L,), mc.mask_id, dtype=torch.long)
            x[:P + K // 2] = torch.randint(0, max(2, mc.vocab_size - 512), (P + K // 2,), generator=g)
            out.append(x)
        return out

    slots = [(pool.allocate(),) for _ in range(R + U)]
    start = min(P, L - K)
    ref = build_batch(runner, "refresh", seqs(R), [P] * R, [start] * R, K, None, slots[:R], pool)
    reu = build_batch(runner, "reuse", seqs(U), [P] * U, [start] * U, K, [(start, start + K)] * U,
                      slots[R:], pool)
    return ref, reu


def timed(fn, dev) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def eagerly(fn):
    """``fn`` with the (in-place compiled) blocks run eagerly: the eager runner's variants."""
    def run():
        with torch.compiler.set_stance("force_eager"):
            return fn()
    return run


def in_mode(graph, mode: str, fn):
    """``fn`` with the graph runner's mixed iterations run as ``mode`` (``mix_iterations``)."""
    def run():
        graph.mix_iterations, graph.mixes = mode, mode != "two"
        return fn()
    return run


def per_part_ops(fn):
    """``fn`` with the packed forward's attention part by part (``dlc::packed_attention``): the varlen
    kernel's tables switched off (``runners.packed.packed_seqs`` answers None), as before the kernel."""
    from dlc.runtime.runners import packed

    def run():
        keep, packed.packed_seqs = packed.packed_seqs, lambda *a: None
        try:
            return fn()
        finally:
            packed.packed_seqs = keep
    return run


VARIANTS = ("two", "mixed", "graph2", "graph_mixed", "graph_packed_ops", "graph_packed", "graph_captured")


def run_mix(eager, graph, mix: str, args, dev) -> dict:
    from dlc.runtime.kv_cache import KVCacheManager
    from dlc.runtime.step import MixedBatch, run_batch, run_mixed
    R, L, U, K = parse_mix(mix)
    pool = KVCacheManager(eager.config, L, 1 << 62, eager.dtype, dev, max_slots=R + U + 1)
    graph.bind_pool(pool)                                      # its scratch slot for padding rows
    ref, reu = batches(eager, pool, R, L, U, K, torch.Generator().manual_seed(R * 1000 + U))
    mixed_batch = MixedBatch((ref, reu))
    variants = {"two": eagerly(lambda: [run_batch(eager, ref), run_batch(eager, reu)]),
                "mixed": eagerly(lambda: run_mixed(eager, mixed_batch)),
                # the served GPU path: compiled Refresh + captured Reuse (two calls)
                "graph2": in_mode(graph, "two", lambda: run_mixed(graph, mixed_batch)),
                "graph_mixed": in_mode(graph, "eager", lambda: run_mixed(graph, mixed_batch)),
                "graph_packed_ops": per_part_ops(in_mode(graph, "compiled",
                                                         lambda: run_mixed(graph, mixed_batch))),
                "graph_packed": in_mode(graph, "compiled", lambda: run_mixed(graph, mixed_batch)),
                "graph_captured": in_mode(graph, "captured", lambda: run_mixed(graph, mixed_batch))}
    variants = {k: v for k, v in variants.items() if k in args.variants}
    outs = {k: fn() for k, fn in variants.items()}      # warm-up (compiles, graph capture) + the tokens
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(args.repeats):
        for k in names if i % 2 == 0 else names[::-1]:           # alternate the order
            times[k].append(timed(variants[k], dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"mix": mix, "tokens": R * L + U * K, **{f"{k}_ms": 1e3 * med[k] for k in names},
           **{f"{k}_spread_ms": [1e3 * min(v), 1e3 * max(v)] for k, v in times.items()}}
    for a, b in RATIOS:
        if a in med and b in med:
            row[f"same_{a}_{b}"] = same_share(outs[a], outs[b])
            row[f"{a}/{b}"] = med[a] / med[b]
    row["packed_calls"] = graph.stats.get("mixed_packed", 0)
    row["captured_calls"] = graph.stats.get("mixed_captured", 0)
    del pool
    return row


RATIOS = (("two", "mixed"), ("graph2", "graph_mixed"),    # (two calls, the mixed call that replaces them)
          ("graph2", "graph_packed_ops"), ("graph2", "graph_packed"), ("graph2", "graph_captured"),
          ("graph_packed_ops", "graph_captured"))


def same_share(a, b) -> float:
    """Share of equal tokens between two variants' outputs (bf16: larger GEMMs round differently)."""
    eq = sum(int((x.x0 == y.x0).sum()) for x, y in zip(a, b))
    return eq / sum(x.x0.numel() for x in a)


def table(rows: list[dict]) -> str:
    names = [k[:-3] for k in rows[0] if k.endswith("_ms") and not k.endswith("_spread_ms")]
    pairs = [(a, b) for a, b in RATIOS if f"{a}/{b}" in rows[0]]
    cols = ["mix", "tokens", *[f"{n} ms (min-max)" for n in names], *[f"same {a}~{b}" for a, b in pairs],
            *[f"{a}/{b}" for a, b in pairs]]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = [r["mix"], str(r["tokens"])]
        for n in names:
            lo, hi = r[n + "_spread_ms"]
            vals.append(f"{r[n + '_ms']:.2f} ({lo:.2f}-{hi:.2f})")
        vals += [f"{r[f'same_{a}_{b}']:.3f}" for a, b in pairs]
        vals += [f"{r[f'{a}/{b}']:.2f}x" for a, b in pairs]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny-llada, fp32, small mixes")
    p.add_argument("--preset", default=None, help="model shape (default llada-8b; tiny-llada with --tiny)")
    p.add_argument("--mixes", default=None, help=f"comma-separated RxL+UxK (default {GPU_MIXES})")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} [all]")
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-backend", default="eager",
                   help="torch.compile backend of the blocks on CPU (inductor: slow to compile) [eager]")
    args = p.parse_args()
    args.variants = args.variants.split(",")
    if set(args.variants) - set(VARIANTS):
        raise SystemExit(f"--variants: unknown {sorted(set(args.variants) - set(VARIANTS))}; "
                         f"choose from {','.join(VARIANTS)}")
    if args.repeats < 5:
        raise SystemExit("--repeats must be >= 5 (medians of at least five)")
    dev = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU) or --device cpu")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    preset = args.preset or ("tiny-llada" if args.tiny else "llada-8b")
    mixes = (args.mixes or (TINY_MIXES if args.tiny else GPU_MIXES)).split(",")
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.runners.graph import GraphRunner
    model = build(preset, str(dev), dtype)
    # CUDA: fuses q|k|v, gate|up in place, captures; CPU: the same code paths without capture (a smoke run)
    # "compiled" so the packed variant can run; each variant sets its mode
    graph = (GraphRunner(model, compile=True, mix_iterations="compiled") if dev.type == "cuda" else
             GraphRunner(model, capture=False, decode="fused", pool_attention=True, compile=args.cpu_backend,
                         mix_iterations="compiled"))
    eager = EagerRunner(model)
    print(f"# {preset} {str(dtype).replace('torch.', '')} on "
          f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"median of {args.repeats} (alternating order)", flush=True)
    rows = []
    for mix in mixes:
        rows.append(run_mix(eager, graph, mix, args, dev))
        print(json.dumps(rows[-1]), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))


if __name__ == "__main__":
    main()
