"""--compile at every batch bucket: the graph runner's warm-up over the GPU default bucket list on CPU.

``capture=False`` runs the same static-buffer step as the GPU without capture, so warm-up compiles exactly
what it would before capturing. The Dynamo frontend (backend "eager") decides the recompilations; Inductor
is checked by the slow test."""
import pytest
import torch
from torch._dynamo.utils import counters

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.graph import BUCKETS, GraphRunner
from dlc.runtime.session import Session, open_model
from dlc.runtime.step import MixedBatch, run_mixed
from test_mixed_packed import mix  # noqa: E402 (tests/runtime is on sys.path under pytest's rootdir)

MAX_BATCH = 64            # ServeConfig.max_batch_size's default: buckets 1 .. 64 (9 of them)


def _warm(compile, fed=(8, 8)):
    torch._dynamo.reset()
    counters.clear()
    model = open_model("tiny-llada", progress=False).runner.model
    kv = KVCacheManager(model.config, 48, 1 << 40, torch.float32, "cpu", max_slots=2 * MAX_BATCH + 1)
    gr = GraphRunner(model, decode="exact", compile=compile, pool_attention=True, fuse=True, buckets=BUCKETS)
    gr.bind_pool(kv)
    gr._warm_eager = lambda blk: None            # count the bucketed Reuse step's compilations alone
    gr.warmup([fed], MAX_BATCH)
    return gr, counters["stats"]["unique_graphs"]


def test_warmup_compiles_once_for_every_bucket():
    """The GPU default path (pool attention, fused projections, exact decode) at buckets 1 .. 64: warm-up
    runs each bucket, and the blocks compile twice (static first bucket, then a dynamic batch dimension),
    not once per bucket (9 here, over Dynamo's limit of 8 with fullgraph: FailOnRecompileLimitHit)."""
    gr, compiles = _warm("eager")
    buckets = [b for b in BUCKETS if b <= MAX_BATCH]
    assert len(buckets) > 8
    assert sorted(k[0] for k in gr.graphs) == buckets
    assert 1 <= compiles <= 2, compiles


@pytest.mark.slow
def test_warmup_with_inductor():
    """Inductor itself (``--compile``'s backend): every bucket warms with at most two compiled graphs."""
    gr, compiles = _warm(True)
    assert 1 <= compiles <= 2, compiles


def test_packed_mixed_iterations_compile_twice_over_many_mixes():
    """``mix_iterations="compiled"``: twelve different mixed iterations (1-3 Refresh rows of various lengths,
    2-9 Reuse rows, dual and prefix caches; 70 to 240 packed tokens over four token buckets) compile the
    packed kind at most twice (static, then the token dimension symbolic), never once per mix."""
    torch._dynamo.reset()
    counters.clear()
    model = open_model("tiny-llada", progress=False).runner.model
    kv = KVCacheManager(model.config, 64, 1 << 40, torch.float32, "cpu", max_slots=16)
    gr = GraphRunner(model, decode="exact", compile="eager", pool_attention=True, fuse=True,
                     mix_iterations="compiled")
    gr.bind_pool(kv)
    g = torch.Generator().manual_seed(3)
    sizes = set()
    for i in range(12):
        lens = [int(x) for x in torch.randint(2, 30, (1 + i % 3,), generator=g)]
        parts = mix(gr, kv, lens, 2 + (7 * i) % 8, ("dual", "prefix")[i % 2], seed=i)
        sizes.add(sum(b.n_seqs * (b.n_fed if b.phase == "reuse" else b.width) for b in parts))
        run_mixed(gr, MixedBatch(tuple(parts)))
    assert gr.stats["mixed_packed"] == 12 and len(sizes) >= 10
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, counters["stats"]["unique_graphs"]


def _compiled_engine(mix_iterations=None):
    """A fresh Dynamo state and an engine over tiny-llada whose graph runner compiles its blocks (eager
    backend: Dynamo's guards and recompiles without Inductor's cost)."""
    torch._dynamo.reset()
    counters.clear()
    sess = open_model("tiny-llada", progress=False)
    gr = GraphRunner(sess.runner.model, decode="exact", compile="eager", pool_attention=True, fuse=True,
                     mix_iterations=mix_iterations)
    eng = Engine(Session(gr, sess.tokenizer, sess.config, sess.chat, sess.source),
                 ServeConfig(max_seq_len=96, max_batch_size=8, gen_length=16, block_length=8, steps=16))
    return gr, eng


def test_mixed_traffic_through_compiled_blocks_never_fails():
    """Compiled blocks also run Refresh, full forwards and the eager Reuse fallbacks (T > 0 with guidance,
    which no captured variant holds) at many shapes:
    more guard variants than Dynamo's default limit of 8 holds; no request may fail on it."""
    gr, eng = _compiled_engine()
    g = torch.Generator().manual_seed(0)
    reqs = []
    mix = [(3, "dual", 0.0, 16), (17, "prefix", 0.0, 32), (40, "none", 0.0, 8), (9, "dual", 0.7, 24),
           (1, "none", 0.7, 16), (25, "dual", 0.0, 8), (60, "prefix", 0.7, 16), (5, "prefix", 0.0, 8),
           (30, "dual", 0.0, 32)]                   # (prompt length, cache, temperature, gen_length)
    for i, (n, kv, temp, gen) in enumerate(mix):
        prompt = torch.randint(3, 200, (n,), generator=g).tolist()
        params = {"kv_cache": kv, "temperature": temp, "seed": i, "gen_length": gen, "steps": gen}
        reqs.append(eng.make_request(prompt, {**params, "top_p": 0.9 if temp else 1.0,
                                              "cfg_scale": 1.0 if temp else 0.0}))
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert gr.stats["replays"] > 0 and gr.stats["eager_reuse"] > 0


@pytest.mark.parametrize("mix_iterations", [None, "compiled", "captured"])
def test_warmup_compiles_what_serving_runs(mix_iterations):
    """After the engine's warm-up, greedy traffic (Refresh and full forwards at new widths and batch sizes,
    Reuse replays; with ``compiled`` / ``captured`` mixed iterations, packed forwards at new token buckets,
    through the per-part op and the varlen kernel's tables) compiles nothing more: no request stalls on a
    compilation."""
    gr, eng = _compiled_engine(mix_iterations)
    eng.warmup()
    warm = counters["stats"]["unique_graphs"]
    assert warm > 2                                   # the graphs' step and the eager kinds
    g = torch.Generator().manual_seed(1)
    waves = ([(5, "dual"), (31, "none"), (12, "dual"), (47, "none"), (2, "dual")],   # (prompt length, cache)
             [(20, "none")], [(9, "dual")])
    for wave in waves:
        reqs = [eng.make_request(torch.randint(3, 200, (n,), generator=g).tolist(), {"kv_cache": kv})
                for n, kv in wave]
        for r in reqs:
            eng.add_request(r)
        eng.run_until_done()
        assert [r.error for r in reqs] == [None] * len(reqs)
    assert gr.stats["replays"] > 0
    if mix_iterations:
        assert gr.stats["mixed_packed"] > 0
    assert counters["stats"]["unique_graphs"] == warm
