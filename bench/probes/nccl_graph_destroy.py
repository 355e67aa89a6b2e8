"""Does destroy_process_group hang after an NCCL all-reduce was captured in a CUDA graph? (issue 16 probe)

Two ranks on two GPUs capture one all_reduce in a CUDA graph and replay it, then leave the group:
``keep`` destroys the group with the graph alive, ``free`` deletes the graph (and syncs) first,
``abort`` sets TORCH_NCCL_ABORT_IN_DESTROY_PG=1. Each variant prints how long destroy took (bounded)."""
import os
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank, variant, port):
    if variant == "abort":
        os.environ["TORCH_NCCL_ABORT_IN_DESTROY_PG"] = "1"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    x = torch.ones(1024, device="cuda")
    dist.all_reduce(x)                                   # communicator made outside capture
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dist.all_reduce(x)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    if variant == "free":
        del g
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    done = threading.Event()
    th = threading.Thread(target=lambda: (dist.destroy_process_group(), done.set()), daemon=True)
    th.start()
    th.join(15)
    print(f"{variant} rank {rank}: destroy {'ok' if done.is_set() else 'HUNG'} "
          f"{time.perf_counter() - t0:.2f} s x={x[0].item():.0f}", flush=True)
    os._exit(0)


if __name__ == "__main__":
    for i, variant in enumerate(sys.argv[1:] or ["keep", "free", "abort"]):
        ctx = mp.get_context("spawn")
        ps = [ctx.Process(target=rank_main, args=(r, variant, 29600 + i)) for r in range(2)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(60)
            if p.exitcode is None:
                p.kill()
