"""Dream-v0 7B (Dream-org/Dream-v0-Instruct-7B, Dream-org/Dream-v0-Base-7B): Qwen2.5-7B layout run
bidirectionally.

GQA (28 query heads over 4 KV heads), bias on q/k/v (not on o_proj), SwiGLU MLP, RMSNorm eps 1e-6, RoPE theta
1e6, untied head. Dream was adapted from an autoregressive model, so its output at position i predicts token
i + 1: ``logit_shift=1`` (the runners read hidden row i - 1 to decode position i).

Config keys and parameter names follow the released checkpoint (``model_type: "Dream"``, ``DreamModel``,
``model.layers.N.self_attn.q_proj.{weight,bias}``, ``model.layers.N.mlp.gate_proj.weight``,
``model.norm.weight``, ``lm_head.weight``), so it loads without ``trust_remote_code``."""
from __future__ import annotations


from .common import HFAttention, HFLayoutLM, PreNormLayer, SwiGLU
from .config import ModelConfig, hf_eos_id, require_keys

HF_MODEL_TYPE = "Dream"
MODEL_TYPES = ("Dream", "dream")
MASK_ID, EOS_ID, IM_END_ID = 151666, 151643, 151645     # <|mask|>, <|endoftext|>, <|im_end|>
REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
MLP_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def _check_supported(d: dict) -> None:
    if d.get("rope_scaling"):
        raise ValueError(f"Dream config.json: rope_scaling {d['rope_scaling']!r} is not supported "
                         "(only plain RoPE)")
    hd = d.get("head_dim")
    if hd is not None and hd != d["hidden_size"] // d["num_attention_heads"]:
        raise ValueError(f"Dream config.json: head_dim {hd} != hidden_size / num_attention_heads is "
                         "not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Dream config.json: hidden_act {d['hidden_act']!r} is not supported (only silu)")


def from_hf(d: dict) -> ModelConfig:
    require_keys("Dream", d, REQUIRED)
    _check_supported(d)
    eos = hf_eos_id(d, EOS_ID)
    pad = d.get("pad_token_id")
    vocab = d["vocab_size"]
    stops = d.get("dlc_stop_ids") or [eos] + ([IM_END_ID] if vocab > IM_END_ID and eos == EOS_ID else [])
    return ModelConfig(
        family="dream",
        d_model=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=d["num_attention_heads"],
        n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        mlp_hidden=d["intermediate_size"], vocab_size=vocab, embedding_size=vocab,
        rope_theta=float(d.get("rope_theta", 10000.0)), rms_eps=float(d.get("rms_norm_eps", 1e-6)),
        qkv_bias=True, tie_embeddings=bool(d.get("tie_word_embeddings", False)), logit_shift=1,
        max_seq_len=d.get("max_position_embeddings", 32768),
        mask_id=d.get("mask_token_id", MASK_ID), eos_id=eos, pad_id=eos if pad is None else pad,
        stop_ids=list(stops),
    )


def to_hf(c: ModelConfig) -> dict:
    return {
        "model_type": HF_MODEL_TYPE, "architectures": ["DreamModel"],
        "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.mlp_hidden, "vocab_size": c.vocab_size,
        "hidden_act": "silu", "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
        "tie_word_embeddings": c.tie_embeddings, "max_position_embeddings": c.max_seq_len,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": c.n_layers,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": False,
        "mask_token_id": c.mask_id, "bos_token_id": c.eos_id, "eos_token_id": c.eos_id,
        "pad_token_id": c.pad_id, "dlc_stop_ids": c.stop_ids, "torch_dtype": "bfloat16",
    }


def make_layer(c: ModelConfig) -> PreNormLayer:
    return PreNormLayer(c, HFAttention(c), SwiGLU(c.d_model, c.mlp_hidden, MLP_NAMES))


class DreamLM(HFLayoutLM):
    def __init__(self, config: ModelConfig):
        super().__init__(config, make_layer)
