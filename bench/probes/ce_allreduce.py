"""Can a TP=2 all-reduce move its bytes with the copy engines instead of SMs? (issue 16 probe, one 2-GPU call)

At B=32 a TP=2 rank of the LLaDA-8B shape spends ~3.2 ms a step in 65 NCCL all-reduces of [1024, 4096] bf16
(49-57 us each, ~150 GB/s over links that carry ~400), and overlapping them with the other micro-batch's
compute lost because NCCL's kernels take the SMs the GEMMs need (bench/RESULTS.md). This probe times, per
rank inside CUDA graphs, the sum of a [rows, 4096] bf16 tensor y over two GPUs:

* ``nccl``: ``dist.all_reduce``;
* ``one_shot``: dlc's ``symm`` path (``one_shot_all_reduce_copy_out``: SM loads of the peer's slot);
* ``ce_push``: y copied by the copy engine straight into the peer's symmetric receive buffer
  (``Tensor.copy_`` onto ``get_buffer(peer)``: a peer memcpy), a signal-pad barrier, y += the received
  partial (one SM kernel), a second barrier before the buffer may be written again;
* ``ce_pull``: y copied into this rank's symmetric buffer, a barrier, the peer's buffer pulled by the copy
  engine, y += it, a barrier.

Each variant: the sum checked against NCCL's (bit for bit: a + b in bf16 is the same on both ranks), ms per
op of 64 back-to-back ops in one graph, and 32 layers of the step's projections with the two sums a layer.

    python3 -P bench/probes/ce_allreduce.py --rows 32,1024 | tee ce.log
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nccl_allreduce import (D, LAYERS, captured, finish, join_group, layer_stack, run_ranks,  # noqa: E402
                             timed)

VARIANTS = ("nccl", "one_shot", "ce_push", "ce_pull")


def make_sums(rows: int, group) -> dict:
    """variant -> fn(y) summing y [rows, D] bf16 over the group in place."""
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed._symmetric_memory as symm_mem
    name, rank = group.group_name, dist.get_rank(group)
    peer = 1 - rank
    shape, dt = (rows, D), torch.bfloat16

    def buffer():
        buf = symm_mem.empty(shape, dtype=dt, device="cuda")
        return buf, symm_mem.rendezvous(buf, name)

    one, _ = buffer()
    recv, h_recv = buffer()
    peer_recv = h_recv.get_buffer(peer, shape, dt)
    send, h_send = buffer()
    peer_send = h_send.get_buffer(peer, shape, dt)
    scratch = torch.empty(shape, dtype=dt, device="cuda")

    def nccl(y):
        dist.all_reduce(y, group=group)

    def one_shot(y):
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(one, y, "sum", name, y)

    def ce_push(y):
        peer_recv.copy_(y)                 # copy engine, over NVLink into the peer's buffer
        h_recv.barrier(0)
        y.add_(recv)
        h_recv.barrier(1)                  # the peer read its receive buffer: it may be written again

    def ce_pull(y):
        send.copy_(y)
        h_send.barrier(0)
        scratch.copy_(peer_send)           # copy engine, over NVLink from the peer's buffer
        h_send.barrier(1)
        y.add_(scratch)

    return {"nccl": nccl, "one_shot": one_shot, "ce_push": ce_push, "ce_pull": ce_pull}


def rank_main(rank: int, world: int, port: int, rows_list: list[int], q):
    group = join_group(rank, world, port)
    res = []
    for rows in rows_list:
        row = {"rows": rows, "MB": rows * D * 2 / 2**20}
        sums = make_sums(rows, group)
        g = torch.Generator(device="cuda").manual_seed(rank)
        x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16, generator=g)
        ref = x.clone()
        sums["nccl"](ref)
        for v in VARIANTS:
            try:
                y = x.clone()
                sums[v](y)
                torch.cuda.synchronize()
                row[f"{v}_exact"] = bool(torch.equal(y, ref))
                t = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16) * 1e-3
                rep = captured(lambda: [sums[v](t) for _ in range(2 * LAYERS)])
                dist.barrier()
                row[f"{v}_us"] = 1e3 * timed(rep) / (2 * LAYERS)
                dist.barrier()
                row[f"{v}_layers_ms"] = timed(captured(layer_stack(rows, world, sums[v])))
            except Exception as e:                  # noqa: BLE001  (reported, the probe goes on)
                row[f"{v}_error"] = repr(e)[:300]
            dist.barrier()
        row["layers_no_comm_ms"] = timed(captured(layer_stack(rows, world, lambda y: None)))
        res.append(row)
        dist.barrier()
    finish(rank, res, q)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="32,1024", help="rows per step (B x block): 32 = B 1, 1024 = B 32")
    args = ap.parse_args()
    res = run_ranks(rank_main, 2, [int(r) for r in args.rows.split(",")], timeout=500)
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": res}),
          flush=True)
    print("\n| rows | MB | variant | same sum as NCCL | us / op (graph) | 32 layers + sums ms | no sums ms |")
    print("|---|---|---|---|---|---|---|")
    for r in res:
        for v in VARIANTS:
            us = r.get(f"{v}_us")
            lay = r.get(f"{v}_layers_ms")
            print(f"| {r['rows']} | {r['MB']:.2f} | {v} | {r.get(f'{v}_exact', r.get(f'{v}_error', '-'))} | "
                  f"{'-' if us is None else f'{us:.1f}'} | {'-' if lay is None else f'{lay:.3f}'} | "
                  f"{r['layers_no_comm_ms']:.3f} |")


if __name__ == "__main__":
    main()
