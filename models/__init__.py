"""dLLM model families and presets.

``FAMILIES`` maps a family name to its module (``from_hf``, ``to_hf``, model class, HF ``model_type``);
``PRESETS`` (dlc.models.presets) maps user-facing names like ``llada-8b`` to a checkpoint and a config."""
from __future__ import annotations

from . import dream, llada, llada2_moe, llada_moe, sdar
from .common import DiffusionLM, KVCache
from .config import ModelConfig

# "detect" (optional): config.json dict -> bool, for families that share a model_type string (the released
# LLaDA-MoE config.json says "llada", like LLaDA-8B). A family with a detect that matches wins; else the first
# family listing the model_type without a detect.
FAMILIES = {
    "llada": {"module": llada, "cls": llada.LLaDAModel, "model_types": ("llada",)},
    "dream": {"module": dream, "cls": dream.DreamLM, "model_types": dream.MODEL_TYPES},
    "llada_moe": {"module": llada_moe, "cls": llada_moe.LLaDAMoEModel, "model_types": llada_moe.MODEL_TYPES,
                  "detect": llada_moe.detect},
    "llada2_moe": {"module": llada2_moe, "cls": llada2_moe.LLaDA2MoeModel,
                   "model_types": llada2_moe.MODEL_TYPES},
    "sdar": {"module": sdar, "cls": sdar.SDARModel, "model_types": sdar.MODEL_TYPES},
}


def register_family(name: str, module, cls, model_types: tuple[str, ...], detect=None) -> None:
    FAMILIES[name] = {"module": module, "cls": cls, "model_types": model_types}
    if detect is not None:
        FAMILIES[name]["detect"] = detect


def family_for_model_type(model_type: str, hf_config: dict | None = None) -> str:
    names = [n for n, f in FAMILIES.items() if model_type in f["model_types"]]
    if not names:
        known = sorted({t for f in FAMILIES.values() for t in f["model_types"]})
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {known}")
    detected = [n for n in names if hf_config is not None
                and FAMILIES[n].get("detect", lambda d: False)(hf_config)]
    plain = [n for n in names if "detect" not in FAMILIES[n]]
    return (detected or plain or names)[0]


def config_from_hf(d: dict) -> ModelConfig:
    if "model_type" not in d:
        raise ValueError("config.json has no 'model_type' key")
    return FAMILIES[family_for_model_type(d["model_type"], d)]["module"].from_hf(d)


def config_to_hf(c: ModelConfig) -> dict:
    return FAMILIES[c.family]["module"].to_hf(c)


def build_model(config: ModelConfig) -> DiffusionLM:
    return FAMILIES[config.family]["cls"](config)


__all__ = ["FAMILIES", "ModelConfig", "DiffusionLM", "KVCache", "build_model", "config_from_hf",
           "config_to_hf", "register_family", "family_for_model_type"]
