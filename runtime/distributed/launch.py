"""Starting a tensor-parallel group: ``open_tp_model`` on rank 0, ``worker_main`` on the others.

By default the command itself starts ranks 1 .. N-1 (``torch.multiprocessing``, spawn) and joins them over
TCP on 127.0.0.1; under ``torchrun`` (RANK / WORLD_SIZE / MASTER_ADDR set) the ranks already exist: rank 0
continues as the command and the others become workers at once. Backends: NCCL on CUDA for the model's
collectives, gloo on CPU; the control messages always use a gloo group. Every rank loads only its shard
straight from the safetensors files (``dlc.models.tensor_parallel``), then sets up its all-reduce backend
(``tp_all_reduce``, carried to every rank: ``dlc.models.all_reduce.setup``, which allocates and rendezvouses
the symmetric buffer at the same point on every rank, before any capture or compile); the rank's runner holds
its all-reduce and two-micro-batch forward (``collectives.ShardCollectives``)."""
from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("dlc.tp")
TIMEOUT_S, START_TIMEOUT_S = 60.0, 1800.0      # defaults of DLC_TP_TIMEOUT_S (every collective while serving)
                                               # and DLC_TP_START_TIMEOUT_S (joining and loading, all ranks)


def _seconds(name: str, default: float) -> timedelta:
    return timedelta(seconds=float(os.environ.get(name, default)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world) when launched by torchrun, else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def _device(device: str, rank: int) -> str:
    if torch.device(device).type != "cuda":
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", rank))
    if local >= torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size needs a GPU per rank; rank {rank} has none "
                         f"({torch.cuda.device_count()} visible)")
    torch.cuda.set_device(local)
    return f"cuda:{local}"


def _init(rank: int, world: int, device: str, init_method: str | None):
    """Join the group -> (model group, control group, startup group). Joining and loading may take long (a
    large checkpoint, ranks loading at different speeds): the rendezvous and the startup barrier get
    DLC_TP_START_TIMEOUT_S; the model's collectives and the control messages DLC_TP_TIMEOUT_S."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    start, step = _seconds("DLC_TP_START_TIMEOUT_S", START_TIMEOUT_S), _seconds("DLC_TP_TIMEOUT_S", TIMEOUT_S)
    dist.init_process_group(backend, init_method=init_method or "env://", rank=rank, world_size=world,
                            timeout=start)
    model = dist.new_group(backend=backend, timeout=step)
    control = dist.new_group(backend="gloo", timeout=step)              # host-side messages, any backend
    startup = dist.new_group(backend="gloo", timeout=start)
    return model, control, startup


def load_shard(model: str, weights, dtype, device: str, rank: int, world: int, group, progress: bool,
               all_reduce: str = "nccl", overlap_tokens: int | None = None):
    """(ShardRunner, LoadedModel) of this rank: its slices only, read from the checkpoint files, every
    parallel layer built holding the rank's one all-reduce; then that all-reduce's backend (``all_reduce``:
    dlc.models.all_reduce.setup, collective when it allocates the symmetric buffer: every rank does it here,
    after loading, before any capture or compile) and the two-micro-batch forward (``overlap_tokens``:
    dlc.models.overlap's threshold, None its default, 0 off), both held by the runner's ``ShardCollectives``
    (collectives.py), not by the model."""
    from dlc.models import all_reduce as ar
    from dlc.models import overlap
    from dlc.models.loading import load_model
    from dlc.models.tensor_parallel import shard_config, shard_modules_

    from .collectives import ShardCollectives
    from .shard_runner import ShardRunner

    reduce = ar.AllReduce(group)
    lm = load_model(model, weights=weights, dtype=dtype, device=device, progress=progress and rank == 0,
                    shard=lambda m, full: shard_modules_(m, rank, world, reduce, full),
                    desc=f"loading weights (rank 0 of {world})")
    ar.setup(reduce, all_reduce, device, next(lm.model.parameters()).dtype, lm.config.d_model)
    tokens = overlap.MIN_TOKENS if overlap_tokens is None else overlap_tokens
    col = ShardCollectives(reduce, overlap.for_shard(lm.model, reduce, tokens))
    return ShardRunner(lm.model, shard_config(lm.config, world), rank, world, group, col), lm


def _make_pool(shard):
    from ..kv_cache import KVCacheManager

    def make(n_slots: int, s_max: int, head_scores: bool):
        return KVCacheManager(shard.config, s_max, 1 << 62, shard.dtype, shard.device, max_slots=n_slots,
                              head_scores=head_scores)
    return make


def worker_main(rank: int, world: int, init_method: str | None, model: str, weights, dtype,
                device: str, all_reduce: str = "nccl", overlap_tokens: int | None = None) -> None:
    """A worker rank: join, load the shard, run forwards until rank 0 says stop (or is gone)."""
    from .channel import Channel
    from .runner import worker_loop

    logging.basicConfig(level=logging.WARNING, format=f"rank {rank}: %(message)s")
    if init_method is not None:                                # spawned by rank 0: rank 0 owns its lifetime,
        try:                                                   # so signals to the command's process group
            os.setsid()                                        # (Ctrl-C, a supervisor) reach rank 0 only and
        except OSError:                                        # it drains, then stops the workers
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        dev = _device(device, rank)
        if dev == "cpu":                                       # ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        group, control, startup = _init(rank, world, dev, init_method)
        shard, _ = load_shard(model, weights, dtype, dev, rank, world, group, progress=False,
                              all_reduce=all_reduce, overlap_tokens=overlap_tokens)
        dist.barrier(group=startup)                            # every rank loaded: serving timeouts from now
        worker_loop(shard, Channel(control, group), _make_pool(shard))
    except Exception as e:                                     # noqa: BLE001 - rank 0 reports the group down
        print(f"dlc tensor-parallel rank {rank}: stopping: {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        os._exit(1)
    try:
        dist.destroy_process_group()
    except Exception:                                          # noqa: BLE001
        pass


def open_tp_model(model: str, world: int, weights=None, dtype=None, device: str = "cpu",
                  progress: bool = True, all_reduce: str = "nccl", overlap_tokens: int | None = None):
    """A Session whose runner drives a tensor-parallel group of ``world`` ranks (this process is rank 0);
    ``all_reduce``: the ranks' all-reduce backend (``tp_all_reduce``: auto, nccl, symm); ``overlap_tokens``:
    the ranks' two-micro-batch threshold (``tp_overlap_tokens``, dlc.models.overlap; None: its default)."""
    from dlc.models.all_reduce import for_new_group, refuse_symm
    from dlc.models.overlap import check_min_tokens

    from ..session import Session
    from .channel import Channel
    from .runner import RankFailure, TensorParallelRunner, _first_line, _is_comm_error

    _check_layout(model, weights, world)
    refuse_symm(all_reduce, torch.device(device).type)      # before any process starts
    if overlap_tokens is not None:
        check_min_tokens(overlap_tokens)
    all_reduce = for_new_group(all_reduce)                  # every rank takes rank 0's choice
    if dist.is_initialized():
        raise ValueError("tensor_parallel_size: this process already belongs to a torch.distributed group")
    procs, init_method = [], None
    launched = torchrun_rank()
    if launched is not None:
        rank, n = launched
        if n != world:
            raise ValueError(f"tensor_parallel_size {world} but torchrun started {n} ranks (WORLD_SIZE)")
        if rank != 0:                                          # a torchrun worker never returns
            worker_main(rank, world, None, model, weights, dtype, device, all_reduce, overlap_tokens)
            sys.exit(0)
    else:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        ctx = torch.multiprocessing.get_context("spawn")
        for r in range(1, world):
            args = (r, world, init_method, model, weights, dtype, device, all_reduce, overlap_tokens)
            p = ctx.Process(target=worker_main, args=args,
                            name=f"dlc-tp-rank{r}", daemon=True)
            p.start()
            procs.append(p)
    started = threading.Event()
    threading.Thread(target=_watch_startup, args=(procs, started), daemon=True).start()
    try:
        dev = _device(device, 0)
        group, control, startup = _init(0, world, dev, init_method)
        shard, lm = load_shard(model, weights, dtype, dev, 0, world, group, progress, all_reduce,
                               overlap_tokens)
        dist.barrier(group=startup)
    except Exception as e:
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and _is_comm_error(e)):
            # a dead worker: the watchdog names it and exits
            time.sleep(0.5)
            e = RankFailure(f"tensor-parallel startup failed: {_first_line(e)}")
        for p in procs:
            p.terminate()
        if dist.is_initialized():                          # this process can open a group again
            dist.destroy_process_group()
        raise e from None
    finally:
        started.set()
    runner = TensorParallelRunner(shard, Channel(control, group), procs)
    atexit.register(runner.close)
    pids = ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(procs, 1)) or "launched by torchrun"
    how = f", {shard.collectives.reduce.describe()}"
    print(f"dlc: tensor parallel over {world} ranks ({dist.get_backend(group)}{how}; {pids})",
          file=sys.stderr)
    return Session(runner, lm.tokenizer, shard.config, lm.chat, lm.source, kind=f"eager-tp{world}")


def _watch_startup(procs, started: threading.Event) -> None:
    """A worker that dies while the group forms (its own error line is already on stderr) would leave rank 0
    waiting in the rendezvous for DLC_TP_START_TIMEOUT_S: end the command at once instead."""
    while not started.wait(0.2):
        dead = [(r, p) for r, p in enumerate(procs, 1) if p.exitcode is not None]
        if dead and not started.is_set():
            r, p = dead[0]
            print(f"dlc: tensor-parallel rank {r} (pid {p.pid}) exited during startup (exit code "
                  f"{p.exitcode})",
                  file=sys.stderr, flush=True)
            for q in procs:
                q.terminate()
            os._exit(1)


def _check_layout(model: str, weights, world: int) -> None:
    """Refuse a size the model cannot split before any process starts (one line naming the numbers)."""
    from dlc.models import build_model
    from dlc.models.loading import read_config, resolve_checkpoint_dir
    from dlc.models.presets import preset_config
    from dlc.models.tensor_parallel import check_layout

    path = resolve_checkpoint_dir(model, weights)
    c = preset_config(model) if path is None else read_config(path)
    with torch.device("meta"):                                 # no weights: the module tree only
        check_layout(build_model(c), world)
