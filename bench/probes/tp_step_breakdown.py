"""Where a synchronous tensor-parallel Reuse step spends its time, per rank (issue 16 probe, one 2-GPU call).

Measured on 2 x H100 (bench/RESULTS.md, 2026-11-28): a synchronous B=1 Reuse step took 10.65 ms on one GPU and
10.34 ms with TP=2, against ~5 ms of GPU work for TP=2. This probe splits the TP=2 step into its host phases
on each rank (``runtime/distributed/step_times.py``: rank 0's encode and broadcast, the frame's latency to the
worker, the worker's rebuild, each rank's staging and replay launch, rank 0's wait for the result) and, on
CUDA, the device time of each rank's replay (CUDA events around the launch: rank 0's includes its all-reduce
waits for the worker). In one process, LLaDA-8B shape (random bf16, head x4 as tp_bench builds it; a
checkpoint written once, ``--ckpt`` reuses one):

* per batch (``--batches``, default 1 and 32; prompt 512 + gen 256, a 32-token block over a dual cache,
  its Refresh done): the median synchronous step of TP=1 (``GraphRunner`` on GPU 0) and of TP=2 with the
  workers staging from the frame (``reuse_frame``, the default) and with the batch path
  (``frames=False``, the path before), each with its per-rank phase table;
* the same steps run ahead (``reuse_ahead``, ``--ahead`` steps back to back, one token committed per row and
  step on the device): ms per step for TP=1 and TP=2;
* in one process (TP=1's graph runner: a rank's ops without its peer), host us per call of rank 0's encode
  (host ids / device ids), the worker's batch rebuild, and graph staging from the batch / from the frame.

Prints one summary table (ms per step, ratios TP=2 / TP=1) and the phase tables (us per step).

    python3 -P bench/probes/tp_step_breakdown.py                    # 2 GPUs (< 300 s; --layers 8 is faster)
    python3 -P bench/probes/tp_step_breakdown.py --tiny             # CPU: tiny-llada, gloo, uncaptured
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))              # bench/ (engine_path, tp_bench)
from tp_bench import ReuseProbe, say  # noqa: E402


def write_checkpoint(preset: str, layers: int | None, dev: str, dtype, ckpt: str | None) -> Path:
    """The preset's shape with random weights, head x4 (bench/engine_path.build), written once."""
    from engine_path import construct

    from dlc.models.loading import save_checkpoint
    from dlc.models.presets import preset_config
    path = Path(ckpt or tempfile.mkdtemp(prefix="dlc-tp-breakdown-"))
    if (path / "config.json").exists():
        return path
    cfg = preset_config(preset)
    if layers:
        cfg = dataclasses.replace(cfg, n_layers=layers)
    model = construct(cfg, dev, dtype)
    with torch.no_grad():
        model.head_weight().mul_(4.0)
    save_checkpoint(model, path, max_shard_bytes=2 << 30)
    del model
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    say(f"checkpoint {path} written ({cfg.n_layers} layers)")
    return path


def host_costs(steps: ReuseProbe, reps: int) -> dict:
    """In one process, on the TP=1 graph runner (the same ops a rank runs, without the other rank): host us
    per call of rank 0's encode (from the host ids, and from the device ids as before
    ``StepBatch.ids_host``), the worker's StepBatch rebuild (``read_batch``), and staging a graph from the
    batch (``GraphRunner._stage``) and from the frame (``shard_graph.stage_frame``)."""
    from dlc.runtime.distributed.channel import Compact, encode, pool_key, read_batch
    from dlc.runtime.distributed.shard_graph import stage_frame
    r, batch = steps.runner, steps.batch
    dev_batch = dataclasses.replace(batch, ids_host=None)
    head, payload = encode(batch)
    msg, h = Compact(head, payload), head.tolist()
    pools = {"key": pool_key(batch.cache), "pool": steps.pool}
    g = r._graph(r.bucket(batch.n_seqs), batch.n_fed, batch.n_out, ())
    aranges = {n: torch.arange(n, device=r.device) for n in (batch.n_fed, g.key_mask.shape[1])}
    calls = {"encode (host ids)": lambda: encode(batch), "encode (device ids)": lambda: encode(dev_batch),
             "rebuild (read_batch)": lambda: read_batch(msg, r.config, r.device, pools, None),
             "stage (batch)": lambda: r._stage(batch, ()),
             "stage (frame)": lambda: stage_frame(g, h, payload, r.scratch, r.config.logit_shift,
                                                  aranges.get)}
    out = {}
    for name, fn in calls.items():
        best = float("inf")
        for _ in range(5):
            if r.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        out[name] = best * 1e6
    return out


def tp_phases(tp, steps: ReuseProbe, reps: int, frames: bool) -> tuple[float, list[dict]]:
    """(median ms, per-rank phase means) of ``reps`` synchronous TP steps, frame staging on or off."""
    gpu = tp.device.type == "cuda"
    tp.step_times(reset=True, frames=frames, gpu_timing=False)
    for _ in range(3):
        steps.run()                                         # the first step of a key takes the batch path
    tp.step_times(reset=True, gpu_timing=gpu)
    ms = steps.median_ms(reps)
    return ms, tp.step_times(reset=True, gpu_timing=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny-llada on the CPU (gloo, no capture, fp32)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--reps", type=int, default=30, help="synchronous steps per measurement")
    ap.add_argument("--ahead", type=int, default=16, help="steps per run-ahead call")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint directory written by an earlier run")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.tiny:
        preset, dev, dtype, (P, G, blk) = "tiny-llada", "cpu", "fp32", (32, 32, 16)
        torch.set_num_threads(1)
    else:
        preset, dev, dtype, (P, G, blk) = "llada-8b", "cuda", "bf16", (512, 256, 32)
    from dlc.models.loading import DTYPES
    from dlc.runtime.engine import graph_runner_for
    from dlc.runtime.session import open_model
    from dlc.runtime.distributed.step_times import table
    ckpt = write_checkpoint(preset, args.layers, dev, DTYPES[dtype], args.ckpt)
    one = graph_runner_for(open_model(str(ckpt), dtype=dtype, device=dev, progress=False).runner, True)
    session = open_model(str(ckpt), dtype=dtype, device=dev, progress=False, tensor_parallel_size=args.tp)
    tp = graph_runner_for(session.runner, True)
    say(f"TP=1 {type(one).__name__}, TP={args.tp} loaded ({'captured' if tp.capture else 'uncaptured'})")
    res = {"preset": preset, "layers": args.layers, "device": dev, "dtype": dtype, "tp": args.tp,
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    tables = []
    try:
        for B in (int(b) for b in args.batches.split(",")):
            a, b = ReuseProbe(one, P, G, blk, B, seed=B), ReuseProbe(tp, P, G, blk, B, seed=B)
            row = {"B": B, "tp1_ms": a.median_ms(args.reps), "host_us": host_costs(a, 4 * args.reps)}
            for frames in (False, True):
                ms, ranks = tp_phases(tp, b, args.reps, frames)
                name = "frame" if frames else "batch"
                row[f"tp_{name}_ms"], row[f"phases_{name}"] = ms, ranks
                tables.append(table(ranks, f"B={B} {name} path: rank"))
            row["tp1_ahead_ms"] = a.ahead_ms(args.ahead, 3)
            row["tp_ahead_ms"] = b.ahead_ms(args.ahead, 3)
            res["rows"].append(row)
            say(f"B={B}: TP=1 {row['tp1_ms']:.2f} ms, TP={args.tp} {row['tp_frame_ms']:.2f} ms (frame) "
                f"{row['tp_batch_ms']:.2f} ms (batch); ahead {row['tp1_ahead_ms']:.2f} / "
                f"{row['tp_ahead_ms']:.2f} ms per step")
            del a, b
    finally:
        session.runner.close()
    n = args.tp
    print(f"\n| B | TP=1 sync ms | TP={n} sync ms (frame) | TP={n} sync ms (batch path) | ratio (frame) | "
          f"TP=1 ahead ms/step | TP={n} ahead ms/step | ratio (ahead) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['B']} | {r['tp1_ms']:.2f} | {r['tp_frame_ms']:.2f} | {r['tp_batch_ms']:.2f} | "
              f"{r['tp_frame_ms'] / r['tp1_ms']:.2f}x | {r['tp1_ahead_ms']:.2f} | {r['tp_ahead_ms']:.2f} | "
              f"{r['tp_ahead_ms'] / r['tp1_ahead_ms']:.2f}x |")
    names = list(res["rows"][0]["host_us"])
    print("\nHost us per call in one process (TP=1 graph runner; host_costs):\n")
    print("| B | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for r in res["rows"]:
        print(f"| {r['B']} | " + " | ".join(f"{r['host_us'][k]:.1f}" for k in names) + " |")
    print("\nPer-rank phases, us per step (step_times.py):\n")
    print("\n\n".join(tables), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
