import json
import os
from pathlib import Path

import pytest
import torch


def _threads() -> int:
    """Intra-op threads of a test process: 2, or the cores each xdist worker has (1 under .ci/run's two
    workers on 2 cores). Two workers of two OpenMP threads each on 2 cores ran a dlc-tiny eval ~10x slower
    than with one thread each (a parallel region waits for its thread that the other worker's threads keep
    off a core), so a worker and the processes its tests start (OMP_NUM_THREADS: CLI runs, bench scripts)
    keep to their share."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


torch.set_num_threads(_threads())
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads()))

# each test file's seconds on 2 cores (refresh it with .ci/file_seconds.py): xdist hands out the longest first
FILE_SECONDS = Path(__file__).with_name("file_seconds.json")


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):      # an xdist worker: its order is the order files are handed out in
        _longest_files_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _longest_files_first(items):
    """Longest-processing-time-first scheduling: with ``--dist loadfile --no-loadscope-reorder`` (.ci/run) a
    worker takes the next file in collection order, so sorting the files by their measured seconds (a file
    not in the table counts 0: it runs last; tests keep their order inside a file) stops a long file from
    starting last while the other worker idles."""
    seconds = json.loads(FILE_SECONDS.read_text()) if FILE_SECONDS.exists() else {}
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], 0.0))


@pytest.fixture(scope="module")
def decisive_tiny_llada():
    """tiny-llada (seed 1) with its LM head x12: decisive, confidences spread over (0, 1). A fresh model per
    test module (tests may change it)."""
    from dlc.models.loading import load_model
    m = load_model("tiny-llada", seed=1).model
    with torch.no_grad():
        m.head_weight().mul_(12.0)
    return m


@pytest.fixture(scope="session")
def shared_engine(tmp_path_factory):
    """``shared_engine(model, backend, target="cpu", **compile_model options) -> engine dir``: built once per
    run across files and xdist workers (tests/shared_engines.py). Read-only: a test that changes its engine
    directory builds its own."""
    from shared_engines import cache_root, shared_engine as build
    root = cache_root(tmp_path_factory)
    return lambda model, backend, **options: build(root, model, backend, **options)
