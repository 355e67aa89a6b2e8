"""Engine manifests: ``OUT_DIR/config.json`` of a ``dlc compile`` build, and its validation on open.

The manifest records versions, target, dtype, model config (with mask/eos ids), build limits, the ordered
passes with their parameters and rewrite counts, per-phase files with input/output names, shapes (symbolic
dims named) and dtypes, tokenizer files, compile timings and artifact sizes, and ``settings_hash``: a sha256 of
the engine-affecting settings. ``load_manifest`` refuses a damaged or mismatched directory with the reason."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import dlc

FORMAT = "dlc-engine"
FORMAT_VERSION = 1
HASHED = ("format_version", "backend", "runtime", "dtype", "target", "model", "build", "passes", "phases")


class EngineError(ValueError):
    """A damaged or mismatched engine directory."""


def settings_hash(m: dict) -> str:
    settings = {k: m.get(k) for k in HASHED}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict:
    import torch
    return {"dlc": dlc.__version__, "torch": torch.__version__}


def write_manifest(out: Path, m: dict) -> Path:
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, **versions(), **m}
    m["settings_hash"] = settings_hash(m)
    path = Path(out) / "config.json"
    path.write_text(json.dumps(m, indent=2, default=str))
    return path


def read_manifest(path) -> dict:
    p = Path(path) / "config.json"
    if not p.exists():
        raise EngineError(f"{path} is not an engine directory: config.json is missing")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{p} is not valid JSON ({e}): the engine directory is damaged") from None
    if m.get("format") != FORMAT:
        raise EngineError(f"{p} is not a dlc engine manifest (format {m.get('format')!r}, expected {FORMAT!r})")
    return m


def validate_manifest(path, m: dict, check_versions: bool = True) -> None:
    """Raise EngineError naming the first problem: format version, dlc/torch versions, settings hash, files."""
    path = Path(path)
    if m.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: engine format version {m.get('format_version')} is not supported "
                          f"(this dlc reads version {FORMAT_VERSION}); recompile with `dlc compile`")
    if check_versions:
        for k, have in versions().items():
            if m.get(k) != have:
                raise EngineError(f"{path}: built with {k} {m.get(k)}, but this is {k} {have}; "
                                  f"recompile the engine with this version (`dlc compile`)")
    h = settings_hash(m)
    if m.get("settings_hash") != h:
        raise EngineError(f"{path}: settings hash mismatch (config.json says {m.get('settings_hash')}, its "
                          f"settings hash to {h}): config.json was edited or damaged; recompile")
    for phase, spec in (m.get("phases") or {}).items():
        for f in [spec["file"]] + spec.get("extra_files", []):
            fp = path / f
            if not fp.exists():
                raise EngineError(f"{path}: the {phase} artifact {f} is missing; the engine directory is damaged")
            size = spec.get("bytes", {}).get(f)
            if size is not None and fp.stat().st_size != size:
                raise EngineError(f"{path}: {f} has {fp.stat().st_size} bytes, config.json recorded {size}: "
                                  f"the artifact is damaged or from another build")
    if not m.get("phases"):
        raise EngineError(f"{path}: config.json lists no phase artifacts")


def load_manifest(path, check_versions: bool = True) -> dict:
    m = read_manifest(path)
    validate_manifest(path, m, check_versions)
    return m


def summary_lines(m: dict) -> list[str]:
    """The `dlc inspect` summary."""
    mc = m.get("model", {})
    b = m.get("build", {})
    lines = [f"engine      {m.get('backend')} (runtime {m.get('runtime')}), dlc {m.get('dlc')}, torch {m.get('torch')}",
             f"target      {m.get('target', {}).get('name')} ({m.get('target', {}).get('arch')}), dtype {m.get('dtype')}",
             f"model       {m.get('source')}: {mc.get('family')} d_model {mc.get('d_model')} layers {mc.get('n_layers')} "
             f"heads {mc.get('n_heads')}/{mc.get('n_kv_heads')} vocab {mc.get('vocab_size')} "
             f"mask {mc.get('mask_id')} eos {mc.get('eos_id')}",
             f"limits      batch {b.get('max_batch_size')} seq {b.get('max_seq_len')} block {b.get('block_length')} "
             f"logit chunk {b.get('logit_chunk')}",
             "passes      " + ", ".join(f"{p['name']}{p.get('params') or ''}" for p in m.get("passes", []))]
    for phase, spec in m.get("phases", {}).items():
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in spec["inputs"])
        outs = ", ".join(f"{o['name']}{o['shape']}" for o in spec["outputs"])
        size = sum(spec.get("bytes", {}).values())
        lines.append(f"phase {phase:<6} {spec['file']} ({size / 1e6:.2f} MB)\n  in:  {ins}\n  out: {outs}")
    if m.get("pending"):
        lines.append(f"pending     {m['pending']}")
    if m.get("tensorrt"):
        for phase, cmd in m["tensorrt"].get("trtexec", {}).items():
            lines.append(f"trtexec [{phase}] {cmd}")
    if m.get("compile_seconds"):
        lines.append("compile     " + ", ".join(f"{k} {v:.1f}s" for k, v in m["compile_seconds"].items()))
    lines.append(f"hash        {m.get('settings_hash')}")
    return lines
