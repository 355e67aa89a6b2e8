"""A batch-invariant matmul: a row's output never depends on how many rows are computed with it.

cuBLAS picks its kernel, tile shape and split-K from the whole problem (M, N, K): the same row of activations
times the same weight rounds differently in a batch of 1 and a batch of 37, so in bf16 a request's tokens
depend on what else runs (bench/RESULTS.md, "Batch invariance"). This kernel fixes every choice that decides
a row's summation order from (N, K, dtype, SM count) only (``plan``), never from M:

* tiles BM x BN x BK are constants of (N, dtype); a row's dot products run over K in BK steps, in order;
* split-K: a fixed number of K ranges (``split``, from N and K: enough N tiles x splits to fill the SMs at
  M = 1, where a Reuse step is bandwidth-bound) each written as a float32 partial, then summed in split
  order by a second kernel (no atomics); split 1 stores directly;
* large M (a Refresh: thousands of rows) runs the same plan over row chunks of ``M_CHUNK`` rows, which only
  bounds the partials' memory (rows are independent, so chunking changes no value).

``mm(a [M, K], b [K, N])``, ``addmm(bias, a, b)`` and ``bmm(a [Z, M, K], b [Z, K, N])`` take any strides (an
nn.Linear's ``w.t()`` view included), accumulate in float32 and return a's dtype. float32 inputs use IEEE
products (``input_precision="ieee"``), so CPU interpreter checks compare to torch at float32 tolerances.
The batch-invariant mode (runtime/batch_invariant.py) routes ``aten::mm`` / ``addmm`` / ``bmm`` on CUDA here.
The reference (``matmul_reference``) is the op's CPU implementation."""
from __future__ import annotations

import torch

from ._registry import HAS_TRITON, INTERPRET, check, define_op, launch, require_triton, tl, triton, use_triton

M_CHUNK = 4096           # rows per launch when split > 1 (bounds the [split, rows, N] float32 partials)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def plan(N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    """Tiles, split-K and launch settings from (N, K, dtype, SM count) only, never from M.

    One row tile times N / BN column tiles times ``split`` K ranges should fill the SMs once (at M = 1 the
    GEMM streams the weight: every SM must be reading); split is at most 4 and keeps >= 8 K steps per range.
    Examples (132 SMs, bf16): N 4096, K 4096 -> BN 64, split 3; N 12288 -> BN 128, split 2; N 126464 -> 1."""
    BN = 64 if N <= 4096 else 128
    BK = 32 if dtype == torch.float32 else 64
    n_tiles = -(-N // BN)
    split = 1 if n_tiles >= sms else max(1, min(4, -(-sms // n_tiles), K // (8 * BK)))
    k_per = -(-K // split)
    k_per = -(-k_per // BK) * BK                                     # whole BK steps per range
    split = -(-K // k_per)
    return dict(BM=64, BN=BN, BK=BK, split=split, k_per=k_per,
                num_warps=4, num_stages=2 if dtype == torch.float32 else 3)


# ----------------------------------------------------------------------------------------------- reference
def matmul_reference(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [.., M, K] @ b [.., K, N] (+ bias [N]) in float32, returned in a's dtype (the CPU implementation)."""
    out = a.float() @ b.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(a.dtype)


# ----------------------------------------------------------------------------------------------- Triton
if HAS_TRITON:
    # M and the batch strides (M * K, M * N) are never specialised on (Triton compiles a variant per value 1
    # or multiple of 16): one compiled kernel serves every batch size
    @triton.jit(do_not_specialize=["M", "s_az", "s_cz"])
    def _mm_kernel(A, B, C, P, BIAS, M, N, K, k_per,
                   s_az, s_am, s_ak, s_bz, s_bk, s_bn, s_cz, s_cm, s_cn,
                   SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        m_tiles = tl.cdiv(M, BM)
        pid_m = pid % m_tiles                                # row tile: fast axis (a weight tile stays in L2)
        pid_n = pid // m_tiles
        sp = tl.program_id(1)
        z = tl.program_id(2).to(tl.int64)
        rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
        mmask = rm < M
        nmask = rn < N
        k0 = sp * k_per
        k1 = tl.minimum(k0 + k_per, K)
        acc = tl.zeros([BM, BN], tl.float32)
        for kk in range(k0, k1, BK):                                  # a row's K order: fixed by the plan
            rk = kk + tl.arange(0, BK)
            kmask = rk < k1
            a = tl.load(A + z * s_az + rm[:, None] * s_am + rk[None, :] * s_ak,
                        mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(B + z * s_bz + rk[:, None] * s_bk + rn[None, :] * s_bn,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if SPLIT == 1:
            if HAS_BIAS:
                acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(C + z * s_cz + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(C.dtype.element_ty),
                     mask=mmask[:, None] & nmask[None, :])
        else:                                                         # partials [Z, SPLIT, M, N] float32
            base = (z * SPLIT + sp) * M
            tl.store(P + (base + rm[:, None]) * N + rn[None, :], acc, mask=mmask[:, None] & nmask[None, :])

    @triton.jit(do_not_specialize=["M", "s_cz"])
    def _mm_combine(P, C, BIAS, M, N, s_cz, s_cm, s_cn,
                    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        z = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        acc = tl.zeros([BLOCK], tl.float32)
        for sp in range(SPLIT):                                       # split order, whatever the batch
            acc += tl.load(P + (z * SPLIT + sp) * M * N + offs, mask=mask, other=0.0)
        m = offs // N
        n = offs % N
        if HAS_BIAS:
            acc += tl.load(BIAS + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(C + z * s_cz + m * s_cm + n * s_cn, acc.to(C.dtype.element_ty), mask=mask)


def matmul_triton(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                  cfg: dict | None = None, sms: int | None = None) -> torch.Tensor:
    """a [Z, M, K] @ b [Z, K, N] (+ bias [N]) -> [Z, M, N] in a's dtype; ``cfg`` overrides ``plan``, ``sms``
    the SM count it plans for (tests). Also runs on CPU tensors under TRITON_INTERPRET=1."""
    Z, M, K = a.shape
    N = b.shape[2]
    p = cfg or plan(N, K, a.dtype, sms or _sm_count(a.device))
    c = torch.empty((Z, M, N), dtype=a.dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_() if bias is None else c.copy_(bias.expand_as(c))
    split, step = p["split"], (M_CHUNK if p["split"] > 1 else M)
    for m0 in range(0, M, step):                                      # row chunks: bound the partials
        _launch(a[:, m0:m0 + step], b, c[:, m0:m0 + step], bias, p, split)
    return c


def _launch(a, b, c, bias, p, split):
    Z, M, K = a.shape
    N = b.shape[2]
    part = torch.empty((Z, split, M, N), dtype=torch.float32, device=a.device) if split > 1 else c
    bp = bias if bias is not None else c                                          # unused pointer: any tensor
    grid = (-(-M // p["BM"]) * -(-N // p["BN"]), split, Z)
    launch(_mm_kernel)[grid](
        a, b, c, part, bp, M, N, K, p["k_per"], a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), c.stride(2),
        SPLIT=split, HAS_BIAS=bias is not None, IEEE=a.dtype == torch.float32,
        BM=p["BM"], BN=p["BN"], BK=p["BK"], num_warps=p["num_warps"], num_stages=p["num_stages"])
    if split > 1:
        block = 1024
        launch(_mm_combine)[(-(-M * N // block), Z)](
            part, c, bp, M, N, c.stride(0), c.stride(1), c.stride(2),
            SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)


# ----------------------------------------------------------------------------------------------- the op
def validate(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> None:
    check(a.dim() == 3 and b.dim() == 3, f"a and b must be [Z, M, K] and [Z, K, N], got {tuple(a.shape)} "
          f"and {tuple(b.shape)}")
    check(a.shape[0] == b.shape[0] and a.shape[2] == b.shape[1],
          f"matmul shapes do not fit: a {tuple(a.shape)}, b {tuple(b.shape)}")
    check(a.dtype == b.dtype and a.dtype in DTYPES, f"a and b must share a dtype in {DTYPES}, got "
          f"{a.dtype} and {b.dtype}")
    check(a.device == b.device, f"a on {a.device} but b on {b.device}")
    if bias is not None:
        check(tuple(bias.shape) == (b.shape[2],) and bias.device == a.device,
              f"bias must be [N={b.shape[2]}] on {a.device}, got {tuple(bias.shape)} on {bias.device}")


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op's body (a [Z, M, K], b [Z, K, N], validated): Triton on CUDA (and on CPU in the interpreter),
    else the reference. The mode's aten overrides call it directly (no second trip through the dispatcher)."""
    if use_triton(a) or INTERPRET:
        require_triton("invariant_matmul")
        return matmul_triton(a, b, bias)
    return matmul_reference(a, b, bias)


@define_op("invariant_matmul", opaque=True)
def invariant_matmul_op(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return matmul(a, b, bias)


@invariant_matmul_op.register_fake
def _(a, b, bias=None):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]))


def invariant_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] @ b [K, N] or a [Z, M, K] @ b [Z, K, N] (+ bias [N]), batch-invariant on CUDA."""
    two = a.dim() == 2 and b.dim() == 2
    a3, b3 = (a[None], b[None]) if two else (a, b)
    validate(a3, b3, bias)
    out = torch.ops.dlc.invariant_matmul(a3, b3, bias)
    return out[0] if two else out
