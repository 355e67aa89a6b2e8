"""LLaDA (LLaDA-8B-Instruct/Base, LLaDA-1.5): Llama-shaped, bidirectional, plain MHA, SwiGLU, no biases.

Parameter names follow the released safetensors exactly (``model.transformer.blocks.N.q_proj.weight``, ...),
so the checkpoint loads without ``trust_remote_code``."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .common import DiffusionLM, Fusable, RMSNorm, TiedHead, project, self_attention
from .config import ModelConfig

HF_MODEL_TYPE = "llada"


def from_hf(d: dict) -> ModelConfig:
    try:
        eos = d.get("eos_token_id", 126081)
        return ModelConfig(
            family="llada",
            d_model=d["d_model"], n_layers=d["n_layers"], n_heads=d["n_heads"],
            n_kv_heads=d.get("n_kv_heads") or d["n_heads"],
            mlp_hidden=d.get("mlp_hidden_size") or d.get("mlp_ratio", 4) * d["d_model"],
            vocab_size=d["vocab_size"], embedding_size=d.get("embedding_size") or d["vocab_size"],
            rope_theta=float(d.get("rope_theta", 10000.0)), rms_eps=float(d.get("rms_norm_eps", 1e-5)),
            qkv_bias=bool(d.get("include_bias", False) or d.get("include_qkv_bias", False)),
            tie_embeddings=bool(d.get("weight_tying", False)),
            max_seq_len=d.get("max_sequence_length", 4096),
            mask_id=d.get("mask_token_id", 126336), eos_id=eos,
            pad_id=d.get("pad_token_id", eos) if d.get("pad_token_id") is not None else eos,
            stop_ids=list(d.get("dlc_stop_ids") or [eos] + ([126348] if d["vocab_size"] > 126348 else [])),
        )
    except KeyError as e:
        raise ValueError(f"LLaDA config.json is missing the key {e.args[0]!r}") from None


def to_hf(c: ModelConfig) -> dict:
    return {
        "model_type": HF_MODEL_TYPE, "architectures": ["LLaDAModelLM"],
        "d_model": c.d_model, "n_layers": c.n_layers, "n_heads": c.n_heads, "n_kv_heads": c.n_kv_heads,
        "mlp_hidden_size": c.mlp_hidden, "vocab_size": c.vocab_size, "embedding_size": c.embedding_size,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_eps, "include_bias": False,
        "include_qkv_bias": c.qkv_bias, "weight_tying": c.tie_embeddings, "block_type": "llama",
        "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
        "max_sequence_length": c.max_seq_len, "mask_token_id": c.mask_id, "eos_token_id": c.eos_id,
        "pad_token_id": c.pad_id, "dlc_stop_ids": c.stop_ids, "use_cache": False,
    }


class LLaDABlock(Fusable, nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        hd = c.head_dim
        self.n_heads, self.n_kv = c.n_heads, c.n_kv_heads
        self.attn_norm = RMSNorm(c.d_model, c.rms_eps)
        self.q_proj = nn.Linear(c.d_model, c.n_heads * hd, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * hd, bias=c.qkv_bias)
        self.attn_out = nn.Linear(c.n_heads * hd, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model, c.rms_eps)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden, bias=False)   # gate
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden, c.d_model, bias=False)    # down

    def fusable(self):
        return [(self.q_proj, self.k_proj, self.v_proj), (self.ff_proj, self.up_proj)]

    def forward(self, x, cos, sin, mask, cache_kv=None, start: int = 0):
        a, kv = self.attention_branch(x, cos, sin, mask, cache_kv, start)
        x = x + a
        return x + self.mlp_branch(x), kv

    def attention_branch(self, x, cos, sin, mask, cache_kv=None, start: int = 0):
        """The attention sublayer before its residual add: (output [B, T, d], (k, v)). A tensor-parallel
        shard's two-micro-batch forward (models/overlap.py) runs the sublayers apart."""
        return self_attention(self.attn_norm(x), self.q_proj, self.k_proj, self.v_proj, self.attn_out,
                              cos, sin, mask, self.n_heads, self.n_kv, cache_kv=cache_kv, start=start,
                              qkv_fused=self.fused_group(0))

    def mlp_branch(self, x):
        """The MLP sublayer before its residual add: [B, T, d] -> [B, T, d]."""
        gate, up = project(self.ff_norm(x), (self.ff_proj, self.up_proj), self.fused_group(1))
        return self.ff_out(F.silu(gate) * up)


class _Transformer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.embedding_size, c.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(c) for _ in range(c.n_layers))
        self.ln_f = RMSNorm(c.d_model, c.rms_eps)
        if not c.tie_embeddings:
            self.ff_out = nn.Linear(c.d_model, c.vocab_size, bias=False)


class _Inner(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.transformer = _Transformer(c)


class LLaDAModel(DiffusionLM):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = _Inner(config)
        if config.tie_embeddings:   # kept out of the module tree: no second name for wte.weight
            self.__dict__["_tied_head"] = TiedHead(self.model.transformer.wte, config.vocab_size)

    embed = property(lambda self: self.model.transformer.wte)
    blocks = property(lambda self: self.model.transformer.blocks)
    norm = property(lambda self: self.model.transformer.ln_f)
    head = property(lambda self: self.__dict__.get("_tied_head") or self.model.transformer.ff_out)
