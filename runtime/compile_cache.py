"""Inductor's code for an export engine, kept in the engine directory (a portable compile cache).

An export engine's phase programs are compiled by Inductor when the engine is opened (``CompiledRunner.
enable_compile``, the CUDA default): Dynamo traces, AOTAutograd and Inductor lower, and Triton (or the C++
compiler) builds kernels, every start of a fresh machine or container (measured at LLaDA-MoE-7B on an H200:
36-49 s of warm-up, against 13-19 s for the runtime path; bench/RESULTS.md). Inductor's own on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``, /tmp by default) only helps a restart on the same machine. torch's portable
cache artifacts (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``: the FX graph, AOTAutograd
and autotuning entries with the compiled kernels) carry it with the engine: after the warm-up (and again at
shutdown, with the shapes served since) the engine writes them to ``compile_cache/<device>-torch<ver>.bin``
in its directory, and the next open loads them before its first compile, so Inductor finds its code instead
of generating it. The file is keyed by the device and the torch version, so another GPU or torch version
compiles as before; a directory that cannot be written (read-only deployments) is left as it is. The
artifacts are code for this process's compiles, so they change no value: the same programs run.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger("dlc.runtime")

CACHE_DIR = "compile_cache"


def device_key(device: torch.device) -> str:
    """``<device name>-torch<version>`` in file-name characters (the artifacts' validity: one GPU model, one
    torch build)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}-torch{torch.__version__}")


class CompileCache:
    """The cache file of one engine directory on one device: ``load`` before the first compile, ``save``
    after compiles (the file's artifacts and the process's, written where that is more than the file held)."""

    def __init__(self, engine_dir: Path, device: torch.device):
        self.file = Path(engine_dir) / CACHE_DIR / f"{device_key(device)}.bin"
        self.loaded = 0                                   # artifacts loaded from the file
        self.saved = 0                                    # artifacts the file holds after the last save

    @classmethod
    def for_engine(cls, source: str, runner) -> "CompileCache | None":
        """The cache of an export engine directory whose programs are compiled at load; None otherwise (an
        eager checkpoint, an engine run interpreted, AOTI / ONNX / TensorRT code)."""
        path = Path(str(source)).expanduser()
        if not getattr(runner, "compiled", False) or not (path / "dlc_engine.json").is_file():
            return None
        return cls(path, runner.device)

    def load(self) -> int:
        """Load the file's artifacts into this process's Inductor caches -> how many (0: no file, or one
        torch refuses: then the programs compile as without it)."""
        if not self.file.is_file():
            return 0
        try:
            info = _load_all(self.file.read_bytes())
        except Exception as e:             # noqa: BLE001 - a stale or damaged cache only costs the compile
            log.warning("compile cache %s not used: %s", self.file, str(e).splitlines()[0][:160])
            return 0
        self.loaded = self.saved = _count(info)
        log.info("compile cache: %d artifacts loaded from %s", self.loaded, self.file)
        return self.loaded

    def save(self) -> int:
        """Write the file's artifacts and this process's together (a start that compiled new shapes adds
        them; one that used only some of the file's keeps the rest) -> how many the file holds now (0:
        nothing new, or the directory cannot be written)."""
        try:
            got = torch.compiler.save_cache_artifacts()
        except Exception as e:             # noqa: BLE001 - saving is best effort, serving goes on
            log.debug("compile cache: nothing saved: %s", e)
            return 0
        if got is None:
            return 0
        data, n = got[0], _count(got[1])
        if self.file.is_file():
            try:
                data, n = _merge(self.file.read_bytes(), data)
            except (ImportError, AttributeError, TypeError) as e:    # torch's layout differs: more wins
                log.debug("compile cache: no merge: %s", e)
            except Exception as e:         # noqa: BLE001 - a damaged file: this process's artifacts replace it
                log.warning("compile cache %s unreadable, rewritten: %s", self.file, str(e)[:160])
        if n <= self.saved:
            return 0
        tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
        try:
            self.file.parent.mkdir(exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.file)                   # readers see the old file or the new one
        except OSError as e:
            log.debug("compile cache: %s not written: %s", self.file, e)
            tmp.unlink(missing_ok=True)
            return 0
        self.saved = n
        log.info("compile cache: %d artifacts (%.1f MB) written to %s", n, len(data) / 2**20, self.file)
        return n


def _chunks(data: bytes) -> list:
    """[(kind, [artifact])] of every chunk of a payload (torch's private serializer)."""
    from torch.compiler._cache import AppendingByteSerializer, CacheArtifactManager, _deserialize_single_cache
    CacheArtifactManager._ensure_cache_artifacts_registered()
    return AppendingByteSerializer.to_list(data, deserialize_fn=_deserialize_single_cache)


def _by_kind(*payloads: bytes) -> dict[str, dict]:
    """{kind: {key: artifact}} over every chunk of ``payloads``: each key once, a later chunk's or payload's
    artifact replacing an earlier one of the same key."""
    merged: dict[str, dict] = {}
    for data in payloads:
        for kind, artifacts in _chunks(data):
            merged.setdefault(kind, {}).update((a.key, a) for a in artifacts)
    return merged


def _merge(*payloads: bytes) -> tuple[bytes, int]:
    """One payload of every artifact of ``payloads`` (``_by_kind``; one chunk per kind) -> (bytes,
    artifacts)."""
    from torch.compiler._cache import _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer
    merged = _by_kind(*payloads)
    out = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
    out.extend((kind, list(arts.values())) for kind, arts in merged.items())
    return out.to_bytes(), sum(len(a) for a in merged.values())


def _load_all(data: bytes):
    """``torch.compiler.load_cache_artifacts`` over every chunk of ``data``. Each ``save_cache_artifacts``
    call appends a chunk per kind of artifact (the ones new since the last call) to one growing payload, and
    the public loader reads the chunks into a dict by kind, so only the last chunk of each kind loads (torch
    2.13: a file saved after the warm-up and again at shutdown loaded 6 of its 9 graphs). This merges the
    chunks of a kind first (``_by_kind``); where torch's private layout differs it falls back to the public
    loader."""
    try:
        from torch.compiler._cache import CacheArtifactManager
        merged = {kind: list(arts.values()) for kind, arts in _by_kind(data).items()}
    except (ImportError, AttributeError, TypeError) as e:
        log.debug("compile cache: torch's loader (no chunk merge): %s", e)
        return torch.compiler.load_cache_artifacts(data)
    return CacheArtifactManager.populate_caches(merged)


def _count(info) -> int:
    """Artifacts in a ``CacheInfo`` (its ``artifacts``: kind -> keys)."""
    return sum(len(v) for v in getattr(info, "artifacts", {}).values())
