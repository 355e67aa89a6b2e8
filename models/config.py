"""Model configuration shared by every dLLM family.

One flat dataclass describes LLaDA, Dream and LLaDA-MoE: the compiler passes, the KV cache manager and the
runtime read the same fields whatever the family. Each family module converts its checkpoint's own
config.json keys to and from this form (``from_hf`` / ``to_hf``), so checkpoints load without remote code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    family: str                      # key of dlc.models.FAMILIES
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden: int                  # dense MLP hidden size (MoE: unused when every layer is MoE)
    vocab_size: int                  # rows of the output projection
    embedding_size: int              # rows of the input embedding (LLaDA pads it past vocab_size)
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    logit_shift: int = 0             # Dream: position i is predicted by output i-1
    n_experts: int = 0               # MoE only
    n_experts_per_tok: int = 0
    expert_hidden: int = 0
    norm_topk_prob: bool = False
    max_seq_len: int = 4096
    mask_id: int = 0
    eos_id: int = 1
    pad_id: int = 1
    stop_ids: list[int] = field(default_factory=list)   # ids that end a generation (eos, end-of-turn)
    extra: dict = field(default_factory=dict)           # checkpoint keys we keep but do not interpret

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        positive = ["d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "embedding_size", "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim {self.head_dim} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            raise ValueError("model config: embedding_size must be >= vocab_size")
        for name in ("mask_id", "eos_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.embedding_size:
                raise ValueError(f"model config: {name} {getattr(self, name)} is outside the embedding "
                                 f"(size {self.embedding_size})")
        if self.is_moe and not (0 < self.n_experts_per_tok <= self.n_experts and self.expert_hidden > 0):
            raise ValueError("model config: MoE needs 0 < n_experts_per_tok <= n_experts and expert_hidden > 0")
        if self.logit_shift not in (0, 1):
            raise ValueError("model config: logit_shift must be 0 or 1")
        if not self.stop_ids:
            self.stop_ids = [self.eos_id]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"model config: unknown fields {sorted(unknown)}")
        return cls(**d)

    def num_parameters(self) -> int:
        d, h, kv = self.d_model, self.n_heads, self.n_kv_heads
        hd = self.head_dim
        attn = d * h * hd + 2 * d * kv * hd + h * hd * d
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:      # per-head q/k RMSNorm weights of size head_dim (LLaDA-MoE)
            attn += 2 * hd
        if self.is_moe:
            mlp = self.n_experts * 3 * d * self.expert_hidden + d * self.n_experts
        else:
            mlp = 3 * d * self.mlp_hidden
        per_layer = attn + mlp + 2 * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.embedding_size * d + self.n_layers * per_layer + d + out
