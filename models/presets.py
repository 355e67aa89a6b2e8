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

# Dream-org/Dream-v0-*-7B config.json (Qwen2.5-7B layout): eos/pad <|endoftext|> 151643, mask 151666, stop
# also at <|im_end|> 151645 (end of a chat turn).
DREAM_7B = dict(family="dream", d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, mlp_hidden=18944,
                vocab_size=152064, embedding_size=152064, rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True,
                logit_shift=1, max_seq_len=131072, mask_id=151666, eos_id=151643, pad_id=151643,
                stop_ids=[151643, 151645])

# inclusionAI/LLaDA-MoE-7B-A1B-* config.json: 64 experts, top-8, expert MLP 1024, per-head QK-norm,
# theta 50000.
LLADA_MOE_7B = dict(family="llada_moe", d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden=8192,
                    vocab_size=157184, embedding_size=157184, rope_theta=50000.0, rms_eps=1e-5, qk_norm=True,
                    n_experts=64, n_experts_per_tok=8, expert_hidden=1024, norm_topk_prob=False,
                    max_seq_len=8192, mask_id=156895, eos_id=156892, pad_id=156892, stop_ids=[156892])

# inclusionAI/LLaDA2.0-mini config.json (the Ling-mini-2.0 layout, model_type llada2_moe): 20 layers of 2048,
# 16 heads over 4 KV heads of 128, partial rotary 0.5 (64 dims), theta 600000, first layer dense (5120), then
# 256 experts of 512 top-8 + 1 shared, sigmoid routing in 8 groups (4 kept), routed scaling 2.5; vocab 157184;
# 32K context.
LLADA2_MINI = dict(family="llada2_moe", d_model=2048, n_layers=20, n_heads=16, n_kv_heads=4, mlp_hidden=5120,
                   vocab_size=157184, embedding_size=157184, rope_theta=600000.0, rms_eps=1e-6, qk_norm=True,
                   n_experts=256, n_experts_per_tok=8, expert_hidden=512, norm_topk_prob=True,
                   max_seq_len=32768, mask_id=156895, eos_id=156892, pad_id=156892, stop_ids=[156892, 156900],
                   rotary_dim=64, block_diffusion=True, n_shared_experts=1, first_dense_layers=1,
                   router="sigmoid_group", n_expert_groups=8, topk_groups=4, routed_scaling=2.5,
                   extra={"use_bias": False})
# inclusionAI/LLaDA2.0-flash (the Ling-flash-2.0 layout): 32 layers of 4096, 32 heads over 4 KV heads of 128,
# dense first layer 9216, 256 experts of 1024 top-8 + 1 shared (100B total, ~6B active).
LLADA2_FLASH = dict(LLADA2_MINI, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=4, mlp_hidden=9216,
                    expert_hidden=1024)
# JetLM/SDAR-*-Chat config.json: the Qwen3 base models' shapes (head_dim 128, GQA 8 KV heads; 1.7B/4B tie the
# embedding), mask <|MASK|> 151669, eos <|endoftext|> 151643, end of turn <|im_end|> 151645.
_SDAR_IDS = dict(vocab_size=151936, embedding_size=151936, rope_theta=1000000.0, rms_eps=1e-6, qk_norm=True,
                 max_seq_len=32768, mask_id=151669, eos_id=151643, pad_id=151643, stop_ids=[151643, 151645],
                 block_diffusion=True)
SDAR_1_7B = dict(family="sdar", d_model=2048, n_layers=28, n_heads=16, n_kv_heads=8, mlp_hidden=6144,
                 tie_embeddings=True, **_SDAR_IDS)
SDAR_4B = dict(family="sdar", d_model=2560, n_layers=36, n_heads=32, n_kv_heads=8, mlp_hidden=9728,
               attn_head_dim=128, tie_embeddings=True, **_SDAR_IDS)
SDAR_8B = dict(family="sdar", d_model=4096, n_layers=36, n_heads=32, n_kv_heads=8, mlp_hidden=12288,
               **_SDAR_IDS)
SDAR_30B_A3B = dict(family="sdar", d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, mlp_hidden=768,
                    attn_head_dim=128, n_experts=128, n_experts_per_tok=8, expert_hidden=768,
                    norm_topk_prob=True, **_SDAR_IDS)

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
    "dlc-tiny-bd": {"repo": None, "path": str(ASSETS / "dlc-tiny-bd"), "chat": True,
                    "description": "bundled trained tiny block-diffusion model (SDAR layout, block 4; "
                                   "dlc-tiny's tasks)"},
    "tiny-llada": {"repo": None, "chat": True, "description": "random tiny LLaDA (tests)",
                   "config": dict(family="llada", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                  mlp_hidden=128, rope_theta=10000.0, **_TINY_IDS)},
    "dream-7b": {"repo": "Dream-org/Dream-v0-Instruct-7B", "config": DREAM_7B, "chat": True,
                 "description": "Dream v0 7B Instruct"},
    "dream-7b-base": {"repo": "Dream-org/Dream-v0-Base-7B", "config": DREAM_7B, "chat": False,
                      "description": "Dream v0 7B Base"},
    "llada-moe-7b": {"repo": "inclusionAI/LLaDA-MoE-7B-A1B-Instruct", "config": LLADA_MOE_7B, "chat": True,
                     "description": "LLaDA-MoE 7B-A1B Instruct (64 experts, top-8)"},
    "llada-moe-7b-base": {"repo": "inclusionAI/LLaDA-MoE-7B-A1B-Base", "config": LLADA_MOE_7B, "chat": False,
                          "description": "LLaDA-MoE 7B-A1B Base"},
    "tiny-dream": {"repo": None, "chat": True,
                   "description": "random tiny Dream (GQA, qkv bias, shifted logits)",
                   "config": dict(family="dream", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  mlp_hidden=128, rope_theta=1000000.0, rms_eps=1e-6, qkv_bias=True,
                                  logit_shift=1, **_TINY_IDS)},
    "tiny-llada-moe": {"repo": None, "chat": True,
                       "description": "random tiny LLaDA-MoE (8 experts, top-2, QK-norm)",
                       "config": dict(family="llada_moe", d_model=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                      mlp_hidden=128, rope_theta=50000.0, qk_norm=True, n_experts=8,
                                      n_experts_per_tok=2, expert_hidden=32, **_TINY_IDS)},
    "llada2-mini": {"repo": "inclusionAI/LLaDA2.0-mini", "config": LLADA2_MINI, "chat": True,
                    "description": "LLaDA2.0 mini (16B-A1.4B block-diffusion MoE)"},
    "llada2-flash": {"repo": "inclusionAI/LLaDA2.0-flash", "config": LLADA2_FLASH, "chat": True,
                     "description": "LLaDA2.0 flash (100B-A6B block-diffusion MoE)"},
    "llada2.1-mini": {"repo": "inclusionAI/LLaDA2.1-mini", "config": LLADA2_MINI, "chat": True,
                      "decoder": "llada2.1",
                      "description": "LLaDA2.1 mini (LLaDA2.0 architecture, token editing)"},
    "llada2.1-flash": {"repo": "inclusionAI/LLaDA2.1-flash", "config": LLADA2_FLASH, "chat": True,
                       "decoder": "llada2.1", "description": "LLaDA2.1 flash (token editing)"},
    "sdar-1.7b": {"repo": "JetLM/SDAR-1.7B-Chat", "config": SDAR_1_7B, "chat": True,
                  "description": "SDAR 1.7B Chat (Qwen3 block diffusion, block 4)"},
    "sdar-4b": {"repo": "JetLM/SDAR-4B-Chat", "config": SDAR_4B, "chat": True,
                "description": "SDAR 4B Chat (Qwen3 block diffusion, block 4)"},
    "sdar-8b": {"repo": "JetLM/SDAR-8B-Chat", "config": SDAR_8B, "chat": True,
                "description": "SDAR 8B Chat (Qwen3 block diffusion, block 4)"},
    "sdar-30b-a3b": {"repo": "JetLM/SDAR-30B-A3B-Chat", "config": SDAR_30B_A3B, "chat": True,
                     "description": "SDAR 30B-A3B Chat (Qwen3-MoE block diffusion, 128 experts top-8)"},
    "tiny-llada2": {"repo": None, "chat": True,
                    "description": "random tiny LLaDA2 (block-causal MoE: dense first layer, shared expert, "
                                   "group-limited sigmoid routing, partial rotary, GQA)",
                    "config": dict(family="llada2_moe", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   mlp_hidden=128, rope_theta=600000.0, rms_eps=1e-6, qk_norm=True,
                                   n_experts=8, n_experts_per_tok=2, expert_hidden=32, norm_topk_prob=True,
                                   rotary_dim=8, block_diffusion=True, n_shared_experts=1,
                                   first_dense_layers=1, router="sigmoid_group", n_expert_groups=4,
                                   topk_groups=2, routed_scaling=2.5, **_TINY_IDS)},
    "tiny-sdar": {"repo": None, "chat": True, "description": "random tiny SDAR (Qwen3 layout, block-causal)",
                  "config": dict(family="sdar", d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                 mlp_hidden=128, attn_head_dim=24, rope_theta=1000000.0, rms_eps=1e-6,
                                 qk_norm=True, block_diffusion=True, **_TINY_IDS)},
}


def register_preset(name: str, repo: str | None, config: dict, chat: bool, description: str, **extra) -> None:
    PRESETS[name] = {"repo": repo, "config": config, "chat": chat, "description": description, **extra}


def preset_config(name: str) -> ModelConfig:
    return ModelConfig(**PRESETS[name]["config"])


def unknown_model_error(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}: not a directory and not a preset. "
                      f"Known presets: {', '.join(sorted(PRESETS))}")
