"""The dlc compiler: export, pass pipeline and engine emission (it writes engine directories; the runtime
opens them: dlc.runtime.runners.engine_dir)."""
from __future__ import annotations


def in_memory_runner(model, *, sparse_retention: float | None = None, block_length: int = 32, passes=None,
                     logit_chunk: int | None = None, device: str | None = None,
                     decode_extras: bool | None = None, logprobs: int = 0):
    """Build the phase programs of ``model`` in memory (trace + pass pipeline, run as FX graphs in Python)
    and return a runner with the EagerRunner contract. ``block_length`` sizes the logit chunk (rows decoded
    per step); ``sparse_retention`` enables head-sparse attention in reuse steps. ``device`` is the target's
    device kind for the lowering (default: the model's; "cuda" decodes with dlc.fused_select_logits, "cpu"
    with the exact chunked float64 loop). ``decode_extras`` (``dlc compile --decode-extras``) defaults to on
    for the CPU lowering, off for the GPU one; ``logprobs``: top alternatives the programs return (``dlc
    compile --logprobs``)."""
    import torch

    from .export import build_phases
    from .plan import default_logit_chunk
    from dlc.runtime.runners.compiled import CompiledRunner
    from dlc.passes.pipeline import input_names

    p = next(model.parameters())
    chunk = logit_chunk if logit_chunk is not None else default_logit_chunk(model.config, block_length)
    kind = device or ("cuda" if p.device.type == "cuda" else "cpu")
    phases, ctx, _ = build_phases(model, passes=passes, sparse_retention=sparse_retention, logit_chunk=chunk,
                                  device=kind, logprobs=logprobs,
                                  extras=kind == "cpu" if decode_extras is None else decode_extras)
    names = {k: input_names(g) for k, g in phases.items()}
    with torch.no_grad():
        return CompiledRunner(model.config, phases, names, device=p.device, dtype=p.dtype,
                              sparse_retention=sparse_retention, kind="in-memory",
                              weights=ctx.shared["weights"])


__all__ = ["in_memory_runner"]
