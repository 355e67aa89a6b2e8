"""Head-sparse vs dense: one Reuse step through the runtime's GraphRunner path (issue 13, item 4).

LLaDA-8B-shaped model (engine_path.build: random bf16 weights on the GPU, no network), one Reuse step of a
32-token block over S = 2048 and 4096 cached tokens per row, B = 1 and 32, dense vs head-sparse at
retention 0.25 and 0.5. Every variant is the same ``GraphRunner`` (``dlc.runtime.runners.graph``: CUDA graph
of the whole Reuse step per batch bucket, in-place K/V write into the serving slot pool, pool attention,
fused selected-row logits), the sparse ones with ``sparse_retention``: each KV head attends over its own kept
columns, read from the pool by index (``dlc.kernels.pool_attention`` with ``cols``). Columns:

* ``step``: ``runner.reuse(batch)``, what the engine calls per Reuse step: staging the batch into the graph's
  static buffers (the kept-column list included), the replay, tokens and confidences out. CUDA events, median
  of ``--repeats``; every shape is warmed (captured) first and the variants alternate order every repeat;
* ``replay``: the captured graph alone (the device work of the step);
* ``select``: choosing the kept columns (``KVCacheManager.kept_columns``: top-k of the head scores per layer,
  row and KV head), done once per slot and block (after each Refresh) when ``make_batch`` builds the block's
  first Reuse step, and copied for its later steps (not in ``step``; the last column spreads it over the
  ``--reuse-per-block`` Reuse steps of a block: 31 at one token per step, block 32);
* ``floor``: bytes the step must read / the measured copy bandwidth (bytes read + written per second of a
  device copy): the layer weights, the whole LM head (every decoded row needs every logit), not the
  embedding table; the cached K/V of the kept columns (every column for dense), and for sparse steps the
  int64 kept-column indices.

K/V in the pool and the head scores are random (a Refresh's scores choose the columns in serving; random
scores give scattered per-head columns, the layout real heads produce). Where the pool for B x S does not fit
next to the 32-layer model (B = 32, S = 4096 needs ~70 GB of K/V), the step is timed on the first n and n / 2
layers of the same model and extrapolated linearly to 32 layers (t32 = t_n + (32 - n) x (t_n - t_n/2) /
(n / 2)); such rows say ``layers n->32``. A log (and a JSON of the rows) goes under $OUT when OUT is set.

    python3 bench/head_sparse.py                     # GPU: llada-8b, bf16
    python3 bench/head_sparse.py --tiny              # CPU smoke run: tiny-llada, fp32, no capture
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
import floors  # noqa: E402  (the byte counts and the copy bandwidth every bench uses)
from engine_path import build, sync  # noqa: E402  (the random LLaDA-shaped model every bench times)

from dlc.models.sparse_heads import kept_counts  # noqa: E402
from dlc.runtime.kv_cache import KVCacheManager, slot_bytes  # noqa: E402
from dlc.runtime.runners.graph import GraphRunner  # noqa: E402
from dlc.runtime.step import build_batch  # noqa: E402

LINES: list[str] = []
GiB = 2**30


def log(msg: str = "") -> None:
    print(msg, flush=True)
    LINES.append(msg)


def timer(dev):
    """() -> stop() -> ms: CUDA events on the GPU, perf_counter on the CPU."""
    if dev.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()

        def stop():
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        return stop
    t = time.perf_counter()
    return lambda: (time.perf_counter() - t) * 1e3


def once(fn, dev) -> float:
    sync(dev)
    stop = timer(dev)
    fn()
    return stop()


@contextlib.contextmanager
def first_layers(model, n: int):
    """The model with its first n blocks only (the same weights; nothing copied)."""
    t = model.model.transformer
    blocks, cfg = t.blocks, model.config
    t.blocks = torch.nn.ModuleList(list(blocks)[:n])
    model.config = replace(cfg, n_layers=n)
    try:
        yield model
    finally:
        t.blocks, model.config = blocks, cfg


def weight_bytes(cfg, elem: int) -> int:
    """Bytes a Reuse step reads of the weights: every layer + final norm + LM head (not the embedding)."""
    return (floors.layer_params(cfg) + floors.head_params(cfg)) * elem


def kv_bytes(cfg, B: int, kept: int, elem: int, sparse: bool) -> int:
    """K and V of the kept columns (every column for dense) per step; sparse steps also read the int64
    lists."""
    index = 8 * cfg.n_layers * B * cfg.n_kv_heads * kept if sparse else 0               # int64 lists
    return floors.kv_bytes(cfg, B, kept, elem) + index


def layers_that_fit(cfg, B: int, S: int, variants: list, dtype, dev, margin: float) -> int:
    """The most layers (<= the model's, even) whose pool (B + one scratch slot per variant), kept-column
    buffers and selection transients fit the free device memory less ``margin`` bytes."""
    if dev.type != "cuda":
        return cfg.n_layers
    free = torch.cuda.mem_get_info(dev)[0] - margin
    slots = B + len(variants)
    for n in range(cfg.n_layers, 1, -2):
        c = replace(cfg, n_layers=n)
        need = slots * slot_bytes(c, S, dtype, head_scores=True)
        for r in variants:
            if r is not None:
                k = kept_counts([S], 32, r)[0]
                need += 3 * 8 * n * B * c.n_kv_heads * k             # graph buffer + batch keep + top-k
                need += 2 * 4 * n * B * c.n_kv_heads * S             # scores gathered for top-k
        if need <= free:
            return n
    raise SystemExit(f"B={B} S={S}: not even 2 layers' K/V pool fits the free memory")


def make_pool(model, B: int, S: int, n_runners: int, dev, dtype, g):
    cfg = model.config
    kv = KVCacheManager(cfg, S, 1 << 62, dtype, dev, max_slots=B + n_runners, head_scores=True)
    for t in (kv.k_all, kv.v_all):
        for i in range(t.shape[0]):                                  # per layer: no full-size fp32 temp
            t[i].normal_(generator=g)
    kv.scores.uniform_(generator=g)                                  # random per-head key scores
    return kv


def measure(model, B: int, S: int, variants: list, args, dev, dtype) -> dict:
    """Median ms per variant of step / replay / select at the model's current depth."""
    cfg = model.config
    g = torch.Generator(device=dev).manual_seed(0)
    kv = make_pool(model, B, S, len(variants), dev, dtype, g)
    T = args.block
    runners, batches = {}, {}
    for r in variants:
        gr = GraphRunner(model, decode="fused", capture=dev.type == "cuda", compile=args.compile,
                         buckets=(B,), sparse_retention=r)
        gr.bind_pool(kv)
        runners[r] = gr
    slots = [kv.allocate() for _ in range(B)]
    gen = torch.Generator().manual_seed(1)
    seqs = []
    for _ in range(B):
        x = torch.randint(0, cfg.vocab_size, (S,), generator=gen)
        x[S - T:] = cfg.mask_id
        seqs.append(x)
    P = S - T
    for r, gr in runners.items():
        batches[r] = build_batch(gr, "reuse", seqs, [P] * B, [P] * B, T, [(P, S)] * B,
                                 [(s,) for s in slots], kv)
    for r, gr in runners.items():                                    # warm every shape (capture + 2 runs)
        for _ in range(3):
            gr.reuse(batches[r])
    sync(dev)
    res = {r: {"step": [], "replay": [], "select": []} for r in variants}
    order = list(variants)
    for rep in range(args.repeats):
        for r in (order if rep % 2 == 0 else order[::-1]):          # alternate dense / sparse order
            gr, b = runners[r], batches[r]
            res[r]["step"].append(once(lambda: gr.reuse(b), dev))
            gph = next(iter(gr.graphs.values()))
            if gph.graph is not None:
                res[r]["replay"].append(once(gph.graph.replay, dev))
            if r is not None:                                        # a fresh choice for every row
                sl, qs, ls = b.slots.tolist(), b.q_start.tolist(), b.lengths.tolist()
                kv.scores_written(sl)
                res[r]["select"].append(once(lambda: kv.kept_columns(sl, qs, T, ls, r), dev))
    out = {}
    for r in variants:
        out[r] = {k: (statistics.median(v) if v else float("nan")) for k, v in res[r].items()}
        out[r]["K"] = batches[r].keep_idx.shape[-1] if r is not None else S
        out[r]["eager_reuse"] = runners[r].stats["eager_reuse"]
    del runners, batches, kv
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def extrapolate(tn: dict, th: dict, n: int, h: int, L: int) -> dict:
    """Linear in depth: t_L = t_n + (L - n) x (t_n - t_h) / (n - h), per timed field."""
    out = dict(tn)
    for k in ("step", "replay", "select"):
        out[k] = tn[k] + (L - n) * (tn[k] - th[k]) / (n - h)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny-llada, fp32, no capture")
    ap.add_argument("--preset", default=None)
    ap.add_argument("--cached", default=None, help="cached tokens per row, comma-separated (2048,4096)")
    ap.add_argument("--batches", default=None, help="batch sizes, comma-separated (1,32)")
    ap.add_argument("--retentions", default="0.25,0.5")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--reuse-per-block", type=int, default=31,
                    help="Reuse steps per block that share one column choice [31: block 32, 1 token/step]")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="time this many layers (default: all that fit)")
    ap.add_argument("--margin-gib", type=float, default=6.0, help="free memory left for activations etc.")
    ap.add_argument("--compile", action="store_true",
                    help="GraphRunner's torch.compile'd blocks (slow warm-up)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    dev = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    preset = args.preset or ("tiny-llada" if tiny else "llada-8b")
    cached = [int(x) for x in (args.cached or ("64,128" if tiny else "2048,4096")).split(",")]
    batches = [int(x) for x in (args.batches or ("1,4" if tiny else "1,32")).split(",")]
    if tiny:
        args.block = min(args.block, 8)
    args.repeats = args.repeats or (3 if tiny else 15)
    variants = [None] + [float(x) for x in args.retentions.split(",")]
    model = build(preset, str(dev), dtype)
    cfg0 = model.config
    L = cfg0.n_layers
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "?"
    except Exception:                                                # noqa: BLE001 - no git on the machine
        commit = "?"
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    log(f"# head-sparse Reuse step, {preset} ({L} layers), {str(dtype)[6:]}, {gpu}, "
        f"torch {torch.__version__}, commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    extra = ", compiled blocks" if args.compile else ""
    capture = "" if dev.type == "cuda" else " WITHOUT capture (CPU)"
    log(f"# path: runtime GraphRunner (CUDA graph per bucket, pool attention, fused logits{extra}){capture}")
    elem = torch.empty((), dtype=dtype).element_size()
    bw = floors.copy_bandwidth(dev, (1 << 30) if dev.type == "cuda" else (1 << 24))
    log(f"# copy bandwidth {bw / 1e12:.2f} TB/s (read + write); weights read per step "
        f"{weight_bytes(cfg0, elem) / 1e9:.2f} GB (layers + LM head, no embedding)")
    rows = []
    for S in cached:
        for B in batches:
            n = args.layers or layers_that_fit(cfg0, B, S, variants, dtype, dev, int(args.margin_gib * GiB))
            n = min(n, L)
            depths = [n] if n == L else [n, max(1, n // 2)]
            got = {}
            for d in depths:
                with first_layers(model, d):
                    got[d] = measure(model, B, S, variants, args, dev, dtype)
                log(f"  timed B={B} S={S} on {d} layers: " + ", ".join(
                    f"{'dense' if r is None else r}: {v['step']:.2f} ms" for r, v in got[d].items()))
            for r in variants:
                t = got[n][r] if n == L else extrapolate(got[n][r], got[depths[1]][r], n, depths[1], L)
                kept = t["K"]
                floor_b = weight_bytes(cfg0, elem) + kv_bytes(cfg0, B, kept, elem, r is not None)
                depth = f"{n}->{L}" if n != L else str(L)
                rows.append(dict(B=B, S=S, retention=r, kept=kept, layers=depth,
                                 step_ms=t["step"], replay_ms=t["replay"], select_ms=t["select"],
                                 floor_ms=floor_b / bw * 1e3, floor_gb=floor_b / 1e9,
                                 eager_fallbacks=t["eager_reuse"]))
    for row in rows:
        dense = next(x for x in rows if x["B"] == row["B"] and x["S"] == row["S"] and x["retention"] is None)
        row["vs_dense"] = dense["step_ms"] / row["step_ms"]
        sel = row["select_ms"] / args.reuse_per_block if row["retention"] is not None else 0.0
        row["vs_dense_with_select"] = dense["step_ms"] / (row["step_ms"] + sel)
    log()
    log("| B | S cached | attention | kept cols/row | layers | step ms (GraphRunner) | replay ms "
        f"| select ms / block | floor ms (GB read) | dense/sparse step "
        f"| dense/(step + select/{args.reuse_per_block}) |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        att = "dense" if x["retention"] is None else f"head-sparse r={x['retention']}"
        sel = "-" if x["retention"] is None else f"{x['select_ms']:.2f}"
        rep = "-" if x["replay_ms"] != x["replay_ms"] else f"{x['replay_ms']:.2f}"      # nan: no capture
        log(f"| {x['B']} | {x['S']} | {att} | {x['kept']} | {x['layers']} | {x['step_ms']:.2f} | "
            f"{rep} | {sel} | {x['floor_ms']:.2f} ({x['floor_gb']:.1f}) | {x['vs_dense']:.2f}x | "
            f"{x['vs_dense_with_select']:.2f}x |")
    if any(x["eager_fallbacks"] for x in rows):
        log("# WARNING: some steps fell back to the eager path (eager_fallbacks > 0): not graph timings")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = "head_sparse_tiny" if tiny else "head_sparse"
        (Path(out) / f"{name}.log").write_text("\n".join(LINES) + "\n")
        (Path(out) / f"{name}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
