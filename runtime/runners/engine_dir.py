"""Opening engine directories (``dlc compile`` output): validate dlc_engine.json (dlc/manifest.py), load each
phase artifact (artifacts.py), wrap them in a CompiledRunner."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from dlc.manifest import EngineError, is_engine_dir, load_manifest  # noqa: F401 (re-exported)
from dlc.models.config import ModelConfig

from .artifacts import LOADERS, BackendUnavailable
from .compiled import CompiledRunner

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_device(path: Path, m: dict, device) -> None:
    """Refuse a GPU the programs cannot run on: a MoE engine traced with grouped GEMMs (``build.moe`` =
    ``fused``: built for sm90 / sm100) on a CUDA GPU whose ``torch._grouped_mm`` would copy the expert offsets
    to the host each call (no CUDA graph could hold it)."""
    from dlc.models.llada_moe import grouped_mm_device

    dev = torch.device(device)
    if m.get("build", {}).get("moe") != "fused" or dev.type != "cuda":
        return
    if not grouped_mm_device(dev, torch.bfloat16):                  # fused programs are bf16 builds
        target, props = m.get("target", {}), torch.cuda.get_device_properties(dev)
        raise EngineError(f"{path}: built for {target.get('name')} ({target.get('arch')}) with grouped-GEMM "
                          f"MoE programs, which need an sm90 / sm100 GPU; this one is "
                          f"sm_{props.major}{props.minor}. "
                          f"Recompile for it: `dlc compile {m.get('source')} --target <this GPU>` (its MoE "
                          "programs are then stacked)")


def engine_runner(path, device="cpu") -> tuple[CompiledRunner, dict]:
    path = Path(path)
    m = load_manifest(path)
    check_device(path, m, device)
    cfg = ModelConfig.from_dict(m["model"])
    phases, names = {}, {}
    for ph, spec in m["phases"].items():
        if spec["runtime"] not in LOADERS:
            raise EngineError(f"{path}: the {ph} artifact has runtime {spec['runtime']!r}; this dlc loads "
                              f"{', '.join(LOADERS)}")
        phases[ph] = _load_program(path / spec["file"], spec["runtime"], ph, device)
        names[ph] = [i["name"] for i in spec["inputs"]] + spec.get("weight_inputs", [])
    sparse = next((p["params"]["retention"] for p in m["passes"] if p["name"] == "sparsify_heads"), None)
    build = m.get("build", {})
    temp = next((i["dtype"] for i in m["phases"]["refresh"]["inputs"] if i["name"] == "temperature"),
                "float64")
    runner = CompiledRunner(cfg, phases, names, device=device, dtype=DTYPES[m["dtype"]],
                            sparse_retention=sparse, kind=m["runtime"], max_seq_len=build.get("max_seq_len"),
                            max_batch_size=build.get("max_batch_size"),
                            temperature_dtype=getattr(torch, temp), weights=load_weights(path, m, device),
                            kv_inplace=build.get("kv_inplace", True))
    return runner, m


def load_weights(path: Path, m: dict, device) -> dict[str, torch.Tensor]:
    """The engine's weights, once, on ``device`` (name -> tensor; aliases share their tensor)."""
    from safetensors import SafetensorError, safe_open

    info = m["weights"]
    f = path / info["file"]
    try:                      # mmap on the host, one copy per tensor to the device (safetensors' own
        with safe_open(str(f), "pt", device="cpu") as st:        # device= path was 10x slower on an H200)
            weights = {name: st.get_tensor(name).to(device) for name in st.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise EngineError(f"{f}: cannot read the engine's weights ({e})") from None
    for alias, name in info.get("aliases", {}).items():
        weights[alias] = weights[name]
    return weights


def _load_program(file: Path, runtime: str, phase: str, device):
    """One phase program; a file the backend cannot read is an EngineError naming it (no traceback)."""
    quiet = logging.getLogger("torch.export")      # it logs the whole failure as a warning before raising
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return LOADERS[runtime](file, device)
    except BackendUnavailable:
        raise
    except Exception as e:           # noqa: BLE001 - each backend raises its own types for unreadable files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EngineError(f"{file}: cannot load the {phase} program ({runtime}): {first}") from None
    finally:
        quiet.setLevel(level)


def open_engine(path, device="cpu", dtype=None):
    """Engine dir -> dlc.runtime.session.Session."""
    from dlc.models.tokenizer import has_tokenizer, load_tokenizer

    from ..session import Session

    path = Path(path)
    runner, m = engine_runner(path, device=str(device))
    if dtype not in (None, "auto") and DTYPES.get(dtype, dtype) != runner.dtype:
        raise EngineError(f"{path} was compiled for {m['dtype']}; --dtype {dtype} needs a recompile")
    tok = load_tokenizer(path) if has_tokenizer(path) else None
    return Session(runner, tok, runner.config, bool(m.get("chat")), str(path), kind=m["runtime"])
