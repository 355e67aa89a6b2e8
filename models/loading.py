"""Checkpoint resolution, loading and saving in Hugging Face layout.

MODEL is a preset name or a local directory holding config.json, model.safetensors (or shards with
model.safetensors.index.json) and tokenizer files. Presets resolve through the local HF cache only (never the
network); ``weights`` overrides the directory. The model is built on the meta device and each tensor is copied
in from its shard once, so an 8B checkpoint never has two full copies in memory. Missing, unexpected or
mis-shaped tensors raise ``CheckpointError`` naming the tensor and the file."""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build_model, config_from_hf, config_to_hf
from .common import DiffusionLM
from .config import ModelConfig
from .presets import PRESETS, preset_config, unknown_model_error
from .tokenizer import byte_tokenizer, has_tokenizer, load_tokenizer

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: DiffusionLM
    tokenizer: object
    config: ModelConfig
    source: str            # directory or preset name
    chat: bool             # whether prompts go through the chat template by default


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_checkpoint_dir(model: str, weights: str | None = None) -> Path | None:
    """Directory holding the checkpoint, or None for a tiny in-process preset."""
    if weights:
        p = Path(weights).expanduser()
        if not (p / "config.json").exists():
            raise CheckpointError(f"--weights {p}: no config.json there (expected a Hugging Face "
                                  "model directory)")
        return p
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise CheckpointError(f"{p} has no config.json (expected a Hugging Face model directory)")
        return p
    if model not in PRESETS:
        raise unknown_model_error(model)
    preset = PRESETS[model]
    if preset.get("path"):
        return Path(preset["path"])
    if preset["repo"] is None:
        return None
    return _hf_cache_dir(model, preset["repo"])


def _hf_cache_dir(name: str, repo: str) -> Path:
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        raise CheckpointError(
            f"preset {name!r} needs the checkpoint {repo}, which is not in the local Hugging Face cache. "
            f"Download it (`hf download {repo}`, huggingface_hub's CLI) or pass --weights DIR pointing at "
            "a local copy."
        ) from None


def read_config(path: Path) -> ModelConfig:
    try:
        d = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    try:
        return config_from_hf(d)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None


def checkpoint_files(path: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index or the single safetensors file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        for f in sorted(set(weight_map.values())):
            if not (path / f).exists():
                raise CheckpointError(f"{index} lists shard {f}, which is missing from {path}")
        return weight_map
    single = path / "model.safetensors"
    if single.exists():
        with _open_safetensors(single) as f:
            return {k: "model.safetensors" for k in f.keys()}
    other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {other}: convert them to safetensors)" if other else ""
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json{hint}")


@contextlib.contextmanager
def _open_safetensors(file: Path):
    """safe_open whose failures (empty, truncated or random bytes) are a CheckpointError naming the file."""
    from safetensors import safe_open
    try:
        with safe_open(str(file), "pt", device="cpu") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as e:          # noqa: BLE001 - SafetensorError, OSError, ...: the file is unreadable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{file} is not a readable safetensors file ({first}); the "
                              f"checkpoint is damaged or incomplete: download it again") from None


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = getattr(mod, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))
    else:
        mod._buffers[attr] = value


def load_weights(model: DiffusionLM, path: Path, dtype: torch.dtype, device="cpu", progress: bool = True,
                 plan: dict | None = None, desc: str = "loading weights") -> None:
    """``plan`` (tensor parallel, models/tensor_parallel.py): name -> the slice of the stored tensor this
    process holds, read with ``get_slice`` (the rest of the tensor is never read)."""
    from tqdm import tqdm

    from .tensor_parallel import read_slice

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weight_map = checkpoint_files(path)
    for name, fname in weight_map.items():
        if plan is not None:            # tensor parallel: tensors the shard lacks are other ranks' (experts)
            break
        if name not in expected and not name.endswith(IGNORED_SUFFIXES):
            raise CheckpointError(f"unexpected tensor {name!r} in {path / fname} "
                                  f"(not a parameter of the {model.config.family} model)")
    missing = [k for k in expected if k not in weight_map]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r}: not in {path} "
                              f"({len(missing)} missing in all; the checkpoint is incomplete)")
    by_file: dict[str, list[str]] = {}
    for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
    bar = tqdm(total=len(expected), desc=desc, unit="tensor", disable=not progress)
    for fname, names in sorted(by_file.items()):
        with _open_safetensors(path / fname) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"tensor {name!r} is listed for {path / fname} but that "
                                          "file lacks it")
                if name not in expected:
                    continue
                t = read_slice(f, name, (plan or {}).get(name))
                if tuple(t.shape) != expected[name]:
                    raise CheckpointError(f"tensor {name!r} in {path / fname} has shape {tuple(t.shape)}, "
                                          f"expected {expected[name]}")
                _set_tensor(model, name, t.to(device=device, dtype=dtype))
                bar.update(1)
    bar.close()


def load_model(model: str, weights: str | None = None, dtype=None, device="cpu", progress: bool = True,
               seed: int = 0, shard=None, desc: str = "loading weights") -> LoadedModel:
    """``shard(model, full) -> plan`` (tensor parallel): swaps the model's layers for this rank's shards
    before the weights load (``full``: a tiny preset's real weights, sliced in place) and returns the loading
    plan."""
    dtype = resolve_dtype(dtype, device)
    path = resolve_checkpoint_dir(model, weights)
    if path is None:  # tiny random preset
        cfg = preset_config(model)
        torch.manual_seed(seed)
        m = build_model(cfg)
        init_weights(m, seed, TINY_INIT_STD)
        if shard is not None:
            shard(m, True)
        m = m.to(device=device, dtype=dtype).eval()
        return LoadedModel(m, byte_tokenizer(), cfg, model, PRESETS[model]["chat"])
    cfg = read_config(path)
    with torch.device("meta"):
        m = build_model(cfg)
        plan = shard(m, False) if shard is not None else None
    load_weights(m, path, dtype, device, progress, plan, desc)
    m.eval()
    tok = load_tokenizer(path) if has_tokenizer(path) else None
    if tok is not None and not getattr(tok, "chat_template", None):    # e.g. LLaDA2's role template
        from . import FAMILIES
        tok.chat_template = getattr(FAMILIES[cfg.family]["module"], "CHAT_TEMPLATE", None)
    chat = PRESETS[model]["chat"] if model in PRESETS else bool(tok is not None and tok.chat_template)
    return LoadedModel(m, tok, cfg, str(path), chat)


TINY_INIT_STD = 0.25    # tiny-* presets: large enough that greedy outputs vary with the input (tests need
                        # decisive models: ordering and cache bugs must change the tokens)


def init_weights(model: DiffusionLM, seed: int = 0, std: float = 0.02) -> None:
    """Deterministic random init (normal, ``std``; std / sqrt(2 n_layers) on output projections;
    norms at 1)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.ndim == 1:
                p.copy_(torch.ones_like(p) if "norm" in name or name.endswith("ln_f.weight")
                        else torch.zeros_like(p))
            else:
                out = name.endswith(("attn_out.weight", "o_proj.weight", "down_proj.weight"))
                scale = std / math.sqrt(2 * model.config.n_layers) if out else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def save_checkpoint(model: DiffusionLM, path: str | Path, tokenizer=None, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json (the family's own HF keys) and model.safetensors, or shards + index when the
    weights exceed max_shard_bytes."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in sd.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        shards, cur, size = [], {}, 0
        for k, v in sd.items():
            nb = v.numel() * v.element_size()
            if cur and size + nb > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += nb
        shards.append(cur)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
