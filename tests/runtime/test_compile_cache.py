"""An export engine compiled at load keeps Inductor's code in its directory (runtime/compile_cache.py): a
second open on a "fresh machine" (an empty Inductor cache directory, Dynamo reset) finds every graph it
compiles in the engine's cache file instead of generating it, and serves the same tokens; a later start that
compiles a new shape adds it to the file, keeping what it did not use."""
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from dlc.runtime.compile_cache import CACHE_DIR, _chunks, device_key
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.session import open_model

PROMPTS = [[5, 17, 99, 3]]
PARAMS = dict(gen_length=8, block_length=8, steps=8)


def _fresh_machine(monkeypatch, cache_dir) -> None:
    """What a new container has: no Inductor cache on disk, nothing compiled in memory."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache_dir))
    torch._dynamo.reset()
    counters.clear()


def _serve(engine_dir, **cfg) -> tuple[Engine, list[list[int]]]:
    """Two request sets, the cache saved between them (as after a warm-up, then at shutdown): two chunks."""
    eng = Engine(open_model(str(engine_dir), device="cpu", progress=False),
                 ServeConfig(model="x", device="cpu", max_batch_size=2, max_seq_len=32, kv_cache_mb=8,
                             compile=True, **cfg))
    out = eng.generate(PROMPTS, PARAMS)                    # compiles what it runs (no warm-up: fewer graphs)
    eng.compile_cache.save()
    out += eng.generate([list(range(3, 17))], PARAMS)      # a longer Refresh: compiled once more
    eng.shutdown()
    return eng, out


def _keys(cache_file) -> set[tuple[str, str]]:
    """(kind, key) of every artifact the cache file holds."""
    return {(kind, a.key) for kind, arts in _chunks(cache_file.read_bytes()) for a in arts}


@pytest.fixture
def engine_dir(shared_engine, tmp_path):
    d = tmp_path / "engine"                                # the shared engine is read-only: a copy
    shutil.copytree(shared_engine("tiny-llada", "export"), d)
    return d


def test_a_fresh_open_loads_the_engines_compiled_code_and_serves_the_same_tokens(engine_dir, tmp_path,
                                                                              monkeypatch):
    _fresh_machine(monkeypatch, tmp_path / "inductor-1")
    first, tokens = _serve(engine_dir)
    cache = engine_dir / CACHE_DIR / f"{device_key(torch.device('cpu'))}.bin"
    assert cache.is_file() and first.compile_cache.saved > 0 and first.compile_cache.loaded == 0
    assert counters["inductor"]["fxgraph_cache_miss"] > 0                 # it compiled
    assert len({t for out in tokens for t in out}) > 1                     # a decisive model

    _fresh_machine(monkeypatch, tmp_path / "inductor-2")
    second, again = _serve(engine_dir)
    assert second.compile_cache.loaded == first.compile_cache.saved        # both chunks, not the last
    assert counters["inductor"]["fxgraph_cache_hit"] > 0
    assert counters["inductor"]["fxgraph_cache_miss"] == 0                 # nothing generated again
    assert again == tokens

    before = _keys(cache)
    _fresh_machine(monkeypatch, tmp_path / "inductor-3")     # a start serving a new shape (two rows at once)
    third = Engine(open_model(str(engine_dir), device="cpu", progress=False),
                   ServeConfig(model="x", device="cpu", max_batch_size=2, max_seq_len=32, kv_cache_mb=8,
                               compile=True))
    third.generate(PROMPTS + [[9, 10]], PARAMS)
    third.shutdown()
    assert counters["inductor"]["fxgraph_cache_miss"] > 0                  # it compiled that shape
    after = _keys(cache)
    assert before < after                       # the file keeps the code this start did not use, adds the new
    assert third.compile_cache.saved == len(after)


def test_only_compiled_export_engines_with_the_flag_keep_a_cache(engine_dir):
    """``--no-compile-cache`` (ServeConfig.compile_cache) and programs run interpreted keep none."""
    session = open_model(str(engine_dir), device="cpu", progress=False)

    def cache_of(**cfg):                  # in this order: compile=True leaves the session's runner compiled
        sc = ServeConfig(model="x", device="cpu", max_batch_size=2, max_seq_len=32, kv_cache_mb=8, **cfg)
        return Engine(session, sc).compile_cache
    assert cache_of(compile=False) is None
    assert cache_of(compile=True, compile_cache=False) is None
    assert cache_of(compile=True) is not None


def test_merged_payloads_keep_every_key_once_the_later_content_winning():
    """``_merge`` (a save over an existing file): the file's artifacts a start did not use stay, new ones are
    added, one artifact per key (the later payload's content), one chunk per kind."""
    from torch.compiler._cache import CacheArtifactFactory, CacheArtifactManager, _serialize_single_cache
    from torch.utils._appending_byte_serializer import AppendingByteSerializer
    CacheArtifactManager._ensure_cache_artifacts_registered()          # what a fresh process does first

    from dlc.runtime.compile_cache import _merge

    def payload(*chunks):
        ser = AppendingByteSerializer(serialize_fn=_serialize_single_cache)
        ser.extend((kind, [CacheArtifactFactory.create(kind, k, c) for k, c in arts])
                   for kind, arts in chunks)
        return ser.to_bytes()
    old = payload(("inductor", [("g1", b"a"), ("g2", b"b")]), ("inductor", [("g3", b"c")]))   # two chunks
    new = payload(("inductor", [("g2", b"B"), ("g4", b"d")]), ("aot_autograd", [("a1", b"x")]))
    data, n = _merge(old, new)
    chunks = _chunks(data)
    assert n == 5 and sorted(kind for kind, _ in chunks) == ["aot_autograd", "inductor"]
    got = {(kind, a.key): a.content for kind, arts in chunks for a in arts}
    assert got == {("inductor", "g1"): b"a", ("inductor", "g2"): b"B", ("inductor", "g3"): b"c",
                   ("inductor", "g4"): b"d", ("aot_autograd", "a1"): b"x"}
