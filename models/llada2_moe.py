"""LLaDA2.0 / LLaDA2.1 (inclusionAI/LLaDA2.0-mini, -flash, LLaDA2.1-mini, -flash): block-diffusion MoE.

Checked against the public remote code ``modeling_llada2_moe.py`` (LLaDA2MoeModelLM; the copy read is the one
in the public Megatron-Bridge repository, 2026-11) and the released LLaDA2.0-mini ``config.json`` keys (the
Ling 2.0 layout, ``model_type: "llada2_moe"``):

* attention: one fused ``attention.query_key_value`` projection ([(H + 2 Hkv) * head_dim, d], bias when
  ``use_qkv_bias``), split per head into q | k | v; per-head RMSNorm ``query_layernorm`` / ``key_layernorm``
  (weight [head_dim], over the whole head) *before* RoPE; partial rotary: only the first ``head_dim *
  partial_rotary_factor`` dims rotate (rotate-half inside them, inv_freq over that width), the rest pass
  through; GQA; output ``attention.dense`` (bias when ``use_bias``). The HF code always builds the QK-norms
  (``use_qk_norm`` is not read), so dlc always has them too.
* MLP: layers ``< first_k_dense_replace`` are a dense SwiGLU of ``intermediate_size``; the others an MoE
  block: router ``mlp.gate.weight`` [E, d] in fp32, ``scores = sigmoid(logits)``; routing picks experts on
  ``scores + mlp.gate.expert_bias`` (a persistent buffer), group-limited: the E experts form ``n_group``
  groups, each group scored by the sum of its two best biased scores, the ``topk_group`` best groups kept,
  then the top-k experts among them; the weights are the *unbiased* scores of those experts, renormalised
  (sum + 1e-20, when k > 1) and times ``routed_scaling_factor``; experts ``mlp.experts.J.{gate,up,down}_proj``
  (separate tensors, as released) of ``moe_intermediate_size``; plus
  ``mlp.shared_experts.{gate,up,down}_proj`` of ``moe_intermediate_size * num_shared_experts`` on every token.
* names: ``model.word_embeddings.weight``, ``model.layers.N.{input,post_attention}_layernorm.weight``,
  ``model.norm.weight``, ``lm_head.weight`` (untied in the releases).

Attention is block-causal (``ModelConfig.block_diffusion``): the runtime passes a per-query key mask, built
from the request's block length (``dlc.runtime.step.block_key_mask``). LLaDA2.1 checkpoints share this
architecture (its token editing is a decoding rule: ``--decoder llada2.1``).

Special ids (tokenizer of the releases): ``<|endoftext|>`` 156892 (eos and pad), ``<|mask|>`` 156895,
``<|role_end|>`` 156900 (end of a chat turn)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import DiffusionLM, RMSNorm, SwiGLU, apply_rope, attend
from .config import ModelConfig, hf_eos_id, refuse_unsupported, require_keys
from .llada_moe import MOE_IMPLS, Experts

HF_MODEL_TYPE = "llada2_moe"
MODEL_TYPES = ("llada2_moe",)
MASK_ID, EOS_ID, ROLE_END_ID = 156895, 156892, 156900
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
            "rope_theta")
MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# LLaDA2's chat format (tokenizer_config.json of the releases; used when a checkpoint's tokenizer ships none):
# <role>SYSTEM</role>...<|role_end|><role>HUMAN</role>...<|role_end|><role>ASSISTANT</role>
CHAT_TEMPLATE = (
    "{% set names = {'system': 'SYSTEM', 'user': 'HUMAN', 'assistant': 'ASSISTANT'} %}"
    "{% for m in messages %}<role>{{ names[m['role']] }}</role>{{ m['content'] }}<|role_end|>{% endfor %}"
    "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)
# The reference generate's defaults (steps are per block; threshold 0.95).
GENERATION_DEFAULTS = {"block_length": 32, "steps_per_block": 32, "threshold": 0.95, "decoder": "llada2"}


def _check_supported(d: dict) -> None:
    unsupported = {
        "rope_scaling": bool(d.get("rope_scaling")),
        "hidden_act": d.get("hidden_act", "silu") != "silu",
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
        "score_function": d.get("score_function", "sigmoid") != "sigmoid",
        "moe_shared_expert_intermediate_size": d.get("moe_shared_expert_intermediate_size") not in (
            None, d.get("moe_intermediate_size")),
    }
    refuse_unsupported("LLaDA2", d, unsupported)


def from_hf(d: dict) -> ModelConfig:
    moe = d.get("num_experts") is not None
    require_keys("LLaDA2", d, REQUIRED + (("num_experts_per_tok", "moe_intermediate_size") if moe else ()))
    _check_supported(d)
    eos = hf_eos_id(d, EOS_ID)
    pad = d.get("pad_token_id")
    H = d["num_attention_heads"]
    hd = d.get("head_dim") or d["hidden_size"] // H
    rot = int(hd * float(d.get("partial_rotary_factor") or 1.0))
    stops = d.get("dlc_stop_ids") or [eos, ROLE_END_ID]
    return ModelConfig(
        family="llada2_moe",
        d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H, mlp_hidden=d["intermediate_size"],
        vocab_size=d["vocab_size"], embedding_size=d["vocab_size"],
        rope_theta=float(d["rope_theta"]), rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=bool(d.get("use_qkv_bias", False)), qk_norm=True,
        n_experts=d.get("num_experts") or 0, n_experts_per_tok=d.get("num_experts_per_tok") or 0,
        expert_hidden=d.get("moe_intermediate_size") or 0, norm_topk_prob=True,
        max_seq_len=d.get("max_position_embeddings", 32768),
        mask_id=d.get("mask_token_id", MASK_ID), eos_id=eos, pad_id=eos if pad is None else pad,
        stop_ids=[s for s in stops if s < d["vocab_size"]] or [eos],
        extra={"use_bias": bool(d.get("use_bias", False))},
        attn_head_dim=hd if hd * H != d["hidden_size"] else 0, rotary_dim=rot if rot != hd else 0,
        block_diffusion=True, n_shared_experts=(d.get("num_shared_experts") or 0) if moe else 0,
        first_dense_layers=d.get("first_k_dense_replace", 0) if moe else 0, router="sigmoid_group",
        n_expert_groups=d.get("n_group") or 1, topk_groups=d.get("topk_group") or 1,
        routed_scaling=float(d.get("routed_scaling_factor", 1.0)),
    )


def to_hf(c: ModelConfig) -> dict:
    hd = c.head_dim
    return {
        "model_type": HF_MODEL_TYPE, "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                     "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"},
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": hd, "vocab_size": c.vocab_size, "hidden_act": "silu",
        "intermediate_size": c.mlp_hidden, "moe_intermediate_size": c.expert_hidden or None,
        "num_experts": c.n_experts or None, "num_shared_experts": c.n_shared_experts or None,
        "num_experts_per_tok": c.n_experts_per_tok or None, "n_group": c.n_expert_groups,
        "topk_group": c.topk_groups, "routed_scaling_factor": c.routed_scaling,
        "first_k_dense_replace": c.first_dense_layers, "score_function": "sigmoid",
        "moe_router_enable_expert_bias": True, "norm_topk_prob": True, "use_qk_norm": True,
        "use_qkv_bias": c.qkv_bias, "use_bias": bool(c.extra.get("use_bias", False)),
        "partial_rotary_factor": c.rope_dim / hd, "rope_theta": c.rope_theta, "rope_scaling": None,
        "rms_norm_eps": c.rms_eps, "tie_word_embeddings": c.tie_embeddings,
        "max_position_embeddings": c.max_seq_len, "use_cache": False, "output_router_logits": False,
        "mask_token_id": c.mask_id, "eos_token_id": c.eos_id, "pad_token_id": c.pad_id,
        "dlc_stop_ids": c.stop_ids, "torch_dtype": "bfloat16",
    }


class FusedQKVAttention(nn.Module):
    """``attention.query_key_value`` -> per-head q | k | v, QK RMSNorm over head_dim, (partial) RoPE, GQA,
    ``attention.dense``. The cache contract is ``common.self_attention``'s (write the fed columns, attend over
    the row)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        hd = c.head_dim
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv_heads, hd
        self.query_key_value = nn.Linear(c.d_model, (c.n_heads + 2 * c.n_kv_heads) * hd, bias=c.qkv_bias)
        self.query_layernorm = RMSNorm(hd, c.rms_eps)
        self.key_layernorm = RMSNorm(hd, c.rms_eps)
        self.dense = nn.Linear(c.n_heads * hd, c.d_model, bias=bool(c.extra.get("use_bias", False)))

    def forward(self, x, cos, sin, mask, cache_kv=None, start=0):
        B, T, _ = x.shape
        qkv = self.query_key_value(x).view(B, T, self.n_heads + 2 * self.n_kv, self.hd)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=2)
        q = self.query_layernorm(q).transpose(1, 2)                       # [B, H, T, D]
        k = self.key_layernorm(k).transpose(1, 2)                         # [B, Hkv, T, D]
        v = v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask, cache_kv, start, self.n_heads, self.n_kv)   # [B, H, T, D]
        return self.dense(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)), (k, v)


def route_sigmoid_group(logits: torch.Tensor, bias: torch.Tensor, k: int, n_group: int, topk_group: int,
                        scaling: float):
    """LLaDA2's router. logits [N, E] fp32 -> (weights [N, k] fp32, expert ids [N, k])."""
    N, E = logits.shape
    scores = torch.sigmoid(logits)                                        # [N, E]
    biased = scores + bias
    group = biased.view(N, n_group, -1).topk(min(2, E // n_group), dim=-1).values.sum(-1)   # [N, G]
    keep = torch.zeros_like(group).scatter(1, group.topk(topk_group, dim=-1, sorted=False).indices, 1.0)
    keep = keep.bool()[:, :, None].expand(N, n_group, E // n_group).reshape(N, E)
    idx = biased.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices  # [N, k]
    w = scores.gather(1, idx)
    if k > 1:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling, idx


class Gate(nn.Module):
    """``mlp.gate``: router weight [E, d] and the expert bias buffer [E] (persistent: it is in the
    checkpoint)."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c.n_experts, c.d_model))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)                # as nn.Linear (and the HF gate)
        self.register_buffer("expert_bias", torch.zeros(c.n_experts))


class MoEBlock(nn.Module):
    impl = "auto"       # key of dlc.models.llada_moe.MOE_IMPLS (all exact against per-token routing)

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.gate = Gate(c)
        self.experts = Experts(SwiGLU(c.d_model, c.expert_hidden, MLP_NAMES) for _ in range(c.n_experts))
        if c.n_shared_experts:
            self.shared_experts = SwiGLU(c.d_model, c.expert_hidden * c.n_shared_experts, MLP_NAMES)

    def route_tokens(self, flat: torch.Tensor):
        """[N, d] -> (weights [N, k] fp32, expert ids [N, k]); also what expert-parallel shards call."""
        c = self.c
        logits = F.linear(flat.float(), self.gate.weight.float())         # [N, E] fp32, as the reference
        return route_sigmoid_group(logits, self.gate.expert_bias.float(), c.n_experts_per_tok,
                                   c.n_expert_groups, c.topk_groups, c.routed_scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        c = self.c
        flat = x.reshape(B * T, d)                                        # [N, d]
        w, idx = self.route_tokens(flat)                                  # [N, k], [N, k]
        y = MOE_IMPLS[self.impl](flat, w, idx, self.experts).view(B, T, d)
        if c.n_shared_experts:
            y = y + self.shared_experts(x)
        return y


class Layer(nn.Module):
    def __init__(self, c: ModelConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.rms_eps)
        self.attention = FusedQKVAttention(c)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.rms_eps)
        dense = not c.is_moe or i < c.first_dense_layers
        self.mlp = SwiGLU(c.d_model, c.mlp_hidden, MLP_NAMES) if dense else MoEBlock(c)

    def forward(self, x, cos, sin, mask, cache_kv=None, start=0):
        a, kv = self.attention(self.input_layernorm(x), cos, sin, mask, cache_kv, start)
        x = x + a                                                          # [B, T, d]
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class _Base(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.d_model, c.rms_eps)


class LLaDA2MoeModel(DiffusionLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.block_diffusion:
            raise ValueError("LLaDA2 model config: block_diffusion must be set (its attention is "
                             "block-causal)")
        self.config = config
        self.model = _Base(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    embed = property(lambda self: self.model.word_embeddings)
    blocks = property(lambda self: self.model.layers)
    norm = property(lambda self: self.model.norm)
    head = property(lambda self: self.lm_head)


