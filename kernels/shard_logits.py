"""Selected-row logits over one vocab shard, reduced to the raw statistics a vocab-parallel combine needs.

A tensor-parallel rank holds head rows [v0, v0 + Vr) (issue 16). Decoding a row over the full vocabulary
means: each rank reduces its slice, then one small all_gather of a few floats per row and rank combines them
(``runtime/distributed/vocab.py``: ``combine``). This op is the rank's part at T = 0 without guidance, in one
sweep over the shard's head by the selected-row logits kernels of ``logits.py`` (the plain
``_select_logits_kernel``, or with entropy / top-k ``_select_extras_kernel``: the very kernels, tiles and
float32 arithmetic TP=1's ``fused`` graph runner decodes with; no [rows, Vr] tensor). Per row it returns,
float64 [R] each (the names ``vocab.shard_stats`` uses):

* ``best``: the best score (at T = 0 the largest logit), ``tok``: its *global* id (``v0 +`` the local one;
  ties: the lowest id), ``bl``: its logit;
* ``m``: the largest logit, ``s = sum exp(l - m)``, ``a = sum exp(l - m) l`` (entropy terms; zeros unless
  ``entropy``), so the shard's logsumexp is ``m + log s`` and its mean logit ``a / s``;
* with ``topk``: ``tv`` [R, k] float64 / ``ti`` [R, k] int64, the shard's k largest logits and global ids.

The kernels write per-(row, vocab split) partials; ``_shard_finish_kernel`` reduces a row's splits in one
launch (float64 sums of the float32 partials; the sums over ranks are float64 too), so the op is two launches
(three torch ops more for a top-k).

Why tokens equal TP=1's ``fused`` decode on the same rows: a logit is the same float32 dot in both (the same
``_tile_logits`` with the same BN / BV / BD: ``plan`` picks BN from the row count alone, and a shard boundary
``v0`` that is a multiple of BV keeps every column in a tile at the same offset, e.g. LLaDA's 126464 / 2 =
494 x 128), the argmax is exact, ties go to the lowest id everywhere (first max in a tile, strict ``>``
across tiles, lowest split, lowest rank). What can differ is the softmax sums' order (TP=1 sums its splits
in float32, a rank in float64 over other splits): confidences differ by float32 rounding (~1e-7 relative),
which can only flip a selection between confidences that close. Across TP sizes the *rows* themselves differ
by the all-reduce's summation order, which flips near-tied argmaxes in bf16 (as any TP engine); decisive
fp32 models decode identically.

CPU tensors run the float32 reference (``_decode_chunked``, the decoding core's chunk loop), so a CPU
``fused`` graph runner exercises the same combine."""
from __future__ import annotations

import torch

from . import logits as L
from ._registry import HAS_TRITON, check, define_op, invariant, launch, require_triton, tl, triton, use_triton

STATS = ("best", "tok", "bl", "m", "s", "a")

if HAS_TRITON:
    @triton.jit(do_not_specialize=["v0"])
    def _shard_finish_kernel(PM, PS, PB, PI, PL, PE, OUT, N, n_split, v0,
                             ENTROPY: tl.constexpr, BS: tl.constexpr):
        """One row per program: its ``n_split`` partials (float32; local int32 ids) -> OUT[:, row] =
        (best, global id, its logit, m, s, a) in float64, in one launch (the splits' reduction, otherwise a
        dozen small torch ops per step). Ties: the first split holding the best (the lowest id)."""
        row = tl.program_id(0)
        j = tl.arange(0, BS)
        msk = j < n_split
        base = row * n_split
        pm32 = tl.load(PM + base + j, mask=msk, other=float("-inf"))
        m32 = tl.max(pm32, 0)
        w = tl.where(msk, tl.exp(pm32 - m32), 0.0).to(tl.float64)     # e^(m_j - m) in float32, as TP=1
        pm = tl.where(msk, pm32, 0.0).to(tl.float64)
        ps = tl.load(PS + base + j, mask=msk, other=0.0).to(tl.float64)
        s = tl.sum(ps * w, 0)
        jb = tl.argmax(tl.load(PB + base + j, mask=msk, other=float("-inf")), 0)     # first max
        tl.store(OUT + row, tl.load(PB + base + jb).to(tl.float64))
        tl.store(OUT + N + row, (tl.load(PI + base + jb) + v0).to(tl.float64))
        tl.store(OUT + 2 * N + row, tl.load(PL + base + jb).to(tl.float64))
        tl.store(OUT + 3 * N + row, m32.to(tl.float64))
        tl.store(OUT + 4 * N + row, s)
        if ENTROPY:                     # a split's e^(l - m_j) l sum: its entropy partial plus m_j s_j
            pe = tl.load(PE + base + j, mask=msk, other=0.0).to(tl.float64)
            tl.store(OUT + 5 * N + row, tl.sum((pe + pm * ps) * w, 0))
        else:
            tl.store(OUT + 5 * N + row, 0.0)


def shard_stats_reference(hidden, weight, v0: int, entropy: bool, topk: int,
                          acc: torch.dtype = torch.float32) -> dict:
    """The op's statistics from the chunked decoding of ``kernels.sampling`` (``acc`` arithmetic)."""
    from .select_extras import reference_sweep
    f = torch.float64
    out = reference_sweep(hidden, weight, entropy, topk, acc)
    lse, s = out["_lse"].to(f), out["_den"].to(f)
    bl = out["logprob"].to(f) + lse
    st = {"best": bl, "tok": (out["tokens"] + v0).to(f), "bl": bl, "m": out["_bm"].to(f), "s": s,
          "a": (lse - out["entropy"].to(f)) * s if entropy else torch.zeros_like(s)}
    if topk:
        st["tv"], st["ti"] = out["_topv"].to(f), out["topk_ids"] + v0
    return st


def shard_stats_triton(hidden, weight, v0: int, entropy: bool, topk: int, **tiles) -> dict:
    """The op's statistics by the Triton kernels (``_shard_stats_packed``) as a dict."""
    packed, tv, ti = _shard_stats_packed(hidden, weight, v0, entropy, topk, **tiles)
    st = dict(zip(STATS, packed.unbind(0)))
    if topk:
        st["tv"], st["ti"] = tv, ti
    return st


def _shard_stats_packed(hidden, weight, v0: int, entropy: bool, topk: int, BN=None, BV=128, BD=None,
                        num_warps=4, num_stages=3, programs_per_sm=4):
    """One launch of the plain (or, with extras, the extras) selected-row logits kernel over the shard's head
    ``weight`` [Vr, d], then one of ``_shard_finish_kernel`` -> (statistics [6, N] float64 in ``STATS``
    order, top-k values [N, k] float64, ids [N, k] int64; None without ``topk``). Tiles and splits as TP=1's
    ``select_logits_triton`` / ``select_extras_triton`` pick them for the same rows."""
    N, D = hidden.shape
    V = weight.shape[0]
    BN, BV, n_split, cols = L.plan(N, V, L._sm_count(hidden.device), BN, BV, programs_per_sm, invariant())
    BD = BD or L.block_d(BN, BV, num_stages, hidden)

    def part(dt=torch.float32, *extra):
        return torch.empty((N, n_split, *extra), dtype=dt, device=hidden.device)
    pm, ps, pb, pi = part(), part(), part(), part(torch.int32)
    grid = (-(-N // BN) * n_split,)
    ieee = hidden.dtype == torch.float32
    pe = ptv = pti = None
    if not (entropy or topk):
        pl = part()
        launch(L._select_logits_kernel)[grid](
            hidden, weight, hidden, hidden, hidden, pm, ps, pb, pi, pl, N, V, D, n_split, cols,
            hidden.stride(0), weight.stride(0), hidden.stride(0), 0.0, 0,
            SAMPLE=False, HAS_NOISE=False, TEMP_PTR=False, HAS_KEYS=False, IEEE=ieee,
            BN=BN, BV=BV, BD=BD, num_warps=num_warps, num_stages=num_stages)
    else:
        kpad = 1 << max(0, (topk - 1).bit_length()) if topk else 1
        pe = part() if entropy else None
        ptv, pti = (part(torch.float32, kpad), part(torch.int32, kpad)) if topk else (None, None)
        opt = [pm if t is None else t for t in (pe, ptv, pti)]       # pointers not asked for: any tensor
        launch(L._select_extras_kernel)[grid](
            hidden, weight, pm, ps, pb, pi, *opt, N, V, D, n_split, cols, hidden.stride(0), weight.stride(0),
            IEEE=ieee, ENTROPY=entropy, TOPK=topk, KPAD=kpad,
            BN=BN, BV=BV, BD=BD, num_warps=num_warps, num_stages=num_stages)
        pl = pb                                                       # the extras kernel's best is a logit
    out = torch.empty(len(STATS), N, dtype=torch.float64, device=hidden.device)          # [6, N]
    launch(_shard_finish_kernel)[(N,)](pm, ps, pb, pi, pl, pm if pe is None else pe, out, N, n_split, v0,
                                       ENTROPY=pe is not None, BS=triton.next_power_of_2(n_split))
    if not topk:
        return out, None, None
    v, i = ptv.flatten(1).topk(topk, dim=1)                           # [N, k] of [N, n_split x KPAD]
    return out, v.to(torch.float64), pti.flatten(1).gather(1, i).to(torch.int64) + v0


def validate(hidden, weight, v0: int, topk: int) -> None:
    L.validate(hidden, weight, 0.0, None)
    check(isinstance(v0, int) and v0 >= 0, f"v0 (the shard's first vocab id) must be an int >= 0, got {v0!r}")
    check(0 <= topk <= weight.shape[0], f"topk must be in [0, shard rows={weight.shape[0]}], got {topk}")


@define_op("fused_shard_stats", opaque=True)
def fused_shard_stats_op(hidden: torch.Tensor, weight: torch.Tensor, v0: int, entropy: bool,
                         topk: int) -> list[torch.Tensor]:
    """-> [statistics [6, R] float64 (``STATS`` order), top-k values [R, k], ids [R, k] (empty without)]."""
    if use_triton(hidden):
        require_triton("fused_shard_stats")
        packed, tv, ti = _shard_stats_packed(hidden, weight, v0, entropy, topk)
    else:
        st = shard_stats_reference(hidden, weight, v0, entropy, topk)
        packed, tv, ti = torch.stack([st[k] for k in STATS]), st.get("tv"), st.get("ti")
    if not topk:                                                       # outputs may not alias each other
        return [packed, hidden.new_empty(0), hidden.new_empty(0)]
    return [packed, tv.contiguous(), ti.contiguous()]


@fused_shard_stats_op.register_fake
def _(hidden, weight, v0, entropy, topk):
    R, e = hidden.shape[0], hidden.new_empty(0)
    return [hidden.new_empty(len(STATS), R, dtype=torch.float64),
            hidden.new_empty(R, topk, dtype=torch.float64) if topk else e,
            hidden.new_empty(R, topk, dtype=torch.int64) if topk else hidden.new_empty(0)]


def fused_shard_stats(hidden: torch.Tensor, weight: torch.Tensor, v0: int = 0, entropy: bool = False,
                      topk: int = 0) -> dict:
    """hidden [R, d] rows, weight [Vr, d] the head rows of global ids v0 .. v0 + Vr -> {"best", "tok", "bl",
    "m", "s", "a"} float64 [R] (+ "tv" float64 / "ti" int64 [R, k] with ``topk``) at T = 0 (the module)."""
    validate(hidden, weight, v0, topk)
    packed, tv, ti = torch.ops.dlc.fused_shard_stats(hidden, weight, int(v0), bool(entropy), int(topk))
    st = dict(zip(STATS, packed.unbind(0)))
    if topk:
        st["tv"], st["ti"] = tv, ti
    return st
