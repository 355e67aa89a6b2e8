"""The ordered pass pipeline of ``dlc compile`` (Torch-TensorRT lowering-pass style).

Every pass has one signature, ``run(gm, ctx) -> int`` (the number of rewrites it made), and runs once on each
phase program. The driver copies the traced full-sequence forward into one program per phase (``refresh``,
``reuse``), then runs ``PIPELINE`` in order on each; after every pass a shared clean-up removes dead code and
lints the graph, the rewrite count is logged, and ``dump_after`` names a pass whose output graph is printed
(``--dump-graph-after``). Each phase's module is recompiled once, after its last pass: regenerating the
Python code of a graph of thousands of nodes after every pass took a fifth of the pipeline's time
(llada2-mini: 44.5 -> 34.6 s on the 2-core CI box)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.fx as fx

from . import (cache_kv_reuse, chunk_logits, fold_weight_stacks, fuse_projections, lift_weights, mask_blocks,
               sparsify_heads)

log = logging.getLogger("dlc.passes")

PHASES = ("refresh", "reuse")

# name -> (module, required). Order is the pipeline order.
PIPELINE: dict[str, tuple] = {
    "fold_weight_stacks": (fold_weight_stacks, False),  # default on for MoE models: experts packed once
    "mask_blocks": (mask_blocks, False),                # block-diffusion models only (and there required)
    "cache_kv_reuse": (cache_kv_reuse, True),
    "sparsify_heads": (sparsify_heads, False),
    "fuse_projections": (fuse_projections, False),      # default on when lowering to the GPU kernels
    "chunk_logits": (chunk_logits, True),
    "lift_weights": (lift_weights, True),              # last: every weight becomes an input, stored once
}


@dataclass
class PassContext:
    """What passes may read: the model facts and the build settings. ``phase`` is set by the driver."""
    config: object                        # dlc.models.ModelConfig
    head_weight: object = None            # the LM head weight tensor [>= vocab, d] (tied: the embedding)
    logit_chunk: int = 0                  # vocab rows per logit chunk (0: the whole vocabulary at once)
    logprobs: int = 0                     # top-k logprobs to return per decoded row (0: none)
    sparse_retention: float | None = None
    device: str = "cpu"                   # the build target's device kind (dlc.targets Target.device)
    kernels: bool | None = None           # lower to dlc.kernels ops (None: when device is "cuda")
    decode_dtype: object = None           # decoding arithmetic (None: torch.float64; float32 for TensorRT)
    kv_inplace: bool = True               # programs write K/V into the pool inputs (False: ONNX / TensorRT,
                                          # which return the new K/V for the runner to write)
    extras: bool = False                  # decode the rules' extras too (entropy, logprob, credit; chunked
                                          # lowering only): chunk_logits.EXTRA_INPUTS / EXTRA_OUTPUTS
    phase: str = ""
    counts: dict = field(default_factory=dict)     # (pass, phase) -> rewrites
    shared: dict = field(default_factory=dict)     # what a pass builds once and both phases use
                                                   # ("weights": name -> tensor, from lift_weights)

    @property
    def use_kernels(self) -> bool:
        """Emit ``torch.ops.dlc.*`` (Triton kernels on CUDA tensors, their references on CPU)? GPU targets
        whose artifact runs torch ops (export, AOTI); never for ONNX / TensorRT, which cannot run the custom
        ops."""
        return self.device == "cuda" if self.kernels is None else self.kernels

    def params(self, name: str) -> dict:
        """The parameters of one pass, as recorded in config.json."""
        return {"mask_blocks": {"mask": "block-causal (blocks aligned to column 0)",
                                "block_size": "runtime input (the request's block length)"},
                "cache_kv_reuse": {**({"layouts": ["block"]} if getattr(self.config, "block_diffusion", False)
                                      else {"layouts": ["prefix", "dual"], "vicinity": "runtime"}),
                                   "kv": "in place" if self.kv_inplace else "returned"},
                "lift_weights": {"weights": len(self.shared.get("weights", {}))},
                "sparsify_heads": sparsify_heads.params(self),
                "fuse_projections": {"groups": "linears sharing one input (q|k|v, gate|up)"},
                "fold_weight_stacks": {"folds": "stacks / concatenations of weights (MoE experts), computed "
                                                "once at build"},
                "chunk_logits": {"vocab_chunk": self.logit_chunk or self.config.vocab_size,
                                 "logprobs": self.logprobs, "device": self.device,
                                 "decode_dtype":
                                     str(self.decode_dtype or "torch.float64").replace("torch.", ""),
                                 "lowering": "fused_select_logits" if self.use_kernels else "chunked",
                                 "extras": bool(self.extras and not self.use_kernels),
                                 "hidden_rows": bool(self.extras)}}[name]


def select_passes(names: list[str] | None, sparse_retention: float | None, gpu: bool = False,
                  block: bool = False, moe: bool = False) -> list[str]:
    """Validate a --passes list; default: the required passes, plus mask_blocks for a block-diffusion model
    (``block``; required there), fold_weight_stacks for a MoE model (``moe``: its experts' packed weights),
    sparsify_heads when a retention is set and fuse_projections when the build lowers to the GPU kernels
    (``gpu``)."""
    if names is None:
        names = [n for n, (_, req) in PIPELINE.items() if req or (n == "fold_weight_stacks" and moe)
                 or (n == "sparsify_heads" and sparse_retention)
                 or (n == "fuse_projections" and gpu) or (n == "mask_blocks" and block)]
    unknown = [n for n in names if n not in PIPELINE]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; the pipeline is {list(PIPELINE)}")
    missing = [n for n, (_, req) in PIPELINE.items() if (req or (n == "mask_blocks" and block))
               and n not in names]
    if missing:
        raise ValueError(f"--passes must include the required pass(es) {missing} (they define the "
                         "phase programs)")
    if "mask_blocks" in names and not block:
        raise ValueError("pass mask_blocks applies to block-diffusion models (LLaDA2, SDAR) only")
    if block and sparse_retention is not None:
        raise ValueError("--sparse-retention: head-sparse attention selects keys at Refresh steps; "
                         "block-diffusion models keep an exact block cache (no Refresh): leave it out")
    if "sparsify_heads" in names and sparse_retention is None:
        raise ValueError("pass sparsify_heads needs --sparse-retention F (0 < F <= 1)")
    if sparse_retention is not None and not 0 < sparse_retention <= 1:
        raise ValueError(f"--sparse-retention must be in (0, 1], got {sparse_retention}")
    return [n for n in PIPELINE if n in names]


def cleanup(gm: fx.GraphModule) -> None:
    """Shared clean-up after every pass: dead code removed, the graph linted. Passes edit ``gm.graph`` only
    (none calls the module), so the module's code is regenerated once per phase, by ``run_pipeline``."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()


def run_pipeline(base: fx.GraphModule, ctx: PassContext, names: list[str], dump_after: str | None = None,
                 dump=print) -> dict[str, fx.GraphModule]:
    """Copy ``base`` into one program per phase and run the selected passes on each, in PIPELINE order."""
    if dump_after is not None and dump_after not in names:
        raise ValueError(f"--dump-graph-after {dump_after!r} is not a pass of this build; passes: {names}")
    phases = {}
    for phase in PHASES:
        gm = fork(base)
        ctx.phase = phase
        for name in names:
            n = PIPELINE[name][0].run(gm, ctx)
            cleanup(gm)
            ctx.counts[(name, phase)] = n
            log.info("pass %s [%s]: %d rewrites", name, phase, n)
            if name == dump_after:
                dump(f"# graph after {name} [{phase}]\n{gm.graph}")
        gm.recompile()
        phases[phase] = gm
    return phases


def fork(base: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with its own copy of base's graph and base's parameters (shared, not copied), using
    the flat calling convention (positional inputs, tuple output) instead of export's pytree one."""
    g = fx.Graph()
    val_map: dict = {}
    out = g.graph_copy(base.graph, val_map)
    g.output(out)
    return fx.GraphModule(base, g)


def input_names(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def count_ops(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target == target)


__all__ = ["PIPELINE", "PHASES", "PassContext", "run_pipeline", "select_passes", "cleanup", "input_names",
           "count_ops", "fork"]
