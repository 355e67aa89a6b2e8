"""Export: trace the model's full-sequence forward with torch.export and build the phase programs.

The trace is ``(input_ids [B, L], position_ids [B, L], key_mask [B, L]) -> hidden [B, L, d]`` with dynamic
B and L; it works on the meta device (no weights: the dry run). The pass pipeline (dlc.passes) turns it into
``refresh`` and ``reuse`` programs; ``export_phase`` re-exports a rewritten program with every input's
symbolic dims named (for AOTI / ONNX / torch.export.save)."""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from dlc.models.common import DiffusionLM
from dlc.models.llada_moe import moe_impl_set, program_trace
from dlc.passes.graph_utils import remove_guard_calls
from dlc.passes.pipeline import PassContext, input_names, run_pipeline, select_passes

# distinct: export must not unify unrelated dims
EXAMPLE = dict(B=4, C=2, L=13, N=3, T=5, S=13, K=7, P=6, M=2)


class _Forward(torch.nn.Module):
    def __init__(self, model: DiffusionLM):
        super().__init__()
        self.m = model

    def forward(self, input_ids, position_ids, key_mask):
        return self.m(input_ids, position_ids, key_mask)


def trace_forward(model: DiffusionLM, moe_impl: str | None = None) -> fx.GraphModule:
    """torch.export of the full forward (dynamic batch and sequence), unlifted to a GraphModule whose
    parameters are the model's own tensors (shared, not copied).

    CUDA models are traced through a meta-device twin (same architecture and parameter names; the real
    parameters are bound afterwards and traced device constants retargeted), so tracing never runs real
    kernels or allocates activations on the GPU. Checked on the H200 (torch 2.11): tokens equal eager.
    ``moe_impl``: the MoE forward traced (a key of ``dlc.models.llada_moe.MOE_IMPLS``; None: the model's
    own, ``auto``, which traces ``stacked``); the model's own afterwards."""
    dev = next(model.parameters()).device
    if dev.type != "cuda":
        with moe_impl_set(model, moe_impl):
            return _export_forward(model, dev)
    from dlc.models import build_model
    with torch.device("meta"):
        twin = build_model(model.config).to(next(model.parameters()).dtype).eval()
    with moe_impl_set(twin, moe_impl):
        gm = _export_forward(twin, torch.device("meta"))
    real = dict(model.named_parameters())
    for name, _ in list(gm.named_parameters()):
        path, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(path), attr, real[name.removeprefix("m.")])
    for node in gm.graph.nodes:
        if isinstance(node.kwargs.get("device"), torch.device) and node.kwargs["device"].type == "meta":
            node.kwargs = {**node.kwargs, "device": dev}
    gm.recompile()
    return gm


def _export_forward(model: DiffusionLM, dev) -> fx.GraphModule:
    B, L = EXAMPLE["B"], EXAMPLE["L"]
    ids = torch.zeros(B, L, dtype=torch.long, device=dev)
    pos = torch.arange(L, device=dev)[None].expand(B, L).contiguous()
    km = torch.ones(B, L, dtype=torch.bool, device=dev)
    b, l = torch.export.Dim("B", min=1), torch.export.Dim("L", min=2)
    dyn = ({0: b, 1: l},) * 3
    # deferred runtime asserts: torch 2.11 emits stride guards (min(16 L, 32 L) == 16 L) it cannot prove
    with program_trace():
        ep = torch.export.export(_Forward(model).eval(), (ids, pos, km), dynamic_shapes=dyn, strict=False,
                                 prefer_deferred_runtime_asserts_over_guards=True)
    gm = ep.module()
    remove_guard_calls(gm)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def head_weight(model: DiffusionLM) -> torch.Tensor:
    """The LM head weight; tied heads use the embedding (the decoder reads its first vocab_size rows)."""
    return model.head.weight if hasattr(model.head, "weight") else model.embed.weight


def build_phases(model: DiffusionLM, *, passes: list[str] | None = None,
                 sparse_retention: float | None = None, logit_chunk: int = 0, logprobs: int = 0,
                 dump_after: str | None = None, dump=print, timings: dict | None = None, device: str = "cpu",
                 kernels: bool | None = None, decode_dtype: torch.dtype = torch.float64,
                 kv_inplace: bool = True, extras: bool = False, moe_impl: str | None = None):
    """Trace + pass pipeline -> ({phase: GraphModule}, PassContext with rewrite counts, pass names).

    ``device`` is the build target's device kind ("cpu" or "cuda"): GPU targets lower to the dlc kernel ops
    (``kernels=None``; ``kernels=False`` keeps the portable lowering, e.g. for ONNX). The model itself may
    live anywhere: ``device="cuda"`` on a CPU model gives the GPU graph, runnable on CPU through the ops'
    references. GPU lowering also adds ``fuse_projections`` to the default pass list. ``kv_inplace``: the
    programs write K/V into the pool inputs (torch artifacts); False returns it (ONNX / TensorRT). The weights
    the programs take as inputs are ``ctx.shared["weights"]`` (name -> tensor). ``moe_impl``: the MoE forward
    traced (``trace_forward``; the driver's ``traced_moe_impl`` picks it per target)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    names = select_passes(passes, sparse_retention, gpu=device == "cuda" if kernels is None else kernels,
                          block=bool(getattr(model.config, "block_diffusion", False)),
                          moe=bool(getattr(model.config, "is_moe", False)))
    t0 = time.perf_counter()
    base = trace_forward(model, moe_impl)
    t1 = time.perf_counter()
    ctx = PassContext(config=model.config, head_weight=head_weight(model),
                      logit_chunk=logit_chunk, logprobs=logprobs, sparse_retention=sparse_retention,
                      device=device, kernels=kernels, decode_dtype=decode_dtype, kv_inplace=kv_inplace,
                      extras=extras)
    phases = run_pipeline(base, ctx, names, dump_after=dump_after, dump=dump)
    if timings is not None:
        timings["trace"] = t1 - t0
        timings["passes"] = time.perf_counter() - t1
    return phases, ctx, names


# ----------------------------------------------------------------------------------------------------------
# Phase signatures: every input's shape as named symbolic dims (ints are static), and its dtype.

def input_specs(phase: str, names: list[str], config, dtype: torch.dtype,
                decode_dtype: torch.dtype = torch.float64,
                weights: dict | None = None) -> dict[str, tuple[tuple, torch.dtype]]:
    """Every input's (shape, dtype); ``weights`` (lifted weight inputs, name -> tensor) have static shapes.
    ``P`` is the number of KV pool slots (any: the runtime's pool)."""
    nl, hkv, hd = config.n_layers, config.n_kv_heads, config.head_dim
    weights = weights or {}
    seq = "L" if phase == "refresh" else "S"
    d = config.d_model
    table = {
        "input_ids": (("B", "L"), torch.long), "position_ids": (("B", "L"), torch.long),
        "q_ids": (("B", "T"), torch.long), "q_pos": (("B", "T"), torch.long),
        "key_mask": (("B", seq), torch.bool), "q_start": (("B",), torch.long),
        "k_pool": ((nl, "P", hkv, "S", hd), dtype), "v_pool": ((nl, "P", hkv, "S", hd), dtype),
        "rows": (("B",), torch.long),
        "keep_idx": ((nl, "B", hkv, "K"), torch.long),
        "out_index": (("B", "N"), torch.long), "cond_rows": (("C",), torch.long),
        "un_rows": (("C",), torch.long), "cfg_weight": ((1,), dtype), "temperature": ((1,), decode_dtype),
        "seeds": (("C",), torch.long), "credit_ids": (("C", "N", "M"), torch.long),
        "credit_vals": (("C", "N", "M"), decode_dtype), "credit_alpha": (("C",), decode_dtype),
        "block_size": ((1,), torch.long),                  # block diffusion (passes/mask_blocks.py)
        "embed_delta": (("B", "N", d), dtype),
    }
    table.update({n: (tuple(t.shape), t.dtype) for n, t in weights.items()})
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"phase {phase}: no signature for input(s) {unknown}")
    return {n: table[n] for n in names}


def output_specs(phase: str, config, dtype: torch.dtype, sparse: bool, logprobs: int,
                 decode_dtype: torch.dtype = torch.float64, kv_inplace: bool = True,
                 extras: bool = False, rows: bool | None = None) -> dict:
    """Output specs; ``extras``: chunk_logits' chunked extras; ``rows``: its ``hidden_rows`` (default: with
    the extras; GPU-lowered --decode-extras builds have the rows only)."""
    nl, hkv, hd = config.n_layers, config.n_kv_heads, config.head_dim
    seq = "L" if phase == "refresh" else "T"
    out = {"tokens": (("C", "N"), torch.long), "confidence": (("C", "N"), decode_dtype)}
    if logprobs:
        out["topk_ids"] = (("C", "N", logprobs), torch.long)
        out["topk_logprobs"] = (("C", "N", logprobs), decode_dtype)
    if extras:                                            # chunk_logits.EXTRA_OUTPUTS
        out.update(entropy=(("C", "N"), decode_dtype), logprob=(("C", "N"), decode_dtype),
                   top1_ids=(("C", "N"), torch.long), top1_prob=(("C", "N"), decode_dtype))
    if extras if rows is None else rows:
        out["hidden_rows"] = (("B", "N", config.d_model), dtype)
    if not kv_inplace:                                   # functional programs return the new K/V
        out["k" if phase == "refresh" else "k_new"] = ((nl, "B", hkv, seq, hd), dtype)
        out["v" if phase == "refresh" else "v_new"] = ((nl, "B", hkv, seq, hd), dtype)
    if sparse and phase == "refresh":
        out["head_scores"] = ((nl, "B", hkv, "L"), torch.float32)
    return out


def example_inputs(phase: str, specs: dict, device="cpu", weights: dict | None = None) -> list[torch.Tensor]:
    """Valid example inputs at the EXAMPLE sizes (distinct per dim); lifted weights are the real tensors."""
    weights = weights or {}
    e = EXAMPLE
    B, C, N, T, S, K = e["B"], e["C"], e["N"], e["T"], e["S"], e["K"]
    q_start = torch.tensor([2, 3, 4, 5][:B])
    vals = {
        "input_ids": torch.randint(0, 200, (B, e["L"])),
        "position_ids": torch.arange(e["L"])[None].repeat(B, 1), "q_ids": torch.randint(0, 200, (B, T)),
        "q_pos": q_start[:, None] + torch.arange(T), "q_start": q_start,
        "rows": torch.tensor([5, 1, 3, 0][:B]),
        "keep_idx": torch.sort(torch.randperm(S)[:K])[0].repeat(1, 1, 1, 1),
        "out_index": (q_start[:, None] if phase == "reuse" else torch.full((B, 1), 4)) + torch.arange(N),
        "cond_rows": torch.arange(C), "un_rows": torch.arange(C) + C,
        "temperature": torch.zeros(1, dtype=torch.float64), "seeds": torch.arange(C),
        "credit_ids": torch.arange(C * N * e["M"]).reshape(C, N, e["M"]) % 7,
        "credit_vals": torch.rand(C, N, e["M"], dtype=torch.float64), "credit_alpha": torch.zeros(C) + 0.5,
        "block_size": torch.tensor([4]),
    }
    if "embed_delta" in specs:
        vals["embed_delta"] = 0.01 * torch.randn(B, N, specs["embed_delta"][0][2])
    out = []
    for name, (shape, dt) in specs.items():
        if name in weights:
            out.append(weights[name])
            continue
        if name == "key_mask":
            out.append(torch.ones(B, e["L"] if phase == "refresh" else S, dtype=torch.bool))
        elif name in ("k_pool", "v_pool"):
            out.append(torch.randn(_concrete(shape)).to(dt))
        elif name == "cfg_weight":
            out.append(torch.ones(1, dtype=dt))
        elif name == "keep_idx":
            out.append(vals[name].expand(_concrete(shape)).contiguous())
        elif name in ("temperature", "credit_vals", "credit_alpha", "embed_delta"):
            out.append(vals[name].to(dt))
        else:
            out.append(vals[name])
    return [t.to(device) for t in out]


def _concrete(shape) -> tuple:
    return tuple(EXAMPLE[d] if isinstance(d, str) else d for d in shape)


def dynamic_shapes(specs: dict, limits: dict[str, int] | None = None) -> tuple:
    """torch.export dynamic_shapes for the inputs: one Dim per symbolic name (max from the build limits)."""
    limits = limits or {}
    dims = {}
    for shape, _ in specs.values():
        for d in shape:
            if isinstance(d, str) and d not in dims:
                dims[d] = torch.export.Dim(d, min=1, max=max(limits.get(d, 1 << 20), EXAMPLE[d] + 1))
    return tuple({i: dims[d] for i, d in enumerate(shape) if isinstance(d, str)} or None
                 for shape, _ in specs.values())


def export_phase(gm: fx.GraphModule, phase: str, config, dtype, limits=None, device="cpu",
                 decode_dtype: torch.dtype = torch.float64, weights: dict | None = None):
    """Re-export a rewritten phase program with named dynamic dims -> ExportedProgram. ``weights``: the lifted
    weight inputs (name -> tensor; ``ctx.shared["weights"]``), fed as the real tensors."""
    specs = input_specs(phase, input_names(gm), config, dtype, decode_dtype, weights)
    args = tuple(example_inputs(phase, specs, device, weights))
    return torch.export.export(gm, args, dynamic_shapes=dynamic_shapes(specs, limits), strict=False,
                               prefer_deferred_runtime_asserts_over_guards=True)
