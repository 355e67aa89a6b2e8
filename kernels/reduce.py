"""Batch-invariant sum / mean over trailing columns: each output's summation order depends on the reduced
length only.

torch's CUDA reduction picks its thread layout, vectorisation and how many blocks share one output from the
whole tensor (the number of outputs too): an RMSNorm's mean over d of one token sums in another order in a
batch of 1 than in a batch of 64, and the rounding reaches the tokens. Here one program reduces one row of
``x [R, C]``: ``BLOCK`` (from C only) lanes accumulate column tiles in order, then one ``tl.sum`` over the
lanes. float16 / bfloat16 / float32 accumulate in float32, float64 in float64, integers and bool in int64.

The batch-invariant mode (runtime/batch_invariant.py) routes ``aten::sum.dim_IntList`` and ``aten::mean.dim``
on CUDA here (``sum_dims``): reduced dims are moved last (a copy) and flattened. The reference is the op's CPU
implementation."""
from __future__ import annotations

import torch

from ._registry import HAS_TRITON, INTERPRET, define_op, launch, require_triton, tl, triton, use_triton


def block_for(C: int) -> int:
    """Lanes per row: a power of two from the reduced length only (at most 1024)."""
    return max(16, min(1024, 1 << max(0, C - 1).bit_length()))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    return torch.int64


def row_sum_reference(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x [R, C] -> [R] sums (times ``scale``) in ``acc_dtype`` (the CPU implementation)."""
    out = x.to(acc_dtype(x.dtype)).sum(1)
    return out * scale if scale != 1.0 else out


if HAS_TRITON:
    @triton.jit
    def _row_sum_kernel(X, O, C, s_x, scale, SCALE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK], ACC)
        for c0 in range(0, C, BLOCK):                                 # column tiles in order
            c = c0 + tl.arange(0, BLOCK)
            acc += tl.load(X + r * s_x + c, mask=c < C, other=0).to(ACC)
        s = tl.sum(acc, 0)
        if SCALE:
            s = s * scale
        tl.store(O + r, s)


def row_sum_triton(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x [R, C] with a contiguous last dim -> [R] in ``acc_dtype`` (also on CPU under TRITON_INTERPRET=1)."""
    R, C = x.shape
    acc = acc_dtype(x.dtype)
    out = torch.empty(R, dtype=acc, device=x.device)
    if R == 0:
        return out
    if C == 0:
        return out.zero_()
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    tl_acc = {torch.float32: tl.float32, torch.float64: tl.float64, torch.int64: tl.int64}[acc]
    launch(_row_sum_kernel)[(R,)](x, out, C, x.stride(0), float(scale), SCALE=scale != 1.0, ACC=tl_acc,
                                  BLOCK=block_for(C), num_warps=4)
    return out


def row_sum(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The op's body: Triton on CUDA (and on CPU in the interpreter), else the reference."""
    if use_triton(x) or INTERPRET:
        require_triton("invariant_row_sum")
        return row_sum_triton(x, scale)
    return row_sum_reference(x, scale)


@define_op("invariant_row_sum", opaque=True)
def invariant_row_sum_op(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return row_sum(x, scale)


@invariant_row_sum_op.register_fake
def _(x, scale=1.0):
    return x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype))


def sum_dims(x: torch.Tensor, dim=None, keepdim: bool = False, dtype: torch.dtype | None = None,
             mean: bool = False) -> torch.Tensor:
    """``x.sum(dim, keepdim, dtype=dtype)`` (``mean``: ``x.mean(...)``) with a batch-invariant order: the
    reduced dims moved last and flattened, one row per output. ``dim`` None or empty: every dim."""
    nd = x.dim()
    if nd == 0:                                      # a scalar: its own sum
        out = x.to(dtype or (x.dtype if x.is_floating_point() else acc_dtype(x.dtype)))
        return out.clone() if not mean else out / 1
    dims = sorted({d % nd for d in dim}) if dim else list(range(nd))
    keep = [d for d in range(nd) if d not in dims]
    if dtype is not None:
        x = x.to(dtype)
    out_shape = [x.shape[d] for d in keep]
    C = 1
    for d in dims:
        C *= x.shape[d]
    rows = x.permute(*keep, *dims).reshape(-1, C)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    res = row_sum(rows, 1.0 / C if mean and C else 1.0)
    if mean and C == 0:
        res = torch.full_like(res, float("nan"))
    if dtype is not None:
        res = res.to(dtype)
    elif x.dtype.is_floating_point:
        res = res.to(x.dtype)
    res = res.reshape(out_shape)
    if keepdim:
        for d in dims:
            res = res.unsqueeze(d)
    return res
