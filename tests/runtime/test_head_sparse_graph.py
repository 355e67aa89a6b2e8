"""Head-sparse Reuse on the eager model and on GraphRunner's static-buffer (CUDA-graph) path.

The eager runner with ``sparse_retention`` scores keys at Refresh and attends per head over the kept
columns at Reuse, as head-sparse engines do (its tokens equal the compiled head-sparse program's);
GraphRunner runs the same steps from its static buffers (one kept-column buffer per graph, the count per row
in ``meta``), so its tokens equal the eager sparse runner's. On CPU the static path runs without capture
(``capture=False``, like tests/runtime/test_graph_runner.py); the GPU test at the end captures (skipped
without CUDA)."""
import math

import pytest
import torch

from dlc.models.sparse_heads import kept_counts, keep_columns_rows
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import Session, open_model
from dlc.runtime.step import build_batch

S_MAX = 96
CONF_ATOL = 1e-6          # fp32: the graph's kept-column buffer is wider than the batch's (masked entries)


@pytest.fixture(scope="module", params=["tiny-llada", "tiny-dream"])
def session(request):
    return open_model(request.param, progress=False)


def test_kept_count_follows_each_rows_length():
    """Each row keeps its fed columns plus ceil(r x (L - T)) of its own other keys, whatever it is batched
    with; shorter rows are padded with column W - 1, one of their padding keys."""
    g = torch.Generator().manual_seed(0)
    nl, Hkv, W, T = 2, 3, 40, 4
    lengths = [40, 23, 9]
    scores = torch.rand(nl, 3, Hkv, W, generator=g)
    for b, L in enumerate(lengths):
        scores[:, b, :, L:] = float("-inf")
    cols = torch.tensor([[30, 31, 32, 33], [10, 11, 12, 13], [5, 6, 7, 8]])
    keep = keep_columns_rows(scores, cols, lengths, 0.25)
    n = kept_counts(lengths, T, 0.25)
    assert n == [T + math.ceil(0.25 * (L - T)) for L in lengths] == [13, 9, 6]
    assert keep.shape == (nl, 3, Hkv, 13)
    for b, L in enumerate(lengths):
        alone = keep_columns_rows(scores[:, b:b + 1], cols[b:b + 1], [L], 0.25)    # [nl, 1, Hkv, n_b]
        assert torch.equal(keep[:, b, :, :n[b]], alone[:, 0])
        assert bool((keep[:, b, :, n[b]:] == W - 1).all())                       # a padding key of row b
        assert bool((keep[:, b, :, :n[b]] < L).all())
        assert all(set(cols[b].tolist()) <= set(keep[i, b, h].tolist())
                   for i in range(nl) for h in range(Hkv))
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])                         # heads keep different keys
    full = keep_columns_rows(scores, cols, lengths, 1.0)                         # 1.0: every real key
    assert all(full[0, b, 0, :L].tolist() == list(range(L)) for b, L in enumerate(lengths))


def _seqs(mc, lengths, P, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in lengths:
        x = torch.randint(0, 200, (L,), generator=g)
        x[P:] = mc.mask_id
        out.append(x)
    return out


def _batch(runner, phase, seqs, P, blk, slots, pool):
    spans = [(P, P + blk)] * len(seqs) if phase == "reuse" else None
    return build_batch(runner, phase, seqs, [P] * len(seqs), [P] * len(seqs), blk, spans,
                       [(s,) for s in slots], pool)


@pytest.mark.parametrize("retention", [0.25, 1.0])
def test_graph_steps_equal_eager_sparse_steps(session, retention):
    """Bucket 4 with 4 rows, then 3 (one padding row, reset from last call's real row): each replay's tokens
    equal the eager sparse runner's step over the same pool; retention 0.25 attends differently from dense,
    1.0 gives dense's tokens."""
    mc, model = session.config, session.runner.model
    kv = KVCacheManager(mc, S_MAX, 1 << 40, torch.float32, "cpu", max_slots=6, head_scores=True)
    gr = GraphRunner(model, decode="exact", buckets=(1, 2, 4, 8), sparse_retention=retention)
    gr.bind_pool(kv)
    eager, dense = EagerRunner(model, sparse_retention=retention), EagerRunner(model)
    slots = [kv.allocate() for _ in range(4)]
    P, blk = 20, 8
    for call, lengths in enumerate(([60, 44, 40, 52], [41, 70, 33])):
        seqs = _seqs(mc, lengths, P, call)
        sl = slots[:len(seqs)]
        eager.refresh(_batch(eager, "refresh", seqs, P, blk, sl, kv))          # writes the head scores
        assert torch.isfinite(kv.scores[:, sl[0], :, :lengths[0]]).all()
        pool = (kv.k_all.clone(), kv.v_all.clone())
        x_ref, c_ref = eager.reuse(_batch(eager, "reuse", seqs, P, blk, sl, kv))
        x_dense, c_dense = dense.reuse(_batch(dense, "reuse", seqs, P, blk, sl, kv))
        kv.k_all.copy_(pool[0])
        kv.v_all.copy_(pool[1])
        batch = _batch(gr, "reuse", seqs, P, blk, sl, kv)
        assert batch.keep_idx.shape[-1] == max(kept_counts(lengths, blk + mc.logit_shift, retention))
        x, c = gr.reuse(batch)
        assert gr.stats["replays"] == call + 1 and gr.stats["eager_reuse"] == 0
        assert torch.equal(x, x_ref) and torch.allclose(c, c_ref, rtol=0, atol=CONF_ATOL)
        assert len(set(x.flatten().tolist())) > 1
        g = gr.graphs[(4, blk + mc.logit_shift, blk)]
        T = blk + mc.logit_shift                                   # padding rows attend their own block
        assert bool((g.keep[:, len(seqs):, :, :T] == torch.arange(T)).all())
        assert g.n_keep[len(seqs):].tolist() == [T] * (4 - len(seqs))
        assert torch.isfinite(kv.k_all[:, gr.scratch]).all()
        if retention == 1.0:
            assert torch.equal(x, x_dense) and torch.allclose(c, c_dense, rtol=0, atol=CONF_ATOL)
        else:
            assert not torch.allclose(c, c_dense, rtol=0, atol=1e-3)            # the kept quarter matters
    assert list(gr.graphs) == [(4, blk + mc.logit_shift, blk)]                    # one graph, both calls


def test_kept_columns_are_chosen_once_per_slot_and_block(session):
    """A Reuse batch chooses each row's columns from its slot's scores once; the block's later steps reuse the
    choice (equal to a fresh top-k) until the slot's next Refresh or its release; another fed span or length
    chooses again."""
    mc, model = session.config, session.runner.model
    kv = KVCacheManager(mc, S_MAX, 1 << 40, torch.float32, "cpu", max_slots=4, head_scores=True)
    eager = EagerRunner(model, sparse_retention=0.25)
    slots = [kv.allocate() for _ in range(3)]
    P, blk, lengths = 20, 8, [60, 44, 52]
    seqs = _seqs(mc, lengths, P, 7)
    eager.refresh(_batch(eager, "refresh", seqs, P, blk, slots, kv))
    first = _batch(eager, "reuse", seqs, P, blk, slots, kv).keep_idx
    assert kv.kept_stats == {"chosen": 3, "reused": 0}
    T = blk + mc.logit_shift
    cols = torch.arange(P - mc.logit_shift, P - mc.logit_shift + T).expand(3, T)
    fresh = keep_columns_rows(kv.scores[:, slots, :, :max(lengths)], cols, lengths, 0.25)
    assert torch.equal(first, fresh)
    again = _batch(eager, "reuse", seqs[:2], P, blk, slots[:2], kv).keep_idx    # next step, two rows left
    assert kv.kept_stats == {"chosen": 3, "reused": 2}
    assert torch.equal(again, fresh[:, :2, :, :again.shape[-1]])
    eager.refresh(_batch(eager, "refresh", seqs[:1], P, blk, slots[:1], kv))     # row 0's next block
    kv.free(slots[2])
    _batch(eager, "reuse", seqs, P, blk, [slots[0], slots[1], kv.allocate()], kv)
    assert kv.kept_stats == {"chosen": 5, "reused": 3}                          # rows 0 and 2 chose again


def _specs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 200, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        out.append((prompt, dict(gen_length=16, block_length=8, steps=16 if i % 2 else 8,
                                 kv_cache=("dual", "prefix")[i % 2], remasking="low_confidence")))
    return out


def test_engine_replays_sparse_steps_with_eager_sparse_tokens(session):
    """Serving with CUDA graphs over a head-sparse eager model: GraphRunner inherits the retention, replays
    every Reuse step (no eager fallback) and each request's tokens equal generate() on the eager sparse
    runner; they differ from dense decoding."""
    items = _specs(6, seed=4)
    er = EagerRunner(session.runner.model, sparse_retention=0.25)
    eng = Engine(session, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8, cuda_graphs=True,
                                      graph_decode="exact", sparse_retention=0.25))     # --sparse-retention
    reqs = eng.run_requests(items)
    assert isinstance(eng.runner, GraphRunner) and eng.runner.sparse_retention == 0.25
    assert eng.runner.stats["replays"] > 0 and eng.runner.stats["eager_reuse"] == 0
    assert eng.kv.scores is not None
    differ = 0
    for (p, params), r in zip(items, reqs):
        cfg = GenerationConfig(**params, stop_at_eos=True)
        assert r.output_ids == generate(er, [p], cfg).token_ids[0]
        differ += r.output_ids != generate(session.runner, [p], cfg).token_ids[0]
    assert differ >= 2


def test_eager_sparse_equals_the_compiled_sparse_program():
    """The eager model's head-sparse steps (scores from its Refresh, kept columns read from the pool) give
    the tokens of the compiled head-sparse programs (sparsify_heads pass) at retention 0.5."""
    from dlc.compiler import in_memory_runner
    m = open_model("tiny-llada", progress=False).runner.model
    prompts = [[5, 17, 99, 3, 44, 12, 9, 100, 101, 7, 8, 9, 10], [42, 8], [11, 12, 13, 14, 15, 16, 17]]
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    eager = generate(EagerRunner(m, sparse_retention=0.5), prompts, cfg).token_ids
    compiled = in_memory_runner(m, sparse_retention=0.5, block_length=8)
    assert eager == generate(compiled, prompts, cfg).token_ids
    assert eager != generate(EagerRunner(m), prompts, cfg).token_ids


def test_bad_retention_is_named(session):
    with pytest.raises(ValueError, match="sparse_retention"):
        EagerRunner(session.runner.model, sparse_retention=0.0)
    with pytest.raises(ValueError, match="sparse_retention"):
        GraphRunner(session.runner.model, sparse_retention=1.5)
    with pytest.raises(ValueError, match="sparse_retention must be in"):
        ServeConfig(sparse_retention=2.0)
    gr = GraphRunner(session.runner.model, sparse_retention=0.5)              # a runner fixed at another one
    sess = Session(gr, session.tokenizer, session.config, session.chat, session.source)
    with pytest.raises(ValueError, match="this GraphRunner runs head-sparse at retention 0.5"):
        Engine(sess, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, sparse_retention=0.25))


def test_serve_cli_refuses_a_bad_retention_in_one_line():
    from click.testing import CliRunner
    from dlc.runtime.server_cli import serve_command
    res = CliRunner().invoke(serve_command, ["tiny-llada", "--sparse-retention", "0", "--device", "cpu"])
    assert res.exit_code != 0 and "sparse_retention must be in (0, 1]" in res.output
    assert "Traceback" not in res.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_sparse_steps_match_eager_sparse_on_gpu():
    """On the GPU: captured head-sparse Reuse steps (Triton pool attention over kept columns) give the eager
    sparse runner's tokens, bf16 (the two read different kept-buffer widths: rounding may flip a few)."""
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)
    items = _specs(6, seed=3)
    outs = {}
    for graphs in (True, False):
        er = EagerRunner(sess.runner.model, sparse_retention=0.25)
        s = Session(er, sess.tokenizer, sess.config, sess.chat, sess.source)
        eng = Engine(s, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8, cuda_graphs=graphs,
                                    graph_decode="exact", compile=False, device="cuda"))
        reqs = eng.run_requests(items)
        if graphs:
            st = eng.runner.stats
            assert st["replays"] > 0 and st["eager_reuse"] == 0
            assert all(g.graph is not None and g.keep is not None for g in eng.runner.graphs.values())
        outs[graphs] = [r.output_ids for r in reqs]
    assert sum(a == b for a, b in zip(outs[True], outs[False])) / len(items) >= 0.8


def test_engine_program_graphs_replay_sparse_steps():
    """A head-sparse engine (compiled programs, in memory) replays its Reuse program from ProgramGraphs'
    static buffers (no capture on CPU): keep_idx padded to a kept-width bucket with a masked column,
    padding rows keeping [0, K); tokens equal the uncaptured program's through generate()."""
    from dlc.compiler import in_memory_runner
    s = open_model("tiny-llada", progress=False)
    cr = in_memory_runner(s.runner.model, sparse_retention=0.25, block_length=8)
    items = _specs(6, seed=4)
    eng = Engine(Session(cr, s.tokenizer, s.config, s.chat, s.source),
                 ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8))
    eng.runner.enable_graphs(True, capture=False)
    eng.runner.bind_pool(eng.kv)
    reqs = eng.run_requests(items)
    st, keys = eng.runner.graphs.stats, list(eng.runner.graphs.graphs)
    assert st["replays"] > 0 and {k.kept for k in keys} == {64}                  # kept bucket 64 > K
    differ = 0
    for (p, params), r in zip(items, reqs):
        cfg = GenerationConfig(**params, stop_at_eos=True)
        assert r.output_ids == generate(cr, [p], cfg).token_ids[0]
        differ += r.output_ids != generate(s.runner, [p], cfg).token_ids[0]
    assert differ >= 2
