"""A ragged forward that ``torch.compile`` can take: every part's tokens packed into one row padded to a token
bucket, attention per part through ONE opaque op per layer (issue 15, item 2).

``DiffusionLM.forward_ragged`` (models/common.py) runs several forwards (a Refresh group, a Reuse group, ...)
as one pass over the weights, but its layers see the part structure as Python: each part's row and column
counts, its mask and its start. Compiled blocks (``torch.compile(fullgraph=True)``) would specialise on every
one of those and recompile for every new mix, which is why the graph runner ran that forward with the
compiled blocks switched off (``set_stance("force_eager")``). Here the structure travels beside the graph:

* the blocks see only tensors whose shapes repeat: the packed tokens ``[1, n_pad, d]`` (``n_pad`` a token
  bucket: padding tokens at the end), their RoPE tables, and one layer's K/V pool tensors (``PackedKV``);
* each layer's attention is ``torch.ops.dlc.packed_attention(q, k, v, k_pool, v_pool)``, a custom op (opaque
  to Dynamo and Inductor: called as an extern kernel, no graph break). Its body reads the part structure of
  the forward in flight (``PackedPlan``, set by ``forward_packed`` for the duration of the forward, as vLLM's
  forward context carries its attention metadata) and attends each part exactly as its own forward would
  (``common.attend_ragged``: Refresh rows bidirectionally over their own valid keys, K/V written into their
  slots; Reuse rows over their slot's cached K/V, through ``pool_attention`` when the part reads the pool in
  place, with the block written first). The op declares that it writes the pool layer (``mutates_args``).
* padding tokens: in no part, so they write no K/V, their attention output is zero (they attend nowhere),
  and nobody decodes them; token-wise work (norms, GEMMs, MLP, routing) never mixes tokens, so they change no
  real token's result.

Dynamo then compiles the packed kind once with static shapes and once more with the token dimension
symbolic (automatic dynamic shapes), whatever the mixes: tests/runtime/test_compile_buckets.py counts it.
Head-sparse parts (per-layer kept columns and score rows) are not packed (``packable``).

With ``meta`` (``packed_meta``: the parts' sequences as a tile table and a write table, tensors) the op is
``dlc::packed_pool_attention`` instead (kernels/packed_attn.py): every token's K/V written into its slot, then
one varlen launch for every part's queries over their slots' keys. Nothing of the part structure is Python
then: the forward over static buffers of a token bucket is the same launches for every mix, so the graph
runner captures it as a CUDA graph per bucket (``mix_iterations="captured"``). The sequences must read
prefixes of their slots (Refresh keys [0, length), Reuse keys [0, kv_len)): block-causal parts and parts
without a cache keep the per-part path (the runner decides: runtime/runners/packed.py ``packed_seqs``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch

from dlc.kernels.packed_attn import BT_DEFAULT, tile_table, write_table

from .common import KVCache, LayerKV, PackedKV, RaggedKV, RaggedPart, Segment, attend_ragged, \
    key_mask_to_attn_mask, pack_parts, unpack_parts


class PlanPart(NamedTuple):
    """One part's attention, the same in every layer: ``rows`` x ``cols`` packed tokens, SDPA mask
    [rows, 1, 1 | cols, S] or None, pool ``slots`` [rows] (None: no cache, the part attends over its own
    tokens), the cache ``width`` it sees (a Refresh's narrowed columns), ``kv_len`` [rows] (Reuse read in the
    pool) and ``start`` (int or [rows])."""
    rows: int
    cols: int
    mask: torch.Tensor | None
    slots: torch.Tensor | None
    width: int
    kv_len: torch.Tensor | None
    start: int | torch.Tensor


class PackedPlan(NamedTuple):
    parts: tuple[PlanPart, ...]
    n_real: int              # real packed tokens; [n_real, n_pad) are padding

    def layer(self, k_pool: torch.Tensor, v_pool: torch.Tensor) -> RaggedKV:
        """The parts' segments over one layer's pool tensors [N, Hkv, S, D]."""
        return RaggedKV(tuple(
            Segment(p.rows, p.cols, p.mask, None if p.slots is None else
                    LayerKV(k_pool[:, :, :p.width], v_pool[:, :, :p.width], p.slots, p.kv_len), p.start)
            for p in self.parts))


class PackedCache:
    """The ``cache`` of a packed forward: layer i is the pool's layer-i K/V (``PackedKV``), with the varlen
    kernel's tables when ``meta`` = (tiles [n_tiles, 4], dst [n_pad, 2]) is given."""

    def __init__(self, pool: KVCache, meta: tuple | None = None):
        self.pool = pool
        self.meta = meta or (None, None)

    def layer(self, i: int) -> PackedKV:
        return PackedKV(self.pool.k[i], self.pool.v[i], *self.meta)


def packed_meta(seqs: list, n_pad: int, n_rows: int, device, BT: int = BT_DEFAULT) -> tuple:
    """The sequences (``packed_attn.PackedSeq``: one per row of a part) as the varlen kernel's tables on
    ``device``: (tiles [n_rows, 4] (``table_rows``), dst [n_pad, 2]) int64."""
    return (tile_table(seqs, n_rows, BT).to(device, non_blocking=True),
            write_table(seqs, n_pad).to(device, non_blocking=True))


_PLANS: list[PackedPlan] = []        # the packed forward in flight (its op reads the top)


@contextmanager
def packed_plan(plan: PackedPlan):
    _PLANS.append(plan)
    try:
        yield
    finally:
        _PLANS.pop()


@torch.library.custom_op("dlc::packed_attention", mutates_args=("k_pool", "v_pool"))
def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                     v_pool: torch.Tensor) -> torch.Tensor:
    """q [1, H, n_pad, D], the new k, v [1, Hkv, n_pad, D] of the packed tokens and one layer's pool
    [N, Hkv, S, D] -> y [1, H, n_pad, D]: each part of the plan in flight attended as its own forward
    (``attend_ragged``), the padding tokens' rows zero."""
    if not _PLANS:
        raise RuntimeError("dlc::packed_attention runs only inside forward_packed (no plan in flight)")
    plan = _PLANS[-1]
    n = plan.n_real
    y = attend_ragged(q[:, :, :n], k[:, :, :n], v[:, :, :n], plan.layer(k_pool, v_pool),
                      q.shape[1], k.shape[1])                                      # [1, H, n, D]
    pad = q.shape[2] - n
    if pad:
        y = torch.cat([y, y.new_zeros(1, y.shape[1], pad, y.shape[3])], dim=2)
    return y.contiguous()


@packed_attention.register_fake
def _(q, k, v, k_pool, v_pool):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def packable(parts: list[RaggedPart]) -> KVCache | None:
    """The one pool every cached part reads, its widest view (None: the parts cannot be packed: no cached
    part, parts over different pools, or head-sparse steps)."""
    caches = [p.cache for p in parts if p.cache is not None]
    if not caches or any(c.rows is None or c.keep is not None or c.score_index is not None for c in caches):
        return None
    if len({c.k[0].untyped_storage().data_ptr() for c in caches}) > 1:
        return None
    return max(caches, key=lambda c: c.seq_len)           # the widest view (a Refresh's is narrowed)


def plan_of(parts: list[RaggedPart], n_pad: int) -> PackedPlan:
    out = []
    for p in parts:
        r, c = p.ids.shape
        kv = p.cache
        out.append(PlanPart(r, c, key_mask_to_attn_mask(p.key_mask), None if kv is None else kv.rows,
                            0 if kv is None else kv.seq_len, None if kv is None else kv.kv_len, p.start))
    n = sum(x.rows * x.cols for x in out)
    if n_pad < n:
        raise ValueError(f"forward_packed: {n} tokens do not fit a bucket of {n_pad}")
    return PackedPlan(tuple(out), n)


def forward_packed(model, parts: list[RaggedPart], pool: KVCache, n_pad: int,
                   meta: tuple | None = None) -> list[torch.Tensor]:
    """``model.forward_ragged(parts)`` with every part's tokens packed into one row of ``n_pad`` tokens
    (padding: the mask id at position 0) and each layer's attention through ``dlc::packed_attention`` over
    ``pool`` (``packable(parts)``), or with ``meta`` (``packed_meta``) ``dlc::packed_pool_attention`` -> each
    part's hidden states [r, c, d]."""
    plan = plan_of(parts, n_pad)
    ids, pos, add = pack_parts(parts, model.config.d_model, n_pad - plan.n_real, model.config.mask_id)
    with packed_plan(plan):
        h = model(ids, pos, None, cache=PackedCache(pool, meta), embed_add=add)        # [1, n_pad, d]
    return unpack_parts(h[0], parts)
