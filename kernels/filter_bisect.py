"""Sampling filters at T > 0 that a row's top candidates do not bound (top-p / min-p without a top-k of at
most ``sampling.FILTER_CANDIDATES``, a larger top-k, filters with credit), exact, without sorting [rows, V]:
a bisection on the survivors' threshold. One home for one process (the CUDA-graph runner's captured variant,
``sampling.decode_rows_ext`` with a ``bisect_plan`` route) and for vocab parallelism
(runtime/distributed/vocab_filters.py: each rank its head shard, ``group`` its ranks; ``group`` None: one
process, no collective).

One process's eager path (``sampling._decode_full``) sorts a row's tempered logits s = lb / T (lb: the logits,
with credit the credit-fused ones) and keeps the prefix that passes top-k, then top-p over the renormalised
top-k, then min-p against the most likely token. Each filter keeps every value above some bound, so the
survivors are {x : s_x >= t*} for the smallest value t* an element could have and still pass (``passes``):
with cnt(t) = #{s >= t} and mass(t) = sum_{s > t} exp(s - M) (M the global max), t passes when cnt(t) <= k,
mass(t) < top_p Z_k (Z_k the mass of the top k, itself the mass at or above the k-th value, found by the same
bisection on cnt) and exp(t - M) >= min_p. Both counts are monotone in t, so a bisection over the values in
their total order (``key_of``: the bits as an order-preserving integer) finds t* exactly in as many halvings
as the key has bits; each halving is one all_reduce of [<= 2, C, N] over the ranks.

The keys: without credit the bisection runs over the raw logits l in the model's dtype (16 halvings for bf16,
32 for fp32) instead of the float64 s (64): l is a model-dtype value (the head GEMM's output, guidance
included, before the cast), and s = fl64(l / T) is strictly increasing in l (two model-dtype values differ by
at least 2^-24 relative, far above float64's 2^-53 rounding), so {s >= t*} = {l >= u*} for the smallest
model-dtype u* with passes(fl64(u* / T)): the same survivors, the same sums (cnt and mass over the same
elements in the same order), with 1/4 (bf16) or 1/2 (fp32) of the halvings each reading 2 or 4 bytes instead
of 8. Credit's fused logits are float64 sums: those batches bisect the float64 s (64 halvings).

On CUDA (and in the interpreter's checks) the search and the draw run as fused Triton kernels over the
model-dtype logits (``fused_draw``, the section at the end): a K-ary search (16 thresholds a pass, so 4 passes
for bf16 keys instead of 16 halvings), each element's float64 weight exp(s - M) recomputed from its 2- or
4-byte value where a sum needs it (no [c, N, V] float64 tensor), and one draw kernel; the torch code below is
their reference, the CPU path and credit's (float64 keys). A sampled step whose rows ask no filter at all
(and no other extra) is the draw with every id kept: ``plain_draw`` (the last section), one kernel per vocab
chunk of the sweep's own head GEMM (split max, exp sum, Gumbel-max), replaces ``logits.decode_rows``' float64
sweep there (``sampling.decode_rows_ext`` routes it: ``plain_ok``): the same tokens, the confidence (the raw
softmax probability of the drawn token) within float64 summation order. ``FUSED = False`` (or
``DLC_BISECT_TORCH=1``) keeps the torch path everywhere, the unfiltered draw's too.

Fixed halvings, no host read (the ``bisect_plan``, what the batch's rows need, is read by the caller once,
with the variant it picks), shapes fixed by the batch: the whole decoding captures in a CUDA graph, the
ranks' all_reduces inside it. The sequences go through in chunks of at most ``CHUNK_ELEMENTS`` logits
(sized from the whole vocabulary, so every rank takes the same chunks), each [c, N, V_rank] float64.

Then the Gumbel-max with the hash noise of the global ids over each process's survivors (one all_gather
merges the ranks' best: ties the lowest rank, the lowest id), as one process's argmax over the survivors.
Values tied exactly at t* are kept together (one process's stable sort could split such a tie at a top-k
boundary: a measure-zero event on real logits)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ._registry import HAS_TRITON, INTERPRET, tl, triton, use_triton
from .logits import uniform_noise

CHUNK_ELEMENTS = 1 << 25          # logits per sequence chunk (256 MiB per float64 [c, N, V] tensor)
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
PLAN = "bisect"                   # bisect_plan's prefix: a decode_rows_ext route beside the candidates'


def bisect_plan(top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> str:
    """What the batch's filters need of the bisection, read once on the host (one copy), as a route string:
    "bisect" + "k" (some row has a top-k: count the survivors), "z" (some row has a top-k and a top-p: the
    top k's mass, a first bisection), "p" (some row has a top-p: the mass above the threshold); min-p needs
    no sum (a closed form of the threshold value). The captured
    variant holds the plan (``runners.graph.ExtrasKey.filtered``), so a replay reads nothing on the host."""
    k, p = torch.stack([top_k.to(torch.float64), top_p.to(torch.float64)]).cpu()
    has_k, has_p = k > 0, p < 1.0
    return PLAN + "k" * bool(has_k.any()) + "z" * bool((has_k & has_p).any()) + "p" * bool(has_p.any())


def is_plan(route) -> bool:
    return isinstance(route, str) and route.startswith(PLAN)


def key_of(x: torch.Tensor) -> torch.Tensor:
    """float -> signed integer of the same width in the same order (negative values: all bits but the sign
    flipped); ``value_of`` inverts it."""
    bits = 8 * x.element_size()
    b = x.view(_INT[x.element_size()])
    return b ^ ((b >> (bits - 1)) & ((1 << (bits - 1)) - 1))


def value_of(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = 8 * k.element_size()
    return (k ^ ((k >> (bits - 1)) & ((1 << (bits - 1)) - 1))).view(dtype)


def bisect(passes, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The smallest key in (a, b] with ``passes(key)`` [C, N] (``passes`` monotone, true at b), by halving
    the integer keys: as many halvings as the keys have bits end every bracket."""
    for _ in range(8 * a.element_size()):
        mid = (a >> 1) + (b >> 1) + (a & b & 1)                  # floor((a + b) / 2) without overflow
        ok = passes(mid)
        a, b = torch.where(ok, a, mid), torch.where(ok, mid, b)
    return b


def bisect_filters(h, w, v0: int, vocab: int, cond_rows, un_rows, cfg_w, temp, seeds, filters, out: dict, *,
                   chunk: int, credit=None, filtered_conf: bool = False, plan: str | None = None,
                   group=None, stats: bool = False, logprobs: bool = False) -> dict:
    """Tokens, confidences and logprobs of the filtered Gumbel-max for every sequence (those without a filter
    keep every id: the plain draw) from ``out`` (``sampling.finish_stats`` of the sweep, the ranks' merged:
    ``_bm``, ``_den``, ``_lse``, credit's ``top1_ids`` / ``top1_prob``), updated in place. h [B, N, d]
    rows, w [Vr, d] this process's head rows (global ids v0 ..), ``chunk`` head rows per GEMM; ``plan``:
    ``bisect_plan`` of the filters (None: read here, on the host). ``stats`` (no credit): no sweep ran, so
    the raw max, softmax sum and logsumexp come from these logits (the fused kernels' first search pass)
    and ``logprobs`` says whether to return the logprob."""
    plan = bisect_plan(*filters) if plan is None else plan
    C, N = cond_rows.shape[0], h.shape[1]
    per = max(1, CHUNK_ELEMENTS // (N * vocab))                  # sequences per chunk (the same on each rank)
    parts = []
    for c0 in range(0, C, per):
        sl = slice(c0, min(C, c0 + per))
        sub = {k: v[sl] for k, v in out.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == C}
        cred = None if credit is None else tuple(x[sl] for x in credit)
        cond = cond_rows[sl]                                     # one index tensor: no guidance, one GEMM
        un = cond if un_rows is cond_rows else un_rows[sl]
        parts.append(_filter_chunk(h, w, v0, vocab, cond, un, cfg_w, temp, seeds[sl],
                                   tuple(f[sl] for f in filters), sub, chunk, cred, filtered_conf, plan,
                                   group, stats, logprobs or "logprob" in out))
    for key in parts[0]:
        out[key] = torch.cat([p[key] for p in parts])
    return out


def _filter_chunk(h, w, v0, vocab, cond, un, cfg_w, temp, seeds, filters, out, chunk, credit, filtered_conf,
                  plan, group, stats, logprobs) -> dict:
    """``bisect_filters`` for one chunk of c sequences (their slices of the filters, credit and ``out``):
    the fused kernels (``fused_draw``) where they run (CUDA, the interpreter's checks; not credit's float64
    keys), else the torch path (``_draw_torch``); then the ranks' best draws merged."""
    lraw = _logits(h, w, cond, un, cfg_w, chunk)                                   # [c, N, Vr] model dtype
    if credit is None and fused_ok(lraw):
        best, M, kept, raw = fused_draw(lraw, temp, seeds, filters, v0, vocab, plan, group, filtered_conf,
                                        stats)
    else:
        best, M, kept = _draw_torch(lraw, h.shape[1], w.shape[0], temp, seeds, filters, v0, vocab, credit,
                                    out, plan, group, filtered_conf)
        raw = _raw_stats(lraw, group) if stats else None
    if stats:                                     # the sweep's statistics, from these logits
        out = {"_bm": raw[0], "_den": raw[1], "_lse": raw[0] + torch.log(raw[1])}
    ranks = _gather(best, group)                                                   # [R, 5, c, N]
    r = ranks[:, 0].argmax(0, keepdim=True)                                        # first max: lowest rank
    best = ranks.gather(0, r[:, None].expand(1, 5, *r.shape[1:]))[0]               # [5, c, N]
    res = {"tokens": best[1].to(torch.int64)}
    if filtered_conf:                             # the probability among the survivors of s
        res["confidence"] = torch.exp(best[4] - M) / _sum(kept[None], group)[0]
    else:
        res["confidence"] = torch.exp(best[2] - out["_bm"]) / out["_den"]
    if logprobs:
        res["logprob"] = best[3] - out["_lse"]
    return res


def _raw_stats(lraw, group):
    """The raw logits' max and softmax sum exp(l - max) [c, N] float64 over the ranks (``stats`` on the
    torch path)."""
    l64 = lraw.to(torch.float64)
    bm = _gather(l64.amax(-1), group).amax(0)
    return bm, _sum(torch.exp(l64 - bm[..., None]).sum(-1)[None], group)[0]


def _draw_torch(lraw, N, Vr, temp, seeds, filters, v0, vocab, credit, out, plan, group, filtered_conf):
    """The torch path (CPU, credit, the reference of the fused kernels): [c, N, Vr] float64 tensors. Returns
    (this process's best draw [5, c, N]: score, global id, lb, l64, s at it; M [c, N]; the survivors' mass
    [c, N] of this process, or None)."""
    acc = torch.float64
    l64 = lraw.to(acc)
    lb = l64 if credit is None else _credit_fused(l64, credit, out, v0)
    s = lb / temp                                                                  # [c, N, Vr] tempered
    keyed = s if credit is not None else lraw                                      # what the keys order
    ext = _gather(torch.stack([s.amax(-1), keyed.amax(-1).to(acc), -keyed.amin(-1).to(acc)]), group)
    M, kmax, kmin = ext[:, 0].amax(0), ext[:, 1].amax(0), -ext[:, 2].amax(0)      # [c, N] each
    e = torch.exp(s - M[..., None])
    keep = _survivors(keyed, e, M, kmax, kmin, temp, filters, vocab, plan, group, credit is None)  # [c,N,Vr]
    g = torch.log(-torch.log(uniform_noise(seeds, N, v0, v0 + Vr, vocab, lraw.device, acc)))
    score = torch.where(keep, lb - temp * g, -float("inf"))
    j = score.argmax(-1, keepdim=True)                                             # first max: lowest id
    mine = torch.stack([score.gather(-1, j)[..., 0], (j[..., 0] + v0).to(acc), lb.gather(-1, j)[..., 0],
                        l64.gather(-1, j)[..., 0], s.gather(-1, j)[..., 0]])      # [5, c, N]
    kept = torch.where(keep, e, 0.0).sum(-1) if filtered_conf else None
    return mine, M, kept


def _logits(h, w, cond, un, cfg_w, chunk: int) -> torch.Tensor:
    """The guided logits [c, N, Vr] of the chunk's sequences in the model's dtype (``sampling._guided``'s
    values before its cast), head rows ``chunk`` at a time. A chunk that reads every row of ``h`` takes
    ``_guided``'s own ops (each GEMM over ``h`` itself, then the rows picked), so the sort's route and this
    one round alike: a GEMM over a copy of the rows may take another kernel (CPU BLAS picks by alignment)."""
    V = w.shape[0]
    if (1 if cond is un else 2) * cond.shape[0] == h.shape[0]:
        from .sampling import _guided
        return torch.cat([_guided(h, w, cond, un, cfg_w, c0, min(V, c0 + chunk), h.dtype)
                          for c0 in range(0, V, chunk)], -1)
    if cond is un:
        hc = h.index_select(0, cond)                                               # [c, N, d]
        return torch.cat([F.linear(hc, w[c0:c0 + chunk]) for c0 in range(0, V, chunk)], -1)
    c = cond.shape[0]
    hc = h.index_select(0, torch.cat([cond, un]))                                  # [2c, N, d]
    parts = []
    for c0 in range(0, V, chunk):
        lc = F.linear(hc, w[c0:c0 + chunk])
        parts.append(lc[c:] + cfg_w * (lc[:c] - lc[c:]))
    return torch.cat(parts, -1)


def _credit_fused(l64, credit, out: dict, v0: int) -> torch.Tensor:
    """This process's credit-fused logits [c, N, Vr] with this step's own credit (p1 ** gamma on the global
    raw top-1, where this process holds it), as one process's ``_decode_full`` fuses them."""
    from .sampling import CREDIT_GAMMA, _credit_chunk
    ids, vals, alpha = credit
    n = l64.shape[-1]
    cred = _credit_chunk(ids, vals, v0, v0 + n, l64)
    own = out["top1_ids"] - v0                                                     # [c, N]
    inside = (own >= 0) & (own < n)
    add = torch.where(inside, out["top1_prob"] ** CREDIT_GAMMA, 0.0)
    cred = cred.scatter_add(-1, own.clamp(0, n - 1)[..., None], add[..., None])
    return l64 + alpha.to(l64.dtype)[:, None, None] * torch.log1p(cred)


def _survivors(keyed, e, M, kmax, kmin, temp, filters, vocab: int, plan: str, group,
               raw: bool) -> torch.Tensor:
    """The survivors [c, N, Vr] of top-k, top-p over the top k's mass and min-p, as the eager sort keeps them.
    ``keyed``: the raw logits (``raw``: s = fl64(u / T)) or s itself; ``plan`` says which sums the batch needs
    (``bisect_plan``). ``bisect`` finds t*, the smallest value at which the first element (in id order) of
    a tie group would survive (cnt(> t) < k, mass(> t) < top_p Z_k, min-p); every value above survives, and of
    the elements tied at t* (frequent with bf16 logits) the first j in id order, as the stable sort's prefix
    keeps them: cnt(> t*) + j < k and mass(> t*) + j e(t*) < top_p Z_k."""
    acc, dt = torch.float64, keyed.dtype
    top_k, top_p, min_p = (f.to(keyed.device) for f in filters)
    k = torch.where(top_k > 0, top_k, vocab).to(acc)[:, None]                      # [c, 1]
    p_top, p_min = top_p.to(acc)[:, None], min_p.to(acc)[:, None]
    hi, lo = key_of(kmax.to(dt)), key_of(kmin.to(dt)) - 1                          # lo: below every value
    need_k, need_z, need_p = (c in plan[len(PLAN):] for c in "kzp")
    keys = key_of(keyed) if (use_triton(keyed) or INTERPRET) and HAS_TRITON else None   # the kernel's

    def s_of(u):                                   # a key value's tempered logit, as the elements' s
        return u.to(acc) / temp if raw else u

    def above(u, mass: bool, count: bool):         # [mass(> u)] + [cnt(> u)], summed over the ranks
        if not (mass or count):
            return None
        sums = above_sums(keyed, e, u, mass, count, keys)                          # [2, c, N]
        return _sum(sums if mass and count else sums[:1] if mass else sums[1:], group)
    z = _sum(e.sum(-1)[None], group)[0] if need_p else None                        # the row's whole mass
    if need_z:                                     # top-p renormalises over the first k: Z_k
        vk = value_of(bisect(lambda m: above(value_of(m, dt), False, True)[0] < k, lo, hi), dt)   # k-th value
        mk, ck = above(vk, True, True)
        zk = mk + (k - ck) * torch.exp(s_of(vk) - M)
        z = torch.where((top_k > 0)[:, None], zk, z)

    def passes(m):                                 # would the first element of key m survive every filter
        u = value_of(m, dt)
        ok = torch.exp(s_of(u) - M) >= p_min
        sums = above(u, need_p, need_k)
        if need_p:
            ok &= sums[0] < p_top * z
        if need_k:
            ok &= sums[-1] < k
        return ok
    t = value_of(bisect(passes, lo, hi), dt)                                       # [c, N]
    keep = keyed > t[..., None]
    if not (need_p or need_k):                     # min-p alone keeps a whole tie group
        return keep | (keyed == t[..., None])
    tie = keyed == t[..., None]                                                    # [c, N, Vr]
    j = _tie_rank(tie, group)                                                      # [c, N, Vr] in id order
    sums = above(t, need_p, need_k)
    first = torch.ones_like(keep)
    if need_p:
        first &= sums[0][..., None] + j * torch.exp(s_of(t) - M)[..., None] < (p_top * z)[..., None]
    if need_k:
        first &= sums[-1][..., None] + j < k[..., None]
    return keep | (tie & (first | (j == 0)))


def above_sums(keyed: torch.Tensor, e: torch.Tensor, u: torch.Tensor, mass: bool = True,
               count: bool = True, keys: torch.Tensor | None = None) -> torch.Tensor:
    """[mass, cnt] [2, c, N] float64 of the elements above u [c, N]: sum of e over keyed > u, and their
    count (a sum left out: zeros), for keyed [c, N, V] and e [c, N, V] float64. A halving's whole work: on
    CUDA one Triton pass reading the keys and e once (``_above_kernel``; ``keys``: ``key_of(keyed)``, the
    integers compare as the values do, whatever the float type), the torch reference elsewhere."""
    if (use_triton(keyed) or INTERPRET) and HAS_TRITON:
        return above_sums_triton(key_of(keyed) if keys is None else keys, e, key_of(u), mass, count)
    gt = keyed > u[..., None]                                                      # [c, N, V]
    zero = torch.zeros(u.shape, dtype=torch.float64, device=u.device)
    return torch.stack([torch.where(gt, e, 0.0).sum(-1) if mass else zero,
                        gt.sum(-1).to(torch.float64) if count else zero])


SPLIT = 8192                        # vocab columns per program (deterministic partials, summed in order)


def above_sums_triton(keys, e, u, mass: bool = True, count: bool = True, block: int = 1024) -> torch.Tensor:
    """``above_sums`` over integer keys [c, N, V] (``key_of``) and u's key [c, N] by ``_above_kernel``:
    programs (row, vocab split), each summing its split's tiles in order into float64 partials [R, S, 2],
    then the splits summed in order (no atomics: deterministic)."""
    keyed = keys
    c, N, V = keyed.shape
    R, S = c * N, triton.cdiv(V, SPLIT)
    k2, e2 = keyed.reshape(R, V), e.reshape(R, V)
    if k2.stride(-1) != 1 or e2.stride(-1) != 1:
        k2, e2 = k2.contiguous(), e2.contiguous()
    part = torch.empty(R, S, 2, dtype=torch.float64, device=keyed.device)
    _above_kernel[(R, S)](k2, e2, u.reshape(R).contiguous(), part, V, k2.stride(0), e2.stride(0),
                          SPLIT=SPLIT, MASS=mass, COUNT=count, BLOCK=min(block, SPLIT), num_warps=4)
    return part.sum(1).t().reshape(2, c, N)


if HAS_TRITON:
    @triton.jit
    def _above_kernel(K, E, U, P, V, s_k, s_e, SPLIT: tl.constexpr, MASS: tl.constexpr, COUNT: tl.constexpr,
                      BLOCK: tl.constexpr):
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        u = tl.load(U + r)
        m_acc = tl.zeros([BLOCK], tl.float64)
        n_acc = tl.zeros([BLOCK], tl.float64)
        for c0 in range(0, SPLIT, BLOCK):                             # the split's tiles in order
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            gt = (tl.load(K + r * s_k + c, mask=inside, other=0) > u) & inside
            if MASS:
                m_acc += tl.where(gt, tl.load(E + r * s_e + c, mask=gt, other=0.0), 0.0)
            if COUNT:
                n_acc += gt.to(tl.float64)
        S = tl.num_programs(1)
        tl.store(P + (r * S + sp) * 2, tl.sum(m_acc, 0))
        tl.store(P + (r * S + sp) * 2 + 1, tl.sum(n_acc, 0))


def _tie_rank(tie: torch.Tensor, group) -> torch.Tensor:
    """Each element's rank among the tied ones [c, N, Vr] in global id order (float64): this process's
    exclusive running count, after the ties of the lower ranks (their lower ids)."""
    own = tie.cumsum(-1, dtype=torch.float64)                                      # inclusive, this shard
    j = own - tie.to(torch.float64)
    if group is not None:
        counts = _gather(own[..., -1], group)                                      # [R, c, N]
        j = j + counts[:dist.get_rank(group)].sum(0)[..., None]
    return j


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """[...] on every rank -> [R, ...] (one ``all_gather_into_tensor``: no host sync, it captures); one
    process (``group`` None): [1, ...]."""
    if group is None:
        return x[None]
    x = x.contiguous()
    world = dist.get_world_size(group)
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    _GATHER(out, x, group=group)
    return out.view((world,) + tuple(x.shape))


def _sum(x: torch.Tensor, group) -> torch.Tensor:
    """[k, c, N] summed over the ranks (one all_reduce; one process: as is)."""
    if group is None:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


# ------------------------------------------------------------------------------------- fused (Triton) path
# One process's and a rank's bisection without [c, N, V] float64 tensors: the kernels read the model-dtype
# logits (2 or 4 bytes an element) and recompute each element's weight e = exp(s - M) in float64 where a sum
# needs it. Passes over the logits: the extent (min / max key), ceil(bits / 4) K-ary search passes (K = 16
# thresholds a pass: the mass and count above each, so one float64 exp serves 16 comparisons instead of one;
# the top-p search's first pass also gives the row's whole mass z in its slot 0), one at t* (ties and the sums
# above), one draw (survivors, the hash noise, the Gumbel score, a per-split argmax). A pass's prologue
# evaluates the previous pass's sums (``passes``, per row, as ``_survivors`` does) and narrows the bracket, so
# a search is one launch a pass (one process; with ``group`` the splits' partials are summed and
# all_reduced between launches). Credit (float64 fused logits) keeps the torch path. The kernels compare keys
# (-0.0 below +0.0), the torch path's final keep compares values: they differ only for a row whose t* is a
# signed zero holding both zeros. Masses: the splits' partials summed in order (deterministic, no atomics),
# within float64 summation order of the torch path's sums (which differ from the sort's cumsum as much).
FUSED = os.environ.get("DLC_BISECT_TORCH") != "1"     # False: the torch path everywhere (bench's baseline),
#                                                       the unfiltered draw (plain_draw) included
K_ARY = 16                          # thresholds per search pass
FUSED_SPLIT = 8192                  # vocab columns per program of the fused kernels
FUSED_BLOCK = 128                   # columns per tile
_DT = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
# ROW columns (float64 per decoded row): max tempered logit, the mass top-p compares with (z or Z_k), top-k
# (vocab when off), top-p, min-p, the tempering operand (T, or 1 / T where torch multiplies by it), Z_k, has a
# top-k, T (the Gumbel scale)
_M, _Z, _K, _P, _MINP, _TDIV, _ZK, _HASK, _T = range(9)
_ROW = 9


def fused_ok(x: torch.Tensor) -> bool:
    """Can the fused kernels take raw logits of x's dtype and device (CUDA with Triton, or the interpreter's
    checks)?"""
    return FUSED and HAS_TRITON and x.dtype in _DT and (use_triton(x) or INTERPRET)


def search_passes(bits: int, k: int = K_ARY) -> int:
    """K-ary passes that end every bracket of keys ``bits`` wide: a pass leaves at most ceil(n / k) of n."""
    n, p = 1 << bits, 0
    while n > 1:
        n, p = -(-n // k), p + 1
    return p


def _tempering(temp, device) -> tuple:
    """(the operand [1] float64 or float, whether to multiply) that reproduces torch's ``l64 / temp`` on
    ``device``: a CUDA tensor divides; a Python number on CUDA multiplies by its reciprocal (torch's CUDA
    division by a CPU scalar does), on CPU divides."""
    host_scalar = temp.device.type == "cpu" and temp.dim() == 0 if torch.is_tensor(temp) else True
    if torch.is_tensor(temp) and not (host_scalar and device.type == "cuda"):
        return temp.to(device=device, dtype=torch.float64).reshape(1), False
    t = float(temp)
    return (1.0 / t, True) if device.type == "cuda" else (t, False)


def _row_params(lraw, temp, filters, vocab, M) -> torch.Tensor:
    """ROW [R, _ROW] float64 (R = c N rows): the per-row operands of the search and the draw."""
    c, N, _ = lraw.shape
    acc, dev = torch.float64, lraw.device
    top_k, top_p, min_p = (f.to(dev) for f in filters)
    tdiv, _ = _tempering(temp, dev)
    row = torch.zeros(c, N, _ROW, dtype=acc, device=dev)
    row[..., _M] = M.reshape(c, N)
    row[..., _K] = torch.where(top_k > 0, top_k, vocab).to(acc)[:, None]
    row[..., _P] = top_p.to(acc)[:, None]
    row[..., _MINP] = min_p.to(acc)[:, None]
    row[..., _TDIV] = tdiv.reshape(()) if torch.is_tensor(tdiv) else tdiv
    row[..., _HASK] = (top_k > 0).to(acc)[:, None]
    row[..., _T] = temp.reshape(()).to(acc) if torch.is_tensor(temp) else float(temp)
    return row.reshape(c * N, _ROW)


def fused_draw(lraw, temp, seeds, filters, v0: int, vocab: int, plan: str, group, filtered_conf: bool,
               stats: bool = False, keep_out: bool = False):
    """``_draw_torch`` by the fused kernels for raw logits ``lraw`` [c, N, Vr] (bf16 / fp16 / fp32, global
    ids v0 ..): the same (best [5, c, N], M [c, N], survivors' mass or None, ``stats``: the raw max and
    softmax sum [c, N] over the ranks, else None); ``keep_out``: also the survivors [c, N, Vr] bool (the
    tests' check)."""
    c, N, Vr = lraw.shape
    R, dev, acc = c * N, lraw.device, torch.float64
    dt, wide = lraw.dtype, lraw.element_size()
    x = lraw.reshape(R, Vr)
    x = (x if x.stride(-1) == 1 else x.contiguous()).view(_INT[wide])              # [R, Vr] the bits
    geo = _Geometry(x, wide, dt, temp)
    kmin, kmax = _extent(geo, group)                                               # [R] int64 keys
    top = value_of(kmax.to(_INT[wide]), dt).to(acc)                                # [R] the raw max
    M = top / temp                                                                 # as s.amax
    row = _row_params(lraw, temp, filters, vocab, M)
    need_k, need_z, need_p = (ch in plan[len(PLAN):] for ch in "kzp")
    state = torch.stack([kmin - 1, kmax], -1)                                      # [R, 2] (a, b]
    if need_z:                                     # Z_k: the mass at or above the k-th value
        st, part = _search(geo, row, state, group, count_only=True, mass=False, count=True, set_z=False,
                           final_mass=True)
        vk = value_of(st[:, 1].to(_INT[wide]), dt).to(acc)
        mk, ck = _sum(part[:, :, 1].sum(1), group).unbind(-1)                      # [R] each
        row[:, _ZK] = mk + (row[:, _K] - ck) * torch.exp(vk / temp - M.reshape(R))
    den = torch.empty(R, geo.S, dtype=acc, device=dev) if stats else None
    st, part = _search(geo, row, state, group, count_only=False, mass=need_p, count=need_k, set_z=need_p,
                       final_mass=need_p, den=den)
    ties = part[:, :, 0, 1] - part[:, :, 1, 1]                                     # [R, S] == t* per split
    tie0 = ties.cumsum(1) - ties                                                   # ties before each split
    if group is not None:                                                          # and on the lower ranks
        tie0 = tie0 + _gather(ties.sum(1), group)[:dist.get_rank(group)].sum(0)[:, None]
    above = _sum(part[:, :, 1].sum(1), group)                                      # [R, 2] mass, cnt > t*
    best, bid, kept, keep = _draw(geo, row, st, above, tie0, _noise_base(seeds, N, vocab, dev), v0, need_p,
                                  need_k, filtered_conf, keep_out)
    j = best.argmax(1, keepdim=True)                                               # first max: lowest split
    idx = bid.gather(1, j)                                                         # [R, 1] local id
    l64 = x.view(dt).gather(1, idx).to(acc)[:, 0]
    mine = torch.stack([best.gather(1, j)[:, 0], (idx[:, 0] + v0).to(acc), l64, l64, l64 / temp])
    raw = None
    if stats:                                      # the raw max and softmax sum (the sweep's _bm, _den)
        raw = top.reshape(c, N), _sum(den.sum(1)[None], group)[0].reshape(c, N)
    out = (mine.reshape(5, c, N), M.reshape(c, N), None if kept is None else kept.sum(1).reshape(c, N), raw)
    return out + (keep.reshape(c, N, Vr).bool(),) if keep_out else out


def _noise_base(seeds: torch.Tensor, N: int, vocab: int, dev) -> torch.Tensor:
    """The hash's per-row offset [C N] int64 of ``seeded_uniform`` ((seed mod 2^32) 1000003 + row) vocab: a
    kernel adds the global id and hashes (``_gumbel``)."""
    rows = torch.arange(N, device=dev)
    return (((seeds.to(dev)[:, None] % 4294967296) * 1000003 + rows) * vocab).reshape(-1)


class _Geometry:
    """The launch geometry of one chunk's fused kernels: bits [R, Vr], key width, dtype code, tempering."""
    def __init__(self, x, wide, dt, temp):
        self.x, self.R, self.V = x, x.shape[0], x.shape[1]
        self.bits, self.dt = 8 * wide, _DT[dt]
        self.S = triton.cdiv(self.V, FUSED_SPLIT)
        self.recip = _tempering(temp, x.device)[1]

    def launch(self, kernel, *args, **const):
        kernel[(self.R, self.S)](self.x, *args, self.V, self.x.stride(0), SPLIT=FUSED_SPLIT,
                                 BLOCK=min(FUSED_BLOCK, FUSED_SPLIT), BITS=self.bits, DT=self.dt,
                                 RECIP=self.recip, enable_fp_fusion=False, num_warps=4, **const)


def _extent(geo: _Geometry, group):
    """Each row's smallest and largest key [R] int64 (over the ranks)."""
    part = torch.empty(geo.R, geo.S, 2, dtype=torch.int32, device=geo.x.device)
    geo.launch(_extent_kernel, part)
    ext = torch.stack([-part[..., 0].amin(1).to(torch.int64), part[..., 1].amax(1).to(torch.int64)])
    ext = _gather(ext, group).amax(0)
    return -ext[0], ext[1]


def _search(geo, row, state, group, *, count_only, mass, count, set_z, final_mass, den=None):
    """A K-ary search of the smallest key that ``passes`` in (a, b] of ``state`` [R, 2], then the sums at
    t* - 1 and t* (slots 0 and 1). Returns (state [R, 2]: b = t*, partials [R, S, K, 2] of that last pass).
    ``den`` [R, S]: the first pass also writes the raw softmax sums there (b is then each row's max key)."""
    dev, passes = geo.x.device, search_passes(geo.bits)
    sums = torch.zeros(1, dtype=torch.float64, device=dev)                         # no prologue: unused
    st_in = state.contiguous()
    for i in range(passes + 1):
        st_out = torch.empty_like(st_in)
        part = torch.empty(geo.R, geo.S, K_ARY, 2, dtype=torch.float64, device=dev)
        final = i == passes
        s_in = sums.shape[1] if i else 1
        with_den = den is not None and i == 0
        geo.launch(_pass_kernel, row, st_in, st_out, sums, s_in, part, den if with_den else sums, K=K_ARY,
                   PROLOGUE=i > 0, COUNT_ONLY=count_only, EVAL_MASS=mass, EVAL_COUNT=count,
                   SET_Z=set_z and i == 1, FINAL=final, BODY_MASS=final_mass if final else mass,
                   WITH_DEN=with_den)
        sums = part if group is None else _sum(part.sum(1, keepdim=True), group)
        st_in = st_out
    return st_in, part


def _draw(geo, row, st, above, tie0, base, v0, need_p, need_k, filtered_conf, keep_out):
    """The draw kernel: per (row, split) the best Gumbel score over the survivors, its local id, and the
    survivors' mass (``filtered_conf``); ``keep_out``: the survivors [R, Vr] int8."""
    dev = geo.x.device
    best = torch.empty(geo.R, geo.S, dtype=torch.float64, device=dev)
    bid = torch.empty(geo.R, geo.S, dtype=torch.int64, device=dev)
    kept = torch.empty(geo.R, geo.S, dtype=torch.float64, device=dev) if filtered_conf else best
    keep = torch.empty(geo.R, geo.V, dtype=torch.int8, device=dev) if keep_out else best
    geo.launch(_draw_kernel, row, st, above.contiguous(), tie0.contiguous(), base.contiguous(), best, bid,
               kept, keep, v0, NEED_P=need_p, NEED_K=need_k, WITH_KEPT=filtered_conf, KEEP_OUT=keep_out)
    return best, bid, kept if filtered_conf else None, keep if keep_out else None


def element_weights(lraw: torch.Tensor, M: torch.Tensor, temp) -> torch.Tensor:
    """e = exp(s - M) [c, N, Vr] float64 of raw logits as the fused kernels recompute them (``_weight``): the
    tests' check that they equal torch's ``torch.exp(lraw.double() / temp - M)``."""
    c, N, Vr = lraw.shape
    geo = _Geometry(lraw.reshape(c * N, Vr).contiguous().view(_INT[lraw.element_size()]),
                    lraw.element_size(), lraw.dtype, temp)
    row = torch.zeros(c * N, _ROW, dtype=torch.float64, device=lraw.device)
    row[:, _M] = M.reshape(-1)
    tdiv, _ = _tempering(temp, lraw.device)
    row[:, _TDIV] = tdiv.reshape(()) if torch.is_tensor(tdiv) else tdiv
    out = torch.empty(c * N, Vr, dtype=torch.float64, device=lraw.device)
    geo.launch(_weights_kernel, row, out)
    return out.reshape(c, N, Vr)



# ------------------------------------------------------------------------------- the unfiltered draw (Triton)
# A sampled step whose rows ask no filter (and no other extra) is the draw above with every id kept: no
# threshold to search, so one kernel per vocab chunk of the head GEMM (``plain_draw``) reads the chunk's
# model-dtype logits twice (the split's max, then the sums and the draw) instead of the sweep's float64 passes
# over [C, N, chunk] (cast, exp, the noise, the log-logs, the score, argmax, max, sum: each a float64 tensor).
# The noise of a tile whose largest logit is more than GUMBEL_SPAN T below the split's largest cannot win
# (-T log(-log u) lies in [-3.131 T, 22.874 T] for every u the hash draws, so such a tile's best score is
# below the split max's own score by at least T): only its exp sum runs.
GUMBEL_SPAN = 27.0                  # > 22.874 + 3.131 (the Gumbel term's range over the hash's u), 1 T margin


def plain_ok(h: torch.Tensor, temp, acc: torch.dtype) -> bool:
    """Does a sampled step over rows ``h`` with no filter and no other extra take ``plain_draw`` (the fused
    kernels' route, ``fused_ok``, with the float64 arithmetic it reproduces)?"""
    sampled = not (isinstance(temp, (int, float)) and temp == 0)
    return sampled and acc == torch.float64 and fused_ok(h)


def plain_draw(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab: int, chunk: int) -> dict:
    """``logits.decode_rows``' sampled decode (the sweep's Gumbel-max with the hash noise; the confidence is
    the raw softmax probability of the drawn token, exp(l_tok - max l) / sum exp(l - max l), as
    ``sampling.finish_stats`` computes it) from ``plain_stats``: the same tokens, confidences within float64
    summation order. Fixed shapes, no host read: it captures. h [B, N, d], w [>= vocab, d] ->
    {"tokens" [C, N], "confidence" [C, N]}."""
    st = plain_stats(h, w, 0, cond_rows, un_rows, cfg_w, temp, seeds, vocab=vocab, chunk=chunk)
    return {"tokens": st["tok"], "confidence": torch.exp(st["bl"] - st["m"]) / st["s"]}


def plain_stats(h, w, v0: int, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab: int, chunk: int,
                rows: int | None = None) -> dict:
    """The unfiltered sweep's statistics over head rows w[:rows] (global ids v0 .., default the whole
    vocabulary) by ``_plain_kernel``, all [C, N]: the best Gumbel score ``best``, its global id ``tok``
    (int64) and logit ``bl``, the max logit ``m`` and ``s`` = sum exp(l - m) (float64) -- what
    ``logits.decode_rows`` keeps, and a vocab-parallel rank's ``vocab.shard_stats``. Per vocab chunk the
    guided logits in the model's dtype (``sampling._guided``: the sweep's own GEMM over ``h``, so the same
    values), then one launch over (row, split) writing the split's max, exp sum, best score, its id and logit;
    the splits merged in id order (first max: the lowest id, as the sweep's argmax)."""
    from .sampling import _guided
    C, N, dev = cond_rows.shape[0], h.shape[1], h.device
    R, wide = C * N, h.element_size()
    n = vocab if rows is None else rows
    spans = [(c0, min(n, c0 + chunk)) for c0 in range(0, n, chunk)]
    split = _plain_split(R, chunk)
    offs = [0]
    for c0, c1 in spans:
        offs.append(offs[-1] + triton.cdiv(c1 - c0, split))
    part = torch.empty(4, R, offs[-1], dtype=torch.float64, device=dev)          # max, sum, best, its logit
    pid = torch.empty(R, offs[-1], dtype=torch.int64, device=dev)               # the best's global id
    if torch.is_tensor(temp):
        t64 = temp.to(device=dev, dtype=torch.float64).reshape(1)
    else:
        t64 = torch.full((1,), float(temp), dtype=torch.float64, device=dev)
    base = _noise_base(seeds, N, vocab, dev)                                           # [R]
    for (c0, c1), s0, s1 in zip(spans, offs, offs[1:]):
        lc = _guided(h, w, cond_rows, un_rows, cfg_w, c0, c1, h.dtype)                 # [C, N, Vc]
        x = lc.reshape(R, c1 - c0)
        x = (x if x.stride(-1) == 1 else x.contiguous()).view(_INT[wide])              # [R, Vc] the bits
        _plain_kernel[(R, s1 - s0)](x, t64, base, part, pid, v0 + c0, s0, offs[-1], c1 - c0, x.stride(0),
                                    SPLIT=split, BLOCK=min(FUSED_BLOCK, split), BITS=8 * wide,
                                    DT=_DT[h.dtype], SPAN=GUMBEL_SPAN, enable_fp_fusion=False, num_warps=4)
    pm, ps, pb, pl = part.unbind(0)                                                     # [R, S] each
    M = pm.amax(1)                                                                      # the raw max
    j = pb.argmax(1, keepdim=True)                                     # first max: the lowest split's id
    st = {"best": pb.gather(1, j)[:, 0], "tok": pid.gather(1, j)[:, 0], "bl": pl.gather(1, j)[:, 0], "m": M,
          "s": (ps * torch.exp(pm - M[:, None])).sum(1)}
    return {k: v.view(C, N) for k, v in st.items()}


def _plain_split(R: int, cols: int) -> int:
    """Columns per program of ``_plain_kernel``: ``FUSED_SPLIT``, halved (to 1024 at least) while a chunk's
    launch has under 1024 programs (B = 1: 32 rows would fill a quarter of an H200's SMs)."""
    split = FUSED_SPLIT
    while split > min(1024, FUSED_SPLIT) and R * triton.cdiv(cols, split) < 1024:
        split //= 2
    return max(split, FUSED_BLOCK)


if HAS_TRITON:
    from .math64 import exp64 as _exp64, log64 as _log64      # CUDA's double exp / log (torch's own)

    @triton.jit
    def _key32(bits, BITS: tl.constexpr):
        """Model-dtype bits (int16 / int32) -> ``key_of``'s order-preserving key, sign-extended to int32
        (an involution: it maps a key back to its bits too)."""
        b = bits.to(tl.int32)
        if BITS == 16:
            return b ^ ((b >> 31) & 0x7FFF)
        else:
            return b ^ ((b >> 31) & 0x7FFFFFFF)

    @triton.jit
    def _float64(bits, DT: tl.constexpr):
        """Model-dtype bits -> the value in float64 (exact): bf16 by shifting into an fp32's high half."""
        if DT == 0:
            return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True).to(tl.float64)
        elif DT == 1:
            return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32).to(tl.float64)
        else:
            return bits.to(tl.int32).to(tl.float32, bitcast=True).to(tl.float64)

    @triton.jit
    def _weight(v, tdiv, M, RECIP: tl.constexpr):
        """e = exp(s - M) of float64 values v, s = v / T as torch computes ``l64 / temp`` (RECIP: v * (1 / T),
        torch's CUDA division by a host scalar). Division, subtraction, exp: the operations of torch's
        kernels, each correctly rounded or CUDA's exp (libdevice is CUDA's math library), and no FMA
        contraction (``enable_fp_fusion=False``): on CUDA the same bits as ``torch.exp(l64 / temp - M)``
        (tests/kernels/test_bisect_fused_gpu.py); the interpreter's numpy exp may differ from torch's CPU exp
        in the last bit, a difference of the size of float64 summation order, which the masses have anyway."""
        if RECIP:
            s = v * tdiv
        else:
            s = v / tdiv
        return _exp64(s - M)

    @triton.jit
    def _extent_kernel(X, P, V, stride, SPLIT: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                       DT: tl.constexpr, RECIP: tl.constexpr):
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        lo = tl.full([BLOCK], 2147483647, tl.int32)
        hi = tl.full([BLOCK], -2147483647 - 1, tl.int32)
        for c0 in range(0, SPLIT, BLOCK):
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            key = _key32(tl.load(X + r * stride + c, mask=inside, other=0), BITS)
            lo = tl.minimum(lo, tl.where(inside, key, 2147483647))
            hi = tl.maximum(hi, tl.where(inside, key, -2147483647 - 1))
        S = tl.num_programs(1)
        tl.store(P + (r * S + sp) * 2, tl.min(lo, 0))
        tl.store(P + (r * S + sp) * 2 + 1, tl.max(hi, 0))

    @triton.jit
    def _thresholds(a, b, K: tl.constexpr, FINAL: tl.constexpr):
        """A pass's K keys [K] int64 in [a, b]: a + floor((b - a) j / K) (slot 0 = a); FINAL: t* - 1, t*."""
        j = tl.arange(0, K).to(tl.int64)
        if FINAL:
            return tl.where(j == 0, b - 1, b + 0 * j)
        else:
            return a + ((b - a) * j) // K

    @triton.jit
    def _pass_kernel(X, ROW, ST_IN, ST_OUT, SUMS, S_IN, PART, DEN, V, stride, K: tl.constexpr,
                     PROLOGUE: tl.constexpr, COUNT_ONLY: tl.constexpr, EVAL_MASS: tl.constexpr,
                     EVAL_COUNT: tl.constexpr, SET_Z: tl.constexpr, FINAL: tl.constexpr,
                     BODY_MASS: tl.constexpr, WITH_DEN: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, RECIP: tl.constexpr):
        """One search pass for (row, split): PROLOGUE: sum the previous pass's partials SUMS [R, S_IN, K, 2]
        in split order, evaluate ``passes`` at its K keys and narrow (a, b] (every program of the row alike;
        split 0 stores it); then the mass and count above each of this pass's K keys over the split's
        columns, tiles in order (PART [R, S, K, 2]). WITH_DEN (a first pass: b is the row's largest key):
        also the raw softmax's sum exp(l - max l) over the split (DEN [R, S]), the sweep's ``_den``."""
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        a = tl.load(ST_IN + r * 2)
        b = tl.load(ST_IN + r * 2 + 1)
        M = tl.load(ROW + r * 9 + 0)
        tdiv = tl.load(ROW + r * 9 + 5)
        jj = tl.arange(0, K)
        if PROLOGUE:
            m = _thresholds(a, b, K, False)                        # the previous pass's keys
            mass = tl.zeros([K], tl.float64)
            cnt = tl.zeros([K], tl.float64)
            for i in range(S_IN):                                  # the splits in order
                at = SUMS + ((r * S_IN + i) * K + jj) * 2
                mass += tl.load(at)
                cnt += tl.load(at + 1)
            kk = tl.load(ROW + r * 9 + 2)
            if COUNT_ONLY:                                         # the k-th value: cnt(> m) < k
                ok = cnt < kk
            else:
                if SET_Z:                                          # slot 0 of the first pass: the whole mass
                    z = tl.sum(tl.where(jj == 0, mass, 0.0), 0)
                    z = tl.where(tl.load(ROW + r * 9 + 7) > 0, tl.load(ROW + r * 9 + 6), z)
                    if sp == 0:
                        tl.store(ROW + r * 9 + 1, z)
                else:
                    z = tl.load(ROW + r * 9 + 1)
                u = _float64(_key32(m.to(tl.int32), BITS), DT)
                ok = _weight(u, tdiv, M, RECIP) >= tl.load(ROW + r * 9 + 4)
                if EVAL_MASS:
                    ok = ok & (mass < tl.load(ROW + r * 9 + 3) * z)
                if EVAL_COUNT:
                    ok = ok & (cnt < kk)
            a2 = tl.max(tl.where(ok, a, m), 0)                     # the largest key that fails (or a)
            b = tl.min(tl.where(ok, m, b), 0)                      # the smallest that passes (or b)
            a = a2
        if sp == 0:
            tl.store(ST_OUT + r * 2, a)
            tl.store(ST_OUT + r * 2 + 1, b)
        m = _thresholds(a, b, K, FINAL)
        m32 = tl.minimum(tl.maximum(m, -2147483647 - 1), 2147483647).to(tl.int32)
        acc_m = tl.zeros([K, BLOCK], tl.float64)
        acc_c = tl.zeros([K, BLOCK], tl.int32)
        acc_d = tl.zeros([BLOCK], tl.float64)
        bm = _float64(_key32(b.to(tl.int32), BITS), DT)           # WITH_DEN: the raw max
        m_lo = tl.min(m32, 0)                                      # the pass's lowest key
        for c0 in range(0, SPLIT, BLOCK):                          # the split's tiles in order
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            bits = tl.load(X + r * stride + c, mask=inside, other=0)
            key = _key32(bits, BITS)
            gt = (key[None, :] > m32[:, None]) & inside[None, :]   # [K, BLOCK]
            acc_c += gt.to(tl.int32)
            if BODY_MASS:                                          # a tile with no key above every
                if tl.max(tl.where(inside, key, m_lo), 0) > m_lo:  # threshold adds only zeros: skipped
                    e = _weight(_float64(bits, DT), tdiv, M, RECIP)
                    acc_m += tl.where(gt, e[None, :], 0.0)
            if WITH_DEN:
                acc_d += tl.where(inside, _exp64(_float64(bits, DT) - bm), 0.0)
        S = tl.num_programs(1)
        out = PART + ((r * S + sp) * K + jj) * 2
        tl.store(out, tl.sum(acc_m, 1))
        tl.store(out + 1, tl.sum(acc_c, 1).to(tl.float64))
        if WITH_DEN:
            tl.store(DEN + r * S + sp, tl.sum(acc_d, 0))

    @triton.jit
    def _gumbel(l, T, ids):
        """The Gumbel score l - T log(-log u) of float64 logits l with ``seeded_uniform``'s hash noise u of
        ``ids`` = ((seed mod 2^32) 1000003 + row) vocab + global id (int64), as the torch sweep computes it
        (the hash bit for bit, then CUDA's log of doubles: the same bits on CUDA)."""
        x = (ids * 2654435761) & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 73244475) & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 73244475) & 0xFFFFFFFF
        x = x ^ (x >> 16)
        u = (x.to(tl.float64) + 0.5) * (1.0 / 4294967296.0)
        return l - T * _log64(-_log64(u))

    @triton.jit
    def _draw_kernel(X, ROW, ST, ABOVE, TIE0, BASE, BEST, BID, KEPT, KEEP, v0, V, stride,
                     NEED_P: tl.constexpr, NEED_K: tl.constexpr, WITH_KEPT: tl.constexpr,
                     KEEP_OUT: tl.constexpr,
                     SPLIT: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
                     RECIP: tl.constexpr):
        """(row, split): the survivors (keys above t*; of the keys at t*, those whose rank j among the row's
        ties in id order passes ``_survivors``' prefix rule, and j = 0), the Gumbel score ``_gumbel`` (BASE
        [R] = ((seed mod 2^32) 1000003 + row) vocab; the global id added) and its first max (lowest id) over
        the split's tiles in order."""
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        t = tl.load(ST + r * 2 + 1).to(tl.int32)
        M = tl.load(ROW + r * 9 + 0)
        z = tl.load(ROW + r * 9 + 1)
        kk = tl.load(ROW + r * 9 + 2)
        ptop = tl.load(ROW + r * 9 + 3)
        tdiv = tl.load(ROW + r * 9 + 5)
        T = tl.load(ROW + r * 9 + 8)
        mass_gt = tl.load(ABOVE + r * 2)
        cnt_gt = tl.load(ABOVE + r * 2 + 1)
        e_t = _weight(_float64(_key32(t, BITS), DT), tdiv, M, RECIP)
        S = tl.num_programs(1)
        run = tl.load(TIE0 + r * S + sp)                           # ties before this split (float64)
        base = tl.load(BASE + r)
        best = tl.full([], float("-inf"), tl.float64)
        bid = tl.full([], 0, tl.int64)
        kept = tl.zeros([BLOCK], tl.float64)
        for c0 in range(0, SPLIT, BLOCK):
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            bits = tl.load(X + r * stride + c, mask=inside, other=0)
            key = _key32(bits, BITS)
            tie = (key == t) & inside
            keep = (key > t) & inside
            if NEED_P or NEED_K:
                ti = tie.to(tl.int32)
                j = run + (tl.cumsum(ti, 0) - ti).to(tl.float64)    # rank among the row's ties
                first = j >= 0.0
                if NEED_P:
                    first = first & (mass_gt + j * e_t < ptop * z)
                if NEED_K:
                    first = first & (cnt_gt + j < kk)
                keep = keep | (tie & (first | (j == 0.0)))
                run += tl.sum(ti, 0).to(tl.float64)
            else:                                                  # min-p alone keeps the whole tie group
                keep = keep | tie
            if tl.max(keep.to(tl.int32), 0) > 0:                  # a tile without survivors: nothing to draw
                l = _float64(bits, DT)
                score = tl.where(keep, _gumbel(l, T, base + v0 + c.to(tl.int64)), -float("inf"))
                cb = tl.max(score, 0)
                ci = tl.argmax(score, 0)
                upd = cb > best                                    # strict: earlier tiles win ties
                best = tl.where(upd, cb, best)
                bid = tl.where(upd, (sp * SPLIT + c0 + ci).to(tl.int64), bid)
                if WITH_KEPT:
                    kept += tl.where(keep, _weight(l, tdiv, M, RECIP), 0.0)
            if KEEP_OUT:
                tl.store(KEEP + r * V + c, keep.to(tl.int8), mask=inside)
        tl.store(BEST + r * S + sp, best)
        tl.store(BID + r * S + sp, bid)
        if WITH_KEPT:
            tl.store(KEPT + r * S + sp, tl.sum(kept, 0))

    @triton.jit
    def _weights_kernel(X, ROW, OUT, V, stride, SPLIT: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr,
                        DT: tl.constexpr, RECIP: tl.constexpr):
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        M = tl.load(ROW + r * 9 + 0)
        tdiv = tl.load(ROW + r * 9 + 5)
        for c0 in range(0, SPLIT, BLOCK):
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            bits = tl.load(X + r * stride + c, mask=inside, other=0)
            tl.store(OUT + r * V + c, _weight(_float64(bits, DT), tdiv, M, RECIP), mask=inside)

    @triton.jit(do_not_specialize=["v0", "S0"])                 # one compile for every chunk and shard
    def _plain_kernel(X, TP, BASE, PART, PID, v0, S0, S_TOT, V, stride, SPLIT: tl.constexpr,
                      BLOCK: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, SPAN: tl.constexpr):
        """(row, split) of one vocab chunk's logits X [R, V] (bits; global ids v0 ..): the split's largest
        logit m (a first loop over its keys), then over its tiles in order sum exp(l - m) and the first max
        of the Gumbel score (``_gumbel``; a tile whose largest logit lies SPAN T below m cannot hold it: its
        noise is skipped). Writes PART [4, R, S_TOT] (m, sum, best score, its logit) and PID [R, S_TOT] (its
        global id) at column S0 + split."""
        r, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        hi = tl.full([BLOCK], -2147483647 - 1, tl.int32)
        for c0 in range(0, SPLIT, BLOCK):
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            key = _key32(tl.load(X + r * stride + c, mask=inside, other=0), BITS)
            hi = tl.maximum(hi, tl.where(inside, key, -2147483647 - 1))
        m = _float64(_key32(tl.max(hi, 0), BITS), DT)                # the split's largest logit
        T = tl.load(TP)
        base = tl.load(BASE + r)
        best = tl.full([], float("-inf"), tl.float64)
        bid = tl.full([], 0, tl.int64)
        blog = tl.full([], 0.0, tl.float64)
        acc = tl.zeros([BLOCK], tl.float64)
        for c0 in range(0, SPLIT, BLOCK):                          # the split's tiles in order
            c = sp * SPLIT + c0 + tl.arange(0, BLOCK)
            inside = c < V
            bits = tl.load(X + r * stride + c, mask=inside, other=0)
            l = _float64(bits, DT)
            acc += tl.where(inside, _exp64(l - m), 0.0)
            kt = tl.max(tl.where(inside, _key32(bits, BITS), -2147483647 - 1), 0)
            top = _float64(_key32(kt, BITS), DT)                   # the tile's largest logit
            if top + SPAN * T >= m:                                # the tile may hold the split's best draw
                score = tl.where(inside, _gumbel(l, T, base + v0 + c.to(tl.int64)), -float("inf"))
                cb = tl.max(score, 0)
                ci = tl.argmax(score, 0)                           # first max: the lowest id
                upd = cb > best                                    # strict: earlier tiles win ties
                best = tl.where(upd, cb, best)
                bid = tl.where(upd, (sp * SPLIT + c0 + ci).to(tl.int64) + v0, bid)
                blog = tl.where(upd, tl.sum(tl.where(tl.arange(0, BLOCK) == ci, l, 0.0), 0), blog)
        out = r * S_TOT + S0 + sp
        n = tl.num_programs(0).to(tl.int64) * S_TOT                   # one [R, S_TOT] plane of PART
        tl.store(PART + out, m)
        tl.store(PART + n + out, tl.sum(acc, 0))
        tl.store(PART + 2 * n + out, best)
        tl.store(PART + 3 * n + out, blog)
        tl.store(PID + out, bid)
