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

Fixed halvings, no host read (the ``bisect_plan``, what the batch's rows need, is read by the caller once,
with the variant it picks), shapes fixed by the batch: the whole decoding captures in a CUDA graph, the
ranks' all_reduces inside it. The sequences go through in chunks of at most ``CHUNK_ELEMENTS`` logits
(sized from the whole vocabulary, so every rank takes the same chunks), each [c, N, V_rank] float64.

Then the Gumbel-max with the hash noise of the global ids over each process's survivors (one all_gather
merges the ranks' best: ties the lowest rank, the lowest id), as one process's argmax over the survivors.
Values tied exactly at t* are kept together (one process's stable sort could split such a tie at a top-k
boundary: a measure-zero event on real logits)."""
from __future__ import annotations

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
                   group=None) -> dict:
    """Tokens, confidences and logprobs of the filtered Gumbel-max for every sequence (those without a filter
    keep every id: the plain draw) from ``out`` (``sampling.finish_stats`` of the sweep, the ranks' merged:
    ``_bm``, ``_den``, ``_lse``, credit's ``top1_ids`` / ``top1_prob``), updated in place. h [B, N, d]
    rows, w [Vr, d] this process's head rows (global ids v0 ..), ``chunk`` head rows per GEMM; ``plan``:
    ``bisect_plan`` of the filters (None: read here, on the host)."""
    plan = bisect_plan(*filters) if plan is None else plan
    C, N = cond_rows.shape[0], h.shape[1]
    per = max(1, CHUNK_ELEMENTS // (N * vocab))                  # sequences per chunk (the same on each rank)
    parts = []
    for c0 in range(0, C, per):
        sl = slice(c0, min(C, c0 + per))
        sub = {k: v[sl] for k, v in out.items() if torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == C}
        cred = None if credit is None else tuple(x[sl] for x in credit)
        parts.append(_filter_chunk(h, w, v0, vocab, cond_rows[sl], un_rows[sl], cfg_w, temp, seeds[sl],
                                   tuple(f[sl] for f in filters), sub, chunk, cred, filtered_conf, plan,
                                   group))
    for key in parts[0]:
        out[key] = torch.cat([p[key] for p in parts])
    return out


def _filter_chunk(h, w, v0, vocab, cond, un, cfg_w, temp, seeds, filters, out, chunk, credit, filtered_conf,
                  plan, group) -> dict:
    """``bisect_filters`` for one chunk of c sequences (their slices of the filters, credit and ``out``)."""
    acc = torch.float64
    lraw = _logits(h, w, cond, un, cfg_w, chunk)                                   # [c, N, Vr] model dtype
    l64 = lraw.to(acc)
    lb = l64 if credit is None else _credit_fused(l64, credit, out, v0)
    s = lb / temp                                                                  # [c, N, Vr] tempered
    keyed = s if credit is not None else lraw                                      # what the keys order
    ext = _gather(torch.stack([s.amax(-1), keyed.amax(-1).to(acc), -keyed.amin(-1).to(acc)]), group)
    M, kmax, kmin = ext[:, 0].amax(0), ext[:, 1].amax(0), -ext[:, 2].amax(0)      # [c, N] each
    e = torch.exp(s - M[..., None])
    keep = _survivors(keyed, e, M, kmax, kmin, temp, filters, vocab, plan, group, credit is None)  # [c,N,Vr]
    g = torch.log(-torch.log(uniform_noise(seeds, h.shape[1], v0, v0 + w.shape[0], vocab, h.device, acc)))
    score = torch.where(keep, lb - temp * g, -float("inf"))
    j = score.argmax(-1, keepdim=True)                                             # first max: lowest id
    mine = torch.stack([score.gather(-1, j)[..., 0], (j[..., 0] + v0).to(acc), lb.gather(-1, j)[..., 0],
                        l64.gather(-1, j)[..., 0], s.gather(-1, j)[..., 0]])      # [5, c, N]
    ranks = _gather(mine, group)                                                   # [R, 5, c, N]
    r = ranks[:, 0].argmax(0, keepdim=True)                                        # first max: lowest rank
    best = ranks.gather(0, r[:, None].expand(1, 5, *r.shape[1:]))[0]               # [5, c, N]
    res = {"tokens": best[1].to(torch.int64)}
    if filtered_conf:                             # the probability among the survivors of s
        kept = _sum(torch.where(keep, e, 0.0).sum(-1)[None], group)[0]
        res["confidence"] = torch.exp(best[4] - M) / kept
    else:
        res["confidence"] = torch.exp(best[2] - out["_bm"]) / out["_den"]
    if "logprob" in out:
        res["logprob"] = best[3] - out["_lse"]
    return res


def _logits(h, w, cond, un, cfg_w, chunk: int) -> torch.Tensor:
    """The guided logits [c, N, Vr] of the chunk's sequences in the model's dtype (``sampling._guided``'s
    values before its cast), head rows ``chunk`` at a time."""
    if cond is un:
        hc = h.index_select(0, cond)                                               # [c, N, d]
        return torch.cat([F.linear(hc, w[c0:c0 + chunk]) for c0 in range(0, w.shape[0], chunk)], -1)
    c = cond.shape[0]
    hc = h.index_select(0, torch.cat([cond, un]))                                  # [2c, N, d]
    parts = []
    for c0 in range(0, w.shape[0], chunk):
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
