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
}


def register_preset(name: str, repo: str | None, config: dict, chat: bool, description: str, **extra) -> None:
    PRESETS[name] = {"repo": repo, "config": config, "chat": chat, "description": description, **extra}


def preset_config(name: str) -> ModelConfig:
    return ModelConfig(**PRESETS[name]["config"])


def unknown_model_error(name: str) -> ValueError:
    return ValueError(f"unknown model {name!r}: not a directory and not a preset. "
                      f"Known presets: {', '.join(sorted(PRESETS))}")
