"""GraphRunner: the static-buffer Reuse path (bucketed batches, scratch padding slot, in-graph decoding).

On CPU the same code path runs without capture (``capture=False``); the CUDA capture itself is checked by the
GPU test at the end (skipped without CUDA). Tokens must equal generate()'s exactly in ``exact`` decode
mode."""
import pytest
import torch

from dlc.models.common import fuse_projections_
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.session import open_model
from dlc.runtime.step import build_batch

S_MAX = 96
CONF_ATOL = 1e-5          # fused (float32 online softmax) vs exact (float64 softmax) confidence, fp32 model


@pytest.fixture(scope="module", params=["tiny-llada", "tiny-dream"])
def session(request):
    return open_model(request.param, progress=False)


def specs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 200, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
        out.append((prompt, dict(gen_length=16, block_length=8, steps=16 if i % 2 else 8,
                                 kv_cache=("dual", "prefix")[i % 2], remasking="low_confidence")))
    return out


def run_engine(session, items, **kw):
    eng = Engine(session, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8, **kw))
    reqs = eng.run_requests(items)
    return eng, [r.output_ids for r in reqs]


def test_engine_tokens_equal_generate(session):
    items = specs(7)
    eng, outs = run_engine(session, items, cuda_graphs=True, graph_decode="exact")
    assert isinstance(eng.runner, GraphRunner)
    for (p, params), out in zip(items, outs):
        ref = generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert out == ref
    st = eng.runner.stats
    assert st["replays"] > 0
    assert {k[0] for k in eng.runner.graphs} <= set(eng.runner.buckets)
    assert eng.kv.num_used == 1                        # only the scratch slot is still held


def test_pool_attention_path_tokens_equal_generate(session):
    """Attention inside the slot pool (dlc.kernels.pool_attention, no row gather, per-row key lengths)."""
    from dlc.runtime.session import Session
    items = specs(6, seed=2)
    gr = GraphRunner(session.runner.model, decode="exact", pool_attention=True)
    sess = Session(gr, session.tokenizer, session.config, session.chat, session.source)
    eng, outs = run_engine(sess, items, cuda_graphs=True)
    assert eng.runner is gr and gr.stats["replays"] > 0 and gr.stats["eager_reuse"] == 0
    for (p, params), out in zip(items, outs):
        assert out == generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]


def test_fused_decode_matches_exact(session):
    items = specs(5, seed=1)
    _, exact = run_engine(session, items, cuda_graphs=True, graph_decode="exact")
    _, fused = run_engine(session, items, cuda_graphs=True, graph_decode="fused")
    assert fused == exact


def test_off_by_default_on_cpu(session):
    eng, _ = run_engine(session, specs(1))
    assert type(eng.runner) is EagerRunner


def _pool_and_runner(session, n_slots=6):
    mc = session.config
    kv = KVCacheManager(mc, 48, 1 << 40, torch.float32, "cpu", max_slots=n_slots)
    gr = GraphRunner(session.runner.model, decode="exact", buckets=(1, 2, 4, 8))
    gr.bind_pool(kv)
    return kv, gr


def _states(mc, B, L, P, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (B, L), generator=g)
    ids[:, P:] = mc.mask_id
    return list(ids)


def _batch(runner, phase, states, P, blk, slots, pool, **kw):
    spans = [(P, P + blk)] * len(states) if phase == "reuse" else None
    return build_batch(runner, phase, states, [P] * len(states), [P] * len(states), blk, spans,
                       [(s,) for s in slots], pool, **kw)


def test_padding_rows_touch_only_the_scratch_slot(session):
    """3 rows run in bucket 4: the padding row writes the scratch slot; slots not in the batch are untouched,
    and each row's step equals the eager runner's over the same pool."""
    mc = session.config
    kv, gr = _pool_and_runner(session)
    eager = EagerRunner(session.runner.model)
    slots = [kv.allocate() for _ in range(4)]
    B, L, P, blk = 3, 40, 20, 8
    states = _states(mc, B, L, P, 0)
    eager.refresh(_batch(eager, "refresh", states, P, blk, slots[:3], kv))
    other = [t[slots[3]].clone() for t in kv.k]
    ref_pool = [t.clone() for t in kv.k]
    x_ref, c_ref = eager.reuse(_batch(eager, "reuse", states, P, blk, slots[:3], kv))
    after_eager = [t.clone() for t in kv.k]
    for t, r in zip(kv.k, ref_pool):
        t.copy_(r)
    x, c = gr.reuse(_batch(gr, "reuse", states, P, blk, slots[:3], kv))
    assert gr.stats["replays"] == 1 and (4, blk + mc.logit_shift, blk) in gr.graphs
    assert torch.equal(x, x_ref) and torch.allclose(c, c_ref, rtol=0, atol=1e-12)
    assert len(set(x.flatten().tolist())) > 1
    for t, r in zip(kv.k, after_eager):
        mine = [i for i in range(kv.n_slots) if i != gr.scratch]
        assert torch.equal(t[mine], r[mine])
    assert all(torch.equal(t[slots[3]], o) for t, o in zip(kv.k, other))


def test_fallbacks_run_eagerly(session):
    """T > 0 replays a sampled variant that decodes as the eager runner (same tokens, float64 confidence);
    caches that are not the bound pool run through the eager runner, with its results."""
    mc = session.config
    kv, gr = _pool_and_runner(session)
    eager = EagerRunner(session.runner.model)
    slots = [kv.allocate() for _ in range(2)]
    states = _states(mc, 2, 40, 20, 1)
    gr.refresh(_batch(gr, "refresh", states, 20, 8, slots, kv))
    hot = dict(temperature=0.7, seeds=[11, 12])
    x_t, c_t = gr.reuse(_batch(gr, "reuse", states, 20, 8, slots, kv, **hot))
    x_e, c_e = eager.reuse(_batch(eager, "reuse", states, 20, 8, slots, kv, **hot))
    assert torch.equal(x_t, x_e) and torch.allclose(c_t, c_e, rtol=0, atol=1e-12)
    own = KVCacheManager(mc, 40, 1 << 40, torch.float32, "cpu", max_slots=2)          # not the bound pool
    gr.refresh(_batch(gr, "refresh", states, 20, 8, [0, 1], own))
    gr.reuse(_batch(gr, "reuse", states, 20, 8, [0, 1], own))
    assert gr.stats == {**gr.stats, "replays": 1, "eager_reuse": 1}


def test_bad_settings_are_named(session):
    with pytest.raises(ValueError, match="decode"):
        GraphRunner(session.runner.model, decode="approx")
    with pytest.raises(ValueError, match="CUDA"):
        GraphRunner(session.runner.model, capture=True)
    with pytest.raises(ValueError, match="graph_decode"):
        ServeConfig(graph_decode="fast")
    mc = session.config
    one = KVCacheManager(mc, 48, 1 << 40, torch.float32, "cpu", max_slots=1)
    gr = GraphRunner(session.runner.model)
    gr.bind_pool(one)                                      # one slot: graphs stay off, the slot stays free
    assert gr.pool is None and one.num_free == 1


def _gemms(model, ids) -> int:
    """Matrix products one forward issues (aten mm / addmm / bmm at the dispatcher)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten
    kinds = (aten.mm.default, aten.addmm.default, aten.bmm.default)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in kinds
            return func(*args, **(kwargs or {}))
    with Count(), torch.no_grad():
        model(ids)
    return Count.n


def test_fuse_projections_keeps_parameters_and_numbers():
    """q|k|v and gate|up fused: the same parameters (names, values: row views of the fused weight) and
    outputs, one GEMM per group (3 fewer per layer), and the fused weights held by the modules that own the
    linears (``Fusable.fused``): the linears carry no attribute a fresh ``nn.Linear`` lacks."""
    from dlc.models import build_model
    from dlc.models.common import Fusable
    from dlc.models.presets import preset_config
    plain = set(vars(torch.nn.Linear(2, 2)))
    for name, groups in (("tiny-llada", 2), ("tiny-dream", 2)):
        torch.manual_seed(0)
        m = build_model(preset_config(name)).eval()
        ids = torch.randint(0, 100, (2, 11))
        ref, gemms = m(ids), _gemms(m, ids)
        sd = {k: v.clone() for k, v in m.state_dict().items()}
        assert fuse_projections_(m) == groups * m.config.n_layers
        assert fuse_projections_(m) == 0                       # idempotent
        assert sd.keys() == m.state_dict().keys()
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
        torch.testing.assert_close(m(ids), ref, rtol=1e-5, atol=1e-5)
        assert _gemms(m, ids) == gemms - 3 * m.config.n_layers
        owners = [o for o in m.modules() if isinstance(o, Fusable)]
        assert owners and all(o.fused and all(f is not None for f in o.fused) for o in owners)
        lins = [x for x in m.modules() if isinstance(x, torch.nn.Linear)]
        assert all(set(vars(x)) == plain for x in lins), [set(vars(x)) - plain for x in lins]
        q = m.blocks[0].q_proj if name == "tiny-llada" else m.blocks[0].self_attn.q_proj
        fw = (m.blocks[0] if name == "tiny-llada" else m.blocks[0].self_attn).fused[0].weight
        assert q.weight.data_ptr() == fw.data_ptr()                 # q's rows are the fused weight's first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_matches_eager_steps():
    """On the GPU: captured Reuse steps (bucket padding included) give the eager runner's tokens, bf16."""
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)
    items = specs(6, seed=3)
    eng_g, outs_g = run_engine(sess, items, cuda_graphs=True, graph_decode="exact", device="cuda",
                               compile=False)
    assert eng_g.runner.stats["replays"] > 0 and all(g.graph is not None
                                                     for g in eng_g.runner.graphs.values())
    eng_e, outs_e = run_engine(sess, items, cuda_graphs=False, device="cuda")
    agree = sum(a == b for a, b in zip(outs_g, outs_e)) / len(items)
    assert agree >= 0.8, (outs_g, outs_e)
    _, outs_f = run_engine(sess, items, cuda_graphs=True, graph_decode="fused", device="cuda", compile=False)
    assert sum(a == b for a, b in zip(outs_f, outs_e)) / len(items) >= 0.6
