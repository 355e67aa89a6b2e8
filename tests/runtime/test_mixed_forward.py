"""One forward per mixed iteration: a ``MixedBatch`` (Refresh rows beside Reuse rows, any phases) through
``EagerRunner.mixed`` gives the (x0, conf) and writes the K/V that the separate calls give, for every family;
the Engine runs each iteration that holds both kinds as exactly one runner call, and every request's output
stays token-identical to ``generate`` (T = 0 and seeded T > 0); a mixed call that raises is retried group by
group without hurting anyone. The CUDA-graph runner's mixed path (pool attention, fused decoding, compiled
blocks run eagerly) is checked on CPU without capture."""
import pytest
import torch
from torch._dynamo.utils import counters

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import open_model
from dlc.runtime.step import MixedBatch, build_batch, run_batch, run_mixed, supports_mixed

# fp32 throughout. The mixed forward packs every part's tokens into larger GEMMs, so values agree up to
# rounding, not bit for bit; tokens must be identical (decisive tiny models).
RTOL, ATOL = 1e-4, 1e-5
S_MAX = 64
FAMILIES = ["tiny-llada", "dlc-tiny", "tiny-dream", "tiny-llada-moe", "tiny-sdar", "tiny-llada2"]


@pytest.fixture(scope="module")
def sessions():
    return {}


def session_of(sessions, name):
    if name not in sessions:
        sessions[name] = open_model(name, progress=False)
    return sessions[name]


def _pools(runner, n=12, s_max=S_MAX):
    """Two pools with the same random K/V (so Reuse rows read real cached values) for the two paths
    (test_mixed_packed.py takes them too)."""
    g = torch.Generator().manual_seed(1)
    pools = [KVCacheManager(runner.config, s_max, 1 << 40, runner.dtype, runner.device, max_slots=n)
             for _ in range(2)]
    k, v = torch.randn(pools[0].k_all.shape, generator=g), torch.randn(pools[0].v_all.shape, generator=g)
    for p in pools:
        p.k_all.copy_(k)
        p.v_all.copy_(v)
    return pools


def _parts(runner, pool, temperature=0.0, cfg_scale=0.0, with_full=False) -> list:
    """A Refresh group of 2 rows and a Reuse group of 3 rows (different lengths and blocks; optionally a full
    group of 2 first) -> their StepBatches over ``pool``."""
    mc, V = runner.config, min(runner.config.vocab_size, 250)
    g = torch.Generator().manual_seed(0)
    bs = 8 if mc.block_diffusion else 0
    per = 2 if cfg_scale > 0 else 1
    slots = iter(range(0, 12, per))

    def take(n):
        return [tuple(range(k, k + per)) for k in [next(slots) for _ in range(n)]]

    def rows(lens, decoded):
        prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in lens]
        seqs = [torch.tensor(p + [mc.mask_id] * 24) for p in prompts]
        for s, p in zip(seqs, prompts):        # some columns decoded already, half of the block's too
            s[len(p):len(p) + decoded + 4] = torch.randint(3, V, (decoded + 4,), generator=g)
        return seqs, [len(p) for p in prompts], [len(p) + decoded for p in prompts]

    kw = dict(temperature=temperature, cfg_scale=cfg_scale, block_size=bs)
    out = []
    if with_full:
        seqs, P, st = rows((6, 13), 3)
        out.append(build_batch(runner, "full", seqs, P, st, 8, seeds=[3, 4], **kw))
    seqs, P, st = rows((9, 4), 0)
    sl = take(len(seqs))
    out.append(build_batch(runner, "refresh", seqs, P, st, 8, None, sl, pool, seeds=[5, 6], **kw))
    seqs, P, st = rows((12, 5, 20), 8)
    sl = take(len(seqs))
    out.append(build_batch(runner, "reuse", seqs, P, st, 8, [(a, a + 8) for a in st], sl, pool,
                           seeds=[7, 8, 9], **kw))
    return out


@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (0.9, 0.0), (0.0, 1.5)])
@pytest.mark.parametrize("name", FAMILIES)
def test_mixed_forward_equals_two_calls(sessions, name, temperature, cfg_scale):
    runner = session_of(sessions, name).runner
    if name in ("tiny-sdar", "tiny-llada2") and cfg_scale:
        pytest.skip("block diffusion decodes without guidance")
    pa, pb = _pools(runner)
    before = pa.k_all.clone()
    two = [getattr(runner, b.phase)(b) for b in _parts(runner, pa, temperature, cfg_scale)]
    assert supports_mixed(runner)
    one = runner.mixed(MixedBatch(tuple(_parts(runner, pb, temperature, cfg_scale))))
    for (x_r, c_r), (x_m, c_m) in zip(two, one):
        assert x_m.dtype == torch.long and c_m.dtype == torch.float64
        assert torch.equal(x_m, x_r)
        torch.testing.assert_close(c_m, c_r, rtol=RTOL, atol=ATOL)
        assert len(set(x_r.flatten().tolist())) > 3                   # a decisive model: tokens vary
    assert not torch.equal(two[0][0], two[1][0][:2])                  # the parts decode different rows
    torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(pb.v_all, pa.v_all, rtol=RTOL, atol=ATOL)
    written = (pa.k_all - before).abs().amax(dim=(0, 2, 4)) > 0                   # [slots, S]
    rows = 2 if cfg_scale else 1
    assert written[:2 * rows].any(dim=1).all() and written[2 * rows:5 * rows].any(dim=1).all()
    assert not written[5 * rows:].any()                                           # no other slot touched


def test_full_rows_and_extras_in_one_mixed_call(sessions):
    """Three parts (full, refresh, reuse), the Reuse part asking for entropy and logprobs, the Refresh part
    carrying an input-embedding delta: decoding falls back to one pass per part, results still equal the
    separate calls (through run_batch / run_mixed)."""
    runner = session_of(sessions, "tiny-llada").runner
    pa, pb = _pools(runner)
    sep, mix = _parts(runner, pa, with_full=True), _parts(runner, pb, with_full=True)
    delta = torch.randn(2, 8, runner.config.d_model, generator=torch.Generator().manual_seed(2))
    for b in (sep[2], mix[2]):
        b.entropy, b.logprobs = True, 2
    for b in (sep[1], mix[1]):                       # smoothing's soft inputs on the Refresh part only
        b.embed_delta = delta
    ref = [run_batch(runner, b) for b in sep]
    got = run_mixed(runner, MixedBatch(tuple(mix)))
    for r, m in zip(ref, got):
        assert torch.equal(m.x0, r.x0)
        torch.testing.assert_close(m.conf, r.conf, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[2].entropy, ref[2].entropy, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[2].logprob, ref[2].logprob, rtol=RTOL, atol=ATOL)
    assert got[0].entropy is None and got[2].entropy is not None
    torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,decode", [("tiny-llada", "exact"), ("tiny-dream", "exact"),
                                         ("tiny-llada", "fused")])
def test_graph_runner_mixes_in_the_pool(sessions, name, decode):
    """The CUDA-graph runner's mixed iteration (one eager ragged forward, its Reuse rows attending inside the
    bound pool through ``pool_attention``; CPU: the op's reference, no capture; decoded exactly or as its
    graphs decode, ``fused``: float32 confidence) equals the eager two calls."""
    eager = session_of(sessions, name).runner
    graph = GraphRunner(eager.model, capture=False, pool_attention=True, decode=decode)
    pa, pb = _pools(eager)
    graph.bind_pool(pb)                                  # its scratch slot is not used by a mixed forward
    ref = [run_batch(eager, b) for b in _parts(eager, pa)]
    got = run_mixed(graph, MixedBatch(tuple(_parts(graph, pb))))
    assert graph.stats["mixed"] == 1 and graph.stats["replays"] == 0
    for r, m in zip(ref, got):
        assert torch.equal(m.x0, r.x0)
        torch.testing.assert_close(m.conf, r.conf, rtol=RTOL, atol=ATOL)
        assert len(set(r.x0.flatten().tolist())) > 3
    torch.testing.assert_close(pb.k_all, pa.k_all, rtol=RTOL, atol=ATOL)


class _TwoCalls(EagerRunner):
    mixes = False


def test_runners_that_do_not_mix_get_one_call_per_part(sessions):
    model = session_of(sessions, "tiny-llada").runner.model
    runner = _TwoCalls(model)
    assert not supports_mixed(runner) and supports_mixed(EagerRunner(model))
    pa, pb = _pools(runner)
    ref = [run_batch(runner, b) for b in _parts(runner, pa)]
    got = run_mixed(runner, MixedBatch(tuple(_parts(runner, pb))))
    assert all(torch.equal(g.x0, r.x0) and torch.equal(g.conf, r.conf) for g, r in zip(got, ref))



def test_compiled_blocks_mix_eagerly(sessions):
    """GraphRunner(compile=True): a mixed iteration runs its blocks eagerly (no compile, no recompile per
    ragged shape) and equals the eager two calls."""
    eager = session_of(sessions, "tiny-llada").runner
    graph = GraphRunner(open_model("tiny-llada", progress=False).runner.model, capture=False, compile=True)
    assert supports_mixed(graph)
    pa, pb = _pools(eager)
    ref = [run_batch(eager, b) for b in _parts(eager, pa)]
    traced = counters["stats"]["calls_captured"]
    got = run_mixed(graph, MixedBatch(tuple(_parts(graph, pb))))
    assert graph.stats["mixed"] == 1 and counters["stats"]["calls_captured"] == traced   # nothing compiled
    for r, m in zip(ref, got):
        assert torch.equal(m.x0, r.x0)
        torch.testing.assert_close(m.conf, r.conf, rtol=RTOL, atol=ATOL)


# -- the Engine ----------------------------------------------------------------------------------------------
def _workload(seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(6):
        prompt = torch.randint(0, 250, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
        bl = (4, 8)[i % 2]
        specs.append((prompt, dict(gen_length=bl * 2, block_length=bl, steps=bl * 2,
                                   kv_cache=("dual", "prefix", "dual", "none")[i % 4],
                                   temperature=0.8 if i % 3 == 1 else 0.0, seed=50 + i)))
    return specs


def _reference(session, prompt, params):
    return generate(session.runner, [prompt], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]


def _counting(monkeypatch, runner, calls: list):
    for name in ("full", "refresh", "reuse", "mixed"):
        fn = getattr(runner, name)

        def wrapped(batch, fn=fn, name=name):
            calls.append(name if name != "mixed" else "mixed:" + "+".join(batch.phases))
            return fn(batch)
        monkeypatch.setattr(runner, name, wrapped)


def _serve(session, specs):
    """A phase-multiplexed engine and the specs' requests."""
    eng = Engine(session, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_num_tokens=160,
                                      refresh_share=0.4))
    reqs = [eng.make_request(p, params) for p, params in specs]
    return eng, reqs


def _drive(eng, reqs, after_step=lambda: None, limit=300):
    """Two requests arrive per iteration (so their blocks start at different iterations) until all finish."""
    pending = list(reqs)
    for _ in range(limit):
        if not (pending or eng.has_work()):
            return
        for r in pending[:2]:
            eng.add_request(r)
        pending = pending[2:]
        eng.step()
        after_step()
    raise AssertionError(f"the engine did not finish in {limit} iterations")


def test_engine_runs_each_mixed_iteration_as_one_call(sessions, monkeypatch):
    session = session_of(sessions, "tiny-llada")
    specs = _workload()
    eng, reqs = _serve(session, specs)
    calls, per_iter = [], []
    _counting(monkeypatch, eng.runner, calls)
    _drive(eng, reqs, lambda: (per_iter.append(list(calls)), calls.clear()))
    mixed = [c for c in per_iter if any(x.startswith("mixed") for x in c)]
    assert len(mixed) >= 5                                            # the workload really mixes
    for c in per_iter:
        plain = [x for x in c if not x.startswith("mixed")]
        assert not ("reuse" in plain and ({"refresh", "full"} & set(plain))), per_iter   # never two calls
        if c in mixed:
            assert len(c) == 1 and "reuse" in c[0] and ("refresh" in c[0] or "full" in c[0])
    assert eng.metrics.counter("mixed_iterations_total") == len(mixed)
    outs = [r.output_ids for r in reqs]
    assert len({tuple(o) for o in outs}) == len(outs)                  # outputs vary
    for r, (p, params) in zip(reqs, specs):
        assert r.output_ids == _reference(session, p, params), params
    assert eng.kv.num_used == 0


def test_a_failing_mixed_call_is_retried_group_by_group(sessions, monkeypatch):
    session = session_of(sessions, "tiny-llada")
    specs = _workload(1)[:4]
    eng, reqs = _serve(session, specs)

    def broken(batch):
        raise RuntimeError("mixed forward broke")
    monkeypatch.setattr(eng.runner, "mixed", broken)
    _drive(eng, reqs)
    m = eng.metrics
    assert m.counter("isolated_batches_total") >= 3 and m.counter("mixed_iterations_total") == 0
    for r, (p, params) in zip(reqs, specs):
        assert r.finish_reason in ("stop", "length") and r.output_ids == _reference(session, p, params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_runner_mixed_on_cuda():
    """On the GPU (fp32): GraphRunner.mixed (Triton pool attention for the Reuse rows, fused decoding) against
    the eager two calls; tolerances for float32 confidence and the kernels' own rounding."""
    sess = open_model("tiny-llada", device="cuda", dtype=torch.float32, progress=False)
    eager = EagerRunner(sess.runner.model)
    graph = GraphRunner(sess.runner.model, mix_iterations="eager")   # capture, fused decode, pool attention
    pa, pb = _pools(eager)
    graph.bind_pool(pb)
    ref = [run_batch(eager, b) for b in _parts(eager, pa)]
    got = run_mixed(graph, MixedBatch(tuple(_parts(graph, pb))))
    assert graph.stats["mixed"] == 1
    same = sum(int((m.x0 == r.x0).sum()) for r, m in zip(ref, got)) / sum(r.x0.numel() for r in ref)
    assert same >= 0.95
    for r, m in zip(ref, got):
        torch.testing.assert_close(m.conf, r.conf, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(pb.k_all, pa.k_all, rtol=1e-3, atol=1e-3)
