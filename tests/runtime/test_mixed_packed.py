"""The CUDA-graph runner's compiled mixed iteration (``mix_iterations="compiled"``, runners/packed.py,
models/packed.py): Refresh rows and Reuse rows packed into one row padded to a token bucket, run through the
compiled blocks with one attention op per layer (the varlen pool kernel's reference on CPU, the per-part op
for block-causal SDAR); ``captured``: the same forward over a token bucket's static buffers (a CUDA graph on
the GPU; run directly on CPU). On CPU without capture, fp32, against the eager two
calls (the compiled blocks switched off: ``set_stance("force_eager")``): tokens identical, confidences and
the pool's K/V within RTOL / ATOL (Inductor and larger GEMMs round differently, not bit for bit).

The fast tests compile with ``aot_eager`` (Dynamo + AOTAutograd: the op's pool writes go through
functionalization as Inductor's do); the Inductor one is ``slow``."""
import pytest
import torch

from dlc.models.packed import forward_packed, packable
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.runners.packed import token_bucket
from dlc.runtime.session import open_model
from dlc.runtime.step import MixedBatch, build_batch, run_batch, run_mixed, supports_mixed
from test_mixed_forward import _pools       # noqa: E402  (the sibling test module: pytest's rootdir import)

RTOL, ATOL = 1e-4, 1e-5          # fp32: packed GEMMs / compiled kernels vs eager per-part forwards
S_MAX, SLOTS = 64, 16
BACKEND = "aot_eager"


@pytest.fixture(scope="module")
def runners():
    return {}


def runner_of(runners, name, backend=BACKEND):
    """A GraphRunner over a fresh model whose blocks compile in place (its own model: compiling changes
    it)."""
    if (name, backend) not in runners:
        model = open_model(name, progress=False).runner.model
        runners[name, backend] = GraphRunner(model, capture=False, decode="exact", pool_attention=True,
                                             compile=backend, mix_iterations="compiled")
    return runners[name, backend]


def pools(runner):
    """Two pools with the same random K/V (the Reuse rows read real cached values), one per path."""
    return _pools(runner, SLOTS, S_MAX)


def mix(runner, pool, refresh_lens, n_reuse, cache="dual", seed=0, blk=8):
    """A Refresh part (rows of the given prompt lengths + 16 masked columns, their first block decoded) and a
    Reuse part of ``n_reuse`` rows (prompts of different lengths; dual: the 8-column block is fed; prefix:
    the block and the 16 columns after it) -> [refresh, reuse] StepBatches over ``pool``."""
    mc, V = runner.config, min(runner.config.vocab_size, 250)
    g = torch.Generator().manual_seed(seed)

    def rows(lens, decoded):
        seqs, P = [], []
        for n in lens:
            s = torch.full((n + 24,), mc.mask_id, dtype=torch.long)
            s[:n + decoded + 3] = torch.randint(3, V, (n + decoded + 3,), generator=g)
            seqs.append(s)
            P.append(n)
        return seqs, P

    bs = blk if mc.block_diffusion else 0                   # block-causal attention (block diffusion)
    seqs, P = rows(refresh_lens, 0)
    R = len(seqs)
    ref = build_batch(runner, "refresh", seqs, P, P, blk, None, [(i,) for i in range(R)], pool, block_size=bs)
    lens = [int(x) for x in torch.randint(3, 20, (n_reuse,), generator=g)]
    seqs, P = rows(lens, blk)
    st = [p + blk for p in P]
    spans = [(a, a + blk) for a in st] if cache == "dual" else [(a, len(s)) for a, s in zip(st, seqs)]
    reu = build_batch(runner, "reuse", seqs, P, st, blk, spans, [(R + i,) for i in range(n_reuse)], pool,
                      block_size=bs)
    return [ref, reu]


def two_calls(runner, parts):
    """The reference: each part's own phase call, the compiled blocks run eagerly."""
    with torch.compiler.set_stance("force_eager"):
        return [run_batch(runner, b) for b in parts]


MIXES = [((9,), 3, "dual"), ((9, 4), 5, "dual"), ((13, 4, 21), 4, "dual"), ((6, 17), 3, "prefix"),
         ((11,), 6, "prefix")]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream", "tiny-llada-moe", "tiny-sdar"])
def test_packed_mixed_equals_two_calls(runners, name):
    """1-3 Refresh rows of different lengths beside several Reuse rows, dual and prefix caches: one packed
    compiled forward per iteration gives the two calls' tokens, confidences and pool K/V (dense, Dream's
    shifted logits with GQA and q/k/v bias, MoE, block-causal SDAR)."""
    graph = runner_of(runners, name)
    assert supports_mixed(graph)
    for i, (lens, n_reuse, cache) in enumerate(MIXES):
        pa, pb = pools(graph)
        before = pa.k_all.clone()
        ref = two_calls(graph, mix(graph, pa, lens, n_reuse, cache, seed=i))
        graph.bind_pool(pb)
        n0, v0 = graph.stats.get("mixed_packed", 0), graph.stats.get("mixed_varlen", 0)
        got = run_mixed(graph, MixedBatch(tuple(mix(graph, pb, lens, n_reuse, cache, seed=i))))
        assert graph.stats["mixed_packed"] == n0 + 1                            # the packed path ran
        varlen = not graph.config.block_diffusion            # block-causal parts: the per-part op
        assert graph.stats.get("mixed_varlen", 0) == v0 + varlen                # the varlen kernel's tables
        for r, m in zip(ref, got):
            assert torch.equal(m.x0, r.x0), (lens, n_reuse, cache)
            torch.testing.assert_close(m.conf, r.conf, rtol=RTOL, atol=ATOL)
        assert len(set(torch.cat([r.x0.flatten() for r in ref]).tolist())) > 3   # decisive: tokens vary
        torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(pb.v_all, pa.v_all, rtol=RTOL, atol=ATOL)
        written = (pa.k_all - before).abs().amax(dim=(0, 2, 4)) > 0            # [slots, S]
        used = len(lens) + n_reuse
        assert written[:used].any(dim=1).all() and not written[used:].any()   # the rows' slots only


def test_padding_changes_no_result(runners):
    """The same parts at two token buckets (14 and 600 padding tokens): every real row's hidden states agree
    within tolerance, and the padding writes no K/V (the pool's unused slots and columns stay as they
    were)."""
    graph = runner_of(runners, "tiny-llada")
    pa, pb = pools(graph)
    before = pa.k_all.clone()
    hs = []
    for pool, n_pad in ((pa, None), (pb, 1024)):
        graph.bind_pool(pool)
        parts = [graph.inputs(graph._in_pool(b) if b.phase == "reuse" else b)
                 for b in mix(graph, pool, (13, 4), 5, "dual", seed=7)]
        n = sum(p.ids.numel() for p in parts)
        with torch.no_grad():
            hs.append(forward_packed(graph.model, parts, packable(parts), n_pad or token_bucket(n)))
    assert token_bucket(n) - n == 14
    for a, b in zip(*hs):
        torch.testing.assert_close(b, a, rtol=RTOL, atol=ATOL)
        assert a.std() > 0.1
    torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)
    unused = torch.ones(pa.k_all.shape[1], dtype=torch.bool)
    unused[:7] = False                                                     # 2 Refresh + 5 Reuse slots
    assert torch.equal(pb.k_all[:, unused], before[:, unused])
    assert torch.equal(pb.k_all[:, :2, :, 37:], before[:, :2, :, 37:])   # past the Refresh rows' 37


def test_unpackable_parts_run_the_eager_ragged_forward(runners):
    """Parts the packed path cannot take (no part reads a pool) run the eager ragged forward."""
    graph = runner_of(runners, "tiny-llada")
    pa, pb = pools(graph)
    ref_b = mix(graph, pa, (9,), 2)
    full = build_batch(graph, "full", [ref_b[0].ids[0].cpu()], [9], [9], 8)
    n0 = graph.stats.get("mixed_packed", 0)
    out = graph.mixed(MixedBatch((full,)))
    assert graph.stats.get("mixed_packed", 0) == n0 and len(out) == 1


def test_mix_iterations_is_one_declared_decision():
    """A GraphRunner option that the serve config and CLI pass 1:1; refused where it cannot apply."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.server_cli import build_config
    sess = open_model("tiny-llada", progress=False)
    model = sess.runner.model
    cfg = build_config("tiny-llada", None, mix_iterations="compiled", cuda_graphs=True, compile=True)
    assert Engine(sess, cfg).runner.mix_iterations == "compiled"
    with pytest.raises(ValueError, match="mix_iterations"):
        Engine(sess, ServeConfig(mix_iterations="eager", cuda_graphs=False))
    cfg = build_config("tiny-llada", None, mix_iterations="captured", cuda_graphs=True)
    assert Engine(sess, cfg).runner.mix_iterations == "captured"
    for bad in (dict(mix_iterations="one"), dict(mix_iterations="compiled", compile=False),
                dict(mix_iterations="captured", batch_invariant=True)):
        with pytest.raises(ValueError, match="mix_iterations"):
            ServeConfig(**bad)
    assert GraphRunner(model, capture=False).mix_iterations == "eager"
    assert not GraphRunner(model, capture=False, mix_iterations="two").mixes
    with pytest.raises(ValueError, match="needs compile"):
        GraphRunner(model, capture=False, mix_iterations="compiled")
    with pytest.raises(ValueError, match="mix_iterations"):
        GraphRunner(model, capture=False, mix_iterations="one")


def captured_runner(runners, name):
    """A GraphRunner with ``mix_iterations="captured"`` and eager blocks (on CPU: the captured forward's
    static buffers, run without a graph)."""
    if (name, "captured") not in runners:
        model = open_model(name, progress=False).runner.model
        runners[name, "captured"] = GraphRunner(model, capture=False, decode="exact", pool_attention=True,
                                                mix_iterations="captured")
    return runners[name, "captured"]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_captured_mixed_equals_two_calls(runners, name):
    """Every mix (1-3 Refresh rows of different lengths, Reuse rows at different columns and key counts, dual
    and prefix caches) through a token bucket's static buffers and the varlen kernel's tables: the two
    calls' tokens, confidences and pool K/V; mixes of one bucket reuse its buffers (stale tables of a
    previous mix would attend the wrong keys)."""
    graph = captured_runner(runners, name)
    for i, (lens, n_reuse, cache) in enumerate(MIXES):
        pa, pb = pools(graph)
        ref = two_calls(graph, mix(graph, pa, lens, n_reuse, cache, seed=i))
        graph.bind_pool(pb)
        got = run_mixed(graph, MixedBatch(tuple(mix(graph, pb, lens, n_reuse, cache, seed=i))))
        for r, m in zip(ref, got):
            assert torch.equal(m.x0, r.x0), (lens, n_reuse, cache)
            torch.testing.assert_close(m.conf, r.conf, rtol=RTOL, atol=ATOL)
        assert len(set(torch.cat([r.x0.flatten() for r in ref]).tolist())) > 3   # decisive: tokens vary
        torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(pb.v_all, pa.v_all, rtol=RTOL, atol=ATOL)
        assert graph.stats["mixed_captured"] == i + 1                            # the captured path ran
    pa, pb = pools(graph)                              # two mixes in one bucket, one pool: buffers reused
    graph.bind_pool(pb)                                # (bind_pool drops a previous pool's buffers)
    for i, (lens, n_reuse) in enumerate((((9, 4), 5), ((21,), 5))):             # 106, 85 -> 128
        ref = two_calls(graph, mix(graph, pa, lens, n_reuse, "dual", seed=10 + i))
        got = run_mixed(graph, MixedBatch(tuple(mix(graph, pb, lens, n_reuse, "dual", seed=10 + i))))
        assert all(torch.equal(m.x0, r.x0) for r, m in zip(ref, got))
    assert len(graph.packed_graphs) == 1 and graph.stats["mixed_captured"] == len(MIXES) + 2


def test_captured_warmup_prepares_token_buckets(runners):
    """The runner's warm-up (no compiled blocks) prepares the first token buckets' packed forwards (captured
    on CUDA) and leaves the pool's unused slots untouched but for the scratch slot."""
    graph = captured_runner(runners, "tiny-llada")
    pa, pb = pools(graph)
    graph.bind_pool(pb)
    before = pb.k_all.clone()
    graph.warmup([(8, 8)], 2)
    assert len(graph.packed_graphs) == 2
    others = torch.ones(pb.k_all.shape[1], dtype=torch.bool)
    others[graph.scratch] = False
    assert torch.equal(pb.k_all[:, others], before[:, others])


def test_captured_falls_back_where_it_cannot_take_the_mix(runners):
    """Block-causal parts (SDAR) cannot use the varlen tables: the uncaptured packed forward runs them."""
    graph = captured_runner(runners, "tiny-sdar")
    pa, pb = pools(graph)
    ref = two_calls(graph, mix(graph, pa, (9, 4), 3))
    graph.bind_pool(pb)
    got = run_mixed(graph, MixedBatch(tuple(mix(graph, pb, (9, 4), 3))))
    assert graph.stats["mixed_packed"] == 1 and "mixed_captured" not in graph.stats
    for r, m in zip(ref, got):
        assert torch.equal(m.x0, r.x0)


@pytest.mark.slow
def test_packed_mixed_with_inductor(runners):
    """Inductor (``--compile``'s backend) over the packed tokens: the two calls' tokens and pool K/V."""
    graph = runner_of(runners, "tiny-llada", True)
    for i, (lens, n_reuse, cache) in enumerate(MIXES[1:4]):
        pa, pb = pools(graph)
        ref = two_calls(graph, mix(graph, pa, lens, n_reuse, cache, seed=i))
        graph.bind_pool(pb)
        got = run_mixed(graph, MixedBatch(tuple(mix(graph, pb, lens, n_reuse, cache, seed=i))))
        for r, m in zip(ref, got):
            assert torch.equal(m.x0, r.x0)
            torch.testing.assert_close(m.conf, r.conf, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)
    assert graph.stats["mixed_packed"] == 3


def assert_cuda_mixes_match_two_calls(graph, after_each=lambda: None) -> None:
    """Every mix of MIXES through ``graph``'s mixed path against its eager two calls on a second pool: >= 95%
    of tokens equal, confidences and the written pool K/V within 1e-3 (float32 and the kernels' rounding);
    ``after_each`` checks the runner after each mix."""
    for i, (lens, n_reuse, cache) in enumerate(MIXES):
        pa, pb = pools(graph)
        ref = two_calls(graph, mix(graph, pa, lens, n_reuse, cache, seed=i))
        graph.bind_pool(pb)
        got = run_mixed(graph, MixedBatch(tuple(mix(graph, pb, lens, n_reuse, cache, seed=i))))
        same = sum(int((m.x0 == r.x0).sum()) for r, m in zip(ref, got)) / sum(r.x0.numel() for r in ref)
        assert same >= 0.95
        for r, m in zip(ref, got):
            torch.testing.assert_close(m.conf, r.conf, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(pb.k_all, pa.k_all, rtol=1e-3, atol=1e-3)
        after_each()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_mixed_on_cuda():
    """On the GPU (fp32, the served build: Inductor blocks, capture, fused decoding, Triton pool attention):
    the packed compiled mixed iteration against the eager two calls; tolerances for float32 confidence and the
    kernels' own rounding."""
    model = open_model("tiny-llada", device="cuda", dtype=torch.float32, progress=False).runner.model
    graph = GraphRunner(model, compile=True, mix_iterations="compiled")
    assert_cuda_mixes_match_two_calls(graph)
    assert graph.stats["mixed_packed"] == len(MIXES)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_captured_mixed_on_cuda(compile):
    """On the GPU (fp32, Triton varlen kernel, fused decoding): the packed mixed forward captured per token
    bucket and replayed, against the eager two calls, with and without Inductor blocks."""
    model = open_model("tiny-llada", device="cuda", dtype=torch.float32, progress=False).runner.model
    graph = GraphRunner(model, compile=compile, mix_iterations="captured")

    def replayed():
        assert all(g.graph is not None for g in graph.packed_graphs.values())     # replayed graphs
    assert_cuda_mixes_match_two_calls(graph, replayed)
    assert graph.stats["mixed_captured"] == len(MIXES)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compiled", "captured"])
def test_engine_outputs_through_packed_mixed_iterations(mode):
    """The Engine over a GraphRunner with ``mix_iterations="compiled"`` (Dynamo's eager backend: the packed
    forward's numerics are the eager kernels') or ``"captured"`` (eager blocks, the static-buffer forward):
    its mixed iterations run packed, and every request (dual, prefix and no cache; T = 0 and seeded T > 0;
    different arrival iterations) gets ``generate``'s tokens on an uncompiled model. Slow (~60 s on 2 shared
    cores): Dynamo traces every shape the engine runs."""
    from test_mixed_forward import _drive, _reference, _workload

    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.session import Session
    sess = open_model("tiny-llada", progress=False)
    gr = GraphRunner(sess.runner.model, capture=False, decode="exact", pool_attention=True,
                     compile="eager" if mode == "compiled" else False, mix_iterations=mode)
    eng = Engine(Session(gr, sess.tokenizer, sess.config, sess.chat, sess.source),
                 ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_num_tokens=160, refresh_share=0.4))
    specs = _workload()
    reqs = [eng.make_request(p, params) for p, params in specs]
    _drive(eng, reqs)
    assert gr.stats["mixed_packed"] >= 5 and eng.metrics.counter("mixed_iterations_total") >= 5
    if mode == "captured":        # every mix the varlen tables could take was replayed (the rest: no-cache
        assert gr.stats["mixed_captured"] >= 1 and "mixed_varlen" not in gr.stats      # parts, per-part op)
    outs = [r.output_ids for r in reqs]
    assert len({tuple(o) for o in outs}) == len(outs)                              # outputs vary
    ref = open_model("tiny-llada", progress=False)
    for r, (p, params) in zip(reqs, specs):
        assert r.output_ids == _reference(ref, p, params), params
