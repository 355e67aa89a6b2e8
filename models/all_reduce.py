"""The all-reduce of tensor parallelism: how one rank's partial sums become the group's sum (issue 16).

The row-parallel linears and the vocab-parallel embedding (``dlc.models.tensor_parallel``) call their
``AllReduce`` (``layer.reduce``); one object per process group, made before loading and given to every layer
of the rank as it is built (``shard_modules_``), configured once loaded (``setup``) and owned by the rank's
``ShardCollectives`` (runtime/distributed/collectives.py: switches, reports and releases go through it,
never by searching the model). Backends (``tp_all_reduce``, ``--tp-all-reduce``):

* ``nccl``: ``dist.all_reduce`` (NCCL on CUDA, gloo on CPU); Dynamo traces it into the functional
  ``_c10d_functional.all_reduce_`` inside compiled blocks.
* ``symm``: symmetric memory's one-shot all-reduce (``torch.ops.symm_mem.one_shot_all_reduce_copy_out``: each
  rank copies its partial sums into its persistent symmetric buffer, the ranks meet at a signal-pad barrier,
  and each rank reads every peer's buffer over NVLink P2P and sums; no multicast, no NCCL kernel). Every
  message up to the buffer goes one-shot, larger ones (long Refresh batches) through NCCL. The buffer is sized
  for the largest captured Reuse step at the serving defaults (``SYMM_ROWS`` tokens x d_model).
* ``auto`` (opt-in; ``nccl`` is the default, see runtime.config): one-shot where it beats NCCL, i.e. on CUDA
  where this PyTorch has the op, the GPUs reach each other P2P and the dtype is bf16 / fp32, for messages
  of at most ``ONE_SHOT_MAX_BYTES[world]``; everything else (CPU: gloo) as ``nccl``.
* the copy engines (``symm`` and ``auto`` at world 2, messages of at least ``CE_MIN_BYTES``, up to the
  receive buffer): each rank's partial sums are copied by the GPU's copy engine straight into the peer's
  symmetric receive buffer (a peer memcpy over NVLink: no SM moves the bytes), the ranks meet at a
  signal-pad barrier, each adds the received partial to its own (one kernel; a + b is the same bits on both
  ranks and as NCCL's), and a second barrier frees the buffer for the next message. On 2 x H200 an 8 MiB
  sum took 46 us this way against NCCL's 58 and one-shot's 63, 32 layers' projections with their sums 13.5
  vs 14.4 ms (bench/probes/ce_allreduce.py); below ~4 MiB the barriers' fixed cost loses to one-shot.
  ``issue`` runs it on a side stream (the two-micro-batch forward's sums then overlap the other half's
  compute without taking its SMs); ``wait`` joins that message's event.

Why those thresholds: one-shot costs one kernel and one barrier, but each rank reads (world - 1) x the
message from its peers, where NCCL's ring moves 2 (world - 1) / world x in more steps. At world 2 the volumes
are equal and one-shot stays ahead: bench/probes/nccl_allreduce.py measured 8 us vs NCCL's 14 us per call in
a CUDA graph at 256 KiB and 53 vs 57 us at 8 MiB on 2 x H200
(bench/logs/nccl_allreduce_h200x2_2026-11-28.log), so world 2 takes one-shot up to 8 MiB (the largest
size measured; vLLM's custom all-reduce also runs one-shot at world 2 up to its 8 MiB cap): a B=32 x 32-token
Reuse step of LLaDA-8B in bf16 is exactly 8 MiB, a B=64 one 16 MiB (NCCL).
At world 4 / 8 the read volume grows 3x / 7x: 512 KiB / 256 KiB, the crossovers vLLM's custom all-reduce
uses for its one-stage kernel. Other world sizes: NCCL.

Compiled blocks and CUDA graphs: the symmetric path is one ``torch.library.custom_op``
(``dlc::tp_all_reduce_``, mutating its input, with a fake impl), so Dynamo / Inductor keep it as one extern
call whatever the shapes (the choice one-shot / NCCL is made inside, from the message's bytes, without
guards on the symbolic batch size), and a CUDA graph captures the kernel it launches. The buffer is
allocated and rendezvoused once per rank (``setup``) right after loading, before any capture or compile,
collectively and in the same order on every rank; captured graphs read it at a fixed address. NVLink
multicast (``multimem_*``) is never used, and the buffer is allocated without multicast objects
(``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` unless set otherwise)."""
from __future__ import annotations

import importlib
import os
import warnings
import weakref
from contextlib import contextmanager

import torch

BACKENDS = ("auto", "nccl", "symm")      # runtime.config.TP_ALL_REDUCE: the CLI's choices (nccl: default)
FIELD = "tp_all_reduce"
ONE_SHOT_MAX_BYTES = {2: 8 << 20, 4: 512 << 10, 8: 256 << 10}   # auto: one-shot up to this (module doc)
SYMM_ROWS = 64 * 128          # symm's buffer: tokens of the largest captured Reuse step (B 64 x 128 fed)
SYMM_DTYPES = (torch.bfloat16, torch.float32)                    # the one-shot kernel's dtypes
ALIGN = 16                    # the kernel's 16-byte vectors: offsets and sizes must keep them
CE_MIN_BYTES = {2: 4 << 20}   # copy-engine sums from this size (world 2; bench/probes/ce_allreduce.py)
CE_MIN_ENV = "DLC_TP_CE_MIN_BYTES"    # overrides it (tests force tiny models' messages through the engines)

# group name -> its AllReduce (the custom op's real impl finds it there: an op takes strings, not objects);
# weak: it lives as long as the shard whose layers and collectives hold it
_REDUCERS: "weakref.WeakValueDictionary[str, AllReduce]" = weakref.WeakValueDictionary()
# whether this process has rendezvoused a symmetric buffer (``symmetric_buffer``): a second TP group of the
# same process hung in PyTorch's ``rendezvous`` on 2 x H200 (torch 2.11; bench/RESULTS.md), so a later group
# of this process takes NCCL (``for_new_group``)
_RENDEZVOUSED = False


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{FIELD} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def symm_missing(device_type: str) -> str | None:
    """Why symmetric memory's one-shot all-reduce cannot run here (None: it can)."""
    if device_type != "cuda":
        return f"it needs CUDA GPUs and this run is on {device_type} (gloo)"
    if not torch.cuda.is_available():
        return "CUDA is not available here"
    try:                              # not `import torch.distributed...`: that would make torch a local name
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError:
        return f"this PyTorch ({torch.__version__}) has no torch.distributed._symmetric_memory"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
        return f"this PyTorch ({torch.__version__}) has no symm_mem.one_shot_all_reduce_out"
    return None


def refuse_symm(backend: str, device_type: str) -> None:
    """``symm`` where it cannot run: one line naming the field (before any process starts)."""
    why = symm_missing(device_type) if check_backend(backend) == "symm" else None
    if why:
        raise ValueError(f"{FIELD} symm: {why}; use {FIELD} auto or nccl")


def for_new_group(backend: str) -> str:
    """The backend a new TP group started by this process takes (rank 0 decides before any worker starts
    and hands it to every rank): as asked, except in a process that already rendezvoused symmetric memory
    for an earlier group. There ``symm_mem.rendezvous`` of the second group hung on 2 x H200 (torch 2.11: a
    faulthandler dump of rank 0 stopped in it, the fresh worker waiting), even with the first group's buffer
    freed before it left; so ``auto`` takes NCCL (a warning) and ``symm`` is refused, naming the field.
    ``dlc serve`` / ``generate`` start one group per process and never meet this; tests and benches that
    open several groups in one process do."""
    check_backend(backend)
    if not _RENDEZVOUSED or backend == "nccl":
        return backend
    why = "this process already set up symmetric memory for an earlier tensor-parallel group"
    if backend == "symm":
        raise ValueError(f"{FIELD} symm: {why} (a second rendezvous in one process hangs); start the group "
                         f"in a new process or use {FIELD} nccl")
    warnings.warn(f"{FIELD} auto: {why}; this group uses NCCL", stacklevel=2)
    return "nccl"


def p2p_ok(world: int) -> bool:
    """Every pair of the group's GPUs (devices 0 .. world-1 of this host, one per rank) reaches the other
    P2P: the same answer on every rank, so every rank takes the same backend."""
    n = min(world, torch.cuda.device_count())
    return n == world and all(torch.cuda.can_device_access_peer(a, b)
                              for a in range(n) for b in range(n) if a != b)


def one_shot_limit(backend: str, device_type: str, world: int, dtype: torch.dtype, p2p: bool = True) -> int:
    """Largest message (bytes) that goes one-shot; 0: every all-reduce through NCCL / gloo. ``symm`` where it
    cannot run is refused (ValueError naming the field)."""
    check_backend(backend)
    if backend == "nccl" or world < 2:
        return 0
    if backend == "auto":
        if symm_missing(device_type) or dtype not in SYMM_DTYPES or not p2p:
            return 0
        return ONE_SHOT_MAX_BYTES.get(world, 0)
    refuse_symm(backend, device_type)
    if dtype not in SYMM_DTYPES:
        raise ValueError(f"{FIELD} symm: the one-shot kernel sums bf16 or fp32, the model is {dtype}; "
                         f"use {FIELD} auto or nccl")
    if not p2p:
        raise ValueError(f"{FIELD} symm: the GPUs of the group cannot reach each other peer to peer; "
                         f"use {FIELD} nccl")
    return 1 << 62                                # up to the buffer (``buffer_bytes``)


def buffer_bytes(limit: int, d_model: int, itemsize: int) -> int:
    """The symmetric buffer: the largest message that uses it (a captured step of ``SYMM_ROWS`` tokens),
    capped by ``limit``; a multiple of ``ALIGN``."""
    n = min(limit, SYMM_ROWS * d_model * itemsize)
    return n - n % ALIGN


def takes_one_shot(nbytes: int, offset_bytes: int, contiguous: bool, dtype: torch.dtype, limit: int) -> bool:
    """One message's path: one-shot when it fits ``limit`` (the byte threshold, already capped by the buffer)
    and the kernel's layout rules hold (contiguous, 16-byte aligned start and size, bf16 / fp32); else
    NCCL."""
    return (0 < nbytes <= limit and contiguous and dtype in SYMM_DTYPES
            and nbytes % ALIGN == 0 and offset_bytes % ALIGN == 0)


def ce_min_bytes(world: int) -> int:
    """Smallest message the copy engines sum at this world size (0: never): ``CE_MIN_BYTES``, or the
    ``DLC_TP_CE_MIN_BYTES`` environment variable where set (read when a group is set up)."""
    env = os.environ.get(CE_MIN_ENV)
    if world != 2:
        return 0
    return max(1, int(env)) if env else CE_MIN_BYTES[2]


def takes_copy_engine(nbytes: int, offset_bytes: int, contiguous: bool, least: int, most: int) -> bool:
    """Whether one message goes through the copy engines: within [``least``, ``most``] bytes (``least`` 0:
    never) and contiguous, 16-byte aligned start and size (the receive buffer's views keep the layout)."""
    return (least > 0 and least <= nbytes <= most and contiguous and nbytes % ALIGN == 0
            and offset_bytes % ALIGN == 0)


class CopyEngineSum:
    """World 2's copy-engine sum (module doc): this rank's symmetric receive buffer ``recv`` (flat bytes),
    the peer's one as this process maps it (``peer_recv``), the rendezvous handle whose signal pads the
    barriers use, and the side stream ``issue`` runs on with one event per message in flight."""

    def __init__(self, recv: torch.Tensor, handle, least: int):
        self.recv, self.handle, self.least = recv, handle, least
        self.peer_recv = handle.get_buffer(1 - handle.rank, (recv.numel(),), torch.uint8)
        self.stream = None
        self.events: dict[int, object] = {}      # data_ptr of a message issued -> its event on the stream

    def takes(self, x: torch.Tensor) -> bool:
        return x.is_cuda and takes_copy_engine(x.numel() * x.element_size(),
                                               x.storage_offset() * x.element_size(), x.is_contiguous(),
                                               self.least, self.recv.numel())

    def run(self, x: torch.Tensor) -> None:
        """x summed over the pair in place, on the current stream (after any sum still in flight on the side
        stream: both use the one receive buffer and its signal pads)."""
        if self.events:
            torch.cuda.current_stream(x.device).wait_stream(self.stream)
        n = x.numel() * x.element_size()
        self.peer_recv[:n].view(x.dtype).view(x.shape).copy_(x)     # a peer memcpy: the copy engine
        self.handle.barrier(0)                                       # both partials have landed
        x.add_(self.recv[:n].view(x.dtype).view(x.shape))
        self.handle.barrier(1)                                       # both read: the buffers are free

    def issue(self, x: torch.Tensor) -> None:
        """``run`` on the side stream after what the current stream queued so far; ``wait`` joins it."""
        cur = torch.cuda.current_stream(x.device)
        if self.stream is None:
            self.stream = torch.cuda.Stream(x.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            self.run(x)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.events[x.data_ptr()] = ev

    def wait(self, x: torch.Tensor) -> None:
        ev = self.events.pop(x.data_ptr(), None)
        if ev is not None:
            torch.cuda.current_stream(x.device).wait_event(ev)


class AllReduce:
    """Sums a tensor over ``group`` in place and returns it. ``limit`` 0 and no buffer: ``dist.all_reduce``
    (traced by Dynamo as a functional collective); else the custom op, which sends each message one-shot
    through the symmetric ``buffer`` or through NCCL (``takes_one_shot``). ``calls`` counts the op's
    choices (host side: eager calls and captures, not graph replays)."""

    def __init__(self, group=None, backend: str = "nccl", limit: int = 0, buffer: torch.Tensor | None = None):
        self.group, self.backend, self.limit, self.buffer = group, backend, limit, buffer
        self.op = group is not None and buffer is not None      # a plain flag: Dynamo guards on it, no tensor
        self.group_name = group.group_name if self.op else ""
        self.pg_name = group.group_name if group is not None else ""     # the functional collectives' name
        self.calls = {"one_shot": 0, "nccl": 0, "copy_engine": 0}
        self.defer = False            # the caller sums (``deferred``): layers return their partial sums
        self.ce: CopyEngineSum | None = None       # world 2's copy-engine sums (``setup``), None: none

    def configure(self, backend: str, limit: int, buffer: torch.Tensor | None) -> None:
        """Take the backend ``setup`` chose, in place: the layers built with this object (``shard_modules_``)
        sum with it from now on. Once, after loading, before any compile or capture (Dynamo guards on
        ``op``)."""
        self.backend, self.limit, self.buffer = check_backend(backend), limit, buffer
        self.op = self.group is not None and buffer is not None
        self.group_name = self.group.group_name if self.op else ""

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        if self.group is None or self.defer:
            return y
        if not self.op:
            import torch.distributed as dist
            dist.all_reduce(y, group=self.group)
            return y
        torch.ops.dlc.tp_all_reduce_(y, self.group_name)
        return y

    @contextmanager
    def deferred(self):
        """While inside, every layer holding this all-reduce returns its rank's partial sum unsummed: the
        caller issues the sums itself (``issue`` / ``wait``: the two-micro-batch forward, models/overlap.py,
        which overlaps one half's sums with the other half's compute). A plain flag that Dynamo guards on."""
        self.defer = True
        try:
            yield
        finally:
            self.defer = False

    def issue(self, y: torch.Tensor) -> torch.Tensor:
        """Start summing ``y`` over the group and return the tensor the sum lands in, valid after ``wait``.
        NCCL / gloo: the functional all-reduce (on its own stream; ``wait`` makes the compute stream wait
        for it where the sum is used, in eager code and in Inductor's, captured graphs included). The
        one-shot op (``symm``) runs on the compute stream: summed at once, ``wait`` is a no-op."""
        if self.op:
            torch.ops.dlc.tp_all_reduce_issue_(y, self.group_name)
            return y
        return torch.ops._c10d_functional.all_reduce(y, "sum", self.pg_name)

    def wait(self, t: torch.Tensor) -> torch.Tensor:
        """The sum ``issue`` started, ready to use (the op's copy-engine sums: their event joined)."""
        if self.op:
            torch.ops.dlc.tp_all_reduce_wait_(t, self.group_name)
            return t
        return torch.ops._c10d_functional.wait_tensor(t)

    def _ce_on(self) -> bool:
        """Whether the copy engines sum this group's large messages now (set up, and not under ``nccl``)."""
        return self.ce is not None and self.backend != "nccl"

    def _ce_takes(self, x: torch.Tensor) -> bool:
        return self._ce_on() and self.ce.takes(x)

    def run(self, x: torch.Tensor, issue: bool = False) -> None:
        """The op's real work on one message (outside any trace); ``issue``: a copy-engine sum goes on the
        side stream (``wait`` joins it), every other path sums at once."""
        if self._ce_takes(x):
            (self.ce.issue if issue else self.ce.run)(x)
            self.calls["copy_engine"] += 1
            return
        n = x.numel() * x.element_size()
        if takes_one_shot(n, x.storage_offset() * x.element_size(), x.is_contiguous(), x.dtype, self.limit):
            view = self.buffer[:n].view(x.dtype).view(x.shape)               # this rank's symmetric slot
            ops = torch.ops.symm_mem
            if hasattr(ops, "one_shot_all_reduce_copy_out"):
                # copy in, barrier, read and sum every peer's slot into x, one kernel (each thread reads its
                # elements of x before the barrier and writes the same ones after it: out may be the input)
                ops.one_shot_all_reduce_copy_out(view, x, "sum", self.group_name, x)
            else:                                           # torch before the fused copy: one more kernel
                view.copy_(x)
                ops.one_shot_all_reduce_out(view, "sum", self.group_name, x)
            self.calls["one_shot"] += 1
            return
        import torch.distributed as dist
        if x.is_contiguous():
            dist.all_reduce(x, group=self.group)
        else:                                               # a strided view from compiled code
            c = x.contiguous()
            dist.all_reduce(c, group=self.group)
            x.copy_(c)
        self.calls["nccl"] += 1

    def release(self) -> None:
        """Free the symmetric buffer now and send every later message through NCCL (a closing rank, before
        it leaves the group: ``shard_graph.release_before_leaving``). Left to garbage collection (the
        ``_REDUCERS`` entry is weak), the buffer went whenever its model did, possibly after the group was
        destroyed and while the next group of the process set up."""
        if self.buffer is None:
            return
        if self.buffer.is_cuda:
            torch.cuda.synchronize(self.buffer.device)       # no replay or kernel still reads a peer's slot
        _REDUCERS.pop(self.group_name, None)
        self.buffer, self.limit, self.op, self.group_name, self.ce = None, 0, False, "", None

    def check_switch(self, backend: str) -> bool:
        """Whether ``switch`` can take this all-reduce to ``backend`` (False: nothing to switch, one device);
        else ValueError naming the field (rank 0 asks before any rank switches)."""
        check_backend(backend)
        if self.group is None:
            return False
        if backend == "symm" and self.buffer is None:      # auto without a buffer: NCCL / gloo, as at setup
            raise ValueError(f"{FIELD} symm: this group started with {self.backend} (no symmetric buffer); "
                             f"start it with {FIELD} symm")
        return True

    def switch(self, backend: str) -> None:
        """Change the backend of a running rank (benches: each backend over the same group and weights):
        within what ``setup`` allocated (``nccl`` sends every message through NCCL, inside the op where a
        buffer exists; ``symm`` needs the buffer, ``auto`` without one is NCCL / gloo). Captured graphs keep
        the path they captured: recapture after."""
        if not self.check_switch(backend):
            return
        cap = 0 if self.buffer is None else self.buffer.numel()
        self.backend, self.calls = backend, {"one_shot": 0, "nccl": 0, "copy_engine": 0}
        auto = min(ONE_SHOT_MAX_BYTES.get(self.group.size(), 0), cap)
        self.limit = {"nccl": 0, "symm": cap, "auto": auto}[backend]

    def max_bytes(self) -> int:
        """Largest message that goes one-shot now (0: none)."""
        return 0 if self.buffer is None else min(self.limit, self.buffer.numel())

    def describe(self) -> str:
        """One line: the backend asked for and what it does on this rank."""
        import torch.distributed as dist
        plain = dist.get_backend(self.group) if self.group is not None else "none"
        if not self.max_bytes():
            return f"all-reduce {self.backend}: {plain}"
        ce = ""
        if self._ce_on():
            ce = (f", copy engines {self.ce.least / 2**20:g}-{self.ce.recv.numel() / 2**20:g} MiB "
                  "(before one-shot)")
        return f"all-reduce {self.backend}: one-shot <= {self.max_bytes() / 2**20:g} MiB{ce}, {plain} above"

    def report(self) -> dict:
        """What ``step_times`` reports per rank: the backend, the one-shot cap, the copy engines' range
        (0: none), the op's choices so far."""
        return {"backend": self.backend, "one_shot_max_bytes": self.max_bytes(),
                "copy_engine_min_bytes": self.ce.least if self._ce_on() else 0, **self.calls}


@torch.library.custom_op("dlc::tp_all_reduce_", mutates_args=("x",))
def _tp_all_reduce_(x: torch.Tensor, group_name: str) -> None:
    _REDUCERS[group_name].run(x)


@_tp_all_reduce_.register_fake
def _(x, group_name):
    return None


@torch.library.custom_op("dlc::tp_all_reduce_issue_", mutates_args=("x",))
def _tp_all_reduce_issue_(x: torch.Tensor, group_name: str) -> None:
    """``AllReduce.issue`` on the op path: a copy-engine sum starts on the side stream, any other sums now."""
    _REDUCERS[group_name].run(x, issue=True)


@_tp_all_reduce_issue_.register_fake
def _(x, group_name):
    return None


@torch.library.custom_op("dlc::tp_all_reduce_wait_", mutates_args=("x",))
def _tp_all_reduce_wait_(x: torch.Tensor, group_name: str) -> None:
    """``AllReduce.wait`` on the op path: the current stream waits for x's copy-engine sum, if it had one
    (mutating x: compiled code reads it only after this)."""
    red = _REDUCERS[group_name]
    if red.ce is not None:
        red.ce.wait(x)


@_tp_all_reduce_wait_.register_fake
def _(x, group_name):
    return None


def setup(reduce: AllReduce, backend: str, device: str, dtype: torch.dtype, d_model: int) -> AllReduce:
    """Configure this rank's all-reduce ``reduce`` (over its group; the one object every parallel layer of
    the shard was built with, ``tensor_parallel.shard_modules_``) for ``backend``, in place, and return it.
    Collective when it allocates the symmetric buffer (every rank calls it at the same point, after loading,
    before any capture or compile); ``symm`` where it cannot run raises ValueError naming the field, on
    every rank alike; ``auto`` whose buffer cannot be set up falls back to NCCL with a warning."""
    import torch.distributed as dist
    group = reduce.group
    world = dist.get_world_size(group)
    dev = torch.device(device).type
    p2p = dev == "cuda" and backend != "nccl" and p2p_ok(world)
    limit = one_shot_limit(backend, dev, world, dtype, p2p)
    buf = None
    if limit:
        nbytes = buffer_bytes(limit, d_model, dtype.itemsize)
        try:
            buf = symmetric_buffer(nbytes, group)
        except Exception as e:                          # noqa: BLE001 - the same failure on every rank
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if backend == "symm":
                raise ValueError(f"{FIELD} symm: the symmetric buffer failed: {why}; use {FIELD} nccl") \
                    from None
            warnings.warn(f"{FIELD} auto: symmetric memory unavailable ({why}); using NCCL", stacklevel=2)
        limit = min(limit, nbytes) if buf is not None else 0
    reduce.configure(backend, limit, buf)
    if buf is not None:
        reduce.ce = copy_engine_sum(group, world, d_model, dtype.itemsize, backend)
        _REDUCERS[reduce.group_name] = reduce
    return reduce


def copy_engine_sum(group, world: int, d_model: int, itemsize: int, backend: str) -> CopyEngineSum | None:
    """World 2's copy-engine sums: a receive buffer for the largest captured Reuse step (``SYMM_ROWS``
    tokens), rendezvoused over ``group`` (collective, right after the one-shot buffer, on every rank alike);
    None at other world sizes or where the buffer fails (a warning: the one-shot / NCCL paths stay)."""
    least = ce_min_bytes(world)
    if not least:
        return None
    nbytes = buffer_bytes(1 << 62, d_model, itemsize)                    # no cap: SYMM_ROWS tokens
    try:
        import torch.distributed._symmetric_memory as symm_mem
        dev = torch.device("cuda", torch.cuda.current_device())
        recv = symm_mem.empty(nbytes, dtype=torch.uint8, device=dev)
        return CopyEngineSum(recv, symm_mem.rendezvous(recv, group.group_name), least)
    except Exception as e:                              # noqa: BLE001 - the same failure on every rank
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        warnings.warn(f"{FIELD} {backend}: copy-engine sums unavailable ({why}); one-shot and NCCL only",
                      stacklevel=2)
        return None


def symmetric_buffer(nbytes: int, group) -> torch.Tensor:
    """``nbytes`` of symmetric memory on this rank's GPU, rendezvoused over ``group`` (collective). The
    one-shot kernel reads peers by P2P pointers only, so PyTorch is told not to create NVLink multicast
    objects for the allocation (``TORCH_SYMM_MEM_DISABLE_MULTICAST``, unless the environment says
    otherwise)."""
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed._symmetric_memory as symm_mem
    buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)        # needed before torch 2.9,
    if enable is not None and not hasattr(enable, "__deprecated__"):     # a deprecated no-op since
        enable(group.group_name)
    global _RENDEZVOUSED
    _RENDEZVOUSED = True                       # set before: a failed rendezvous has touched the state too
    symm_mem.rendezvous(buf, group.group_name)
    return buf
