"""tests/shared_engines.py (the ``shared_engine`` fixture): a build is made once per key and run, in one
process and across processes (xdist workers), and the key holds everything the build reads. The builds are
fakes that record their calls: what is tested is the cache, not the compiler."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import shared_engines
from shared_engines import build_key, shared_engine

HERE = Path(__file__).resolve().parent


@pytest.fixture
def builds(monkeypatch):
    """The (model, backend, options) of every build this process makes; each writes an engine manifest."""
    calls = []

    def fake(model, target, out, backend, **options):
        calls.append((model, backend, options))
        Path(out).mkdir(parents=True)
        (Path(out) / "dlc_engine.json").write_text(json.dumps({"backend": backend}))
    monkeypatch.setattr(shared_engines, "_compile", fake)
    monkeypatch.setattr(shared_engines, "_BUILT", {})
    return calls


def test_a_build_is_made_once_per_key(tmp_path, builds, monkeypatch):
    a = shared_engine(tmp_path, "dlc-tiny", "aoti", block_length=4)
    assert shared_engine(tmp_path, "dlc-tiny", "aoti", block_length=4) == a
    monkeypatch.setattr(shared_engines, "_BUILT", {})            # another worker: only the disk is shared
    assert shared_engine(tmp_path, "dlc-tiny", "aoti", block_length=4) == a
    assert builds == [("dlc-tiny", "aoti", {"block_length": 4})]
    others = {shared_engine(tmp_path, "dlc-tiny", "aoti", block_length=8),
              shared_engine(tmp_path, "dlc-tiny", "export", block_length=4),
              shared_engine(tmp_path, "dlc-tiny-bd", "aoti", block_length=4),
              shared_engine(tmp_path, "dlc-tiny", "aoti", target="rtx4090", block_length=4)}
    assert len(others) == 4 and a not in others and len(builds) == 5
    assert json.loads((a / "dlc_engine.json").read_text()) == {"backend": "aoti"}


def test_an_interrupted_build_is_made_again(tmp_path, builds, monkeypatch):
    """A worker that died mid-build leaves a directory without its ``.done`` mark: the next one rebuilds."""
    a = shared_engine(tmp_path, "dlc-tiny", "onnx")
    (tmp_path / f"{a.name}.done").unlink()
    monkeypatch.setattr(shared_engines, "_BUILT", {})
    assert shared_engine(tmp_path, "dlc-tiny", "onnx") == a and len(builds) == 2


def test_checkpoint_directories_are_keyed_by_their_bytes(tmp_path):
    """Each worker writes its own copy of a test checkpoint: the same files at another path are one build,
    one changed byte another."""
    dirs = [tmp_path / "gw0" / "ckpt", tmp_path / "gw1" / "ckpt"]
    for d in dirs:
        (d / "sub").mkdir(parents=True)
        (d / "config.json").write_text('{"d_model": 64}')
        (d / "sub" / "model.safetensors").write_bytes(bytes(range(256)))
    assert build_key(dirs[0], "export", "cpu", {}) == build_key(dirs[1], "export", "cpu", {})
    (dirs[1] / "sub" / "model.safetensors").write_bytes(bytes(range(255)) + b"\0")
    assert build_key(dirs[0], "export", "cpu", {}) != build_key(dirs[1], "export", "cpu", {})


WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import shared_engines

    def slow_build(model, target, out, backend, **options):
        with open(Path(sys.argv[2]) / "builds.log", "a") as log:
            log.write(f"{model} {backend}\\n")
        time.sleep(1.0)                       # long enough for the other process to ask meanwhile
        Path(out).mkdir(parents=True)
        (Path(out) / "dlc_engine.json").write_text("{}")

    shared_engines._compile = slow_build
    print(shared_engines.shared_engine(Path(sys.argv[2]), "dlc-tiny", "aoti", block_length=4))
""")


def test_two_processes_asking_at_once_build_once(tmp_path):
    """Two xdist workers asking for one engine at the same time: the second waits for the first's build (the
    file lock) and gets its directory."""
    cmd = [sys.executable, "-c", WORKER, str(HERE), str(tmp_path)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert (tmp_path / "builds.log").read_text() == "dlc-tiny aoti\n"
    assert outs[0][0] == outs[1][0] and Path(outs[0][0].strip()).is_dir()
