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


def _compiled_engine():
    """A fresh Dynamo state and an engine over tiny-llada whose graph runner compiles its blocks (eager
    backend: Dynamo's guards and recompiles without Inductor's cost)."""
    torch._dynamo.reset()
    counters.clear()
    sess = open_model("tiny-llada", progress=False)
    gr = GraphRunner(sess.runner.model, decode="exact", compile="eager", pool_attention=True, fuse=True)
    eng = Engine(Session(gr, sess.tokenizer, sess.config, sess.chat, sess.source),
                 ServeConfig(max_seq_len=96, max_batch_size=8, gen_length=16, block_length=8, steps=16))
    return gr, eng


def test_mixed_traffic_through_compiled_blocks_never_fails():
    """Compiled blocks also run Refresh, full forwards and the eager Reuse fallbacks (T > 0 with top-p, which
    no captured variant holds) at many shapes:
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
        reqs.append(eng.make_request(prompt, {**params, "top_p": 0.9 if temp else 1.0}))
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert gr.stats["replays"] > 0 and gr.stats["eager_reuse"] > 0


def test_warmup_compiles_what_serving_runs():
    """After the engine's warm-up, greedy traffic (Refresh and full forwards at new widths and batch sizes,
    Reuse replays) compiles nothing more: no request stalls on a compilation."""
    gr, eng = _compiled_engine()
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
    assert counters["stats"]["unique_graphs"] == warm
