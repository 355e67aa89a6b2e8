"""GPU kernels (Triton) registered as torch custom ops, each with a pure-PyTorch reference.

Every op lives under ``torch.ops.dlc`` so torch.export keeps it as one node and AOTInductor compiles the
Triton kernel into the artifact. On CPU tensors each op runs its reference (the op's CPU implementation); on
CUDA tensors it launches the Triton kernel. ``OPS`` maps name -> op for passes that look ops up by name.

Python API (what compiler passes and runtimes call):

* ``fused_select_logits(hidden [N, d], weight [V, d], temperature=0.0, seed=0, noise=None, temperature_t=None,
  row_keys=None)`` -> (token [N] int64, confidence [N] float32). Logits of the selected rows in vocab tiles
  with an online softmax; never an [N, V] tensor. T > 0 samples by Gumbel-max with noise ``u`` [N, V] when
  given, else a counter-based hash of (seed, row, column). Confidence = softmax probability of the chosen
  token. Graph form (compiled phases): ``temperature_t`` [1] tensor instead of the float, ``row_keys`` [N]
  int64 per-row hash keys (``logits.row_key(seed, row)``) instead of the seed.
* ``fused_select_extras(hidden [R, d], weight [V, d], entropy=False, topk=0, credit_ids=None,
  credit_vals=None, credit_alpha=None)`` -> dict: ``fused_select_logits``' decoding at T = 0 plus the
  decoding extras of the entropy-bounded and logprobs rules from the same vocab sweep, credit as a sparse
  correction of it over the credited ids' logits (kernels/select_extras.py).
* ``fused_shard_stats(hidden [R, d], weight [Vr, d], v0=0, entropy=False, topk=0)`` -> dict: the same sweep
  over one vocab shard (head rows of global ids v0 ..), reduced to the raw statistics a vocab-parallel combine
  needs instead of (token, confidence): best logit, its global id, max, sum of exp, entropy terms, top-k
  (kernels/shard_logits.py; tensor parallelism's ``fused`` decoding).
* ``fused_topk_logprobs(hidden, weight, k)`` -> (logprobs [N, k] float32, ids [N, k] int64), vocab-chunked.
* ``sparse_attention(q [B, H, T, D], k, v, k_blk, v_blk [B, Hkv, T, D], idx=None)`` -> [B, H, T, D].
  Attention of the block's queries over per-head selected cached positions plus the block's own K/V (GQA:
  head h reads KV head h // (H / Hkv)). ``idx`` [B, Hkv, n] indexes the full cache k/v [B, Hkv, S, D] (entries
  < 0 skipped); without ``idx``, k/v are used whole (compacted [B, Hkv, n, D], or the full cache = dense).
* ``select_positions(q_blk, k, retention, key_mask=None, pool=3, v=None)`` -> idx [B, Hkv, n]: per-head choice
  of cached positions: Sparse-dLLM's mean-query score, or with ``v`` the block's attention probabilities times
  ||v|| (the score of the sparsify_heads pass; docs/QUALITY.md says why).
* ``pool_attention(q [B, H, T, D], k_pool, v_pool [N, Hkv, S, D], rows [B], kv_len [B], cols=None,
  n_cols=None)`` -> [B, H, T, D]: attention over the serving slot pool's rows read in place, keys
  [0, kv_len[b]) (split-KV for small batches); head-sparse with ``cols`` [B, Hkv, K] / ``n_cols`` [B]: each
  KV head reads only its kept columns ``cols[b, g, :n_cols[b]]``.
* ``packed_pool_attention(q [1, H, n_pad, D], k, v [1, Hkv, n_pad, D], k_pool, v_pool [N, Hkv, S, D],
  tiles [n_rows, 4], dst [n_pad, 2])`` -> [1, H, n_pad, D]: a packed mixed forward's attention in one launch
  per layer: every token's K/V written to its (slot, column) of ``dst``, then every query tile of ``tiles``
  (a header row with the count, then (first token, end token, slot, n_keys) per tile) over its slot's keys
  [0, n_keys) (kernels/packed_attn.py).
* ``kv_write_(k_cache, v_cache, k_new, v_new, start [B], rows=None)``: in place,
  ``cache[rows[b], :, start[b]:start[b]+T] = new[b]`` for K and V (rows=None: row b).
* ``invariant_matmul(a [M, K] | [Z, M, K], b [K, N] | [Z, K, N], bias=None)`` -> [(Z,) M, N]: a GEMM whose
  tiles and split-K come from (N, K, dtype) only, so a row's output is bitwise the same in any batch
  (``matmul.py``; the batch-invariant mode routes aten mm / addmm / bmm here on CUDA).
* ``invariant_row_sum(x [R, C], scale=1.0)`` -> [R]: one program per row, order from C only (``reduce.py``;
  the mode's aten sum / mean over dims).
"""
from __future__ import annotations

import torch

from ._registry import HAS_TRITON, OPS, concrete
from . import cache_write as _kv
from . import logits as _sl
from . import attention as _sa
from . import pool_attn as _pa
from . import packed_attn as _pk
from . import matmul as _mm
from . import reduce as _rd
from .matmul import invariant_matmul
from . import select_extras as _se
from .attention import select_positions
from .select_extras import fused_select_extras
from . import shard_logits as _sh
from .shard_logits import fused_shard_stats

OPS["fused_topk_logprobs"] = torch.ops.dlc.fused_topk_logprobs

REFERENCES = {                     # name -> pure-PyTorch reference (the CPU implementation)
    "fused_select_logits": _sl.select_logits_reference,
    "fused_topk_logprobs": _sl.topk_logprobs_reference,
    "sparse_attention": _sa.sparse_attention_reference,
    "kv_write": _kv.kv_write_reference,
    "pool_attention": _pa.pool_attention_reference,
    "packed_pool_attention": _pk.packed_attention_reference,
    "invariant_matmul": _mm.matmul_reference,
    "invariant_row_sum": _rd.row_sum_reference,
    "fused_select_extras": _se.select_extras_reference,
    "fused_shard_stats": _sh.shard_stats_reference,
}


def fused_select_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 0.0, seed: int = 0,
                        noise: torch.Tensor | None = None, temperature_t: torch.Tensor | None = None,
                        row_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [N] int64, confidence [N] float32) for hidden [N, d] against the lm-head weight [V, d]."""
    _sl.validate(hidden, weight, temperature, noise, temperature_t, row_keys)
    return torch.ops.dlc.fused_select_logits(hidden, weight, float(temperature), int(seed), noise,
                                             temperature_t, row_keys)


def fused_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k log-probabilities (logprobs [N, k] float32, ids [N, k] int64) without an [N, V] tensor."""
    _sl.validate(hidden, weight, 0.0, None)
    if not 0 < k <= weight.shape[0]:
        raise ValueError(f"k must be in [1, vocab={weight.shape[0]}], got {k}")
    return torch.ops.dlc.fused_topk_logprobs(hidden, weight, int(k))


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_blk: torch.Tensor,
                     v_blk: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Block queries over per-head selected cached K/V plus the block's own K/V: [B, H, T, D]."""
    _sa.validate(q, k, v, k_blk, v_blk, idx)
    if idx is not None and concrete() and idx.numel() and int(idx.max()) >= k.shape[2]:
        raise ValueError(f"idx holds position {int(idx.max())} but the cache has S={k.shape[2]} positions")
    return torch.ops.dlc.sparse_attention(q, k, v, k_blk, v_blk, idx)


def pool_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor,
                   kv_len: torch.Tensor, cols: torch.Tensor | None = None,
                   n_cols: torch.Tensor | None = None) -> torch.Tensor:
    """Block queries [B, H, T, D] over slot-pool rows ``rows`` [B] of K/V [N, Hkv, S, D], keys [0, kv_len[b]):
    [B, H, T, D], reading the pool in place (no gather). Head-sparse: only the kept columns
    ``cols[b, g, :n_cols[b]]`` of each KV head ([B, Hkv, K], [B] int64; columns >= kv_len masked)."""
    _pa.validate(q, k_pool, v_pool, rows, kv_len, cols, n_cols)
    return torch.ops.dlc.pool_attention(q, k_pool, v_pool, rows, kv_len, cols, n_cols)


def packed_pool_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor, tiles: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """A packed forward's attention over the slot pool (one launch per layer for every part): the packed
    tokens' K/V written at ``dst`` [n_pad, 2] (slot, column; slot -1 = padding), then each query tile of
    ``tiles`` [n_rows, 4] (header (count, 0, 0, 0), then first token, end token, slot, n_keys per tile) over
    keys [0, n_keys) of its slot -> [1, H, n_pad, D], padding tokens zero (``packed_attn.tile_table`` /
    ``write_table`` build the tables)."""
    _pk.validate(q, k, v, k_pool, v_pool, tiles, dst)
    return torch.ops.dlc.packed_pool_attention(q, k, v, k_pool, v_pool, tiles, dst)


def kv_write_(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
              start: torch.Tensor | int, rows: torch.Tensor | None = None) -> None:
    """Write the block's K/V [B, Hkv, T, D] into the caches [N, Hkv, S, D] in place at per-row ``start``."""
    if isinstance(start, int):
        start = torch.full((k_new.shape[0],), start, dtype=torch.int64, device=k_new.device)
    _kv.validate(k_cache, v_cache, k_new, v_new, start, rows)
    if concrete():
        _kv.check_ranges(k_cache, k_new, start, rows)
    torch.ops.dlc.kv_write(k_cache, v_cache, k_new, v_new, start, rows)


__all__ = ["OPS", "REFERENCES", "HAS_TRITON", "fused_select_logits", "fused_select_extras",
           "fused_shard_stats", "fused_topk_logprobs", "sparse_attention", "select_positions", "kv_write_",
           "pool_attention", "packed_pool_attention", "invariant_matmul"]
