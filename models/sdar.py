"""SDAR (JetLM/SDAR-1.7B-Chat, -4B-Chat, -8B-Chat, SDAR-30B-A3B-Chat / -Sci): Qwen3 run as a block-diffusion
LM.

Checked against the public remote code (github JetAstra/SDAR,
``training/model/SDAR-4B-Chat/modeling_sdar.py``, generated from transformers' Qwen3 modular file): the Qwen3
layout unchanged, ``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj`` (bias on all four when
``attention_bias``; the releases say false), ``self_attn.{q,k}_norm.weight`` [head_dim] (RMSNorm over each
head *before* RoPE), ``head_dim`` from the config (4B: 32 heads x 128 = 4096 != hidden 2560), full RoPE,
``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head`` (or the embedding when ``tie_word_embeddings``). The
MoE variant (30B-A3B) differs only in the MLP: the Qwen3-MoE block, router ``mlp.gate.weight`` [E, d], softmax
in fp32, top-k, renormalised when ``norm_topk_prob``, experts ``mlp.experts.J.{gate,up,down}_proj`` of
``moe_intermediate_size`` (dlc.models.llada_moe.SparseMoeBlock).

Attention is block-causal (the reference passes a keep-mask ``tril(n_blocks) x block``); blocks of 4 in the
releases. Special ids: ``<|MASK|>`` 151669, ``<|endoftext|>`` 151643, ``<|im_end|>`` 151645."""
from __future__ import annotations

from .common import HFAttention, HFLayoutLM, PreNormLayer, SwiGLU
from .config import ModelConfig, hf_eos_id, refuse_unsupported, require_keys
from .llada_moe import HeadRMSNorm, SparseMoeBlock

MODEL_TYPES = ("sdar", "sdar_moe")
MASK_ID, EOS_ID, IM_END_ID = 151669, 151643, 151645
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "rope_theta")
MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
# The reference's defaults (JetAstra/SDAR generate.py and model cards): block 4, 4 steps, dynamic
# threshold 0.9.
GENERATION_DEFAULTS = {"block_length": 4, "steps_per_block": 4, "threshold": 0.9, "decoder": "llada2"}


def _is_moe(d: dict) -> bool:
    return d.get("model_type") == "sdar_moe" or bool(d.get("num_experts"))


def _check_supported(d: dict) -> None:
    unsupported = {
        "rope_scaling": bool(d.get("rope_scaling")),
        "attention_bias": bool(d.get("attention_bias")),
        "hidden_act": d.get("hidden_act", "silu") != "silu",
        "use_sliding_window": bool(d.get("use_sliding_window")),
        "mlp_only_layers": bool(d.get("mlp_only_layers")),
        "decoder_sparse_step": _is_moe(d) and d.get("decoder_sparse_step", 1) != 1,
    }
    refuse_unsupported("SDAR", d, unsupported)


def from_hf(d: dict) -> ModelConfig:
    req = REQUIRED + (("num_experts", "num_experts_per_tok", "moe_intermediate_size") if _is_moe(d)
                      else ("intermediate_size",))
    require_keys("SDAR", d, req)
    _check_supported(d)
    eos = hf_eos_id(d, EOS_ID)
    pad = d.get("pad_token_id")
    H = d["num_attention_heads"]
    hd = d.get("head_dim") or d["hidden_size"] // H
    moe = _is_moe(d)
    stops = d.get("dlc_stop_ids") or [eos, IM_END_ID]
    return ModelConfig(
        family="sdar", d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=H,
        n_kv_heads=d.get("num_key_value_heads") or H,
        mlp_hidden=d.get("intermediate_size") or d.get("moe_intermediate_size"),
        vocab_size=d["vocab_size"], embedding_size=d["vocab_size"], rope_theta=float(d["rope_theta"]),
        rms_eps=float(d.get("rms_norm_eps", 1e-6)), qk_norm=True,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        n_experts=d["num_experts"] if moe else 0, n_experts_per_tok=d["num_experts_per_tok"] if moe else 0,
        expert_hidden=d["moe_intermediate_size"] if moe else 0,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)) if moe else False,
        max_seq_len=d.get("max_position_embeddings", 32768),
        mask_id=d.get("mask_token_id", MASK_ID), eos_id=eos, pad_id=eos if pad is None else pad,
        stop_ids=[s for s in stops if s < d["vocab_size"]] or [eos],
        attn_head_dim=hd if hd * H != d["hidden_size"] else 0, block_diffusion=True,
    )


def to_hf(c: ModelConfig) -> dict:
    d = {
        "model_type": "sdar_moe" if c.is_moe else "sdar",
        "architectures": ["SDARMoeForCausalLM" if c.is_moe else "SDARForCausalLM"],
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
        "hidden_act": "silu", "attention_bias": False, "rope_theta": c.rope_theta, "rope_scaling": None,
        "rms_norm_eps": c.rms_eps, "tie_word_embeddings": c.tie_embeddings, "use_sliding_window": False,
        "max_position_embeddings": c.max_seq_len, "mask_token_id": c.mask_id, "eos_token_id": c.eos_id,
        "pad_token_id": c.pad_id, "dlc_stop_ids": c.stop_ids, "torch_dtype": "bfloat16",
    }
    if c.is_moe:
        d.update({"num_experts": c.n_experts, "num_experts_per_tok": c.n_experts_per_tok,
                  "moe_intermediate_size": c.expert_hidden, "norm_topk_prob": c.norm_topk_prob,
                  "decoder_sparse_step": 1, "mlp_only_layers": []})
    else:
        d["intermediate_size"] = c.mlp_hidden
    return d


def make_layer(c: ModelConfig) -> PreNormLayer:
    mlp = SparseMoeBlock(c) if c.is_moe else SwiGLU(c.d_model, c.mlp_hidden, MLP_NAMES)
    return PreNormLayer(c, HFAttention(c, HeadRMSNorm), mlp)


class SDARModel(HFLayoutLM):
    def __init__(self, config: ModelConfig):
        if not config.block_diffusion:
            raise ValueError("SDAR model config: block_diffusion must be set (its attention is block-causal)")
        super().__init__(config, make_layer)


