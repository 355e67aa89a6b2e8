"""The tensor-parallel control message per step (issue 16): what rank 0 pays to hand a StepBatch to a worker.

Two gloo processes on the CPU. Rank 0 builds a Reuse batch (dual cache: one 32-token block fed, prompt 512 +
gen 256) at B=1 and B=32 and sends it N times, as ``TensorParallelRunner`` does, in two forms:

* ``pickled``: the whole batch as host tensors, pickled (the form every step used before; now only for batches
  with tensors the compact form does not hold),
* ``compact``: a fixed int64 frame (header + the fed ids, seeds, lengths, ...: ``channel.encode``), one
  broadcast at B=1;

the worker receives and rebuilds the StepBatch (``read_batch``), then answers with a one-element broadcast.
Reported: median round trip per message minus the round trip of the answer alone (``ack``), i.e. the
control cost a step pays before the worker can launch its replay. Against a ~4 ms captured Reuse step.

    python3 -P bench/tp_control.py [--reps 300]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist

P, G, BLOCK = 512, 256, 32


def _batch(B: int):
    from dlc.models.presets import preset_config
    from dlc.runtime.kv_cache import KVCacheManager
    from dlc.runtime.step import build_batch
    mc = preset_config("tiny-llada")
    runner = SimpleNamespace(device=torch.device("cpu"), config=mc, sparse_retention=None)
    L = P + G
    pool = KVCacheManager(mc, L, 1 << 62, torch.float32, "cpu", max_slots=B + 1)
    seqs = [torch.randint(0, 200, (L,)) for _ in range(B)]
    slots = [pool.allocate_n(1) for _ in range(B)]
    batch = build_batch(runner, "reuse", seqs, [P] * B, [P] * B, BLOCK, spans=[(P, P + BLOCK)] * B,
                        slots=slots, pool=pool, temperature=0.7, seeds=list(range(B)))
    return mc, pool, batch


def _rank(rank: int, port: int, reps: int, out: dict | None) -> None:
    from dlc.runtime.distributed.channel import STEP, Channel, pack_batch, read_batch
    from dlc.runtime.kv_cache import KVCacheManager
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ch, ack = Channel(dist.group.WORLD), torch.zeros(1)
    res = {}
    for B in (1, 32):
        mc, pool, batch = _batch(B)
        pools: dict = {}

        def make(n, s, scores, mc=mc):
            return KVCacheManager(mc, s, 1 << 62, torch.float32, "cpu", max_slots=n)
        for form in ("ack", "pickled", "compact", "ack"):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                if rank == 0:
                    if form == "pickled":
                        ch.send(STEP, (pack_batch(batch), None))
                    elif form == "compact":
                        ch.send_batch(STEP, batch)
                elif form != "ack":
                    read_batch(ch.recv()[1], mc, torch.device("cpu"), pools, make)
                dist.broadcast(ack, 1)
                times.append(time.perf_counter() - t0)
            res.setdefault((B, form), []).append(statistics.median(times[reps // 5:]) * 1e3)
    if rank == 0:
        for B in (1, 32):
            base = min(res[(B, "ack")])
            row = [f"{B:>3}", f"{base * 1e3:7.1f}"] + [f"{(res[(B, f)][0] - base) * 1e3:8.1f}"
                                                       for f in ("pickled", "compact")]
            print(" | ".join(row), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print("B | ack round trip us | pickled us | compact us (per message, above the ack)", flush=True)
    ctx = torch.multiprocessing.get_context("spawn")
    p = ctx.Process(target=_rank, args=(1, port, args.reps, None))
    p.start()
    _rank(0, port, args.reps, {})
    p.join()
    sys.exit(p.exitcode or 0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
