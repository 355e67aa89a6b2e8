"""LLaDA-MoE-7B-A1B (inclusionAI/LLaDA-MoE-7B-A1B-Instruct, -Base): OLMoE-style sparse MoE, bidirectional.

16 layers of d_model 2048, 16 heads (MHA, head_dim 128) with per-head QK RMSNorm (``q_norm``/``k_norm``
weights of size head_dim, applied before RoPE), RoPE theta 50000, and in every layer a router over 64 SwiGLU
experts (expert_intermediate_size 1024) of which the top 8 run per token. Routing follows the released
modeling code: softmax over all experts in fp32, top-k, *no* renormalisation of the k weights (its MoE block
hard-codes ``norm_topk_prob = False`` whatever config.json says), weights cast to the activation dtype,
weighted sum.

The released config.json says ``model_type: "llada"`` (the same string as LLaDA-8B; architectures
``["LLaDAMoEModelLM"]``), so ``dlc.models`` tells the two apart by ``detect`` (MoE keys present). Forks that
renamed it (``lladamoe``, ``llada_moe``) load too. Parameter names: ``model.embed_tokens.weight``,
``model.layers.N.self_attn.{q,k,v,o}_proj.weight``, ``model.layers.N.self_attn.{q,k}_norm.weight``,
``model.layers.N.mlp.gate.weight`` (router, [E, d]),
``model.layers.N.mlp.experts.J.{gate,up,down}_proj.weight``,
``model.layers.N.{input,post_attention}_layernorm.weight``, ``model.norm.weight``, ``lm_head.weight``.

The MoE forward has four implementations (``MOE_IMPLS``), all exact against the released per-token routing,
and ``auto`` (the default) picks one: ``fused`` on CUDA, eager or inside torch.compile, where
``torch._grouped_mm`` has its device kernel (bf16 on sm90 / sm100), ``stacked`` elsewhere (CPU, other GPUs
or dtypes, and programs traced without an explicit choice). Engines choose per target: ``dlc compile``
traces ``fused`` for bf16 export / AOTI builds for sm90 / sm100 (``dlc.compiler.build.traced_moe_impl``).

* ``fused``: each expert on its routed tokens only, as two grouped GEMMs over all experts
  (``torch._grouped_mm``): rows grouped by expert on the device (a counting sort), per-expert offsets without
  a host sync, so CUDA graphs capture it; the routed FLOPs only, two grouped GEMMs per layer whatever E. Falls
  back to ``grouped`` where ``torch._grouped_mm`` would sync or refuse (``grouped_mm_fits``), to ``stacked``
  there while a CUDA graph is captured or the program traced.
* ``stacked``: the E experts as one wide SwiGLU of hidden E * expert_hidden, its hidden scaled per expert by
  a dense [N, E] routing matrix that is zero off the top-k: two GEMMs, static shapes, no data-dependent
  ops, so torch.export / ONNX trace it as is. It does E / k times the routed FLOPs (Refresh) but reads each
  weight once (Reuse is bandwidth-bound: every expert is touched anyway).
* ``dense``: a Python loop running each expert on every token (static; 3 * E small GEMMs per layer).
* ``grouped``: each expert runs on its routed tokens only (data-dependent gathers: eager only, a Python loop
  of 2 GEMMs per routed expert: launch-bound on GPUs).

``stacked`` and ``fused`` share one copy of the expert weights: in eager mode the experts' parameters are
re-pointed once into two packed tensors (``pack_experts``: gate+up [E, 2H, d], down [E, H, d]; same values,
same names in the state dict, no extra memory); torch.compile reads those packs as module state (the graph
runner packs before compiling, ``pack_model_experts``); an engine's trace (``program_trace``) holds the
stacking instead, and its ``fold_weight_stacks`` pass computes it once at build."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import HFAttention, HFLayoutLM, PreNormLayer, RMSNorm, SwiGLU
from .config import ModelConfig, hf_eos_id, refuse_unsupported, require_keys

HF_MODEL_TYPE = "llada"                       # what the released config.json says
MODEL_TYPES = ("llada", "lladamoe", "llada_moe")
MASK_ID, EOS_ID = 156895, 156892              # <|mask|>, <|endoftext|>
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
            "num_experts_per_tok", "expert_intermediate_size", "rope_theta")
MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def detect(d: dict) -> bool:
    """True when a config.json (possibly ``model_type: "llada"``) describes LLaDA-MoE rather than LLaDA-8B."""
    arch = " ".join(d.get("architectures") or [])
    return "num_experts" in d or "MoE" in arch or "Moe" in arch


def _check_supported(d: dict) -> None:
    """Options of the remote config class that the released checkpoints leave off; refuse rather than
    ignore."""
    unsupported = {
        "shared_expert_intermediate_size": d.get("shared_expert_intermediate_size") not in (None, 0),
        "moe_router_enable_expert_bias": bool(d.get("moe_router_enable_expert_bias")),
        "attention_bias": bool(d.get("attention_bias")),
        "clip_qkv": d.get("clip_qkv") is not None,
        "rope_scaling": bool(d.get("rope_scaling")),
        "partial_rotary_factor": d.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0, -1),
        "moe_router_score_function": d.get("moe_router_score_function") not in (None, "softmax"),
        "moe_layer_freq": any(f != 1 for f in (d.get("moe_layer_freq") or [])),
        "hidden_act": d.get("hidden_act", "silu") != "silu",
    }
    refuse_unsupported("LLaDA-MoE", d, unsupported)


def from_hf(d: dict) -> ModelConfig:
    require_keys("LLaDA-MoE", d, REQUIRED)
    _check_supported(d)
    eos = hf_eos_id(d, EOS_ID)
    pad = d.get("pad_token_id")
    return ModelConfig(
        family="llada_moe",
        d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        mlp_hidden=d.get("dense_intermediate_size") or d["expert_intermediate_size"],
        vocab_size=d["vocab_size"], embedding_size=d["vocab_size"],
        rope_theta=float(d["rope_theta"]), rms_eps=float(d.get("rms_norm_eps", 1e-5)),
        qk_norm=bool(d.get("qk_layernorm", True)), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        n_experts=d["num_experts"], n_experts_per_tok=d["num_experts_per_tok"],
        expert_hidden=d["expert_intermediate_size"], norm_topk_prob=False,
        max_seq_len=d.get("max_position_embeddings", 4096),
        mask_id=d.get("mask_token_id", MASK_ID), eos_id=eos, pad_id=eos if pad is None else pad,
        stop_ids=list(d.get("dlc_stop_ids") or [eos]),
        extra={"norm_topk_prob": d.get("norm_topk_prob")} if d.get("norm_topk_prob") else {},
    )


def to_hf(c: ModelConfig) -> dict:
    return {
        "model_type": HF_MODEL_TYPE, "architectures": ["LLaDAMoEModelLM"],
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "vocab_size": c.vocab_size, "hidden_act": "silu",
        "dense_intermediate_size": c.mlp_hidden, "expert_intermediate_size": c.expert_hidden,
        "shared_expert_intermediate_size": None, "num_experts": c.n_experts,
        "num_experts_per_tok": c.n_experts_per_tok, "moe_layer_freq": [1] * c.n_layers,
        "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
        "norm_topk_prob": c.norm_topk_prob, "qk_layernorm": c.qk_norm, "attention_bias": False,
        "clip_qkv": None, "rope_theta": c.rope_theta, "rope_scaling": None, "partial_rotary_factor": 1.0,
        "rms_norm_eps": c.rms_eps, "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": c.max_seq_len, "router_aux_loss_coef": 0.01, "output_router_logits": False,
        "use_cache": False, "mask_token_id": c.mask_id, "eos_token_id": c.eos_id, "pad_token_id": c.pad_id,
        "dlc_stop_ids": c.stop_ids, "torch_dtype": "bfloat16",
    }


class HeadRMSNorm(RMSNorm):
    """RMSNorm over each head's head_dim slice of a [B, T, H * head_dim] projection (weight: [head_dim])."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hd = self.weight.shape[0]
        return super().forward(x.unflatten(-1, (-1, hd))).flatten(-2)    # [B, T, H, D] -> [B, T, H * D]


def route(router_logits: torch.Tensor, k: int, norm_topk: bool):
    """[N, E] router logits -> (weights [N, k] fp32, expert ids [N, k]): softmax in fp32, then top-k."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k, dim=-1)
    if norm_topk:
        w = w / w.sum(-1, keepdim=True)
    return w, idx


def moe_dense(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Every expert on every token, weighted by the dense routing matrix (0 off the top-k). Static shapes."""
    dense = torch.zeros(x.shape[0], len(experts), dtype=w.dtype, device=x.device).scatter(1, idx, w)
    dense = dense.to(x.dtype)                                            # [N, E]
    out = torch.zeros_like(x)                                            # [N, d]
    for e, expert in enumerate(experts):
        out = out + dense[:, e:e + 1] * expert(x)
    return out


def moe_grouped(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Each expert runs on its routed tokens only (eager: the gathers have data-dependent shapes)."""
    w = w.to(x.dtype)
    out = torch.zeros_like(x)                                            # [N, d]
    for e, expert in enumerate(experts):
        tok, slot = torch.where(idx == e)                                # [n_e], [n_e]
        out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
    return out


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


_PROGRAM_TRACE = [False]       # set while dlc.compiler.export traces an engine's programs (program_trace)


@contextlib.contextmanager
def program_trace():
    """While dlc.compiler traces an engine's programs: the experts' weights enter the graph as a stack of the
    parameters (``fold_weight_stacks`` computes it once at build), never as a pack made before. A flag of
    our own: inside torch.compile, torch 2.11's ``torch.compiler.is_exporting()`` is True as well (seen on
    the H200 image), so torch's predicates cannot tell an export from a compiled block."""
    old, _PROGRAM_TRACE[0] = _PROGRAM_TRACE[0], True
    try:
        yield
    finally:
        _PROGRAM_TRACE[0] = old


def _exporting() -> bool:
    """A program that must hold every op (an engine's trace, ONNX, jit tracing): ``_tracing`` less Dynamo's
    torch.compile of the blocks, which keeps module state (the packed experts) as inputs."""
    return _PROGRAM_TRACE[0] or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _weights_id(experts: nn.ModuleList):
    """Storage identity of the first and last experts' weights: changes when loading or ``.to()`` replaces
    them."""
    return tuple((w.data_ptr(), w.dtype, w.device) for e in (experts[0], experts[-1])
                 for w in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight))


class Experts(nn.ModuleList):
    """A MoE block's experts (``experts.J.{gate,up,down}_proj``: the checkpoint's names, as a ModuleList's)
    and the one home of their packed weights: ``packed`` (declared here, set by ``pack_experts``) is
    (``_weights_id`` when packed, (w_gu [E, 2H, d], w_down [E, H, d])), the tensors the experts' parameters
    view. A cache of the list it describes, not an attribute stuck onto torch's ``nn.ModuleList``."""
    packed: tuple | None = None


def _stack_experts(experts: nn.ModuleList):
    """(w_gu [E, 2H, d], w_down [E, H, d]) built from the experts' weights (a copy; four ops, so a traced
    graph stays small): expert e's gate rows, then its up rows; its down weight read transposed ([in, out],
    a strided view)."""
    gate = torch.stack([e.gate_proj.weight for e in experts])                  # [E, H, d]
    up = torch.stack([e.up_proj.weight for e in experts])                      # [E, H, d]
    down = torch.stack([e.down_proj.weight for e in experts])                  # [E, d, H]
    return torch.cat([gate, up], dim=1), down.transpose(1, 2)                  # [E, 2H, d], [E, H, d]


def pack_experts(experts: Experts) -> None:
    """Re-point every expert's gate/up/down weight at a slice of two packed tensors, so ``moe_stacked`` and
    ``moe_fused`` run without copying: ``w_gu`` [E, 2H, d] (expert e's ``gate_proj.weight`` is
    ``w_gu[e, :H]``, its ``up_proj.weight`` ``w_gu[e, H:]``, both [out, in] as in the checkpoint) and
    ``w_down`` [E, H, d] (its ``down_proj.weight`` is the transposed view ``w_down[e].t()``, [d, H]).
    Values and parameter names are unchanged; one copy of the weights stays in memory."""
    w_gu, w_down = _stack_experts(experts)
    w_down = w_down.contiguous()                                               # [E, H, d] row-major
    H = w_down.shape[1]
    for i, e in enumerate(experts):
        rg = e.gate_proj.weight.requires_grad
        e.gate_proj.weight = nn.Parameter(w_gu[i, :H], requires_grad=rg)
        e.up_proj.weight = nn.Parameter(w_gu[i, H:], requires_grad=rg)
        e.down_proj.weight = nn.Parameter(w_down[i].t(), requires_grad=rg)
    experts.packed = (_weights_id(experts), (w_gu, w_down))


def pack_model_experts(model: nn.Module) -> None:
    """Pack every MoE block's experts now (``pack_experts``; skipped where the pack is current), the
    expert-parallel shards' local experts too (a compute view held outside the module tree). The graph
    runner calls it before compiling the blocks: compiled code reads the packs as they are."""
    for m in model.modules():
        for e in (m, m.__dict__.get("_local")):
            if isinstance(e, Experts) and e[0].gate_proj.weight.device.type != "meta":
                _packed(e)


def _packed(experts: Experts):
    """(w_gu [E, 2H, d], w_down [E, H, d]): the packed tensors while the experts still point into them,
    packing first in eager mode. Inside torch.compile (Dynamo) the existing pack as it is (module state: the
    compiled code takes the tensors as inputs, no copy; ``pack_model_experts`` packs before compiling: a
    check of the weights' storage cannot be compiled). While exporting (the engines' programs, whose
    ``fold_weight_stacks`` pass computes the stack once at build), without a pack, or on the meta device: a
    plain stack of the parameters."""
    if torch.compiler.is_compiling() and not _exporting() and experts.packed is not None:
        return experts.packed[1]
    if _tracing() or experts[0].gate_proj.weight.device.type == "meta":
        return _stack_experts(experts)
    if experts.packed is None or experts.packed[0] != _weights_id(experts):
        with torch.no_grad():
            pack_experts(experts)
    return experts.packed[1]


def moe_stacked(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """All experts as one wide SwiGLU whose hidden is scaled per expert by the routing weight (0 off the
    top-k)."""
    w_gu, w_down = _packed(experts)
    N, (E, H, d) = x.shape[0], w_down.shape
    dense = torch.zeros(N, E, dtype=w.dtype, device=x.device).scatter(1, idx, w).to(x.dtype)   # [N, E]
    gu = F.linear(x, w_gu.reshape(E * 2 * H, d)).view(N, E, 2 * H)                             # [N, E, 2H]
    h = F.silu(gu[..., :H]) * gu[..., H:] * dense[:, :, None]                                   # [N, E, H]
    return h.reshape(N, E * H) @ w_down.reshape(E * H, d)                                       # [N, d]


# compute capability majors whose torch._grouped_mm is CUTLASS's device kernel in bf16 (sm90, sm100)
GROUPED_MM_MAJORS = (9, 10)


def grouped_mm_fits(x: torch.Tensor, w_down: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs this MoE on x's device without a host sync. Its rules (ATen
    ``GroupedMMUtils.h`` / ``cuda/GroupedBlas.cpp``): fp32 / bf16 / fp16; row strides multiples of 16 bytes
    (d and H here); on CUDA only bf16 on sm90 / sm100 takes the CUTLASS kernel (offsets read on the device,
    fewer than 1024 groups): every other CUDA case is ATen's fallback, which copies the offsets to the host.
    Traced (torch.export / torch.compile), its meta kernel takes bf16 only."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    E, H, d = w_down.shape
    align = 16 // x.element_size()
    if d % align or H % align:
        return False
    if _tracing() and x.dtype != torch.bfloat16:
        return False                              # its fake-tensor (meta) kernel takes bf16 only
    if x.device.type == "cuda":
        return E < 1024 and grouped_mm_device(x.device, x.dtype)
    # a meta twin traced for a GPU target (dlc.compiler.export.trace_forward): the build checked the target
    return x.device.type == "cpu" or (x.device.type == "meta" and _tracing() and E < 1024)


def grouped_mm_device(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` on this CUDA device in ``dtype`` is the device kernel (bf16 on sm90 /
    sm100): where ``auto`` runs ``fused`` (properties, not capability: Dynamo constant-folds them)."""
    return dtype == torch.bfloat16 and torch.cuda.get_device_properties(device).major in GROUPED_MM_MAJORS


def grouped_mm_target(arch: str, dtype: torch.dtype) -> bool:
    """Whether a program built for CUDA ``arch`` ("sm_90") in ``dtype`` may trace ``moe_fused``: the GPUs
    whose ``torch._grouped_mm`` reads the expert offsets on the device (``grouped_mm_fits``)."""
    return dtype == torch.bfloat16 and arch.startswith("sm_") and arch[3:-1].isdigit() \
        and int(arch[3:-1]) in GROUPED_MM_MAJORS


def expert_offsets(idx: torch.Tensor, n_experts: int):
    """Rows (token, slot) grouped by expert, on the device (no host sync): (order [N * k]: the flat (token,
    slot) of each grouped row, stable, so rows of one expert keep token order; dest [N * k]: where each flat
    row went, ``order``'s inverse; offs [E] int32: cumulative row ends per expert, as ``torch._grouped_mm``
    takes them; an expert without rows repeats its predecessor's end).

    A counting sort (a count, a scan over tokens and a gather, which Inductor fuses; a scatter inverts it),
    not ``sort``: a Reuse step routes a few hundred to a few thousand rows, where ``sort`` launched a
    segmented radix sort per layer (16% of LLaDA-MoE's kernel time at B=1, bench/RESULTS.md). Its [N, E]
    count is 4 bytes a (token, expert) (uncompiled, the [N, k, E] comparison before it k bytes more; compiled,
    fused away), small beside a forward's activations at any N, and it has no branch on N, so a program
    traced with a symbolic token count keeps one path. Not ``torch.bincount``: on CUDA it
    reads the ids' min and max back to the host."""
    M = idx.numel()
    experts = torch.arange(n_experts, device=idx.device, dtype=idx.dtype)           # [E]
    rows = torch.arange(M, device=idx.device, dtype=idx.dtype)                       # [M]
    hot = (idx[:, :, None] == experts).sum(1, dtype=torch.int32)                     # [N, E] t's rows of e
    counts = hot.sum(0, dtype=torch.int32)                                           # [E]
    ends = counts.cumsum(0, dtype=torch.int32)                                       # [E]
    before = hot.cumsum(0, dtype=torch.int32) - hot                                  # [N, E] earlier tokens'
    same = (idx[:, :, None] == idx[:, None, :]).tril(-1).sum(-1, dtype=torch.int32)  # [N, k] earlier slots'
    dest = ((ends - counts)[idx] + before.gather(1, idx) + same).reshape(-1).long()  # [M]
    return torch.empty_like(rows).scatter_(0, dest, rows), dest, ends


def moe_fused(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """Each expert on its routed tokens only, as two grouped GEMMs over all experts (static shapes, no host
    sync, so CUDA graphs capture it): rows grouped by expert (``expert_offsets``), gathered once [N * k, d];
    gate+up in one ``torch._grouped_mm`` over ``w_gu`` [E, 2H, d] (read transposed, no copy); SiLU(gate) * up;
    down in a second over ``w_down`` [E, H, d]; rows put back in (token, slot) order (one gather through the
    grouping's inverse, no second sort) and summed with the routing weights in fp32 over k (a fixed order:
    deterministic, no atomics; compiled, the gather, the weights and the sum are one kernel: the batched [1,
    k] x [k, d] product it replaces ran at ~0.5 TB/s, 11% of LLaDA-MoE's B=32 kernels). Where
    ``grouped_mm_fits`` says no (fp32 / fp16 on CUDA, GPUs before sm90, misaligned dims) it runs
    ``moe_grouped`` instead (a Python loop over experts with data-dependent gathers, so a host sync each), or
    ``moe_stacked`` while a CUDA graph is being captured or the program traced (static shapes). In bf16 it
    traces as is (torch.export: a count, a scan, _grouped_mm; no data-dependent shapes)."""
    w_gu, w_down = _packed(experts)
    if not grouped_mm_fits(x, w_down):
        if _tracing() or (x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return moe_stacked(x, w, idx, experts)
        return moe_grouped(x, w, idx, experts)
    (N, k), (E, H, d) = idx.shape, w_down.shape
    order, dest, offs = expert_offsets(idx, E)                                 # [N * k], [N * k], [E]
    xs = x[order // k]                                                               # [N * k, d]
    gu = torch._grouped_mm(xs, w_gu.transpose(-2, -1), offs=offs)                    # [N * k, 2H]
    h = F.silu(gu[:, :H]) * gu[:, H:]                                                # [N * k, H]
    ys = torch._grouped_mm(h, w_down, offs=offs)                                     # [N * k, d]
    y = ys[dest].view(N, k, d)                                                       # [N, k, d] (token, slot)
    return (y * w[:, :, None]).sum(1).to(x.dtype)                                    # [N, d], fp32 sum


def moe_auto(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, experts: nn.ModuleList) -> torch.Tensor:
    """The default: ``fused`` on CUDA, eager or compiled (and so inside the graph runner's CUDA graphs),
    where ``torch._grouped_mm`` has its device kernel (bf16 on sm90 / sm100); ``stacked`` elsewhere: on the
    CPU, on other GPUs and dtypes (where fused would fall back to a loop over experts), and in programs
    traced for export (ONNX, jit; ``dlc compile`` sets ``fused`` itself where its target runs it)."""
    if x.device.type == "cuda" and not _exporting() and grouped_mm_fits(x, _packed(experts)[1]):
        return moe_fused(x, w, idx, experts)
    return moe_stacked(x, w, idx, experts)


MOE_IMPLS = {"auto": moe_auto, "fused": moe_fused, "stacked": moe_stacked, "dense": moe_dense,
             "grouped": moe_grouped}


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's MoE blocks (every family's, and expert-parallel shards): modules with experts and an
    ``impl`` (a key of MOE_IMPLS)."""
    return [m for m in model.modules() if hasattr(m, "experts") and isinstance(getattr(m, "impl", None), str)]


def set_moe_impl(model: nn.Module, impl: str) -> None:
    """Every MoE block of ``model`` runs ``impl`` (``DiffusionLM.set_moe_impl`` calls this)."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {sorted(MOE_IMPLS)}")
    for block in moe_blocks(model):
        block.impl = impl


@contextlib.contextmanager
def moe_impl_set(model: nn.Module, impl: str | None):
    """``impl`` on every MoE block for the duration (None: unchanged); each block's own afterwards."""
    blocks = moe_blocks(model) if impl is not None else []
    before = [b.impl for b in blocks]
    if impl is not None:
        set_moe_impl(model, impl)
    try:
        yield
    finally:
        for b, old in zip(blocks, before):
            b.impl = old


class SparseMoeBlock(nn.Module):
    impl = "auto"       # key of MOE_IMPLS; set per instance or on the class

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk = c.n_experts_per_tok, c.norm_topk_prob
        self.gate = nn.Linear(c.d_model, c.n_experts, bias=False)
        self.experts = Experts(SwiGLU(c.d_model, c.expert_hidden, MLP_NAMES) for _ in range(c.n_experts))

    def route_tokens(self, flat: torch.Tensor):
        """[N, d] -> (weights [N, k] fp32, expert ids [N, k]); also what expert-parallel shards call."""
        return route(self.gate(flat), self.top_k, self.norm_topk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(B * T, d)                                       # [N, d]
        w, idx = self.route_tokens(flat)                                 # [N, k], [N, k]
        return MOE_IMPLS[self.impl](flat, w, idx, self.experts).view(B, T, d)


def make_layer(c: ModelConfig) -> PreNormLayer:
    return PreNormLayer(c, HFAttention(c, HeadRMSNorm), SparseMoeBlock(c))


class LLaDAMoEModel(HFLayoutLM):
    def __init__(self, config: ModelConfig):
        if not config.is_moe:
            raise ValueError("LLaDA-MoE model config: n_experts must be > 0")
        super().__init__(config, make_layer)
