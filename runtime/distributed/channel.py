"""Rank 0 -> workers: one message per runner call over a gloo group (CPU tensors, even when the model's own
collectives run on NCCL), with bounded timeouts.

A message is a header [kind, n_bytes] then the pickled payload as a uint8 tensor, both broadcast from rank 0:
``STEP`` carries a ``StepBatch`` as host tensors (``pack_batch``: everything but the KV pool view, replaced by
the pool's shape and the batch's slots, so each worker indexes its own pool of its heads), ``PING`` keeps an
idle group alive (rank 0 pings while idle, so a worker waiting longer than the timeout knows rank 0 is gone),
``STOP`` ends the workers."""
from __future__ import annotations

import dataclasses
import pickle

import torch
import torch.distributed as dist

from ..step import StepBatch

PING, STEP, STOP = 0, 1, 2


class Channel:
    def __init__(self, group):
        self.group = group

    def send(self, kind: int, payload: object = None) -> None:
        data = b"" if payload is None else pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        dist.broadcast(torch.tensor([kind, len(data)], dtype=torch.int64), 0, group=self.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def recv(self) -> tuple[int, object]:
        head = torch.empty(2, dtype=torch.int64)
        dist.broadcast(head, 0, group=self.group)
        kind, n = int(head[0]), int(head[1])
        if not n:
            return kind, None
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return kind, pickle.loads(buf.numpy().tobytes())


def _host(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def pack_batch(batch: StepBatch) -> dict:
    """The batch as host tensors; the pool view becomes (n_slots, S, head scores?, pool id) + ``slots``."""
    d = {f.name: _host(getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.name != "cache"}
    c = batch.cache
    d["cache"] = None if c is None else (c.k_all.shape[1], c.seq_len, c.scores is not None,
                                         c.k_all.data_ptr())
    return d


def unpack_batch(d: dict, device, pools: dict, make_pool) -> StepBatch:
    """A worker's StepBatch: tensors on its device, the cache a view of its own pool of the same slots
    (``make_pool(n_slots, S, head_scores)`` makes one when rank 0's pool changed)."""
    d = dict(d)
    pool_key = d.pop("cache")
    host = {"lengths", "out_start", "q_start", "slots"}
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) and k not in host else v for k, v in d.items()}
    cache = None
    if pool_key is not None:
        if pools.get("key") != pool_key:
            pools.clear()
            pools["key"], pools["pool"] = pool_key, make_pool(*pool_key[:3])
        cache = pools["pool"].view(kw["slots"])
    return StepBatch(cache=cache, **kw)
