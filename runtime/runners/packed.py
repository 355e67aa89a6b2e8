"""How the CUDA-graph runner runs a mixed iteration (Refresh rows beside Reuse rows): ``MIX_ITERATIONS``.

* ``two``: one call per group (eager or compiled Refresh, then the captured Reuse step);
* ``eager``: one eager ragged forward (``DiffusionLM.forward_ragged``; compiled blocks switched off for it:
  Dynamo would recompile on every new mix), Reuse rows attending inside the pool;
* ``compiled``: one packed forward through the compiled blocks (``models/packed.py``): every part's tokens in
  one row padded to a token bucket (``TOKEN_BUCKETS``), attention per part through one opaque op per layer,
  so the token-wise work (norms, projections, RoPE, MLP) runs Inductor's fused kernels over all rows at once
  and Dynamo compiles the kind twice whatever the mixes (static, then a symbolic token dimension).

Not captured as a CUDA graph: the part structure (row counts and lengths of each kind, slots, starts) changes
every iteration, and Refresh attention over hundreds of tokens per row is compute-bound (launch overhead is
noise there); capturing per (bucket, part structure) would capture once per mix.

The padding costs token-wise compute on at most the gap to the next bucket: buckets are close (25 % steps
from 1024 on) so the waste stays small at the realistic sizes (2 x 768 + 30 x 32 = 2496 tokens -> 2560)."""
from __future__ import annotations

from dlc.models.packed import forward_packed, packable

from ..config import MIX_ITERATIONS
from ..step import MixedBatch

__all__ = ["MIX_ITERATIONS", "TOKEN_BUCKETS", "run_packed", "token_bucket"]   # the modes: config.py's list
TOKEN_BUCKETS = (64, 128, 256, 512, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096, 5120, 6144, 8192,
                 10240, 12288, 16384)


def token_bucket(n: int, buckets=TOKEN_BUCKETS) -> int:
    """The smallest bucket >= n tokens; past the largest, a multiple of the last bucket step."""
    for b in buckets:
        if b >= n:
            return b
    step = buckets[-1] - buckets[-2] if len(buckets) > 1 else buckets[-1]
    return -(-n // step) * step


def run_packed(runner, batch: MixedBatch, buckets=TOKEN_BUCKETS) -> list | None:
    """``runner.mixed``'s work as one packed forward -> one result per part, decoded as ``runner`` decodes
    (``decode_parts``); None where the parts cannot be packed (``packed.packable``: head-sparse steps, parts
    over different pools, no cached part)."""
    parts = [runner.inputs(b) for b in batch.parts]
    pool = packable(parts)
    if pool is None:
        return None
    n = sum(p.ids.numel() for p in parts)
    hs = forward_packed(runner.model, parts, pool, token_bucket(n, buckets))           # [r_i, c_i, d]
    return runner.decode_parts([runner.decoded_rows(h, b) for h, b in zip(hs, batch.parts)], batch.parts)
