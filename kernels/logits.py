"""Fused logits for selected rows: (token, confidence) without the [N, V] logit tensor.

A diffusion step decodes a few rows per sequence, but ``head(hidden)`` then ``softmax`` materialises [N, V]
logits twice (V = 126464 for LLaDA: 12 GiB at B=32, L=768 in fp32). This kernel streams the lm-head weight in
vocab tiles, keeps per row a running max ``m`` and sum ``s`` of exp (online softmax) and the best
(Gumbel-)score with its id and logit, and reduces at once. Output: token id [N] int64 and confidence [N]
float32 = softmax probability of the chosen token (LLaDA's ``low_confidence``).

Sampling at temperature T > 0 is Gumbel-max: argmax(logit - T * log(-log u)), which is LLaDA's
``exp(logit) / (-log u)^T`` in log space (the same argmax without overflowing exp). ``u`` is either passed in
(``noise`` [N, V], for parity with a torch generator) or drawn by a counter-based hash of (seed, row, column),
so the Triton kernel and the reference draw the very same noise and the op needs no [N, V] noise tensor.

Graph form (what compiled phase programs call, where temperature and seeds are runtime tensors, not Python
numbers): ``temperature_t`` [1] (any float dtype) replaces the float ``temperature``, and ``row_keys`` [N]
int64 replaces the (seed, row) part of the hash: row i draws from ``key = row_keys[i]`` where the scalar form
uses ``key = (i * ROW_M + (seed & 0x7FFFFFFF)) mod 2^32`` (``row_key``). So a call with ``row_keys =
row_key(seed_c, arange(n))`` for each request c of a flattened batch draws exactly what one call per request
with ``seed=seed_c`` would. With ``temperature_t`` the noise is always computed (the kernel skips it at run
time when the loaded temperature is 0) and ``logit - 0 * g == logit``: T = 0 is the plain argmax, exactly.

GPU parallelism: rows are tiled by BN and the vocab is split so that about four programs per SM run; each
program writes its partial (m, s, best score, id, logit); a tiny torch reduction over the splits finishes.
Programs sharing a vocab split run side by side (row tile is the fast grid axis), so each weight tile is read
from HBM once and served from L2 to the other row tiles. In the batch-invariant mode (``_registry.invariant``)
the split is the one of a single row tile whatever N is and the splits are combined in split order
(``plan(..., invariant=True)``, ``_combine``), so a row's (token, confidence) does not depend on N.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._registry import (HAS_TRITON, check, check_shape, define_op, invariant, launch, require_triton, tl,
                        triton, use_triton)
from .reduce import row_sum_triton

_MASK32 = 0xFFFFFFFF
_HASH_M1, _HASH_M2, _ROW_M = 0x7FEB352D, 0x2C1B3C6D, 0x27D4EB2F   # odd multipliers < 2^31 (int64-safe)
REF_CHUNK = 8192                                                   # vocab columns per reference chunk


# ----------------------------------------------------------------------------------------------- reference
def _mix32(x: torch.Tensor) -> torch.Tensor:
    """32-bit integer finaliser on int64 tensors holding values < 2^32 (low 32 bits kept)."""
    x = x ^ (x >> 16)
    x = (x * _HASH_M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _HASH_M2) & _MASK32
    return x ^ (x >> 16)


def row_key(seed, rows: torch.Tensor) -> torch.Tensor:
    """The per-row hash key of (seed, row): ``(row * ROW_M + (seed & 0x7FFFFFFF)) mod 2^32`` (int64). ``seed``
    is an int or an int64 tensor broadcasting against ``rows``."""
    return ((rows * _ROW_M) + (seed & 0x7FFFFFFF)) & _MASK32


def key_uniform(keys: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float32 from per-row keys [N, 1] and columns [1, C] int64 -> [N, C].

    24 random bits, so the value is exact in float32 and never 0 or 1 (the Gumbel transform stays finite)."""
    r = _mix32(keys & _MASK32)
    x = _mix32(_mix32(r ^ cols))
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def hash_uniform(seed: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) float32 from (seed, row, column): rows [N, 1], cols [1, C] int64 -> [N, C]."""
    return key_uniform(row_key(seed, rows), cols)


def select_logits_reference(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 0.0,
                            seed: int = 0, noise: torch.Tensor | None = None, temperature_t=None,
                            row_keys=None, chunk: int = REF_CHUNK):
    """Pure-PyTorch reference: the same online reduction over vocab chunks of ``chunk`` columns, in float32.

    Never holds more than [N, chunk] logits. Returns (token [N] int64, confidence [N] float32)."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    h = hidden.float()                                                 # [N, d]
    m = torch.full((N,), -math.inf, device=dev)
    s = torch.zeros(N, device=dev)
    best = torch.full((N,), -math.inf, device=dev)
    tok = torch.zeros(N, dtype=torch.int64, device=dev)
    blog = torch.zeros(N, device=dev)
    rows = torch.arange(N, device=dev)[:, None]                        # [N, 1]
    keys = row_keys[:, None] if row_keys is not None else row_key(seed, rows)          # [N, 1]
    temp = temperature_t.reshape(()).to(torch.float32) if temperature_t is not None else None
    for v0 in range(0, V, chunk):
        logit = h @ weight[v0:v0 + chunk].float().T                    # [N, C]
        m_new = torch.maximum(m, logit.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(logit - m_new[:, None]).sum(1)
        m = m_new
        score = logit
        if temperature > 0 or temp is not None:
            cols = torch.arange(v0, v0 + logit.shape[1], device=dev)[None]
            u = noise[:, v0:v0 + chunk].float() if noise is not None else key_uniform(keys, cols)
            score = logit - (temp if temp is not None else temperature) * torch.log(-torch.log(u))
        cbest, cidx = score.max(1)                                     # first max within the chunk
        upd = cbest > best                                             # strict: earlier chunks win ties
        best = torch.where(upd, cbest, best)
        tok = torch.where(upd, cidx + v0, tok)
        blog = torch.where(upd, logit.gather(1, cidx[:, None])[:, 0], blog)
    return tok, torch.exp(blog - m) / s


# ----------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    @triton.jit
    def _mix32_tl(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x = x ^ (x >> 15)
        x = (x * 0x2C1B3C6D) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _tile_logits(H, W, rows, rmask, cols, cmask, D, stride_h, stride_w, IEEE: tl.constexpr,
                     BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
        """Logits [BN, BV] of a row tile against a vocab tile (fp32 accumulation), -inf past its end."""
        acc = tl.zeros([BN, BV], tl.float32)
        for d0 in range(0, D, BD):
            dk = d0 + tl.arange(0, BD)
            dmask = dk < D
            h = tl.load(H + rows[:, None] * stride_h + dk[None, :], mask=rmask[:, None] & dmask[None, :],
                        other=0.0)
            w = tl.load(W + cols[:, None] * stride_w + dk[None, :], mask=cmask[:, None] & dmask[None, :],
                        other=0.0)
            if IEEE:
                acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(h, tl.trans(w), acc)
        return tl.where(cmask[None, :], acc, float("-inf"))

    @triton.jit(do_not_specialize=["seed", "temperature", "N"])      # one compiled kernel for every N
    def _select_logits_kernel(H, W, U, TP, KP, PM, PS, PB, PI, PL,
                              N, V, D, n_split, cols_per_split, stride_h, stride_w, stride_u,
                              temperature, seed,
                              SAMPLE: tl.constexpr, HAS_NOISE: tl.constexpr, TEMP_PTR: tl.constexpr,
                              HAS_KEYS: tl.constexpr, IEEE: tl.constexpr,
                              BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BN)
        pid_n = pid % n_tiles                                          # row tile: fast axis (L2 reuse of W)
        pid_s = pid // n_tiles
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        v_lo = pid_s * cols_per_split
        v_hi = tl.minimum(v_lo + cols_per_split, V)
        m = tl.full([BN], float("-inf"), tl.float32)
        s = tl.zeros([BN], tl.float32)
        best = tl.full([BN], float("-inf"), tl.float32)
        bidx = tl.zeros([BN], tl.int32)
        blog = tl.zeros([BN], tl.float32)
        if TEMP_PTR:                                                   # graph form: T from a [1] tensor
            temperature = tl.load(TP).to(tl.float32)
        if SAMPLE:
            if HAS_KEYS:                                               # graph form: per-row keys
                key = tl.load(KP + rows, mask=rmask, other=0).to(tl.int64)
            else:
                key = (rows.to(tl.int64) * 0x27D4EB2F) + seed
            r = _mix32_tl(key & 0xFFFFFFFF)
        for v0 in range(v_lo, v_hi, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < v_hi
            logit = _tile_logits(H, W, rows, rmask, cols, cmask, D, stride_h, stride_w, IEEE, BN, BV, BD)
            m_new = tl.maximum(m, tl.max(logit, 1))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), 1)
            m = m_new
            score = logit
            if SAMPLE:
                if temperature > 0:                                    # run time: skipped when T == 0
                    if HAS_NOISE:
                        u = tl.load(U + rows[:, None] * stride_u + cols[None, :],
                                    mask=rmask[:, None] & cmask[None, :], other=0.5).to(tl.float32)
                    else:
                        x = _mix32_tl(_mix32_tl(r[:, None] ^ cols[None, :].to(tl.int64)))
                        u = ((x >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                    score = tl.where(cmask[None, :], logit - temperature * tl.log(-tl.log(u)), float("-inf"))
            cbest = tl.max(score, 1)
            cidx = tl.argmax(score, 1)
            clog = tl.sum(tl.where(tl.arange(0, BV)[None, :] == cidx[:, None], logit, 0.0), 1)
            upd = cbest > best
            best = tl.where(upd, cbest, best)
            bidx = tl.where(upd, cidx + v0, bidx)
            blog = tl.where(upd, clog, blog)
        out = rows * n_split + pid_s
        tl.store(PM + out, m, mask=rmask)
        tl.store(PS + out, s, mask=rmask)
        tl.store(PB + out, best, mask=rmask)
        tl.store(PI + out, bidx, mask=rmask)
        tl.store(PL + out, blog, mask=rmask)

    @triton.jit
    def _entropy_step(ent, s, m, m_new, e, raw, cmask):
        """Online S = sum e^(l - m) (l - m) moved to the new max m_new and grown by the tile
        (e = e^(l - m_new)) -> the entropy H = log s - S / s at the end. A row's first tile: s = 0,
        m = -inf (no 0 * inf)."""
        el = tl.where(cmask[None, :], e * (raw - m_new[:, None]), 0.0)
        shift = tl.where(s > 0, (m - m_new) * s, 0.0)
        return tl.exp(m - m_new) * (ent + shift) + tl.sum(el, 1)

    @triton.jit
    def _topk_step(tv, ti, raw, v0, TOPK: tl.constexpr, KPAD: tl.constexpr, BV: tl.constexpr):
        """Merge the tile's TOPK largest raw logits into the running top list tv / ti [BN, KPAD] (each
        replaces the list's smallest when larger)."""
        work = raw
        slot = tl.arange(0, KPAD)[None, :]
        col = tl.arange(0, BV)[None, :]
        for _ in tl.static_range(TOPK):
            x = tl.max(work, 1)
            xi = tl.argmax(work, 1)
            low = tl.min(tv, 1)
            put = (slot == tl.argmin(tv, 1)[:, None]) & (x > low)[:, None]
            tv = tl.where(put, x[:, None], tv)
            ti = tl.where(put, (xi + v0)[:, None], ti)
            work = tl.where(col == xi[:, None], float("-inf"), work)
        return tv, ti

    @triton.jit
    def _select_extras_kernel(H, W, PM, PS, PB, PI, PE, PTV, PTI,
                              N, V, D, n_split, cols_per_split, stride_h, stride_w,
                              IEEE: tl.constexpr, ENTROPY: tl.constexpr,
                              TOPK: tl.constexpr, KPAD: tl.constexpr,
                              BN: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
        """``_select_logits_kernel`` at T = 0 with the decoding extras of kernels/select_extras.py in the same
        sweep (its own kernel: the plain one, which compiled programs trace, keeps its signature). Per row and
        vocab split: max / sum / best id / its logit; with ENTROPY the running S; with TOPK the running top
        list. Credit is no term of this sweep: ``select_extras.credit_correction`` corrects its result with
        the few credited logits afterwards."""
        pid = tl.program_id(0)
        n_tiles = tl.cdiv(N, BN)
        pid_n = pid % n_tiles                                          # row tile: fast axis (L2 reuse of W)
        pid_s = pid // n_tiles
        rows = pid_n * BN + tl.arange(0, BN)
        rmask = rows < N
        v_lo = pid_s * cols_per_split
        v_hi = tl.minimum(v_lo + cols_per_split, V)
        m = tl.full([BN], float("-inf"), tl.float32)                   # running max, sum,
        s = tl.zeros([BN], tl.float32)
        bidx = tl.zeros([BN], tl.int32)                                # best id and its logit
        blog = tl.full([BN], float("-inf"), tl.float32)
        ent = tl.zeros([BN], tl.float32)                               # sum e^(l - m) (l - m)
        tv = tl.full([BN, KPAD], float("-inf"), tl.float32)            # running top-k of the logits
        ti = tl.zeros([BN, KPAD], tl.int32)
        for v0 in range(v_lo, v_hi, BV):
            cols = v0 + tl.arange(0, BV)
            cmask = cols < v_hi
            logit = _tile_logits(H, W, rows, rmask, cols, cmask, D, stride_h, stride_w, IEEE, BN, BV, BD)
            m_new = tl.maximum(m, tl.max(logit, 1))
            e = tl.exp(logit - m_new[:, None])
            if ENTROPY:
                ent = _entropy_step(ent, s, m, m_new, e, logit, cmask)
            s = s * tl.exp(m - m_new) + tl.sum(e, 1)
            m = m_new
            if TOPK > 0:
                tv, ti = _topk_step(tv, ti, logit, v0, TOPK, KPAD, BV)
            cbest = tl.max(logit, 1)
            cidx = tl.argmax(logit, 1)
            upd = cbest > blog                                         # strict: earlier tiles win ties
            bidx = tl.where(upd, cidx + v0, bidx)
            blog = tl.where(upd, cbest, blog)
        out = rows * n_split + pid_s
        tl.store(PM + out, m, mask=rmask)
        tl.store(PS + out, s, mask=rmask)
        tl.store(PB + out, blog, mask=rmask)
        tl.store(PI + out, bidx, mask=rmask)
        if ENTROPY:
            tl.store(PE + out, ent, mask=rmask)
        if TOPK > 0:
            kk = tl.arange(0, KPAD)
            tl.store(PTV + out[:, None] * KPAD + kk[None, :], tv, mask=rmask[:, None])
            tl.store(PTI + out[:, None] * KPAD + kk[None, :], ti, mask=rmask[:, None])

    @triton.jit(do_not_specialize=["P", "M"])
    def _gather_logits_kernel(H, W, IDS, OUT, P, M, D, stride_h, stride_w,
                              BP: tl.constexpr, BD: tl.constexpr):
        """OUT[p] = H[p // M] . W[IDS[p]] (fp32 accumulation) for P = R x M (row, id) pairs: the logits of a
        few ids per row without a sweep (credit's correction)."""
        pairs = tl.program_id(0) * BP + tl.arange(0, BP)
        pmask = pairs < P
        rows = (pairs // M).to(tl.int64)
        ids = tl.load(IDS + pairs, mask=pmask, other=0).to(tl.int64)
        acc = tl.zeros([BP], tl.float32)
        for d0 in range(0, D, BD):
            dk = d0 + tl.arange(0, BD)
            msk = pmask[:, None] & (dk < D)[None, :]
            h = tl.load(H + rows[:, None] * stride_h + dk[None, :], mask=msk, other=0.0).to(tl.float32)
            w = tl.load(W + ids[:, None] * stride_w + dk[None, :], mask=msk, other=0.0).to(tl.float32)
            acc += tl.sum(h * w, 1)
        tl.store(OUT + pairs, acc, mask=pmask)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def plan(N: int, V: int, sms: int, BN: int | None = None, BV: int = 128, programs_per_sm: int = 4,
         invariant: bool = False):
    """Tile sizes and vocab split: (BN, BV, n_split, cols_per_split).

    A symbolic N (the op traced inside a compiled graph: AOTInductor, torch.compile, where the row count is a
    dynamic dim) must not be branched on (each comparison would become a shape guard, specialising the
    artifact to the example's row count): then BN = 64 and the split is sized for one row tile, so only the
    grid depends on N. ``invariant`` (the batch-invariant mode): BN = 32 and the split sized for one row tile
    whatever N is, so a row's online softmax runs over the same vocab chunks alone or in any batch."""
    symbolic = not isinstance(N, int)
    if BN is None:
        BN = 32 if invariant else 64 if symbolic else 16 if N <= 16 else 32 if N <= 32 else 64
    n_tiles = 1 if symbolic or invariant else -(-N // BN)
    n_split = max(1, min(-(-programs_per_sm * sms // n_tiles), -(-V // BV)))
    cols = -(-(-(-V // n_split)) // BV) * BV
    return BN, BV, -(-V // cols), cols


def _smem_per_block(device: torch.device) -> int:
    """Bytes of shared memory one program may take (opt-in limit); the interpreter (CPU) has no limit."""
    if device.type != "cuda":
        return 1 << 30
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin or (227 if props.major >= 9 else 163 if props.major == 8 else 96) * 1024


def block_d(BN: int, BV: int, num_stages: int, hidden: torch.Tensor) -> int:
    """The hidden-dim step of a select sweep's tile GEMM: 128 for row tiles of at most 32 rows (one request's
    block: the B = 1 decode) where ``num_stages`` stages of the (BN + BV) x 128 input tiles fit the device's
    shared memory, else 64. Measured on an H200 (bench/probes/extras_sweep.py, LLaDA-8B head, 32 rows, bf16):
    0.294 -> 0.241 ms a sweep, plain and extras kernels alike (cuBLAS's bare h @ W.T: 0.252). Depends on BN
    alone, so the batch-invariant mode (BN fixed) stays invariant; a symbolic row count (BN 64) keeps 64."""
    if not isinstance(BN, int) or BN > 32:
        return 64
    need = num_stages * (BN + BV) * 128 * hidden.element_size()
    return 128 if need <= _smem_per_block(hidden.device) else 64


def select_logits_triton(hidden, weight, temperature=0.0, seed=0, noise=None, temperature_t=None,
                         row_keys=None, BN=None, BV=128, BD=None, num_warps=4, num_stages=3,
                         programs_per_sm=4):
    """Launch the kernel (also on CPU tensors under TRITON_INTERPRET=1) and reduce the per-split partials."""
    N, D = hidden.shape
    V = weight.shape[0]
    inv = invariant()
    BN, BV, n_split, cols = plan(N, V, _sm_count(hidden.device), BN, BV, programs_per_sm, inv)
    BD = BD or block_d(BN, BV, num_stages, hidden)
    part = [torch.empty((N, n_split), dtype=dt, device=hidden.device)
            for dt in (torch.float32, torch.float32, torch.float32, torch.int32, torch.float32)]
    pm, ps, pb, pi, pl = part
    sample = temperature > 0 or temperature_t is not None
    u = noise if noise is not None else hidden
    tp = temperature_t if temperature_t is not None else hidden                  # unused pointers: any tensor
    kp = row_keys if row_keys is not None else hidden
    grid = (-(-N // BN) * n_split,)
    launch(_select_logits_kernel)[grid](
        hidden, weight, u, tp, kp, pm, ps, pb, pi, pl, N, V, D, n_split, cols,
        hidden.stride(0), weight.stride(0), u.stride(0), float(temperature), int(seed) & 0x7FFFFFFF,
        SAMPLE=sample, HAS_NOISE=noise is not None, TEMP_PTR=temperature_t is not None,
        HAS_KEYS=row_keys is not None, IEEE=hidden.dtype == torch.float32,
        BN=BN, BV=BV, BD=BD, num_warps=num_warps, num_stages=num_stages)
    return _combine(pm, ps, pb, pi, pl, inv)


def _combine(pm, ps, pb, pi, pl, invariant: bool = False):
    """Partials [N, n_split] -> (token [N] int64, confidence [N] float32). ``invariant``: the softmax sum over
    the splits by ``reduce.row_sum_triton`` (split order; torch's sum picks its order from the batch)."""
    M = pm.amax(1)                                                     # [N]
    terms = ps * torch.exp(pm - M[:, None])                            # [N, n_split]
    S = row_sum_triton(terms) if invariant else terms.sum(1)
    j = pb.argmax(1, keepdim=True)                                     # first max: lowest vocab split
    tok = pi.gather(1, j)[:, 0].to(torch.int64)
    return tok, torch.exp(pl.gather(1, j)[:, 0] - M) / S


# ----------------------------------------------------------------------------------------------- the op
def validate(hidden, weight, temperature, noise, temperature_t=None, row_keys=None) -> None:
    check_shape("hidden", hidden, 2, "[N, d]")
    check_shape("weight", weight, 2, "[V, d] (the lm-head weight)")
    check(hidden.shape[1] == weight.shape[1],
          f"hidden has d={hidden.shape[1]} but weight has d={weight.shape[1]}")
    check(hidden.dtype == weight.dtype, f"hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    check(hidden.device == weight.device, f"hidden on {hidden.device} but weight on {weight.device}")
    check(temperature >= 0 and math.isfinite(temperature),
          f"temperature must be finite and >= 0, got {temperature}")
    check(hidden.stride(1) == 1 and weight.stride(1) == 1, "hidden and weight need a contiguous last dim")
    if noise is not None:
        check(tuple(noise.shape) == (hidden.shape[0], weight.shape[0]),
              f"noise must be [N, V] = {(hidden.shape[0], weight.shape[0])}, got {tuple(noise.shape)}")
        check(noise.stride(1) == 1, "noise needs a contiguous last dim")
    if temperature_t is not None:
        check(isinstance(temperature_t, torch.Tensor) and temperature_t.numel() == 1
              and temperature_t.is_floating_point(), "temperature_t must be a one-element float tensor")
        check(temperature == 0, f"give temperature or temperature_t, not both (temperature={temperature})")
        check(temperature_t.device == hidden.device, f"temperature_t on {temperature_t.device}, hidden on "
              f"{hidden.device}")
    if row_keys is not None:
        check(isinstance(row_keys, torch.Tensor) and tuple(row_keys.shape) == (hidden.shape[0],)
              and row_keys.dtype == torch.int64, f"row_keys must be int64 [N={hidden.shape[0]}], got "
              f"{getattr(row_keys, 'dtype', type(row_keys))} {tuple(getattr(row_keys, 'shape', ()))}")
        check(row_keys.device == hidden.device, f"row_keys on {row_keys.device}, hidden on {hidden.device}")


@define_op("fused_select_logits")
def fused_select_logits_op(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 0.0,
                           seed: int = 0, noise: torch.Tensor | None = None,
                           temperature_t: torch.Tensor | None = None,
                           row_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(hidden):
        require_triton("fused_select_logits")
        return select_logits_triton(hidden, weight, temperature, seed, noise, temperature_t, row_keys)
    return select_logits_reference(hidden, weight, temperature, seed, noise, temperature_t, row_keys)


@fused_select_logits_op.register_fake
def _(hidden, weight, temperature=0.0, seed=0, noise=None, temperature_t=None, row_keys=None):
    N = hidden.shape[0]
    return hidden.new_empty((N,), dtype=torch.int64), hidden.new_empty((N,), dtype=torch.float32)


# --------------------------------------------------------------------------------------------- top-k logprobs
def topk_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk: int = REF_CHUNK):
    """Top-k log-probabilities per row, chunked over the vocab (never [N, V]): (logprobs [N, k] f32, ids
    [N, k])."""
    N, V = hidden.shape[0], weight.shape[0]
    h = hidden.float()
    m = torch.full((N,), -math.inf, device=hidden.device)
    s = torch.zeros(N, device=hidden.device)
    vals = torch.full((N, 0), -math.inf, device=hidden.device)
    ids = torch.zeros((N, 0), dtype=torch.int64, device=hidden.device)
    for v0 in range(0, V, chunk):
        logit = h @ weight[v0:v0 + chunk].float().T                    # [N, C]
        m_new = torch.maximum(m, logit.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(logit - m_new[:, None]).sum(1)
        m = m_new
        cv, ci = logit.topk(min(k, logit.shape[1]), dim=1)
        vals, j = torch.cat([vals, cv], 1).topk(min(k, vals.shape[1] + cv.shape[1]), dim=1)
        ids = torch.cat([ids, ci + v0], 1).gather(1, j)
    return vals - (m + torch.log(s))[:, None], ids


# a triton_op (with Triton) so Inductor/AOTI trace the torch body
@define_op("fused_topk_logprobs")
def fused_topk_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor,
                           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return topk_logprobs_reference(hidden, weight, k)


@fused_topk_logprobs_op.register_fake
def _(hidden, weight, k):
    N = hidden.shape[0]
    return hidden.new_empty((N, k), dtype=torch.float32), hidden.new_empty((N, k), dtype=torch.int64)


# ------------------------------------------------------------------------- chunked decoding in plain torch
_M32 = 4294967296


def uniform_noise(seeds: torch.Tensor, n_rows: int, c0: int, c1: int, vocab: int, device,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Counter-based uniform(0, 1) noise [C, N, c1 - c0] for vocab ids c0..c1 (integer hash; the same
    (seed, row, id) always gives the same draw, whatever the chunking). float64: 32 random bits; float32
    (builds for runtimes without doubles, TensorRT): the top 24 bits, exact in float32 and never 0 or 1."""
    row = torch.arange(n_rows, device=device)[None, :, None]                    # [1, N, 1]
    col = torch.arange(c0, c1, device=device)[None, None, :]                    # [1, 1, Vc]
    return seeded_uniform(seeds, row, col, vocab, dtype)


def seeded_uniform(seeds: torch.Tensor, row: torch.Tensor, col: torch.Tensor, vocab: int,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The counter hash of (seed [C], decoded row, vocab id) -> uniform(0, 1); ``row`` and ``col`` broadcast
    against [C, N, J] (``uniform_noise``: a vocab chunk; ``kernels.sampling``: arbitrary ids)."""
    x = ((seeds[:, None, None] % _M32) * 1000003 + row) * vocab + col           # [C, N, J] int64
    x = (x * 2654435761) % _M32
    for _ in range(2):
        x = torch.bitwise_xor(x, x // 65536)
        x = (x * 73244475) % _M32
    x = torch.bitwise_xor(x, x // 65536)
    if dtype == torch.float32:
        return ((x // 256).to(torch.float32) + 0.5) / 16777216.0
    return (x.to(torch.float64) + 0.5) / _M32


def decode_rows(h, w, cond_rows, un_rows, cfg_w, temp, seeds, *, vocab: int, chunk: int, topk: int,
                acc: torch.dtype = torch.float64):
    """h [B, N, d] rows to decode, w [>=V, d] LM head -> tokens [C, N], confidence [C, N] float64 (+ top-k ids
    and logprobs [C, N, k]). Guided rows ``un + cfg_w * (cond - un)``
    (cond_rows / un_rows [C] index h; without
    CFG both are arange(B) and the rows pass through bit-exactly); Gumbel-max at temperature ``temp`` ([1]
    tensor, or a Python float: 0.0 skips the noise) with ``uniform_noise(seeds [C])``; one vocab chunk of
    ``chunk`` head rows at a time, reduced at once (running best and an online float64 logsumexp), so no
    [C, N, V] tensor exists.
    The one decoding of the CPU lowering (``chunk_logits``) and of the eager runners. ``acc``: the arithmetic
    (float64, LLaDA's reference; float32 only for builds whose runtime has no doubles, TensorRT)."""
    best = tok = best_l = m = s = top_v = top_i = None
    have = 0                                                                     # top-k candidates so far
    for c0 in range(0, vocab, chunk):
        c1 = min(vocab, c0 + chunk)
        lc = F.linear(h, w[c0:c1])                                               # [B, N, Vc]
        cond, un = lc.index_select(0, cond_rows), lc.index_select(0, un_rows)    # [C, N, Vc]
        l64 = (un + cfg_w * (cond - un)).to(acc)
        if isinstance(temp, (int, float)) and temp == 0:
            score = l64                                                          # argmax, no noise to draw
        else:
            g = torch.log(-torch.log(uniform_noise(seeds, h.size(1), c0, c1, vocab, h.device, acc)))
            score = l64 - temp * g                                               # [C, N, Vc]
        ci = score.argmax(-1, keepdim=True)                                      # [C, N, 1]
        cs, cl = score.gather(-1, ci)[..., 0], l64.gather(-1, ci)[..., 0]
        cm = l64.amax(-1)
        csum = torch.exp(l64 - cm[..., None]).sum(-1)
        if best is None:
            best, tok, best_l, m, s = cs, ci[..., 0] + c0, cl, cm, csum
        else:
            take = cs > best                                                     # ties keep the earlier id
            best, tok, best_l = torch.where(take, cs, best), torch.where(take, ci[..., 0] + c0, tok), \
                torch.where(take, cl, best_l)
            nm = torch.maximum(m, cm)
            s = s * torch.exp(m - nm) + csum * torch.exp(cm - nm)
            m = nm
        if topk:
            tv, ti = l64.topk(min(topk, c1 - c0), dim=-1)
            ti = ti + c0
            if top_v is not None:
                tv, ti = torch.cat([top_v, tv], -1), torch.cat([top_i, ti], -1)
            have += min(topk, c1 - c0)
            top_v, j = tv.topk(min(topk, have), dim=-1)
            have = min(topk, have)
            top_i = ti.gather(-1, j)
    conf = torch.exp(best_l - m) / s                                             # [C, N] float64
    if topk:
        return tok, conf, top_i, top_v - (m + torch.log(s))[..., None]
    return tok, conf
