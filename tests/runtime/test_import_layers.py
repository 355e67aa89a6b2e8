"""Import layering: the runtime never imports the compiler or the passes, and the models and kernels never
import the runtime, the compiler or the passes (no import cycle between the layers: docs/DEVELOPING.md).

Each package (every module under it, found by ``pkgutil.walk_packages``) is imported in a fresh interpreter
whose ``sys.meta_path`` starts with a finder that records every forbidden module being imported and the
repository frame that imported it; the child prints the records as JSON. A recording finder (it finds
nothing, so the import goes on) rather than one that raises: an ``ImportError`` could be swallowed by an
optional import's ``except ImportError`` and hide the edge. Serving and training (``dlc.tiny.train``) are
imported the same way. The static check reads every runtime source for a top-level or local
``import dlc.compiler`` / ``dlc.passes`` (one inside a function would cycle at call time)."""
import json
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
UPPER = ("dlc.runtime", "dlc.compiler", "dlc.passes")

CHILD = r'''
import importlib, importlib.abc, json, pkgutil, sys, traceback
forbidden, seen = tuple(sys.argv[2].split(",")), []

class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(forbidden) and name not in sys.modules:
            frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
            seen.append((name, f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"))
        return None

sys.meta_path.insert(0, Recorder())
for root in sys.argv[1].split(","):
    pkg = importlib.import_module(root)
    for m in pkgutil.walk_packages(getattr(pkg, "__path__", []), root + "."):
        importlib.import_module(m.name)
print(json.dumps(seen))
'''


def imported(roots: list[str], forbidden: tuple[str, ...]) -> list:
    """(forbidden module, importing frame) for each forbidden import while ``roots`` and every module under
    them import in a fresh interpreter."""
    r = subprocess.run([sys.executable, "-c", CHILD, ",".join(roots), ",".join(forbidden)],
                       capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("root", ["dlc.runtime", "dlc.tiny.train"])
def test_runtime_never_imports_the_compiler_or_passes(root):
    """Serving (every runtime module: engine, server, runners, distributed) and training import no compiler
    or pass module: the runtime owns engine loading (runners/engine_dir.py), the compiler only writes engine
    directories."""
    assert imported([root], ("dlc.compiler", "dlc.passes")) == []


def test_models_and_kernels_never_import_the_layers_above():
    assert imported(["dlc.models", "dlc.kernels"], UPPER) == []


def test_the_recorder_sees_a_forbidden_import():
    """The check itself: the compiler's build module imports the passes at its top, and the recorder names
    that import and its line (so an empty list above means something)."""
    seen = imported(["dlc.compiler.build"], ("dlc.passes",))
    assert ["dlc.passes", "dlc.passes.pipeline"] == [name for name, _ in seen[:2]], seen
    assert seen[0][1].startswith(str(ROOT / "dlc" / "compiler" / "build.py") + ":"), seen


def test_no_runtime_source_imports_the_compiler():
    pat = re.compile(r"^\s*(from|import)\s+(dlc\.compiler|dlc\.passes)", re.M)
    bad = [str(f) for f in (ROOT / "runtime").rglob("*.py") if pat.search(f.read_text())]
    assert bad == []
