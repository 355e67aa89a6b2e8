"""How the CUDA-graph runner runs a mixed iteration (Refresh rows beside Reuse rows): ``MIX_ITERATIONS``.

* ``two``: one call per group (eager or compiled Refresh, then the captured Reuse step);
* ``eager``: one eager ragged forward (``DiffusionLM.forward_ragged``; compiled blocks switched off for it:
  Dynamo would recompile on every new mix), Reuse rows attending inside the pool;
* ``compiled``: one packed forward through the compiled blocks (``models/packed.py``): every part's tokens in
  one row padded to a token bucket (``TOKEN_BUCKETS``), so the token-wise work (norms, projections, RoPE,
  MLP) runs Inductor's fused kernels over all rows at once and Dynamo compiles the kind twice whatever the
  mixes (static, then a symbolic token dimension). Attention: where every part reads prefixes of its pool
  slots (``packed_seqs``), ONE varlen launch per layer (``dlc.kernels.packed_pool_attention``, its tile and
  write tables built here on the host), else one opaque op per layer attending part by part in Python;
* ``captured``: the ``compiled`` forward (compiled blocks or eager ones) with the varlen kernel, captured as a
  CUDA graph per token bucket over static buffers (ids, positions, embedding adds, the tables: the number of
  table rows are fixed per bucket, ``packed_attn.table_rows`` for ``2 x`` the largest batch bucket rows),
  so a mixed iteration costs one replay plus its decoding (``GraphRunner._packed``). Mixes it cannot take
  (block-causal parts, parts without a cache, more rows than the tile table holds) run ``compiled``'s
  uncaptured forward. Without capture (CPU) the same static-buffer forward runs directly.

The padding costs token-wise compute on at most the gap to the next bucket: buckets are close (25 % steps
from 1024 on) so the waste stays small at the realistic sizes (2 x 768 + 30 x 32 = 2496 tokens -> 2560)."""
from __future__ import annotations

from dlc.kernels.packed_attn import PackedSeq, table_rows
from dlc.models.packed import forward_packed, packable, packed_meta

from ..config import MIX_ITERATIONS
from ..step import MixedBatch

__all__ = ["MIX_ITERATIONS", "TOKEN_BUCKETS", "packed_seqs", "run_packed", "token_bucket"]
TOKEN_BUCKETS = (64, 128, 256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192,
                 10240, 12288, 16384)


def token_bucket(n: int, buckets=TOKEN_BUCKETS) -> int:
    """The smallest bucket >= n tokens; past the largest, a multiple of the last bucket step."""
    for b in buckets:
        if b >= n:
            return b
    step = buckets[-1] - buckets[-2] if len(buckets) > 1 else buckets[-1]
    return -(-n // step) * step


def packed_seqs(batches, parts) -> list[PackedSeq] | None:
    """The varlen kernel's sequences of a packed forward (one per row of each part, in packing order), from
    the host facts of the StepBatches: pool slot, first written column (a Refresh 0, a Reuse its
    ``q_start``) and valid keys ``lengths`` (keys [0, L) of the slot: the key mask of a Refresh of rows of
    different lengths, the kv_len of a Reuse). None where a part's attention is not that: block-causal
    (block diffusion), no cache (a full forward attends over its own packed keys)."""
    seqs, off = [], 0
    for b, p in zip(batches, parts):
        if p.cache is None or b.block_size or b.slots is None or b.phase not in ("refresh", "reuse"):
            return None
        c = p.ids.shape[1]
        starts = [0] * b.fed if b.phase == "refresh" else b.q_start.tolist()
        for slot, col0, n in zip(b.slots.tolist(), starts, b.lengths.tolist()):
            seqs.append(PackedSeq(off, c, slot, col0, n))
            off += c
    return seqs


def run_packed(runner, batch: MixedBatch, buckets=TOKEN_BUCKETS, max_seqs: int = 0) -> list | None:
    """``runner.mixed``'s work as one packed forward -> one result per part, decoded as ``runner`` decodes
    (``decode_parts``); None where the parts cannot be packed (``packed.packable``: head-sparse steps, parts
    over different pools, no cached part). The varlen kernel's tables hold ``max_seqs`` rows (a fixed size:
    compiled blocks see one shape per bucket) or the batch's, if more; ``runner.stats["mixed_varlen"]``
    counts the forwards that ran it."""
    parts = [runner.inputs(b) for b in batch.parts]
    pool = packable(parts)
    if pool is None:
        return None
    n = sum(p.ids.numel() for p in parts)
    n_pad = token_bucket(n, buckets)
    seqs = packed_seqs(batch.parts, parts)
    meta = None if seqs is None else packed_meta(seqs, n_pad, table_rows(n_pad, max(max_seqs, len(seqs))),
                                                 pool.k[0].device)
    if meta is not None:
        runner.stats["mixed_varlen"] = runner.stats.get("mixed_varlen", 0) + 1
    hs = forward_packed(runner.model, parts, pool, n_pad, meta)                        # [r_i, c_i, d]
    return runner.decode_parts([runner.decoded_rows(h, b) for h, b in zip(hs, batch.parts)], batch.parts)
