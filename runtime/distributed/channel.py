"""Rank 0 -> workers: one message per runner call over a gloo group (CPU tensors, even when the model's own
collectives run on NCCL), with bounded timeouts.

Every message starts with one broadcast of a fixed int64 frame (``FRAME`` values, 8 KiB): a header
(``HEAD`` values: kind, form, sizes) and, for a step small enough, its whole payload. Two forms:

* ``COMPACT`` (``STEP`` and ``AHEAD`` of the batches tensor parallelism serves): the header holds the batch's
  scalars (phase, sizes, flags, temperature and guidance as float bits, the pool's key) and the payload,
  int64, only what a worker cannot derive: the fed ids (a Reuse step's fed span only: the model reads nothing
  else; read from ``StepBatch.ids_host`` when the builder kept them, so no device->host copy), the seeds (at
  T > 0 only: zeros otherwise), lengths, out_start, q_start, slots (and run-ahead counts, then the decoding
  core's commit of the run's rules as ``ahead_rules.encode_commit`` words: header slot ``_RULES``
  counts them).
  Positions, key mask, hidden-row
  starts and guidance rows are derived on the worker as ``step.build_batch`` makes them (``decode``). A B=1
  Reuse step is one broadcast, no pickling, one host->device copy on the worker; a payload larger than the
  frame follows in a second broadcast. The decoding rules' per-row tensors (sampling filters, credit,
  smoothing's soft inputs ``embed_delta``) stay on the device: the header flags them and rank 0 broadcasts
  their bytes, one message over the model's group (NCCL on GPUs: device to device), right after the frame
  (``send_rule_tensors`` / ``recv_rule_tensors``); a channel without that group sends such batches pickled.
* ``PICKLED``: the header, then the pickled payload as uint8 (control messages: GRAPHS, BIND, WARMUP; a
  batch carrying tensors the compact form does not hold: ``pack_batch``, everything but the KV pool view,
  replaced by the pool's shape and the batch's slots, so each worker indexes its own pool of its heads).

``PING`` keeps an idle group alive (rank 0 pings while idle, so a worker waiting longer than the timeout knows
rank 0 is gone), ``STOP`` ends the workers, ``STATS`` gathers the workers' step timings (``step_times.py``).

Timing: header slot ``_SENT`` carries rank 0's ``time.monotonic_ns()`` at the broadcast of a step (one clock
on one host: a worker subtracts it from its own clock); ``Channel.stats`` sums rank 0's encode and broadcast
seconds per step, ``Channel.sent_ns`` / ``arrived_ns`` are the last step frame's send and arrival times."""
from __future__ import annotations

import dataclasses
import math
import pickle
import struct
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..step import StepBatch

PING, STEP, STOP, GRAPHS, BIND, WARMUP, AHEAD, STATS, MORE = range(9)   # MORE: steps of the last AHEAD run
NONE, COMPACT, PICKLED = range(3)                       # message forms
HEAD, FRAME = 24, 1024                                  # header values; frame = header + inline payload
PHASES = ("full", "refresh", "reuse")
# header slots
(_KIND, _FORM, _SIZE, _PHASE, _B, _FED, _W, _NOUT, _NFED, _BLOCK, _FLAGS, _LOGPROBS, _TEMP, _CFG,
 _N_AHEAD, _POOL) = range(16)                           # _POOL .. _POOL + 3: n_slots, S, head scores, id
_RULES = _POOL + 4                                      # run ahead: words of the rules' commit (0: none)
_SOFT_TAU, _SOFT_K, _CREDIT_M = _RULES + 1, _RULES + 2, _RULES + 3   # smoothing's tau bits (NaN: off), top k;
                                                        # credit's ids per column (0: no credit)
_SENT = HEAD - 1                                        # rank 0's monotonic clock (ns) at the broadcast
_TEMPERED, _ENTROPY, _CACHE, _REUSE, _FILTERS, _CREDIT, _DELTA, _SOFT = 1, 2, 4, 8, 16, 32, 64, 128
_RULE_FLAGS = _FILTERS | _CREDIT | _DELTA               # rule tensors follow the frame on the model's group
_DELTA_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)   # flags >> 8: embed_delta's
_NAN_BITS = struct.unpack("<q", struct.pack("<d", float("nan")))[0]
# batch fields the compact form does not carry (a batch with any of them set goes pickled)
_PICKLED_ONLY = ("keep_idx",)
# the rules' device tensors, in their broadcast order (``_rule_specs``)
_RULE_FIELDS = {_FILTERS: ("top_k", "top_p", "min_p"), _CREDIT: ("credit_ids", "credit_vals", "credit_alpha"),
                _DELTA: ("embed_delta",)}


class Compact(NamedTuple):
    """A received compact step: the header and the payload (host int64)."""
    head: torch.Tensor
    payload: torch.Tensor


class Channel:
    """``group``: the gloo group of the frames; ``device_group``: the model's group (None: the rules' tensors
    go pickled)."""

    def __init__(self, group, device_group=None):
        self.group, self.device_group = group, device_group
        self._frame = torch.zeros(FRAME, dtype=torch.int64)
        self.stats = {"encode_s": 0.0, "send_s": 0.0, "frames": 0}     # rank 0, step frames (compact form)
        self.sent_ns = self.arrived_ns = 0                             # the last step frame's clocks

    def send(self, kind: int, payload: object = None) -> None:
        """A control message (payload pickled; None: the header alone)."""
        data = b"" if payload is None else pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        f = self._frame
        f[:HEAD] = 0
        f[_KIND], f[_FORM], f[_SIZE] = kind, PICKLED if data else NONE, len(data)
        dist.broadcast(f, 0, group=self.group)
        if data:
            dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, group=self.group)

    def send_batch(self, kind: int, batch: StepBatch, counts: torch.Tensor | None = None,
                   rules: torch.Tensor | None = None) -> Compact | None:
        """A STEP (or AHEAD, with the run-ahead ``counts`` [B, n] and the ``rules`` words of its commit, if
        any) of ``batch``: compact when it can be. Returns the compact step sent (what the workers receive),
        None when it went pickled."""
        t0 = time.perf_counter()
        msg = encode(batch, counts, rules, self.device_group is not None)
        if msg is None:
            self.send(kind, (pack_batch(batch), counts, rules))
            return None
        head, payload = msg
        f, n = self._frame, payload.numel()
        f[:HEAD] = head
        f[_KIND], f[_FORM], f[_SIZE] = kind, COMPACT, n
        inline = n <= FRAME - HEAD
        if inline:
            f[HEAD:HEAD + n] = payload
        t1 = time.perf_counter()
        self.sent_ns = f[_SENT] = time.monotonic_ns()
        dist.broadcast(f, 0, group=self.group)
        if not inline:
            dist.broadcast(payload, 0, group=self.group)
        if int(head[_FLAGS]) & _RULE_FLAGS:
            send_rule_tensors(batch, head.tolist(), self.device_group)
        st = self.stats
        st["encode_s"] += t1 - t0
        st["send_s"] += time.perf_counter() - t1
        st["frames"] += 1
        return Compact(head, payload)

    def recv(self) -> tuple[int, object]:
        """(kind, payload): the unpickled object, a ``Compact`` step, or None."""
        f = torch.empty(FRAME, dtype=torch.int64)
        dist.broadcast(f, 0, group=self.group)
        kind, form, n = int(f[_KIND]), int(f[_FORM]), int(f[_SIZE])
        if form == NONE:
            return kind, None
        if form == COMPACT:
            self.arrived_ns, self.sent_ns = time.monotonic_ns(), int(f[_SENT])
            if n <= FRAME - HEAD:
                return kind, Compact(f[:HEAD], f[HEAD:HEAD + n])
            payload = torch.empty(n, dtype=torch.int64)
            dist.broadcast(payload, 0, group=self.group)
            return kind, Compact(f[:HEAD], payload)
        buf = torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.group)
        return kind, pickle.loads(buf.numpy().tobytes())


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _float(b: int) -> float:
    """The float of header bits (``_bits``): temperature ``h[_TEMP]``, guidance ``h[_CFG]``."""
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def pool_key(pool) -> tuple | None:
    """What names a pool across ranks: (n_slots, S, head scores?, rank 0's storage id), of a
    ``KVCacheManager`` or a batch's ``KVCache`` view of it (k_all [n_layers, n_slots, Hkv, S, D])."""
    if pool is None:
        return None
    return (pool.k_all.shape[1], pool.k_all.shape[3], pool.scores is not None, pool.k_all.data_ptr())


def encode(batch: StepBatch, counts: torch.Tensor | None = None, rules: torch.Tensor | None = None,
           rule_tensors: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(header [HEAD], payload) int64 of a batch, or None when it carries what the compact form does not.
    ``rules``: the words of a run ahead's commit (``ahead_rules.encode_commit``), last in the payload.
    ``rule_tensors``: the decoding rules' tensors may follow the frame (else such a batch goes pickled)."""
    ruled = _rule_flags(batch)
    if any(getattr(batch, f) is not None for f in _PICKLED_ONLY) or (ruled and not rule_tensors):
        return None
    B, fed, W = batch.n_seqs, batch.fed, batch.width
    reuse = batch.phase == "reuse"
    on_host = batch.ids_host is not None                        # the builder's host ids: no device copy
    ids = batch.ids_host if on_host else batch.ids
    if reuse:                                                   # the model reads the fed span only
        q = batch.q_start if on_host else batch.q_start_dev
        ids = ids.gather(1, q[:, None] + torch.arange(batch.n_fed, device=ids.device))   # [fed, T]
    parts = [ids.flatten()]
    if batch.temperature > 0:                                   # seeds are read at T > 0 only
        parts.append(batch.seeds.to(ids.device, torch.int64))
    host = [(torch.cat(parts) if len(parts) > 1 else parts[0]).cpu(), batch.lengths, batch.out_start]
    if reuse:
        host.append(batch.q_start)
    if batch.cache is not None:
        host.append(batch.slots)
    if counts is not None:
        host.append(counts.flatten())
    if rules is not None:
        host.append(rules)
    head = torch.zeros(HEAD, dtype=torch.int64)
    key = pool_key(batch.cache) or (0, 0, 0, 0)
    flags = (_TEMPERED * batch.tempered_conf | _ENTROPY * bool(batch.entropy)
             | _CACHE * (batch.cache is not None) | _REUSE * reuse | ruled)
    head.numpy()[_PHASE:_POOL + 4] = (                          # numpy: no tensor built from a list
        PHASES.index(batch.phase), B, fed, W, batch.n_out, batch.n_fed, batch.block_size, flags,
        -1 if batch.logprobs is None else batch.logprobs, _bits(batch.temperature), _bits(batch.cfg_scale),
        0 if counts is None else counts.shape[1], *(int(v) for v in key))
    head[_RULES] = 0 if rules is None else rules.numel()
    head[_SOFT_TAU] = _NAN_BITS if batch.soft_tau is None else _bits(batch.soft_tau)
    head[_SOFT_K] = batch.soft_top_k
    head[_CREDIT_M] = 0 if batch.credit_ids is None else batch.credit_ids.shape[2]
    return head, torch.cat([t.to(torch.int64).flatten() for t in host])


def _rule_flags(batch: StepBatch) -> int:
    """The header flags of the rules' tensors the batch carries (``_SOFT``: smoothing asked, no tensor)."""
    d = batch.embed_delta
    return ((_FILTERS if batch.top_k is not None else 0) | (_CREDIT if batch.credit_ids is not None else 0)
            | (_DELTA | _DELTA_DTYPES.index(d.dtype) << 8 if d is not None else 0)
            | (_SOFT if batch.soft_tau is not None else 0))


def _rule_specs(h: list, d_model: int) -> list[tuple[str, tuple, torch.dtype]]:
    """(field, shape, dtype) of the rule tensors a compact step's header ``h`` says follow its frame, in
    their broadcast order (``d_model``: embed_delta's width, which only the receiver needs)."""
    B, fed, N, M = h[_B], h[_FED], h[_NOUT], h[_CREDIT_M]
    dtype = _DELTA_DTYPES[h[_FLAGS] >> 8 & 15]
    shapes = {"top_k": ((B,), torch.int64), "top_p": ((B,), torch.float64), "min_p": ((B,), torch.float64),
              "credit_ids": ((B, N, M), torch.int64), "credit_vals": ((B, N, M), torch.float64),
              "credit_alpha": ((B,), torch.float64), "embed_delta": ((fed, N, d_model), dtype)}
    return [(f, *shapes[f]) for flag, fields in _RULE_FIELDS.items() if h[_FLAGS] & flag for f in fields]


def send_rule_tensors(batch: StepBatch, h: list, group) -> None:
    """Rank 0: the rule tensors the frame's header ``h`` flags, as one byte broadcast over the model's group
    (no host copy; the 8-byte fields first, so every view of the receiver's buffer is aligned), each in the
    dtype the receiver reads (``_rule_specs``: a no-op for the batches the decoding core builds)."""
    data = [getattr(batch, f).to(dt).contiguous().view(-1).view(torch.uint8)
            for f, _, dt in _rule_specs(h, 0)]
    dist.broadcast(torch.cat(data) if len(data) > 1 else data[0], 0, group=group)


def recv_rule_tensors(h: list, group, d_model: int, device) -> dict[str, torch.Tensor]:
    """A worker: the rule tensors rank 0's ``send_rule_tensors`` broadcast after the frame of header ``h``,
    as views of one received buffer on ``device``."""
    specs = _rule_specs(h, d_model)
    sizes = [math.prod(shape) * dt.itemsize for _, shape, dt in specs]
    buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    dist.broadcast(buf, 0, group=group)
    return {f: part.view(dt).view(shape) for (f, shape, dt), part in zip(specs, buf.split(sizes))}


def decode(msg: Compact, config, device, group=None,
           rules: dict | None = None) -> tuple[StepBatch, tuple | None, torch.Tensor | None]:
    """A compact step -> (StepBatch without its cache, pool key or None, run-ahead counts [B, n] or None).
    A step with rule tensors receives them over ``group`` (the model's) unless the caller did (``rules``).
    The fields it does not carry are derived as ``step.build_batch`` makes them: positions ``arange(W)``, key
    mask ``arange(W) < length``, hidden-row starts ``out_start - logit_shift`` (twice with guidance), guidance
    rows [0, B) / [B, fed); a Reuse step's ids are its fed span in [fed, W] rows of mask ids."""
    h = msg.head.tolist()
    B, fed, W, N, T, flags = h[_B], h[_FED], h[_W], h[_NOUT], h[_NFED], h[_FLAGS]
    # first: rank 0 broadcast them right after the frame, whatever fails below on this rank
    if rules is None:
        rules = recv_rule_tensors(h, group, config.d_model, device) if flags & _RULE_FLAGS else {}
    reuse, cached = bool(flags & _REUSE), bool(flags & _CACHE)
    ids, seeds, lengths, out_start, q_start, slots, counts = split_payload(h, msg.payload)
    hid = out_start - config.logit_shift
    hid = torch.cat([hid, hid]) if fed != B else hid                                  # [fed]
    ids, seeds_d, len_d, qs_d, hid_d = torch.cat([ids, seeds, lengths, q_start, hid]).to(device).split(
        [ids.numel(), B, fed, q_start.numel(), fed])                                  # one host->device copy
    ar = torch.arange(W, device=device)
    if reuse:
        cols = qs_d[:, None] + torch.arange(T, device=device)                         # [fed, T]
        ids = torch.full((fed, W), config.mask_id, dtype=torch.long, device=device).scatter_(
            1, cols, ids.view(fed, T))
    arange_b = torch.arange(B, device=device)
    batch = StepBatch(
        phase=PHASES[h[_PHASE]], n_seqs=B, ids=ids.view(fed, W), pos=ar.expand(fed, W).contiguous(),
        key_mask=ar[None] < len_d[:, None], lengths=lengths, out_start=out_start, n_out=N, hid_start=hid_d,
        q_start=q_start if reuse else None, q_start_dev=qs_d if reuse else None, n_fed=T, cache=None,
        slots=slots if cached else None, temperature=_float(h[_TEMP]), cfg_scale=_float(h[_CFG]),
        seeds=seeds_d, cond_rows=arange_b, un_rows=arange_b + (fed - B), block_size=h[_BLOCK],
        tempered_conf=bool(flags & _TEMPERED), entropy=bool(flags & _ENTROPY),
        logprobs=None if h[_LOGPROBS] < 0 else h[_LOGPROBS])
    if flags & _SOFT:
        batch.soft_tau, batch.soft_top_k = _float(h[_SOFT_TAU]), h[_SOFT_K]
    for f, t in rules.items():
        setattr(batch, f, t)
    key = (h[_POOL], h[_POOL + 1], bool(h[_POOL + 2]), h[_POOL + 3]) if cached else None
    return batch, key, counts.view(B, -1) if h[_N_AHEAD] else None


def split_payload(h: list, payload: torch.Tensor) -> list[torch.Tensor]:
    """A compact step's payload (header ``h`` as a list) -> [ids, seeds, lengths, out_start, q_start, slots,
    counts] host int64 views (q_start, slots, counts empty when the step has none)."""
    B, fed, W, T, flags = h[_B], h[_FED], h[_W], h[_NFED], h[_FLAGS]
    reuse, cached, sampled = bool(flags & _REUSE), bool(flags & _CACHE), _float(h[_TEMP]) > 0
    parts = list(payload.split([fed * (T if reuse else W), B if sampled else 0, fed, B, fed if reuse else 0,
                                fed if cached else 0, B * h[_N_AHEAD], h[_RULES]]))[:7]   # + commit_words
    if not sampled:                                             # T = 0: the seeds are zeros (not sent)
        parts[1] = torch.zeros(B, dtype=torch.int64)
    return parts


def commit_words(kind_msg) -> torch.Tensor | None:
    """The words of the commit a STEP / AHEAD message carries (either form; ``ahead_rules.decode_commit``
    reads them), None without one."""
    if isinstance(kind_msg, Compact):
        n = int(kind_msg.head[_RULES])
        return kind_msg.payload[kind_msg.payload.numel() - n:] if n else None
    return kind_msg[2] if len(kind_msg) > 2 else None


def frame_key(h: list) -> tuple:
    """What a compact step's header says about its shape and decoding (phase, sizes, flags with the rules'
    tensors and embed_delta's dtype, logprobs, temperature, guidance, run-ahead steps, pool key, smoothing's
    tau and top k): steps with equal keys take the same path through a rank's graph runner
    (``ShardGraphRunner.reuse_frame``; credit's variant is keyed by the decoded width, ``_NOUT``)."""
    return tuple(h[_PHASE:_POOL + 4]) + (h[_SOFT_TAU], h[_SOFT_K])


def frame_reuses(h: list) -> bool:
    """A compact step of the Reuse phase over a cache, one step (not run ahead), that a rank may stage from
    the frame: plain, or with credit (at most ``_NOUT`` ids per column: the variant's width) and smoothing's
    inputs (the rule tensors received beside the frame go into the variant's static buffers). Sampling
    filters take the batch path: which variant decodes them (the top candidates or the bisection) depends on
    their values, which the header does not say."""
    return (h[_PHASE] == PHASES.index("reuse") and bool(h[_FLAGS] & _CACHE) and not h[_N_AHEAD]
            and not h[_FLAGS] & _FILTERS and h[_CREDIT_M] <= h[_NOUT])


def frame_wants_extras(h: list) -> bool:
    """Whether a compact step's result carries extras (a StepOutput, as ``StepBatch.wants_extras``)."""
    return bool(h[_FLAGS] & (_ENTROPY | _RULE_FLAGS | _SOFT)) or h[_LOGPROBS] >= 0


def frame_rules(h: list, batch: StepBatch) -> dict[str, torch.Tensor]:
    """The rule tensors the header ``h`` flags, read off rank 0's ``batch`` (a worker receives them:
    ``recv_rule_tensors``)."""
    return {f: getattr(batch, f) for f, _, _ in _rule_specs(h, 0)}


def _host(v):
    return v.cpu() if isinstance(v, torch.Tensor) else v


def pack_batch(batch: StepBatch) -> dict:
    """The batch as host tensors; the pool view becomes (n_slots, S, head scores?, pool id) + ``slots``."""
    d = {f.name: _host(getattr(batch, f.name)) for f in dataclasses.fields(batch) if f.name != "cache"}
    d["cache"] = pool_key(batch.cache)
    return d


def unpack_batch(d: dict, device) -> tuple[StepBatch, tuple | None]:
    """A pickled batch -> (StepBatch on ``device`` without its cache, pool key or None)."""
    d = dict(d)
    key = d.pop("cache")
    host = {"lengths", "out_start", "q_start", "slots", "ids_host"}
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) and k not in host else v for k, v in d.items()}
    return StepBatch(cache=None, **kw), key


def pool_for(pools: dict, key: tuple, make_pool):
    """The worker's pool for rank 0's pool ``key`` (``make_pool(n_slots, S, head_scores)`` makes one when
    rank 0's pool changed). The pool bound for the graphs (``pools["bound"]``: (key, pool), set at BIND) is
    kept beside the latest other one, so a step over another pool does not drop the bound pool's K/V."""
    bound = pools.get("bound")
    if bound is not None and bound[0] == key:
        return bound[1]
    if pools.get("key") != key:
        pools["key"], pools["pool"] = key, make_pool(*key[:3])
    return pools["pool"]


def read_batch(kind_msg, config, device, pools: dict, make_pool, group=None,
               rules: dict | None = None) -> tuple[StepBatch, torch.Tensor | None]:
    """A worker's StepBatch of a STEP / AHEAD message (either form; the cache a view of its own pool of the
    same slots) and the run-ahead counts (None for STEP). ``group``, ``rules``: ``decode``'s."""
    if isinstance(kind_msg, Compact):
        batch, key, counts = decode(kind_msg, config, device, group, rules)
    else:
        packed, counts = kind_msg[:2]
        batch, key = unpack_batch(packed, device)
    if key is not None:
        batch.cache = pool_for(pools, key, make_pool).view(batch.slots)
    return batch, counts
