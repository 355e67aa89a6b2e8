"""The batch-invariant mode (``--batch-invariant``): a request's output does not depend on what else runs.

A row's numbers go through GEMMs, norms, attention and the logits reduction. On CUDA each of those picks its
kernel, tiling and split from the whole batch (cuBLAS by M, torch's reductions by the number of outputs,
SDPA by whether a padding mask exists, the fused logits kernel's vocab split by N), so in bf16 one request's
tokens change with its neighbours (bench/RESULTS.md, "Batch invariance"). While the mode is on
(``batch_invariant_mode``, entered by the Engine around every runner call and its warm-up):

* ``aten::mm`` / ``addmm`` / ``bmm`` on CUDA run ``kernels/matmul.py`` (tiles and split-K from N, K and the
  dtype only, split partials summed in order): every nn.Linear, fused projection, LM-head chunk of the eager
  model, whatever module calls it, also inside CUDA-graph capture (the override is a dispatcher entry, so a
  captured graph holds these kernels);
* ``aten::sum.dim_IntList`` / ``aten::mean.dim`` / ``aten::logsumexp`` on CUDA run ``kernels/reduce.py`` (one
  program per output, order from the reduced length only): RMSNorm's mean, decoding's softmax sums, the
  extras' logprobs;
* dense attention (Refresh, full forwards, gathered Reuse) goes through ``invariant_attention``: the
  pool-attention Triton kernel with one split and one query tile shape, each row masked by its own key count
  (the runtime's key masks are prefixes: ``StepBatch.key_mask``), instead of SDPA (flash without a mask,
  another kernel with one: a row's numerics depended on whether a neighbour was padded);
* kernels read ``kernels._registry.invariant()``: the fused logits kernel takes the vocab split of one row
  tile whatever N is (``logits.plan``) and pool attention the split count of one row (``pool_attn``).

What stays outside: compiled blocks (Inductor picks its own GEMM and reduction configs per shape: the mode
keeps ``compile`` off), compiled engine directories and tensor parallelism (refused: ``check_runner``,
``ServeConfig``), block-causal masks (LLaDA2 / SDAR: SDPA, always masked, not proven
invariant), CPU (torch's CPU kernels; the CPU check in tests/runtime/test_batch_invariance.py holds with the
mode off and on, but nothing forces it). Sampling state is per row already (hash noise of (seed, row,
column)). The cost is measured by ``bench/batch_invariance.py --batch-invariant both``."""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from dlc.kernels._registry import HAS_TRITON, INTERPRET, invariant, set_invariant
from dlc.kernels.matmul import DTYPES, matmul
from dlc.kernels.reduce import sum_dims
from dlc.models.common import attention_override


# ------------------------------------------------------------------------------------- aten overrides
def _matmul_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.dtype in DTYPES


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _matmul_ok(a, b):                       # float64 / integer GEMMs: products summed in order
        return sum_dims(a[:, :, None] * b[None], [1])
    return matmul(a[None], b[None])[0]


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    if beta == 1 and alpha == 1 and bias.dim() == 1 and bias.shape[0] == b.shape[1] and _matmul_ok(a, b) \
            and bias.dtype == a.dtype:
        return matmul(a[None], b[None], bias)[0]   # the bias added in float32 before rounding, as cuBLAS
    out = _mm(a, b)
    return out * alpha + bias * beta if beta != 0 else out * alpha


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if not _matmul_ok(a, b):
        return sum_dims(a[:, :, :, None] * b[:, None], [2])
    return matmul(a, b)


def _sum(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    return sum_dims(x, dim, keepdim, dtype)


def _mean(x: torch.Tensor, dim=None, keepdim: bool = False, *, dtype=None) -> torch.Tensor:
    return sum_dims(x, dim, keepdim, dtype, mean=True)


def _logsumexp(x: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """max + log(sum(exp(x - max))) with the sum in the invariant order (decoding extras' logprobs)."""
    m = x.amax(dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    out = torch.log(sum_dims(torch.exp(x - m), dim, True)) + m
    return out if keepdim else out.squeeze(tuple(d % x.dim() for d in dim) if dim else None)


OVERRIDES = {"mm": _mm, "addmm": _addmm, "bmm": _bmm, "sum.dim_IntList": _sum, "mean.dim": _mean,
             "logsumexp": _logsumexp}


# ------------------------------------------------------------------------------------- attention
def invariant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask=None) -> torch.Tensor:
    """``models.common.attend``'s dense attention in the mode: q [B, H, T, D], k, v [B, H, S, D] (GQA
    expanded), mask None or [B, 1, 1, S] bool (a prefix of real keys per row) -> [B, H, T, D] through the
    pool-attention kernel (rows = the batch, one key split, a fixed query tile): a row reads its own keys
    [0, kv_len) in fixed tiles, so padding columns of longer neighbours never enter its sums. Per-query
    masks (block-causal) and CPU tensors keep SDPA (the Triton interpreter runs the kernel on CPU)."""
    prefix = attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4
                                   and attn_mask.shape[1] == 1 and attn_mask.shape[2] == 1)
    if not ((q.is_cuda or INTERPRET) and HAS_TRITON and prefix and q.dtype == k.dtype):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    from dlc.kernels.pool_attn import pool_attention_triton
    B, S = q.shape[0], k.shape[2]
    if attn_mask is None:
        kv_len = torch.full((B,), S, dtype=torch.int64, device=q.device)
    else:
        kv_len = attn_mask[:, 0, 0, :S].to(torch.int64).sum(-1)                  # [B]
    rows = torch.arange(B, device=q.device)
    # the kernel reads k and v with one stride set: after RoPE k is a fresh tensor while v may still be a view
    # of the fused q|k|v projection (found on an H100: a row's values then depended on its batch index)
    return pool_attention_triton(q, k.contiguous(), v.contiguous(), rows, kv_len, splits=1)


# ------------------------------------------------------------------------------------- the mode
def check_runner(runner) -> None:
    """Refuse what the mode cannot make invariant: CUDA without Triton, a compiled engine directory (its
    programs hold their own kernels) and a model whose blocks are already compiled (``torch.compile`` in
    place, e.g. by an earlier GraphRunner with compile on): Inductor's GEMMs and fused reductions bypass the
    overrides."""
    from .runners.compiled import CompiledRunner
    if runner.device.type == "cuda" and not HAS_TRITON:
        raise ValueError("batch_invariant on CUDA runs Triton kernels; install triton (or leave it off)")
    if isinstance(runner, CompiledRunner):
        raise ValueError("batch_invariant: compiled engine directories run their own kernels; serve the "
                         "checkpoint (or preset) the engine was built from")
    model = getattr(runner, "model", None)
    blocks = getattr(model, "blocks", ()) if model is not None else ()
    if any(getattr(b, "_compiled_call_impl", None) is not None for b in blocks):
        raise ValueError("batch_invariant: this model's blocks are compiled (torch.compile); the mode needs "
                         "them uncompiled (load the model again, or leave compile off)")


@contextmanager
def batch_invariant_mode(on: bool = True, keys: tuple[str, ...] = ("CUDA",)):
    """While inside: the overrides above on the dispatch ``keys`` (CUDA; tests pass CPU under the Triton
    interpreter), kernels in their invariant plans, dense attention through ``invariant_attention``.
    ``on=False`` (the default serving mode) does nothing; nesting keeps the outer registration. Registering
    costs ~20 us, so the Engine enters it per iteration; the mode is process-wide while entered (one engine
    thread runs the forwards)."""
    if not on or invariant():
        yield
        return
    prev = set_invariant(True)
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():            # "Overriding a previously registered kernel": intended
            warnings.simplefilter("ignore")
            for key in keys:
                for name, fn in OVERRIDES.items():
                    lib.impl(name, fn, key)
        with attention_override(invariant_attention):
            yield
    finally:
        lib._destroy()
        set_invariant(prev)
