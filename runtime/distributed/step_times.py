"""Where a synchronous tensor-parallel step spends its host time, per rank (issue 16).

Cheap sums, no logging per step: rank 0's ``TensorParallelRunner.loop`` and each worker's loop dict add a few
``perf_counter`` / ``monotonic_ns`` differences per step; the channel (rank 0: ``encode_s``, ``send_s``) and
the rank's ``ShardGraphRunner.stats`` (``stage_s``, ``launch_s``) hold the rest.
``TensorParallelRunner.step_times`` gathers one ``report`` per rank (a ``STATS`` control message) as
per-step means in microseconds:

| key | rank 0 | worker |
|---|---|---|
| ``encode_us`` | the batch -> compact frame (the fed ids' device->host copy included) | - |
| ``send_us`` | the frame's gloo broadcast call | - |
| ``latency_us`` | - | rank 0's broadcast start -> the frame on the worker (one host clock) |
| ``rebuild_us`` | - | arrival -> staging starts (frame parsed; a StepBatch rebuilt on the batch path) |
| ``stage_us`` | graph inputs staged (``GraphRunner._stage`` or the frame path) | same |
| ``launch_us`` | the replay call (without capture: the whole CPU forward) | same |
| ``wait_us`` | after the launch until rank 0 holds (x0, conf) (``_settled`` and the copies) | - |
| ``to_launch_us`` | ``_run`` entered -> the replay launched | rank 0's broadcast -> the replay launched |
|  | (means over the steps that replayed) |  |
| ``gpu_us`` | device time of the replay (CUDA events, ``gpu_timing``) | same |

Not per step: ``compiled`` (the rank's blocks run under torch.compile), ``compiled_graphs`` (Dynamo's
count of graphs compiled in the rank's process), ``all_reduce`` (the rank's backend, its one-shot cap in
bytes and the op's one-shot / NCCL choices so far: ``dlc.models.all_reduce.AllReduce.report``) and
``overlap`` (the two-micro-batch threshold and forwards split), both from the rank's ``ShardCollectives``.

A step's critical path before the GPUs overlap is the later of rank 0's and the worker's ``to_launch_us``
(the worker's counts from rank 0's broadcast, rank 0's from before its encode: add rank 0's ``encode_us``)."""
from __future__ import annotations

import time

LOOP_KEYS = ("steps", "launches", "latency_s", "rebuild_s", "to_launch_s", "wait_s")   # launches: replays
SHARD_KEYS = ("stage_s", "launch_s", "frame_replays")


def new_loop() -> dict:
    return {k: 0.0 if k.endswith("_s") else 0 for k in LOOP_KEYS}


def now_ns() -> int:
    return time.monotonic_ns()


def report(rank: int, loop: dict, shard, channel=None, reset: bool = False) -> dict:
    """This rank's per-step means (microseconds) since the last reset; ``reset`` starts the sums again."""
    n = max(loop["steps"], 1)
    out = {"rank": rank, "steps": loop["steps"]}
    sums = {k: v for k, v in loop.items() if k.endswith("_s")}
    stats = getattr(shard, "stats", None) or {}
    sums.update({k: stats.get(k, 0.0) for k in SHARD_KEYS if k.endswith("_s")})
    out["frame_replays"] = stats.get("frame_replays", 0)
    out["compiled"] = bool(getattr(shard, "compiled", False))
    out["compiled_graphs"] = compiled_graphs() if out["compiled"] else 0
    out.update(shard.collectives.report(reset))               # all_reduce, overlap (collectives.py)
    if channel is not None:
        sums.update(encode_s=channel.stats["encode_s"], send_s=channel.stats["send_s"])
    if getattr(shard, "gpu_timing", False):
        gpu, k = shard.gpu_s(reset)
        out["gpu_us"] = gpu / max(k, 1) * 1e6
    out.update({k[:-2] + "_us": v / n * 1e6 for k, v in sums.items()})
    out["to_launch_us"] = loop["to_launch_s"] / max(loop["launches"], 1) * 1e6     # per replayed step
    if reset:
        loop.update(new_loop())
        for k in SHARD_KEYS:
            if k in stats:
                stats[k] = type(stats[k])(0)
        if channel is not None:
            channel.stats.update(encode_s=0.0, send_s=0.0, frames=0)
    return out


def compiled_graphs() -> int:
    """Graphs Dynamo compiled in this process so far (the rank's compiled blocks: every static / dynamic
    entry of each kind of forward)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


COLUMNS = ("encode_us", "send_us", "latency_us", "rebuild_us", "stage_us", "launch_us", "wait_us",
           "to_launch_us", "gpu_us")


def table(reports: list[dict], title: str = "") -> str:
    """One markdown row per rank: the phases' per-step means (us); '-' where a rank has no such phase."""
    head = f"| {title or 'rank'} | steps | frame replays | " + " | ".join(c[:-3] for c in COLUMNS) + " |"
    rows = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for r in reports:
        cells = [f"{r[c]:.0f}" if r.get(c) is not None and (r[c] or c in ("stage_us", "launch_us")) else "-"
                 for c in COLUMNS]
        lead = f"| {r['rank']} | {r['steps']} | {r.get('frame_replays', 0)} | "
        rows.append(lead + " | ".join(cells) + " |")
    return "\n".join(rows)
