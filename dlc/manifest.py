"""Engine manifests: ``OUT_DIR/dlc_engine.json`` of a ``dlc compile`` build, and its validation on open.

An engine directory also holds the model's Hugging Face ``config.json`` and tokenizer files, so HF tooling
(``AutoTokenizer.from_pretrained(OUT_DIR)``) reads it as it reads the checkpoint; dlc's own description lives
in its own file, never under HF's keys (transformers would read ``dtype: "fp32"`` as a torch attribute).

The manifest records versions, target, dtype, model config (with mask/eos ids), build limits, the ordered
passes with their parameters and rewrite counts, per-phase files with input/output names, shapes (symbolic
dims named) and dtypes, the weights (``weights``: one ``weights.safetensors`` every phase program takes as
inputs, named ``w__*`` after its runtime inputs, in ``weight_inputs`` order), tokenizer files, compile timings
and artifact sizes, and ``settings_hash``: a sha256 of the engine-affecting settings. Every artifact file's
sha256 is recorded under its phase (``sha256``: file -> hex digest) and so covered by the settings hash.
``load_manifest`` refuses a damaged or mismatched directory with the reason, naming the file: wrong versions,
an edited manifest, a missing file, a file whose size or sha256 differs from the record (truncated,
overwritten, from another build).

Hashing a 16 GB engine takes about a minute, so a verified file's (size, mtime, digest) is remembered in
``$XDG_CACHE_HOME/dlc/verified.json`` (default ``~/.cache``): an unchanged file is hashed once.
``verify="full"`` (``dlc inspect --verify``) hashes everything again."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dlc

FORMAT = "dlc-engine"
MANIFEST = "dlc_engine.json"
FORMAT_VERSION = 3                     # 2: per-artifact sha256, dlc_engine.json beside an HF config.json
                                       # 3: weights once in weights.safetensors, K/V in the runtime's pool
HASHED = ("format_version", "backend", "runtime", "dtype", "target", "model", "build", "passes", "phases")


class EngineError(ValueError):
    """A damaged or mismatched engine directory."""


VERIFY_MODES = ("cached", "full", "off")
_CHUNK = 16 << 20


WEIGHTS_FILE = "weights.safetensors"    # the engine's one copy of the weights, read by every phase program
WEIGHT_PREFIX = "w__"                   # phase program inputs named so are weights (dlc.passes.lift_weights)
# the weight inputs a compiled runner decodes with itself (dlc.passes.chunk_logits names them): the LM head
# [>= V, d] of every engine, and the input embedding [>= V, d] of engines built with --decode-extras
HEAD_WEIGHT = WEIGHT_PREFIX + "lm_head_weight"
EMBED_WEIGHT = WEIGHT_PREFIX + "embed_weight"


def is_weight_input(name: str) -> bool:
    return name.startswith(WEIGHT_PREFIX)


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dlc" / "verified.json"


def _read_cache() -> dict:
    try:
        d = json.loads(_cache_path().read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _write_cache(d: dict) -> None:
    try:
        p = _cache_path()
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(d))
        tmp.replace(p)
    except OSError:                         # a read-only home: verify every time instead
        pass


def artifact_sha256(path, verify: str = "cached") -> str:
    """sha256 of ``path``; with ``cached``, a file whose (size, mtime) is unchanged since it was last hashed
    here is not read again."""
    p = Path(path).resolve()
    st = p.stat()
    key, stamp = str(p), [st.st_size, st.st_mtime_ns]
    cache = _read_cache() if verify == "cached" else {}
    hit = cache.get(key)
    if hit and hit[:2] == stamp:
        return hit[2]
    digest = file_sha256(p)
    cache = _read_cache()
    cache[key] = stamp + [digest]
    _write_cache(cache)
    return digest


def settings_hash(m: dict) -> str:
    settings = {k: m.get(k) for k in HASHED}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def versions() -> dict:
    import torch
    return {"dlc": dlc.__version__, "torch": torch.__version__}


def write_manifest(out: Path, m: dict) -> Path:
    m = {"format": FORMAT, "format_version": FORMAT_VERSION, **versions(), **m}
    m["settings_hash"] = settings_hash(m)
    path = Path(out) / MANIFEST
    path.write_text(json.dumps(m, indent=2, default=str))
    return path


def is_engine_dir(path) -> bool:
    """A directory with a dlc engine manifest (a damaged one too: opening it reports what is wrong)."""
    p = Path(path) / MANIFEST
    try:
        text = p.read_text()
    except OSError:
        return False
    try:
        return json.loads(text).get("format") == FORMAT
    except (json.JSONDecodeError, AttributeError):
        return f'"{FORMAT}"' in text


def read_manifest(path) -> dict:
    p = Path(path) / MANIFEST
    if not p.exists():
        raise EngineError(f"{path} is not an engine directory: {MANIFEST} is missing")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise EngineError(f"{p} is not valid JSON ({e}): the engine directory is damaged") from None
    if m.get("format") != FORMAT:
        raise EngineError(f"{p} is not a dlc engine manifest (format {m.get('format')!r}, "
                          f"expected {FORMAT!r})")
    return m


def validate_manifest(path, m: dict, check_versions: bool = True, verify: str = "cached") -> None:
    """Raise EngineError naming the first problem: format version, dlc/torch versions, settings hash, files
    (present, recorded size, recorded sha256 unless ``verify="off"``)."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
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
        raise EngineError(f"{path}: settings hash mismatch ({MANIFEST} says {m.get('settings_hash')}, its "
                          f"settings hash to {h}): {MANIFEST} was edited or damaged; recompile")
    if not isinstance(m.get("weights"), dict):
        raise EngineError(f"{path}: {MANIFEST} records no weights file; recompile with `dlc compile`")
    for phase, spec in [*(m.get("phases") or {}).items(), ("weights", m["weights"])]:
        for f in [spec["file"]] + spec.get("extra_files", []):
            fp = path / f
            if not fp.exists():
                raise EngineError(f"{path}: the {phase} artifact {f} is missing; the engine "
                                  "directory is damaged")
            size = spec.get("bytes", {}).get(f)
            if size is not None and fp.stat().st_size != size:
                raise EngineError(f"{path}: {f} has {fp.stat().st_size} bytes, {MANIFEST} recorded {size}: "
                                  f"the artifact is damaged or from another build")
            want = spec.get("sha256", {}).get(f)
            if want is None:
                raise EngineError(f"{path}: {MANIFEST} records no sha256 for {f}; recompile with "
                                  "`dlc compile`")
            if verify != "off" and artifact_sha256(fp, verify) != want:
                raise EngineError(f"{path}: {f} does not match the sha256 in {MANIFEST}: the "
                                  f"artifact is damaged or from another build; recompile with `dlc compile`")
    if not m.get("phases"):
        raise EngineError(f"{path}: {MANIFEST} lists no phase artifacts")


def load_manifest(path, check_versions: bool = True, verify: str = "cached") -> dict:
    m = read_manifest(path)
    validate_manifest(path, m, check_versions, verify)
    check_program_shapes(path, m)
    return m


KV_NAMES = ("k", "v", "k_new", "v_new", "k_pool", "v_pool")    # [n_layers, B or P, n_kv_heads, S, head_dim]


def check_program_shapes(path, m: dict, config=None) -> None:
    """The K/V shapes each program records against the model config (``config``: a ModelConfig, default the
    manifest's model section), so an edited config whose settings hash was recomputed is refused at load, not
    at the first request."""
    c = config.__dict__ if config is not None else (m.get("model") or {})
    try:
        want = [c["n_layers"], None, c["n_kv_heads"], None,
                c.get("attn_head_dim") or c["d_model"] // c["n_heads"]]      # explicit head_dim (Qwen3, SDAR)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise EngineError(f"{path}: {MANIFEST} has no usable model config ({e!r})") from None
    for ph, spec in (m.get("phases") or {}).items():
        for io in ("inputs", "outputs"):
            for t in spec.get(io) or []:
                if t.get("name") not in KV_NAMES:
                    continue
                shape = t.get("shape") or []
                if len(shape) != 5 or any(w is not None and d != w for d, w in zip(shape, want)):
                    dims = ", ".join("*" if w is None else str(w) for w in want)
                    raise EngineError(f"{path}: the {ph} program's {t['name']} {io[:-1]} has shape "
                                      f"{shape}, but the model config in {MANIFEST} gives [{dims}] "
                                      "(n_layers, batch, n_kv_heads, columns, head_dim): the manifest does "
                                      f"not describe these programs; recompile with `dlc compile`")


def summary_lines(m: dict) -> list[str]:
    """The `dlc inspect` summary."""
    mc = m.get("model", {})
    b = m.get("build", {})
    lines = [f"engine      {m.get('backend')} (runtime {m.get('runtime')}), dlc {m.get('dlc')}, torch "
             f"{m.get('torch')}",
             f"target      {m.get('target', {}).get('name')} ({m.get('target', {}).get('arch')}), dtype "
             f"{m.get('dtype')}",
             f"model       {m.get('source')}: {mc.get('family')} d_model {mc.get('d_model')} layers "
             f"{mc.get('n_layers')} heads {mc.get('n_heads')}/{mc.get('n_kv_heads')} vocab "
             f"{mc.get('vocab_size')} mask {mc.get('mask_id')} eos {mc.get('eos_id')}",
             f"limits      batch {b.get('max_batch_size')} seq {b.get('max_seq_len')} block "
             f"{b.get('block_length')} logit chunk {b.get('logit_chunk')}",
             "passes      " + ", ".join(f"{p['name']}{p.get('params') or ''}" for p in m.get("passes", []))]
    if b.get("moe"):
        how = "grouped GEMMs over routed tokens" if b["moe"] == "fused" else "every expert on every token"
        lines.append(f"moe         {b['moe']} ({how})")
    w = m.get("weights") or {}
    if w:
        lines.append(f"weights     {w.get('file')} ({sum(w.get('bytes', {}).values()) / 1e6:.2f} MB, "
                     f"{w.get('tensors')} tensors, once for every phase; K/V "
                     f"{'written in place' if b.get('kv_inplace') else 'returned'} to the runtime's pool)")
    for phase, spec in m.get("phases", {}).items():
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in spec["inputs"])
        outs = ", ".join(f"{o['name']}{o['shape']}" for o in spec["outputs"])
        size = sum(spec.get("bytes", {}).values())
        n_w = len(spec.get("weight_inputs", []))
        lines.append(f"phase {phase:<6} {spec['file']} ({size / 1e6:.2f} MB)\n  in:  {ins} + {n_w} weights\n"
                     f"  out: {outs}")
    if m.get("pending"):
        lines.append(f"pending     {m['pending']}")
    if m.get("tensorrt"):
        for phase, cmd in m["tensorrt"].get("trtexec", {}).items():
            lines.append(f"trtexec [{phase}] {cmd}")
    if m.get("compile_seconds"):
        lines.append("compile     " + ", ".join(f"{k} {v:.1f}s" for k, v in m["compile_seconds"].items()))
    lines.append(f"hash        {m.get('settings_hash')}")
    return lines
