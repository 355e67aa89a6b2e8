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
    # Block diffusion and the LLaDA2 / SDAR layouts (defaults describe every earlier family).
    # explicit head_dim (Qwen3 / SDAR: != d_model / n_heads); 0: d_model / n_heads
    attn_head_dim: int = 0
    # rotated dims per head (LLaDA2: partial_rotary_factor * head_dim); 0: all
    rotary_dim: int = 0
    block_diffusion: bool = False    # block-causal attention: bidirectional inside a block, causal across
    # LLaDA2: shared expert(s) of hidden expert_hidden * n, added to every token
    n_shared_experts: int = 0
    # LLaDA2: layers [0, k) use a dense MLP of mlp_hidden (first_k_dense_replace)
    first_dense_layers: int = 0
    router: str = "softmax"          # "softmax" (LLaDA-MoE, Qwen3-MoE) | "sigmoid_group" (LLaDA2)
    # sigmoid_group: experts in n groups, tokens route into topk_groups of them
    n_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling: float = 1.0      # sigmoid_group: routing weights scaled after renormalisation

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Rotated dims of each head (the rest pass through unrotated)."""
        return self.rotary_dim or self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def ffn_hidden(self, every_expert: bool = False) -> int:
        """The widest MLP hidden one token's forward holds (the activation estimates' MLP term): the dense
        MLP's; a MoE layer's routed experts' (top k) plus its shared ones, or with ``every_expert`` (a stacked
        MoE forward: one wide GEMM over all experts) every expert's."""
        if not self.is_moe:
            return self.mlp_hidden
        routed = self.n_experts if every_expert else self.n_experts_per_tok
        moe = self.expert_hidden * (routed + self.n_shared_experts)
        return max(moe, self.mlp_hidden if self.first_dense_layers else 0)

    def validate(self) -> None:
        positive = ["d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "embedding_size",
                    "max_seq_len"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config: {name} must be > 0, got {getattr(self, name)}")
        if not self.attn_head_dim and self.d_model % self.n_heads:
            raise ValueError(f"model config: d_model {self.d_model} is not divisible by n_heads "
                             f"{self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.n_kv_heads}")
        if self.head_dim % 2 or self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"model config: head_dim {self.head_dim} and rotary_dim {self.rope_dim} "
                             f"must be even with rotary_dim <= head_dim")
        if self.router not in ("softmax", "sigmoid_group"):
            raise ValueError(f"model config: router must be softmax or sigmoid_group, got {self.router!r}")
        if self.is_moe and self.n_experts % self.n_expert_groups:
            raise ValueError(f"model config: n_experts {self.n_experts} is not divisible by n_expert_groups "
                             f"{self.n_expert_groups}")
        if self.embedding_size < self.vocab_size:
            raise ValueError("model config: embedding_size must be >= vocab_size")
        for name in ("mask_id", "eos_id", "pad_id"):
            if not 0 <= getattr(self, name) < self.embedding_size:
                raise ValueError(f"model config: {name} {getattr(self, name)} is outside the embedding "
                                 f"(size {self.embedding_size})")
        if self.is_moe and not (0 < self.n_experts_per_tok <= self.n_experts and self.expert_hidden > 0):
            raise ValueError("model config: MoE needs 0 < n_experts_per_tok <= n_experts and "
                             "expert_hidden > 0")
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
        dense_mlp = 3 * d * self.mlp_hidden
        if self.qkv_bias:
            attn += h * hd + 2 * kv * hd
        if self.qk_norm:      # per-head q/k RMSNorm weights of size head_dim (LLaDA-MoE)
            attn += 2 * hd
        if self.is_moe:
            mlp = (self.n_experts + self.n_shared_experts) * 3 * d * self.expert_hidden + d * self.n_experts
        else:
            mlp = dense_mlp
        n_dense = min(self.first_dense_layers, self.n_layers) if self.is_moe else 0
        layers = (self.n_layers - n_dense) * (attn + mlp + 2 * d) + n_dense * (attn + dense_mlp + 2 * d)
        out = 0 if self.tie_embeddings else self.vocab_size * d
        return self.embedding_size * d + layers + d + out

    def num_active_parameters(self) -> int:
        """Parameters one token runs through (MoE: top-k routed + shared experts; dense: all)."""
        if not self.is_moe:
            return self.num_parameters()
        idle = (self.n_experts - self.n_experts_per_tok) * 3 * self.d_model * self.expert_hidden
        n_moe = self.n_layers - min(self.first_dense_layers, self.n_layers)
        return self.num_parameters() - n_moe * idle


# -- reading a family's config.json (the families' ``from_hf``) ----------------------------------------------
def require_keys(family: str, d: dict, keys) -> None:
    """Refuse a config.json that lacks one of ``keys``, naming the first."""
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{family} config.json is missing the key {missing[0]!r}")


def refuse_unsupported(family: str, d: dict, unsupported: dict) -> None:
    """Refuse the first key whose flag in ``unsupported`` (key -> bool) is set, naming it and its value."""
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{family} config.json: {bad[0]}={d.get(bad[0])!r} is not supported by dlc "
                         f"(the released checkpoints use the default)")


def hf_eos_id(d: dict, default: int) -> int:
    """config.json's ``eos_token_id`` (the first of a list), else ``default``."""
    eos = d.get("eos_token_id")
    return default if eos is None else (eos[0] if isinstance(eos, list) else eos)
