"""dLLM model families and presets.

``FAMILIES`` maps a family name to its module (``from_hf``, ``to_hf``, model class, HF ``model_type``);
``PRESETS`` (dlc.models.presets) maps user-facing names like ``llada-8b`` to a checkpoint and a config."""
from __future__ import annotations

from . import llada
from .common import DiffusionLM, KVCache
from .config import ModelConfig

FAMILIES = {
    "llada": {"module": llada, "cls": llada.LLaDAModel, "model_types": ("llada",)},
}


def register_family(name: str, module, cls, model_types: tuple[str, ...]) -> None:
    FAMILIES[name] = {"module": module, "cls": cls, "model_types": model_types}


def family_for_model_type(model_type: str) -> str:
    for name, fam in FAMILIES.items():
        if model_type in fam["model_types"]:
            return name
    known = sorted(t for f in FAMILIES.values() for t in f["model_types"])
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {known}")


def config_from_hf(d: dict) -> ModelConfig:
    if "model_type" not in d:
        raise ValueError("config.json has no 'model_type' key")
    return FAMILIES[family_for_model_type(d["model_type"])]["module"].from_hf(d)


def config_to_hf(c: ModelConfig) -> dict:
    return FAMILIES[c.family]["module"].to_hf(c)


def build_model(config: ModelConfig) -> DiffusionLM:
    return FAMILIES[config.family]["cls"](config)


__all__ = ["FAMILIES", "ModelConfig", "DiffusionLM", "KVCache", "build_model", "config_from_hf", "config_to_hf",
           "register_family", "family_for_model_type"]
