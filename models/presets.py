"""Model presets: user-facing names -> Hugging Face repo and exact architecture.

Each real preset records the numbers of its released config.json (checked against the public configs), so
`dlc compile llada-8b --dry-run` can plan on the meta device without weights. ``tiny-*`` presets are random,
seeded, in-process models with a byte tokenizer: they exercise every code path in tests and on CPU."""
from __future__ import annotations

from pathlib import Path

import dlc

from .config import ModelConfig

ASSETS = Path(dlc.__file__).resolve().parent / "assets"   # package data, in editable and normal installs

LLADA_8B = dict(family="llada", d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden=12288,
                vocab_size=126464, embedding_size=126464, rope_theta=500000.0, rms_eps=1e-5, max_seq_len=4096,
                mask_id=126336, eos_id=126081, pad_id=126081, stop_ids=[126081, 126348])

# Dream-org/Dream-v0-*-7B config.json (Qwen2.5-7B layout): eos/pad <|endoftext|> 151643, mask 151666, stop also at
# <|im_end|> 151645 (end of a chat turn).
DREAM_7B = dict(family="dream", d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, mlp_hidden=18944,
                vocab_size=152064, embedding_size=152064, rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True,
                logit_shift=1, max_seq_len=131072, mask_id=151666, eos_id=151643, pad_id=151643,
                stop_ids=[151643, 151645])

# inclusionAI/LLaDA-MoE-7B-A1B-* config.json: 64 experts, top-8, expert MLP 1024, per-head QK-norm, theta 50000.
LLADA_MOE_7B = dict(family="llada_moe", d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden=8192,
                    vocab_size=157184, embedding_size=157184, rope_theta=50000.0, rms_eps=1e-5, qk_norm=True,
                    n_experts=64, n_experts_per_tok=8, expert_hidden=1024, norm_topk_prob=False,
                    max_seq_len=8192, mask_id=156895, eos_id=156892, pad_id=156892, stop_ids=[156892])

# Byte tokenizer ids (dlc.models.tokenizer.BYTE_SPECIALS): eos 256, mask 257, eot 258.
_TINY_IDS = dict(vocab_size=262, embedding_size=262, mask_id=257, eos_id=256, pad_id=256, stop_ids=[256, 258],
                 max_seq_len=1024)

PRESETS: dict[str, dict] = {
    "llada-8b": {"repo": "GSAI-ML/LLaDA-8B-Instruct", "config": LLADA_8B, "chat": True,
                 "description": "LLaDA 8B Instruct"},
    "llada-8b-base": {"repo": "GSAI-ML/LLaDA-8B-Base", "config": LLADA_8B, "chat": False,
                      "description": "LLaDA 8B Base"},
    "llada-1.5": {"repo": "GSAI-ML/LLaDA-1.5", "config": LLADA_8B, "chat": True,
                  "description": "LLaDA 1.5 (8B, VRPO-aligned)"},
    "dlc-tiny": {"repo": None, "path": str(ASSETS / "dlc-tiny"), "chat": True,
                 "description": "bundled trained tiny LLaDA (synthetic tasks; the quick-start default)"},
    "tiny-llada": {"repo": None, "chat": True, "description": "random tiny LLaDA (tests)",
                   "config": dict(family="llada", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=128,
                                  rope_theta=10000.0, **_TINY_IDS)},
    "dream-7b": {"repo": "Dream-org/Dream-v0-Instruct-7B", "config": DREAM_7B, "chat": True,
                 "description": "Dream v0 7B Instruct"},
    "dream-7b-base": {"repo": "Dream-org/Dream-v0-Base-7B", "config": DREAM_7B, "chat": False,
                      "description": "Dream v0 7B Base"},
    "llada-moe-7b": {"repo": "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", "config": LLADA_MOE_7B, "chat": True,
                     "description": "LLaDA-MoE 7B-A1B Instruct (64 experts, top-8)"},
    "llada-moe-7b-base": {"repo": "inclusionAI/LLaDA-MoE-7B-A1B-Base", "config": LLADA_MOE_7B, "chat": False,
                          "description": "LLaDA-MoE 7B-A1B Base"},
    "tiny-dream": {"repo": None, "chat": True, "description": "random tiny Dream (GQA, qkv bias, shifted logits)",
                   "config": dict(family="dream", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=128,
                                  rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True, logit_shift=1, **_TINY_IDS)},
    "tiny-llada-moe": {"repo": None, "chat": True, "description": "random tiny LLaDA-MoE (8 experts, top-2, QK-norm)",
                       "config": dict(family="llada_moe", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                      mlp_hidden=128, rope_theta=50000.0, qk_norm=True, n_experts=8,
                                      n_experts_per_tok=2, expert_hidden=32, **_TINY_IDS)},
}


def register_preset(name: str, repo: str | None, config: dict, chat: bool, description: str, **extra) -> None:
    PRESETS[name] = {"repo": repo, "config": config, "chat": chat, "description": description, **extra}


def preset_config(name: str) -> ModelConfig:
    return ModelConfig(**PRESETS[name]["config"])


def unknown_model_error(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}: not a directory and not a preset. "
                      f"Known presets: {', '.join(sorted(PRESETS))}")
