"""Float64 math inside Triton kernels, one home: CUDA's libdevice functions (the ones torch's float64 CUDA
kernels call, so a kernel reproduces torch's bits where it does the same operations) and, under
TRITON_INTERPRET=1, numpy-backed ``tl`` forms (the interpreter runs no libdevice; log1p / expm1 / pow are
then composed, exact to float64 rounding of their parts: CPU checks only). Used by ``filter_bisect``'s
sampled kernels and ``select_extras``' credit kernel."""
from __future__ import annotations

from ._registry import HAS_TRITON, INTERPRET, tl, triton

if HAS_TRITON:
    if INTERPRET:
        @triton.jit
        def exp64(x):
            return tl.exp(x)

        @triton.jit
        def log64(x):
            return tl.log(x)

        @triton.jit
        def log1p64(x):
            return tl.log(1.0 + x)

        @triton.jit
        def expm164(x):
            return tl.exp(x) - 1.0

        @triton.jit
        def pow64(x, g):
            return tl.exp(g * tl.log(x))
    else:
        try:
            from triton.language.extra import libdevice
        except ImportError:                        # older layout
            from triton.language.extra.cuda import libdevice

        @triton.jit
        def exp64(x):
            return libdevice.exp(x)

        @triton.jit
        def log64(x):
            return libdevice.log(x)

        @triton.jit
        def log1p64(x):
            return libdevice.log1p(x)

        @triton.jit
        def expm164(x):
            return libdevice.expm1(x)

        @triton.jit
        def pow64(x, g):
            return libdevice.pow(x, g.to(tl.float64))         # a float argument arrives as float32
