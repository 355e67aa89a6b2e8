"""One build per test run of an engine that several tests compile the same way (tests/conftest.py's
``shared_engine`` fixture).

Engine builds are the suite's slowest steps (a CPU AOTInductor build ~1-1.5 min on 2 cores, an ONNX or
export build 10-25 s). A build is a pure function of what it reads (the model's files or preset name, the
backend, target and options) and the code doing the build, which cannot change during one run; so tests
that ask for the same build get the same directory:

* in one pytest process through a dict;
* across the xdist workers of one run (``.ci/run``'s two) through a directory both see, under the parent of
  the workers' base temp dirs (pytest's own per-run directory), with a file lock per build: the first worker
  to ask builds, a second one waits for it instead of building the same thing on the other core.

Shared engines are read-only: a test that writes into its engine directory (recompiles it, damages a
file) builds its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from filelock import FileLock          # a dependency of torch: always installed with it

_BUILT: dict[str, Path] = {}


def cache_root(tmp_path_factory) -> Path:
    """The directory every process of this run sees: with xdist each worker's base temp is
    ``pytest-N/popen-gwK``, so their parent ``pytest-N`` (made for this run); without xdist the base temp
    itself (its parent, ``pytest-of-USER``, outlives the run: a later run must not read stale builds)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-engines"
    root.mkdir(parents=True, exist_ok=True)
    return root


def model_key(model) -> str:
    """A preset or bundled model's name, or a checkpoint directory's contents (each worker writes its own
    copy of a test checkpoint at its own path: the same bytes are the same build)."""
    path = Path(str(model))
    if not path.is_dir():
        return str(model)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes())
    return "dir:" + digest.hexdigest()


def build_key(model, backend: str, target: str, options: dict) -> str:
    what = json.dumps([model_key(model), backend, target, sorted(options.items())], default=str)
    return f"{backend}-{hashlib.sha256(what.encode()).hexdigest()[:16]}"


def _compile(model: str, target: str, out: str, backend: str, **options) -> None:
    from dlc.compiler.build import compile_model
    compile_model(model, target, out, backend=backend, echo=lambda *a, **k: None, **options)


def shared_engine(root: Path, model, backend: str, target: str = "cpu", **options) -> Path:
    """The engine directory of ``compile_model(model, target, OUT, backend=backend, **options)``, built
    once per run. A ``KEY.done`` file next to the directory marks a finished build (a worker that died
    mid-build leaves none: the next one starts over)."""
    key = build_key(model, backend, target, options)
    if key in _BUILT:
        return _BUILT[key]
    out, done = root / key, root / f"{key}.done"
    with FileLock(str(root / f"{key}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            _compile(str(model), target, str(out), backend=backend, **options)
            done.write_text(json.dumps({"model": str(model), "backend": backend, "target": target,
                                        "options": options}, default=str))
    _BUILT[key] = out
    return out
