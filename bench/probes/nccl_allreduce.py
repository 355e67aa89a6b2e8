"""What tensor parallelism's collectives cost on this host (issue 16 probe, one 2-GPU call).

A TP=2 Reuse step of the LLaDA-8B shape runs two all-reduces per layer (after o and down) over [rows, 4096]
bf16. This probe times, per rank, with CUDA events:

* one all-reduce of [rows, d] eagerly and inside a CUDA graph (64 back to back, as a step's 32 layers do),
  through NCCL and, where PyTorch has it, through symmetric memory's one-shot all-reduce (P2P loads, no
  multicast);
* the step's projections alone as one graph of 32 layers: TP=1 (full width) vs one TP=2 rank (half width)
  without and with the all-reduces, i.e. the compute a rank must do and what the collectives add to it
  (symm: copy in, one-shot, copy out; and dlc's path, ``one_shot_all_reduce_copy_out`` summing in place).

    python3 -P bench/probes/nccl_allreduce.py --rows 32,1024 | tee nccl.log
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

D, FFN, LAYERS = 4096, 12288, 32              # LLaDA-8B (MHA: q, k, v each d wide)


def timed(fn, reps: int = 20, warm: int = 3) -> float:
    """Median ms of fn() over reps (CUDA events, one sync per rep)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def captured(body):
    """body() captured once as a CUDA graph -> its replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()                                     # warm (NCCL sets up its buffers outside the capture)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return g.replay


def symm_all_reduce(rows: int, group):
    """One-shot all-reduce over symmetric memory, or None where this PyTorch has none."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
        buf = symm_mem.empty((rows, D), dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(buf, group.group_name)
        op = torch.ops.symm_mem.one_shot_all_reduce
        return lambda: op(buf, "sum", group.group_name)
    except Exception as e:                          # noqa: BLE001  (reported, the probe goes on)
        return repr(e)[:200]


def layer_stack(rows: int, world: int, reduce):
    """32 layers of the step's four projections at 1/world width; ``reduce``(y) after o and down."""
    x = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
    w_qkv = torch.randn(3 * D // world, D, device="cuda", dtype=torch.bfloat16) * 0.01
    w_o = torch.randn(D, D // world, device="cuda", dtype=torch.bfloat16) * 0.01
    w_gu = torch.randn(2 * FFN // world, D, device="cuda", dtype=torch.bfloat16) * 0.01
    w_dn = torch.randn(D, FFN // world, device="cuda", dtype=torch.bfloat16) * 0.01

    def body():
        h = x
        for _ in range(LAYERS):
            a = torch.nn.functional.linear(h, w_qkv)[:, : D // world]          # [rows, d / world]
            y = torch.nn.functional.linear(a, w_o)                             # [rows, d]
            reduce(y)
            g = torch.nn.functional.linear(y, w_gu)[:, : FFN // world]         # [rows, ffn / world]
            h = torch.nn.functional.linear(g, w_dn)                            # [rows, d]
            reduce(h)
    return body


def join_group(rank: int, world: int, port: int):
    """This rank's GPU and the NCCL group of ``world`` spawned ranks -> the group."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    return dist.group.WORLD


def rank_main(rank: int, world: int, port: int, rows_list: list[int], q):
    group = join_group(rank, world, port)
    res = []
    for rows in rows_list:
        t = torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)
        row = {"rows": rows, "MB": rows * D * 2 / 2**20}
        row["nccl_eager_ms"] = timed(lambda: dist.all_reduce(t, group=group))
        rep = captured(lambda: [dist.all_reduce(t, group=group) for _ in range(2 * LAYERS)])
        row["nccl_graph_ms_each"] = timed(rep) / (2 * LAYERS)
        sym = symm_all_reduce(rows, group)
        if callable(sym):
            row["symm_eager_ms"] = timed(sym)
            try:
                rep = captured(lambda: [sym() for _ in range(2 * LAYERS)])
                row["symm_graph_ms_each"] = timed(rep) / (2 * LAYERS)
            except Exception as e:                  # noqa: BLE001
                row["symm_graph_error"] = repr(e)[:200]
        else:
            row["symm_error"] = sym
        dist.barrier()
        row["tp1_layers_ms"] = timed(captured(layer_stack(rows, 1, lambda y: None)))
        row["tp2_layers_no_comm_ms"] = timed(captured(layer_stack(rows, world, lambda y: None)))
        row["tp2_layers_nccl_ms"] = timed(captured(layer_stack(rows, world,
                                                               lambda y: dist.all_reduce(y, group=group))))
        if callable(sym):
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty((rows, D), dtype=torch.bfloat16, device="cuda")
            symm_mem.rendezvous(buf, group.group_name)

            def reduce_symm(y):                     # copy in, reduce, copy out (what a TP layer would do)
                buf.copy_(y)
                y.copy_(torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", group.group_name))
            try:
                row["tp2_layers_symm_ms"] = timed(captured(layer_stack(rows, world, reduce_symm)))
            except Exception as e:                  # noqa: BLE001
                row["tp2_layers_symm_error"] = repr(e)[:200]

            def reduce_fused(y):                    # dlc's path (models/all_reduce.py): the copy in fused
                view = buf.view(-1)[: y.numel()].view(y.shape)          # into the kernel, y summed in place
                torch.ops.symm_mem.one_shot_all_reduce_copy_out(view, y, "sum", group.group_name, y)
            try:
                row["tp2_layers_symm_fused_ms"] = timed(captured(layer_stack(rows, world, reduce_fused)))
            except Exception as e:                  # noqa: BLE001
                row["tp2_layers_symm_fused_error"] = repr(e)[:200]
        res.append(row)
        dist.barrier()
    finish(rank, res, q)


def finish(rank: int, res, q) -> None:
    """A rank's end: rank 0 hands the results over, every rank leaves the group."""
    if rank == 0:
        q.put(res)
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(target, world: int, *args, timeout: float = 600):
    """target(rank, world, port, *args, queue) in ``world`` spawned processes -> what rank 0 put."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=target, args=(r, world, port, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = q.get(timeout=timeout)
    for p in procs:
        p.join(60)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="32,1024", help="rows per step (B x block): 32 = B 1, 1024 = B 32")
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()
    res = run_ranks(rank_main, args.tp, [int(r) for r in args.rows.split(",")])
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tp": args.tp,
                      "results": res}), flush=True)
    print("\n| rows | MB | NCCL eager ms | NCCL in graph ms/op | symm eager ms | symm in graph ms/op | "
          "32 layers TP=1 ms | TP=2 rank, no comm ms | + NCCL ms | + symm ms | "
          "+ symm fused copy, in place ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    f = lambda v: f"{v:.3f}" if isinstance(v, float) else "-"                  # noqa: E731
    for r in res:
        print(f"| {r['rows']} | {r['MB']:.2f} | {f(r['nccl_eager_ms'])} | {f(r['nccl_graph_ms_each'])} | "
              f"{f(r.get('symm_eager_ms'))} | {f(r.get('symm_graph_ms_each'))} | {f(r['tp1_layers_ms'])} | "
              f"{f(r['tp2_layers_no_comm_ms'])} | {f(r['tp2_layers_nccl_ms'])} | "
              f"{f(r.get('tp2_layers_symm_ms'))} | {f(r.get('tp2_layers_symm_fused_ms'))} |")


if __name__ == "__main__":
    main()
