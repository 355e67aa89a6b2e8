"""Building blocks shared by the dLLM families.

Every family is a bidirectional pre-norm transformer. Forward passes take an optional ``KVCache``: a query
slice ``[start, start + T)`` (``start`` an int or one per row) writes its new K/V into the cache in place and
attends over the whole cached sequence. That one primitive gives the three schedules of the runtime:

* refresh: queries = the whole sequence, start = 0 (fills the cache);
* prefix reuse: queries = block + everything after it;
* dual reuse: queries = the block only (the rest of the cache is stale until the next refresh).

Without a cache the layer attends over its own K/V, which is the plain full forward that torch.export traces.
Attention goes through ``F.scaled_dot_product_attention`` so compiler passes find one SDPA node per layer
whose K/V inputs are the post-RoPE keys and values.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .sparse_heads import head_scores


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos/sin tables for positions [B, T] in float32: two [B, 1, T, head_dim] tensors."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, device=position_ids.device,
                                             dtype=torch.float32) / half))
    ang = position_ids.float()[..., None] * inv_freq                 # [B, T, half]
    ang = torch.cat([ang, ang], dim=-1)                                # [B, T, D]
    return ang.cos()[:, None], ang.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by tables [B, 1, T, R]; with R < D (partial rotary, LLaDA2) only the first R dims
    rotate (rotate-half within them) and the rest pass through."""
    R = cos.shape[-1]
    if R < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :R], cos, sin), x[..., R:]], dim=-1)
    xf = x.float()                                                     # [B, H, T, D]
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class LayerKV(NamedTuple):
    """One layer's view of a KVCache: k, v [N, Hkv, S, D]; ``rows`` [B] pool rows (None: row b is cache
    row b); ``kv_len`` [B] valid keys per row (a prefix) when the layer may attend inside the pool
    without a gather. Head-sparse (``KVCache.keep`` / ``score_index``): ``keep`` [B, Hkv, K] this layer's
    kept columns with ``n_keep`` [B] entries used per row; ``scores`` [N, Hkv, S] this layer's key scores,
    written from the queries of hidden rows ``score_index`` [B, n]."""
    k: torch.Tensor
    v: torch.Tensor
    rows: torch.Tensor | None = None
    kv_len: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    n_keep: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    score_index: torch.Tensor | None = None


class KVCache:
    """Per-layer K/V: ``k[l]``, ``v[l]`` are [N, n_kv_heads, S, head_dim].

    Without ``rows`` batch row b is cache row b (N = B). With ``rows`` (LongTensor [B]) the tensors are a slot
    pool shared by many requests and batch row b lives in pool row ``rows[b]``: the runtime's KV cache manager
    hands out such views so requests of different lengths and blocks run in one batch. ``kv_len`` [B]: valid
    keys per row (a prefix of the row) for attention inside the pool.
    ``scores`` [n_layers, N, Hkv, S] float32:
    head-sparse engines' per-head key scores from the last Refresh of each row (models/sparse_heads.py), None
    for dense runners. ``k_all``, ``v_all`` [n_layers, N, Hkv, S, D]: the storage ``k[l]`` / ``v[l]`` are
    views of (the slot pool as one tensor), which compiled phase programs take as an input and write in place;
    None when the layers are separate tensors.

    Head-sparse steps of the eager model (``EagerRunner(sparse_retention=...)``): ``keep`` [n_layers, B, Hkv,
    K] kept columns per head (a Reuse step attends over those of its pool rows only, ``n_keep`` [B] entries
    per row, columns >= ``kv_len`` masked: ``dlc.kernels.pool_attention`` with ``cols``); ``score_index``
    [B, n] (a Refresh writes each layer's per-head key scores of those hidden rows' queries into ``scores``,
    ``models/sparse_heads.head_scores``)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], rows: torch.Tensor | None = None,
                 kv_len: torch.Tensor | None = None, scores: torch.Tensor | None = None,
                 k_all: torch.Tensor | None = None, v_all: torch.Tensor | None = None,
                 keep: torch.Tensor | None = None, n_keep: torch.Tensor | None = None,
                 score_index: torch.Tensor | None = None):
        self.k, self.v, self.rows = k, v, rows
        self.kv_len = kv_len
        self.scores = scores
        self.k_all, self.v_all = k_all, v_all
        self.keep, self.n_keep, self.score_index = keep, n_keep, score_index

    def with_(self, **kw) -> "KVCache":
        """The same pool view with some fields replaced (kv_len, keep, n_keep, score_index)."""
        f = dict(rows=self.rows, kv_len=self.kv_len, scores=self.scores, k_all=self.k_all, v_all=self.v_all,
                 keep=self.keep, n_keep=self.n_keep, score_index=self.score_index)
        return KVCache(self.k, self.v, **{**f, **kw})

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, seq_len: int, dtype, device) -> "KVCache":
        shape = (config.n_layers, batch, config.n_kv_heads, seq_len, config.head_dim)
        k_all = torch.zeros(shape, dtype=dtype, device=device)
        v_all = torch.zeros(shape, dtype=dtype, device=device)
        n = config.n_layers
        return cls([k_all[i] for i in range(n)], [v_all[i] for i in range(n)], k_all=k_all, v_all=v_all)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0] if self.rows is None else self.rows.shape[0]

    @property
    def seq_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def narrow(self, width: int) -> "KVCache":
        """The same rows, columns [0, width) only (views: writes land in this cache): a Refresh of sequences
        at most ``width`` long attends over ``width`` keys instead of the whole slot (and, with no padding,
        without a mask: SDPA's flash kernel)."""
        if width >= self.seq_len or self.scores is not None:
            return self
        return KVCache([k[:, :, :width] for k in self.k], [v[:, :, :width] for v in self.v], self.rows)

    def layer(self, i: int) -> LayerKV:
        scoring = self.score_index is not None
        return LayerKV(self.k[i], self.v[i], self.rows, self.kv_len,
                       None if self.keep is None else self.keep[i], self.n_keep,
                       self.scores[i] if scoring else None, self.score_index if scoring else None)

    def row_index(self, batch: int, device) -> torch.Tensor:
        """Pool rows of batch rows 0..batch-1 ([batch] int64)."""
        return torch.arange(batch, device=device) if self.rows is None else self.rows.to(device)


def write_cache(ck, cv, rows, k, v, start, gather: bool = True):
    """Write k, v [B, Hkv, T, D] into cache rows at columns start .. start + T, in place; returns the keys and
    values to attend over, [B, Hkv, S, D]. ``start`` is an int (every row) or a LongTensor [B] (per row)."""
    T = k.shape[2]
    if rows is None and isinstance(start, int):
        ck[:, :, start:start + T] = k
        cv[:, :, start:start + T] = v
        return ck, cv
    B = k.shape[0]
    if isinstance(start, int):
        start = torch.full((B,), start, dtype=torch.long, device=k.device)
    r = torch.arange(B, device=k.device) if rows is None else rows
    cols = start[:, None] + torch.arange(T, device=k.device)           # [B, T]
    ck[r[:, None], :, cols] = k.transpose(1, 2)                         # indexed view is [B, T, Hkv, D]
    cv[r[:, None], :, cols] = v.transpose(1, 2)
    if not gather:
        return None
    return (ck, cv) if rows is None else (ck[r], cv[r])


class FusedWeight(NamedTuple):
    """One group's concatenated projection weight (``fuse_projections_``): its linears' parameters are
    row-slice views of ``weight`` / ``bias``, ``sizes`` their output widths in order."""
    weight: torch.Tensor                  # [sum(sizes), d_in]
    bias: torch.Tensor | None
    sizes: list[int]


class Fusable:
    """Mixin of the modules whose linears read one input (q|k|v; the MLP's gate|up): ``fusable()`` lists the
    groups; ``fused`` (declared here, empty until ``fuse_projections_``) holds each group's ``FusedWeight`` in
    that order (None: the group stays unfused), so the fused state lives with the module that owns the
    linears and calls ``project``, not on torch's ``nn.Linear`` objects."""
    fused: tuple = ()

    def fusable(self) -> list[tuple]:
        raise NotImplementedError

    def fused_group(self, i: int) -> FusedWeight | None:
        return self.fused[i] if self.fused else None


def project(x: torch.Tensor, linears: tuple, fused: FusedWeight | None = None) -> tuple:
    """``x`` through several linears that share it: one GEMM over their concatenated weight when
    ``fuse_projections_`` fused them (``fused``: the owner's ``Fusable.fused_group``), else one GEMM each.
    Returns one output per linear."""
    if fused is None:
        return tuple(lin(x) for lin in linears)
    return F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1)


def fuse_projections_(model: nn.Module) -> int:
    """Concatenate the weights of linears that read the same input (q|k|v; the MLP's gate|up) into one tensor,
    in place: each parameter becomes a row-slice view of it, so names, state_dict and memory are unchanged and
    ``project`` runs one GEMM instead of three / two (at small batch a Reuse step is weight-read bound and
    skinny GEMMs stream faster when wide). Call it after the model is on its final device and dtype (moving it
    afterwards breaks the sharing). The fused weights go to each owner's ``Fusable.fused``. Returns the number
    of groups fused now (0 on a model already fused)."""
    n = 0
    for mod in model.modules():
        if not isinstance(mod, Fusable) or mod.fused:
            continue
        mod.fused = tuple(_fuse_group(group) for group in mod.fusable())
        n += sum(f is not None for f in mod.fused)
    return n


def _fuse_group(group: tuple) -> FusedWeight | None:
    """One group's linears -> their concatenated weight, each parameter becoming a row slice of it (None: the
    linears differ in input width, dtype, device or bias and stay apart)."""
    ws = [lin.weight for lin in group]
    if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1:
        return None
    has_b = [lin.bias is not None for lin in group]
    if any(has_b) and not all(has_b):
        return None
    with torch.no_grad():
        w = torch.cat([x.detach() for x in ws])                             # [sum(out), d_in]
        b = torch.cat([lin.bias.detach() for lin in group]) if all(has_b) else None
        sizes, r = [], 0
        for lin in group:
            m = lin.weight.shape[0]
            lin.weight.data = w[r:r + m]
            if b is not None:
                lin.bias.data = b[r:r + m]
            sizes.append(m)
            r += m
    return FusedWeight(w, b, sizes)


def key_mask_to_attn_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, S] bool (True = attend) -> [B, 1, 1, S] for SDPA; a per-query mask [B, T, S] (block-causal
    attention, ``block_key_mask``) -> [B, 1, T, S]."""
    if key_mask is None:
        return None
    return key_mask[:, None] if key_mask.dim() == 3 else key_mask[:, None, None, :]


def block_key_mask(key_mask: torch.Tensor, qpos: torch.Tensor, block) -> torch.Tensor:
    """Block-causal keys per query: key_mask [B, S] (real keys) and query positions qpos [B, T] -> [B, T, S],
    True where the key's column is below the end of the query's block (bidirectional inside a block, causal
    across blocks aligned to column 0: the mask of LLaDA2's and SDAR's reference generate). ``block``: an int,
    or a one-element int64 tensor (compiled phase programs take the block size as an input: passes/
    mask_blocks.py)."""
    ends = (qpos // block + 1) * block                                         # [B, T]
    cols = torch.arange(key_mask.shape[1], device=key_mask.device)
    return key_mask[:, None, :] & (cols[None, None, :] < ends[..., None])


# training-time replacements of the dense SDPA (attention_override); empty otherwise
_ATTENTION: list = []


@contextmanager
def attention_override(fn):
    """Route the dense attention of ``self_attention`` through ``fn(q [B, H, T, D], k, v [B, H, S, D],
    attn_mask)`` (GQA already expanded) while the block runs. For training-time simulations such as
    ``dlc.tiny.train``'s head-sparse Reuse attention; never active while tracing for export (passes look for
    SDPA nodes)."""
    _ATTENTION.append(fn)
    try:
        yield
    finally:
        _ATTENTION.pop()


def self_attention(x, q_proj, k_proj, v_proj, o_proj, cos, sin, attn_mask, n_heads: int, n_kv: int,
                   q_norm=None, k_norm=None, cache_kv=None, start: int = 0,
                   qkv_fused: FusedWeight | None = None):
    """Bidirectional attention with GQA and optional QK-norm; projections are the caller's modules so each
    family keeps its checkpoint's parameter names (``qkv_fused``: their fused weight, the caller's
    ``Fusable.fused_group``). Returns (output [B, T, d], (k, v) [B, Hkv, T, D])."""
    B, T, _ = x.shape
    q, k, v = project(x, (q_proj, k_proj, v_proj), qkv_fused)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    hd = q.shape[-1] // n_heads
    q = q.view(B, T, n_heads, hd).transpose(1, 2)                     # [B, H, T, D]
    k = k.view(B, T, n_kv, hd).transpose(1, 2)                        # [B, Hkv, T, D]
    v = v.view(B, T, n_kv, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = attend(q, k, v, attn_mask, cache_kv, start, n_heads, n_kv)    # [B, H, T, D]
    return o_proj(y.transpose(1, 2).reshape(B, T, n_heads * hd)), (k, v)


def attend(q, k, v, attn_mask, cache_kv, start, n_heads: int, n_kv: int) -> torch.Tensor:
    """The part of a layer that depends on the row kind: post-RoPE q [B, H, T, D] and the new k, v
    [B, Hkv, T, D] -> y [B, H, T, D]. Without a cache the queries attend over their own keys; with a
    ``LayerKV`` the new K/V are written at columns start .. start + T of the rows, in place, and the queries
    attend over the whole cached rows; with a ``RaggedKV`` (a ragged forward) each segment of the packed
    tokens does one of those (``attend_ragged``). Everything else in a layer is token-wise."""
    if isinstance(cache_kv, RaggedKV):
        return attend_ragged(q, k, v, cache_kv, n_heads, n_kv)
    if isinstance(cache_kv, PackedKV):                  # a packed ragged forward: one opaque op per layer
        if cache_kv.tiles is not None:                  # the varlen kernel: metadata as tensors
            from dlc.kernels import packed_pool_attention
            return packed_pool_attention(q, k, v, cache_kv.k, cache_kv.v, cache_kv.tiles, cache_kv.dst)
        from .packed import packed_attention
        return packed_attention(q, k, v, cache_kv.k, cache_kv.v)
    if cache_kv is not None and cache_kv.score_index is not None:     # head-sparse Refresh: key scores
        store_head_scores(q, k, v, attn_mask, cache_kv, n_heads // n_kv)
    if cache_kv is not None and cache_kv.kv_len is not None:         # the pool is read in place: keys
        write_cache(cache_kv.k, cache_kv.v, cache_kv.rows, k, v, start, gather=False)     # [0, kv_len),
        from dlc.kernels import pool_attention                        # head-sparse: the kept columns only
        rows = cache_kv.rows if cache_kv.rows is not None else torch.arange(q.shape[0], device=q.device)
        return pool_attention(q, cache_kv.k, cache_kv.v, rows, cache_kv.kv_len, cache_kv.keep,
                              cache_kv.n_keep)
    T = q.shape[2]
    if cache_kv is not None and isinstance(start, int) and start == 0 and cache_kv.k.shape[2] == T:
        write_cache(cache_kv.k, cache_kv.v, cache_kv.rows, k, v, 0, gather=False)   # a Refresh over a cache
                                                  # narrowed to its width: its own keys are the whole cache
    elif cache_kv is not None:                                        # gather the batch's rows for SDPA
        k, v = write_cache(cache_kv.k, cache_kv.v, cache_kv.rows, k, v, start)   # [B, Hkv, S, D]
    if n_kv != n_heads:
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
    fn = _ATTENTION[-1] if _ATTENTION else F.scaled_dot_product_attention
    return fn(q, k, v, attn_mask=attn_mask)                           # [B, H, T, D]


def store_head_scores(q, k, v, attn_mask, kv: LayerKV, group: int) -> None:
    """A head-sparse Refresh's key scores of one layer (q [B, H, L, D], its new k, v [B, Hkv, L, D]) into
    the pool rows' ``kv.scores`` [N, Hkv, S]: columns [0, L) scored, the rest -inf (what a compiled
    Refresh returns and ``CompiledRunner.refresh`` stores)."""
    B, L = q.shape[0], k.shape[2]
    if attn_mask is None:
        key_mask = torch.ones(B, L, dtype=torch.bool, device=q.device)
    elif attn_mask.shape[2] != 1:
        raise ValueError("head-sparse scores need bidirectional attention (no block-causal mask)")
    else:
        key_mask = attn_mask[:, 0, 0, :L]                                          # [B, L]
    s = head_scores(q, k, v, key_mask, kv.score_index, group)                     # [B, Hkv, L]
    r = torch.arange(B, device=q.device) if kv.rows is None else kv.rows
    kv.scores[r] = float("-inf")
    kv.scores[r, :, :L] = s.to(kv.scores.dtype)


# -- ragged forwards: several row kinds in one pass over the weights -----------------------------------------
class RaggedPart(NamedTuple):
    """One forward's inputs inside a ragged forward (``DiffusionLM.forward_ragged``): ids, pos [r, c];
    key_mask [r, S] or [r, c, S] as ``DiffusionLM.forward`` takes it; its cache (None: attend over its own
    tokens) and start (int or [r]); embed_add [r, c, d] or None."""
    ids: torch.Tensor
    pos: torch.Tensor
    key_mask: torch.Tensor | None
    cache: "KVCache | None"
    start: int | torch.Tensor = 0
    embed_add: torch.Tensor | None = None


class Segment(NamedTuple):
    """One part's attention in one layer: ``rows`` x ``cols`` consecutive packed tokens, its SDPA mask
    [rows, 1, 1 | cols, S], its ``LayerKV`` (or None) and start."""
    rows: int
    cols: int
    mask: torch.Tensor | None
    kv: LayerKV | None
    start: int | torch.Tensor


class RaggedKV(NamedTuple):
    """One layer's view of a ``RaggedCache``: the segments in packing order."""
    segments: tuple


class RaggedCache:
    """The ``cache`` of a ragged forward: the token-wise work of every layer (embedding, norms, projections,
    MLP / MoE) runs once over all parts' tokens packed as one row [1, sum r * c]; ``attend`` unpacks each
    part's tokens to its own [r, c] batch and attends exactly as that part's own forward would (Refresh rows
    over their sequence, Reuse rows over their cached rows with the block written in place)."""

    def __init__(self, parts: list[RaggedPart]):
        self.parts = [(p.ids.shape[0], p.ids.shape[1], key_mask_to_attn_mask(p.key_mask), p.cache, p.start)
                      for p in parts]

    def layer(self, i: int) -> RaggedKV:
        return RaggedKV(tuple(Segment(r, c, m, None if kv is None else kv.layer(i), s)
                              for r, c, m, kv, s in self.parts))


def pack_parts(parts: list[RaggedPart], d: int, pad: int = 0, pad_id: int = 0) -> tuple:
    """Every part's tokens in one row, then ``pad`` padding tokens (``pad_id`` at position 0, nothing
    added) -> ids [1, N + pad], positions [1, N + pad], embed_add [1, N + pad, d] or None (no part adds)."""
    dev = parts[0].ids.device
    ids = torch.cat([p.ids.reshape(-1) for p in parts]
                    + [torch.full((pad,), pad_id, dtype=torch.long, device=dev)])[None]
    pos = torch.cat([p.pos.reshape(-1) for p in parts]
                    + [torch.zeros(pad, dtype=torch.long, device=dev)])[None]
    adds = [p.embed_add for p in parts if p.embed_add is not None]
    if not adds:
        return ids, pos, None
    zero = lambda n: adds[0].new_zeros(n, d)                                          # noqa: E731
    add = torch.cat([p.embed_add.reshape(-1, d) if p.embed_add is not None else zero(p.ids.numel())
                     for p in parts] + [zero(pad)])[None]
    return ids, pos, add


def unpack_parts(h: torch.Tensor, parts: list[RaggedPart]) -> list[torch.Tensor]:
    """The packed row's hidden states [>= N, d] (padding after the parts' N tokens) -> each part's
    [r, c, d]."""
    sizes = [p.ids.numel() for p in parts]
    return [x.view(*p.ids.shape, h.shape[-1]) for x, p in zip(h[:sum(sizes)].split(sizes), parts)]


class PackedKV(NamedTuple):
    """One layer's view of a packed ragged forward (models/packed.py): the pool's K/V [N, Hkv, S, D] of the
    layer; the part structure travels beside the compiled graph (``packed.PackedPlan``), or as tensors: the
    varlen kernel's tile table [n_tiles, 4] and write table [n_pad, 2] (``dlc.kernels.packed_pool_attention``:
    one launch per layer, capturable)."""
    k: torch.Tensor
    v: torch.Tensor
    tiles: torch.Tensor | None = None
    dst: torch.Tensor | None = None


def attend_ragged(q, k, v, plan: RaggedKV, n_heads: int, n_kv: int) -> torch.Tensor:
    """q [1, H, N, D], k, v [1, Hkv, N, D] of the packed tokens -> y [1, H, N, D], each segment attended as
    its own batch [rows, heads, cols, D]."""
    ys, t = [], 0
    for seg in plan.segments:
        qs, ks, vs = (_unpack(x, t, seg.rows, seg.cols) for x in (q, k, v))
        y = attend(qs, ks, vs, seg.mask, seg.kv, seg.start, n_heads, n_kv)      # [rows, H, cols, D]
        ys.append(y.transpose(0, 1).flatten(1, 2))                              # [H, rows * cols, D]
        t += seg.rows * seg.cols
    return torch.cat(ys, dim=1)[None]


def _unpack(x: torch.Tensor, t: int, rows: int, cols: int) -> torch.Tensor:
    """Packed tokens t .. t + rows * cols of x [1, h, N, D] -> [rows, h, cols, D] (a view)."""
    return x[0, :, t:t + rows * cols].unflatten(1, (rows, cols)).transpose(0, 1)


class SwiGLU(Fusable, nn.Module):
    def __init__(self, d_model: int, hidden: int, names: dict[str, str]):
        super().__init__()
        self.names = names
        setattr(self, names["gate"], nn.Linear(d_model, hidden, bias=False))
        setattr(self, names["up"], nn.Linear(d_model, hidden, bias=False))
        setattr(self, names["down"], nn.Linear(hidden, d_model, bias=False))

    def forward(self, x):
        n = self.names
        gate, up = project(x, (getattr(self, n["gate"]), getattr(self, n["up"])), self.fused_group(0))
        return getattr(self, n["down"])(F.silu(gate) * up)

    def fusable(self):
        return [(getattr(self, self.names["gate"]), getattr(self, self.names["up"]))]


class TiedHead(nn.Module):
    """Output projection that reuses the input embedding; the embedding is held in a list so it stays out of
    the module tree (one parameter name per tensor)."""

    def __init__(self, embed: nn.Embedding, vocab: int):
        super().__init__()
        self._embed = [embed]
        self.vocab = vocab

    def tie(self, embed: nn.Module) -> None:
        """Read ``embed``'s weight from now on (a tensor-parallel shard replaces the embedding it ties to)."""
        self._embed[0] = embed

    def forward(self, h):
        return F.linear(h, self._embed[0].weight[: self.vocab])


class HFAttention(Fusable, nn.Module):
    """Attention under the HF Llama/Qwen names (q_proj, k_proj, v_proj, o_proj); q/k/v bias from the config,
    and with ``config.qk_norm`` the family's ``head_norm`` class (built as ``head_norm(head_dim, eps)``) as
    q_norm and k_norm."""

    def __init__(self, c: ModelConfig, head_norm=None):
        super().__init__()
        hd = c.head_dim
        self.n_heads, self.n_kv = c.n_heads, c.n_kv_heads
        self.q_proj = nn.Linear(c.d_model, c.n_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * hd, c.d_model, bias=False)
        if c.qk_norm:
            if head_norm is None:
                raise ValueError(f"model config: qk_norm is set but the {c.family} family has no QK-norm")
            self.q_norm = head_norm(hd, c.rms_eps)
            self.k_norm = head_norm(hd, c.rms_eps)

    def fusable(self):
        return [(self.q_proj, self.k_proj, self.v_proj)]

    def forward(self, x, cos, sin, mask, cache_kv=None, start=0, **kw):
        qn, kn = getattr(self, "q_norm", None), getattr(self, "k_norm", None)
        return self_attention(x, self.q_proj, self.k_proj, self.v_proj, self.o_proj, cos, sin, mask,
                              self.n_heads, self.n_kv, q_norm=qn, k_norm=kn, cache_kv=cache_kv, start=start,
                              qkv_fused=self.fused_group(0), **kw)


class PreNormLayer(nn.Module):
    """A decoder layer under the HF Llama/Qwen names (input_layernorm, self_attn, post_attention_layernorm,
    mlp); the family supplies its attention and MLP modules."""

    def __init__(self, c: ModelConfig, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.rms_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(c.d_model, c.rms_eps)
        self.mlp = mlp

    def forward(self, x, cos, sin, mask, cache_kv=None, start=0, **kw):
        a, kv = self.attention_branch(x, cos, sin, mask, cache_kv, start, **kw)
        x = x + a                                                         # [B, T, d]
        return x + self.mlp_branch(x), kv

    def attention_branch(self, x, cos, sin, mask, cache_kv=None, start=0, **kw):
        """The attention sublayer before its residual add: (output [B, T, d], (k, v)) (the sublayers run
        apart in a tensor-parallel shard's two-micro-batch forward, models/overlap.py)."""
        return self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_kv, start, **kw)

    def mlp_branch(self, x):
        """The MLP sublayer before its residual add: [B, T, d] -> [B, T, d]."""
        return self.mlp(self.post_attention_layernorm(x))


class DiffusionLM(nn.Module):
    """Base class of the families: embedding -> blocks -> final norm; ``logits`` applies the head.

    Subclasses build ``self.embed``, ``self.blocks`` (each block:
    ``forward(x, cos, sin, mask, cache_kv, start) -> (x, (k, v))``), ``self.norm`` and ``self.head`` under
    the checkpoint's parameter names."""

    config: ModelConfig

    def set_moe_impl(self, impl: str) -> None:
        """Every MoE block runs ``impl`` (a key of ``dlc.models.llada_moe.MOE_IMPLS``; dense models: none)."""
        from .llada_moe import set_moe_impl
        set_moe_impl(self, impl)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None, cache: KVCache | None = None, start: int = 0,
                return_kv: bool = False, embed_add: torch.Tensor | None = None):
        """input_ids [B, T] -> final hidden states [B, T, d] (and per-layer post-RoPE (k, v) if asked).

        ``start`` (int or LongTensor [B]) is the column of input_ids[:, 0] in the cache; position_ids default
        to ``start + arange(T)``; key_mask [B, S] marks the keys to attend (S = T without a cache, the cache
        length with one), or [B, T, S] per query (block-causal families). ``embed_add`` [B, T, d] is added to
        the input embeddings (iteration smoothing)."""
        cos, sin, mask = self.layer_inputs(input_ids, position_ids, key_mask, start)
        x = self.embed(input_ids)                                         # [B, T, d]
        if embed_add is not None:
            x = x + embed_add.to(x.dtype)
        kvs = []
        for i, block in enumerate(self.blocks):
            ckv = None if cache is None else cache.layer(i)
            x, kv = block(x, cos, sin, mask, ckv, start)
            kvs.append(kv)
        h = self.norm(x)
        return (h, kvs) if return_kv else h

    def layer_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None,
                     key_mask: torch.Tensor | None, start=0) -> tuple:
        """What every layer of ``forward`` reads beside x: (cos, sin [B, T, rope_dim], the attention mask or
        None). Its own method so that a tensor-parallel shard's two-micro-batch forward (models/overlap.py,
        which runs the layers over two halves of the rows) starts from the same inputs."""
        B, T = input_ids.shape
        if position_ids is None:
            st = start[:, None] if isinstance(start, torch.Tensor) else start
            position_ids = (torch.arange(T, device=input_ids.device)[None] + st).expand(B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.rope_dim, self.config.rope_theta)
        return cos, sin, key_mask_to_attn_mask(key_mask)

    def forward_ragged(self, parts: list[RaggedPart]) -> list[torch.Tensor]:
        """Several forwards as one pass over the weights: every part's tokens packed into one row, attention
        per part (``RaggedCache``) -> each part's hidden states [r, c, d], as its own ``forward`` would return
        them (up to the rounding of the larger GEMMs). The parts' cache rows must be disjoint."""
        ids, pos, add = pack_parts(parts, self.config.d_model)                      # [1, N], [1, N, d]
        h = self(ids, pos, None, cache=RaggedCache(parts), embed_add=add)            # [1, N, d]
        return unpack_parts(h[0], parts)

    def head_weight(self) -> torch.Tensor:
        """The LM head weight [vocab, d] (tied heads: the embedding's first vocab rows, a view)."""
        head = self.head
        return head.weight if hasattr(head, "weight") else head._embed[0].weight[: self.config.vocab_size]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, N, d] -> [B, N, vocab]. Callers pass only the rows they decode (never the whole sequence)."""
        return self.head(hidden)

    def full_logits(self, input_ids, position_ids=None, key_mask=None) -> torch.Tensor:
        """Unoptimised [B, T, vocab] logits aligned so row i predicts token i (Dream's shift applied)."""
        out = self.logits(self(input_ids, position_ids, key_mask))
        if self.config.logit_shift:
            out = torch.cat([out[:, :1], out[:, :-1]], dim=1)
        return out


class _HFBase(nn.Module):
    """``model.*`` of an HF Llama/Qwen-layout checkpoint: embed_tokens, layers, norm."""

    def __init__(self, c: ModelConfig, make_layer):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.embedding_size, c.d_model)
        self.layers = nn.ModuleList(make_layer(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_eps)


class HFLayoutLM(DiffusionLM):
    """Families stored in the HF Llama/Qwen layout (Dream, LLaDA-MoE): ``model.embed_tokens``,
    ``model.layers.N``, ``model.norm``, ``lm_head`` (or the embedding when tied). ``make_layer(config)``
    builds one layer (usually a ``PreNormLayer``)."""

    def __init__(self, config: ModelConfig, make_layer):
        super().__init__()
        self.config = config
        self.model = _HFBase(config, make_layer)
        if config.tie_embeddings:
            self.__dict__["_tied_head"] = TiedHead(self.model.embed_tokens, config.vocab_size)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    embed = property(lambda self: self.model.embed_tokens)
    blocks = property(lambda self: self.model.layers)
    norm = property(lambda self: self.model.norm)
    head = property(lambda self: self.__dict__.get("_tied_head") or self.lm_head)
