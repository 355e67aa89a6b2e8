"""How dlc's kernels become torch ops.

Each kernel is one ``dlc::<name>`` op. With Triton importable the op is a ``torch.library.triton_op``: its
body launches the Triton kernel through ``wrap_triton`` on CUDA tensors, so torch.export keeps one node and
Inductor/AOTInductor compile the kernel itself into the artifact (no Python at run time). Without Triton
(CPU-only installs, and CPU-only machines outside the interpreter's checks, where Triton is not imported) the
same body is registered as a plain ``custom_op``. Either way the body dispatches CPU
tensors to the pure-PyTorch reference, which is the op's CPU implementation and the numerics every Triton
result is checked against."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Triton is imported where it can run: with a CUDA device, or for the interpreter's checks. On a CPU-only
# machine the references run either way, and importing Triton cost every process 2.5-4 s (CLI, servers, TP
# workers: ``import dlc.runtime`` 2.8 s -> 5.3-6.9 s on the 2-core CI box).
triton, tl, HAS_TRITON = None, None, False
if INTERPRET or torch.cuda.is_available():
    try:                                         # Triton is optional: CPU installs run the references
        import triton
        import triton.language as tl
        HAS_TRITON = True
    except Exception:                            # noqa: BLE001 - any import failure means "no Triton"
        triton, tl, HAS_TRITON = None, None, False

OPS: dict[str, object] = {}                      # name -> torch op (torch.ops.dlc.<name>)
# batch-invariant mode (runtime/batch_invariant.py): kernels pick their splits from a row's own shape only
_INVARIANT: list[bool] = [False]


def define_op(name: str, mutates_args=(), opaque: bool = False):
    """Decorator: define ``dlc::name`` from a Python body (triton_op when Triton is there, else custom_op).
    ``opaque``: always a custom_op, so torch.compile calls the body as an extern kernel instead of compiling
    the Triton kernel into its own graph (runtime-only ops: nothing to lower into an exported artifact)."""
    def wrap(fn):
        if HAS_TRITON and not opaque:
            op = torch.library.triton_op(f"dlc::{name}", fn, mutates_args=mutates_args)
        else:
            op = torch.library.custom_op(f"dlc::{name}", fn, mutates_args=mutates_args)
        OPS[name] = getattr(torch.ops.dlc, name)
        return op
    return wrap


def use_triton(t: torch.Tensor) -> bool:
    """Run the Triton kernel for this tensor? CUDA tensors when Triton is there; CPU tensors never
    (reference), except that callers may launch kernels directly under TRITON_INTERPRET=1 for checks."""
    return t.device.type == "cuda"


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{what} on a CUDA tensor needs Triton, which is not importable here; "
                           f"install triton or run on CPU (the reference implementation)")


def launch(kernel):
    """``kernel[grid](...)`` through ``wrap_triton`` so tracing sees the kernel; plain launch in the
    interpreter."""
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def invariant() -> bool:
    """Is the batch-invariant mode on? Kernels then choose tile sizes and splits that never depend on the
    number of rows (``logits.plan``, ``pool_attn``); read at launch time (baked into a graph at capture)."""
    return _INVARIANT[0]


def set_invariant(on: bool) -> bool:
    """Switch the mode; returns the previous value (runtime/batch_invariant.py is the one caller)."""
    prev, _INVARIANT[0] = _INVARIANT[0], bool(on)
    return prev


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def check_shape(name: str, t: torch.Tensor, ndim: int, what: str) -> None:
    check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    check(t.dim() == ndim, f"{name} must be {what} ({ndim}-D), got shape {tuple(t.shape)}")


def concrete() -> bool:
    """True when tensors hold real values (not tracing/compiling/capturing): value checks may sync then."""
    if torch.compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True
