"""Block-diffusion models (LLaDA2.x, SDAR) on the graph runner's fast path.

* A Reuse step over exactly one block (every step of a block after its first, with the exact block cache)
  replays the ordinary captured Reuse step over the prefix up to the block's end (``step.block_as_prefix``);
  a block's first step (the finished block and the new one: truly block-causal) stays eager.
* LLaDA2.0's / SDAR's block-threshold rule (``BlockThresholdRule``) runs its steps ahead of the host
  (``select_ahead``, ``DecodeState.lookahead`` for block decoders, bounded by ``ahead_horizon``).
* Sampled block steps (T > 0: confidence from tempered rows) replay a sampled variant that divides the rows
  by T as the eager runner does (``ExtrasKey.tempered``), and run ahead too.

On CPU the graph runner runs uncaptured over the same static buffers (``graph_decode="exact"``): tokens must
equal generate() on the eager runner exactly. The GPU tests capture (fp32, skipped without CUDA)."""
import dataclasses

import pytest
import torch

from dlc.models import build_model
from dlc.models.loading import TINY_INIT_STD, init_weights
from dlc.models.presets import preset_config
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.session import Session
from dlc.runtime.step import block_rows_as_prefix

# per model, a token it predicts now and then (test_block_decoding.py): stops happen on some prompts only
EOS_OF = {"tiny-llada2": 72, "tiny-sdar": 25}
PARAMS = dict(gen_length=24, block_length=8, steps_per_block=8, threshold=0.2, kv_cache="block")


def tiny(name: str, device: str = "cpu"):
    c = preset_config(name)
    c = dataclasses.replace(c, eos_id=EOS_OF[name], pad_id=EOS_OF[name], stop_ids=[EOS_OF[name]])
    torch.manual_seed(0)
    m = build_model(c)
    init_weights(m, 0, TINY_INIT_STD)
    return m.to(device).eval()


@pytest.fixture(scope="module", params=list(EOS_OF))
def model(request):
    return tiny(request.param)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (int(torch.randint(2, 14, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine(model, lookahead: int = 1, **kw) -> Engine:
    session = Session(EagerRunner(model), None, model.config, False, "test")
    return Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=8, max_batch_size=8, cuda_graphs=True,
                                       graph_decode="exact", lookahead_steps=lookahead, lookahead_max_ms=0.0,
                                       **kw))


def eager_tokens(model, ps, params):
    return [generate(model, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0] for p in ps]


def test_later_steps_of_a_block_replay_the_ordinary_graph(model):
    """One request at a time: every later step of a block replays the captured Reuse step, and so does a
    first block's first step that feeds that block alone (a prompt shorter than a block: keys [0, be)
    again); each block's first step (the finished block + the new one, or the prefill of the prompt's
    complete blocks + the first block) replays it too, one row per fed block in the request's slot
    (``step.block_rows_as_prefix``); nothing runs eagerly and tokens are the eager runner's."""
    ps = prompts(3, seed=1) + [list(range(20, 31))]               # an 11-token prompt: a prefill + a block
    eng = engine(model)
    outs, forwards, blocks = [], 0, 0
    for p in ps:
        seen = set()
        r = eng.make_request(p, PARAMS)
        r.on_step = lambda req, off, *_: seen.add(off)          # the block each applied step decoded
        eng.add_request(r)
        eng.run_until_done()
        outs.append(r.output_ids)
        forwards, blocks = forwards + r.state.forwards, blocks + len(seen)
    assert outs == eager_tokens(model, ps, PARAMS)
    assert len({tuple(o) for o in outs}) > 1                     # decisive: outputs vary by prompt
    st = eng.runner.stats
    assert blocks >= 2 * len(ps) and forwards > blocks           # several blocks, several steps each
    one_block_prefill = sum(len(p) < PARAMS["block_length"] for p in ps)
    assert 0 < one_block_prefill < len(ps)
    assert st["eager_reuse"] == 0
    assert st["block_rows"] == blocks - one_block_prefill
    assert st["replays"] == forwards


def test_steps_over_several_blocks_replay_in_views_of_the_warmed_rows(model, monkeypatch):
    """Two requests with 30-token prompts (a prefill of four blocks: three complete ones and the first) and
    the views capped at four rows (two blocks of both sequences per view): the prefill replays as two views,
    in block order but the decoded block first in the last view; tokens equal generate()'s. With views of
    two rows the prefill would take four views, over ``MAX_BLOCK_VIEWS``: it runs eagerly."""
    from dlc.runtime.runners import graph
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, 250, (30,), generator=g).tolist() for _ in range(2)]
    eng = engine(model)
    eng.runner.warm_rows = 4
    made = []

    def views(batch, *a):
        out = block_rows_as_prefix(batch, *a)
        made.append([(v.n_seqs, v.q_start.tolist()) for v in out or []])
        return out
    monkeypatch.setattr(graph, "block_rows_as_prefix", views)
    reqs = [eng.make_request(p, PARAMS) for p in ps]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.output_ids for r in reqs] == eager_tokens(model, ps, PARAMS)
    assert reqs[0].output_ids != reqs[1].output_ids
    assert made[0] == [(4, [0, 0, 8, 8]), (4, [24, 24, 16, 16])]                   # the prefill
    st = eng.runner.stats
    assert st["eager_reuse"] == 0 and st["block_rows"] == len(made) >= 2
    eng.runner.warm_rows, made[:] = 2, []                        # four views of two rows: eager
    again = [eng.make_request(p, PARAMS) for p in ps]
    for r in again:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.output_ids for r in again] == [r.output_ids for r in reqs]
    assert len(made[0]) == 4 and st["eager_reuse"] == 1          # the prefill only


def test_a_batch_of_block_requests_replays_with_generate_tokens(model):
    """Several requests in one group (thresholds, the static schedule, an early stop), batched: tokens are
    generate()'s on the eager runner and every step replays (first steps of blocks as rows per block)."""
    ps = prompts(6, seed=2)
    kinds = [PARAMS, dict(PARAMS, threshold=None), dict(PARAMS, eos_early_stop=True)]
    eng = engine(model)
    items = [(p, kinds[i % 3]) for i, p in enumerate(ps)]
    got = [r.output_ids for r in eng.run_requests(items)]
    assert got == [eager_tokens(model, [p], kw)[0] for p, kw in items]
    assert len({tuple(o) for o in got}) > 1
    st = eng.runner.stats
    assert st["replays"] > st["block_rows"] > 0 and st["eager_reuse"] == 0


RULE_EXTRAS = {"entropy_bound": dict(threshold=None, entropy_bound=0.5),
               "logprobs": dict(logprobs=3), "credit": dict(credit=True), "smoothing": dict(smoothing=True),
               "all": dict(credit=True, smoothing=True, logprobs=1)}


@pytest.mark.parametrize("kind", list(RULE_EXTRAS))
def test_block_steps_with_rule_extras_replay_with_generate_tokens(model, kind):
    """Block decoders with the rules' extras (entropy, logprobs, credit, smoothing): every step replays, a
    block's first step as rows per block with the batch's extras (credit rows follow their sequence), and
    the later steps run ahead; tokens and logprobs are generate()'s on the eager runner, and the rule
    changes what is decoded."""
    ps = prompts(4, seed=8)
    params = dict(PARAMS, **RULE_EXTRAS[kind])
    eng = engine(model, lookahead=16)
    reqs = eng.run_requests([(p, params) for p in ps])
    ref = [generate(model, [p], GenerationConfig(**params, stop_at_eos=True)) for p in ps]
    assert [r.output_ids for r in reqs] == [g.token_ids[0] for g in ref]
    if params.get("logprobs") is not None:
        for r, g in zip(reqs, ref):
            got, want = r.state.token_logprobs, g.logprobs[0]
            assert [a is None for a in got] == [b is None for b in want]       # None: past a stop
            pairs = [(a, b) for a, b in zip(got, want) if a is not None]
            assert len(pairs) >= 4
            for (lp, ids, lps), (lp2, ids2, lps2) in pairs:       # fp32 logits of other shapes: 1e-5
                assert ids == ids2 and abs(lp - lp2) < 1e-5
                torch.testing.assert_close(torch.tensor(lps), torch.tensor(lps2), rtol=0, atol=1e-5)
            assert len({round(a[0], 3) for a, _ in pairs}) > 2                # logprobs vary
    st = eng.runner.stats
    assert st["block_rows"] > 0 and st["eager_reuse"] == 0 and st["ahead_calls"] > 0, st
    if kind != "logprobs":
        assert [r.output_ids for r in reqs] != eager_tokens(model, ps, PARAMS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(EOS_OF))
def test_captured_block_steps_give_the_eager_tokens(name):
    """On the GPU (captured graphs, fp32, exact decoding): block requests give the eager runner's tokens, the
    later steps of each block replayed from captured graphs."""
    m = tiny(name, "cuda")
    ps = prompts(5, seed=3)
    eng = engine(m, device="cuda", compile=False)
    got = [r.output_ids for r in eng.run_requests([(p, PARAMS) for p in ps])]
    assert got == eager_tokens(m, ps, PARAMS)
    assert eng.runner.stats["replays"] > 0
    assert any(g.graph is not None for g in eng.runner.graphs.values())


# ------------------------------------------------------------------------------ the block threshold ahead
def served(model, items, lookahead, spy=None):
    """items (prompt, params) through one engine -> (engine, outputs); ``spy``: a list that collects the rows
    of each run ahead."""
    eng = engine(model, lookahead)
    if spy is not None:
        real = eng.runner.reuse_ahead

        def reuse_ahead(batch, counts, **kw):
            spy.append(batch.n_seqs)
            return real(batch, counts, **kw)
        eng.runner.reuse_ahead = reuse_ahead
    return eng, [r.output_ids for r in eng.run_requests(items)]


def counter(eng, name):
    return eng.metrics.counter(name)


def check_ahead(model, items, spy=None):
    """lookahead 16 == lookahead 1 == generate() on the eager runner; the steps ran ahead and every dropped
    step was past its block's end (no device commit differed from the core's) -> the engine run ahead, the
    outputs."""
    sync, want = served(model, items, 1)
    assert sync.runner.stats["ahead_calls"] == 0
    eng, got = served(model, items, 16, spy)
    assert got == want == [eager_tokens(model, [p], kw)[0] for p, kw in items]
    assert eng.runner.stats["ahead_calls"] > 0
    assert counter(eng, "lookahead_dropped_steps_total") == counter(eng, "lookahead_past_block_steps_total")
    return eng, got


def test_block_threshold_runs_ahead_with_the_synchronous_tokens(model):
    """B=4 in one group, gen spanning 3-4 blocks: the block threshold's later steps of each block run ahead
    (runs of >= 3 rows), with the synchronous path's and generate()'s tokens, and the horizon keeps steps
    from launching past a block's end (none here; without it, some)."""
    items = [(p, PARAMS) for p in prompts(4, seed=5)]
    rows = []
    eng, got = check_ahead(model, items, rows)
    assert len({tuple(o) for o in got}) > 1 and max(rows) >= 3
    assert eng.metrics.counter("lookahead_runs_total", rule="rules") > 0        # the core's AheadCommit
    assert counter(eng, "lookahead_past_block_steps_total") == 0


def test_without_the_horizon_steps_past_the_block_are_dropped(model, monkeypatch):
    """The threshold empties blocks before their schedule ends: a run launching the whole schedule
    (``ahead_bounded`` off) spends steps past the block's end, which commit nothing and are dropped; the
    tokens stay the synchronous path's."""
    from dlc.runtime.decoding import DecodeState
    monkeypatch.setattr(DecodeState, "ahead_bounded", lambda self: False)
    eng, _ = check_ahead(model, [(p, PARAMS) for p in prompts(2, seed=5)])
    assert counter(eng, "lookahead_past_block_steps_total") > 0


def test_an_early_stop_mid_run_drops_the_later_steps(model):
    """eos_early_stop: a stop id (the request's ``stop_token_ids``: the first new token past the first block
    of each prompt's plain output) committed mid-run settles the block; the device's later steps no longer
    match the core and are dropped (past the block), and tokens are the synchronous path's."""
    base = dict(PARAMS, threshold=0.9)
    ps = prompts(3, seed=6)
    dropped, stops = 0, 0
    for p, out in zip(ps, eager_tokens(model, ps, base)):
        pos = next((i for i in range(9, len(out)) if out[i] not in out[:i]), None)
        if pos is None:                                              # the output stopped early by itself
            continue
        eng, got = check_ahead(model, [(p, dict(base, eos_early_stop=True, stop_token_ids=[out[pos]]))])
        assert got[0] == out[:pos]                                   # the stop cut the output there
        dropped, stops = dropped + counter(eng, "lookahead_past_block_steps_total"), stops + 1
    assert stops >= 2 and dropped > 0                                # some stop came with steps in flight


def test_a_wrong_device_commit_is_dropped(model, monkeypatch):
    """The core checks every device commit: a device block threshold that commits the least confident masks
    makes the runs' later steps differ; they are dropped and run again, tokens stay generate()'s."""
    from dlc.runtime import decoding

    def worst(self, conf, masked, n_sched):
        return decoding._topk_mask(torch.where(masked, -conf, torch.full_like(conf, float("inf"))),
                                   n_sched) & masked
    monkeypatch.setattr(decoding.BlockThresholdRule, "select_ahead", worst)
    items = [(p, PARAMS) for p in prompts(3, seed=7)]
    _, want = served(model, items, 1)
    eng, got = served(model, items, 16)
    assert got == want == [eager_tokens(model, [p], kw)[0] for p, kw in items]
    assert counter(eng, "lookahead_dropped_steps_total") > counter(eng, "lookahead_past_block_steps_total")


def test_block_lookahead_counts(model):
    """``DecodeState.lookahead`` for block decoders: nothing for a block's first step (two blocks fed), the
    schedule's counts once the block is fed alone; LLaDA2.1's token editing stays synchronous."""
    from dlc.runtime.decoding import DecodeState
    mc = model.config

    def stepped(**kw):
        st = DecodeState.new(list(range(1, 11)), GenerationConfig(**dict(PARAMS, **kw)), mc)
        st.advance(8)
        first = st.lookahead(16)
        st.apply(torch.full((8,), 5), torch.linspace(0, 0.1, 8, dtype=torch.float64))
        st.advance(8)
        return first, st
    first, st = stepped()
    assert first == [] and st.q_span() == (8, 16) and st.lookahead(16) == [1] * 7
    assert st.ahead_bounded() and st.ahead_horizon() == 5             # 5 masks left, 1 a step so far
    assert stepped(decoder="llada2.1", threshold=0.5, steps_per_block=None)[1].lookahead(16) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(EOS_OF))
def test_captured_block_threshold_runs_ahead(name):
    """On the GPU (captured graphs, fp32, exact decoding): lookahead 16 gives lookahead 1's tokens, the steps
    ran ahead, and no device commit differed from the core's."""
    m = tiny(name, "cuda")
    items = [(p, PARAMS) for p in prompts(5, seed=8)]
    out = {}
    for la in (1, 16):
        eng = engine(m, la, device="cuda", compile=False)
        out[la] = ([r.output_ids for r in eng.run_requests(items)], eng)
    eng = out[16][1]
    assert out[16][0] == out[1][0] and eng.runner.stats["ahead_calls"] > 0
    assert counter(eng, "lookahead_dropped_steps_total") == counter(eng, "lookahead_past_block_steps_total")


def test_sampled_block_steps_replay_tempered(model):
    """Block decoders at T > 0 decode tempered (confidence from rows / T, drawn at temperature 1: the eager
    runner's ``_tempered``): their later steps replay a sampled variant that divides the rows the same way,
    and run ahead; tokens are generate()'s on the eager runner for each seed, and the seeds matter."""
    ps = prompts(3, seed=5)
    params = dict(PARAMS, temperature=0.8)
    items = [(p, dict(params, seed=7 + i)) for i, p in enumerate(ps)]
    eng = engine(model, lookahead=16)
    outs = [r.output_ids for r in eng.run_requests(items)]
    assert outs == [eager_tokens(model, [p], prm)[0] for p, prm in items]
    st = eng.runner.stats
    assert st["replays"] > 0 and st["ahead_calls"] > 0
    other = [eager_tokens(model, [p], dict(params, seed=70 + i))[0] for i, p in enumerate(ps)]
    assert other != outs


@pytest.mark.parametrize("filters", [dict(top_p=0.9), dict(top_k=20, top_p=0.8), dict(top_k=5, min_p=0.05)],
                         ids=["top_p", "top_k_top_p", "top_k_min_p"])
def test_filtered_block_steps_replay_with_the_survivors_confidence(model, filters):
    """Block decoders at T > 0 with top-k / top-p / min-p: the steps replay a filtered tempered variant
    (top-p alone through the bisection, small top-k over the candidates) whose confidence is renormalised
    over the survivors as the eager runner's; nothing runs eagerly and tokens are generate()'s for each seed;
    the filter matters."""
    ps = prompts(3, seed=6)
    params = dict(PARAMS, temperature=0.8, **filters)
    items = [(p, dict(params, seed=11 + i)) for i, p in enumerate(ps)]
    eng = engine(model, lookahead=16)
    outs = [r.output_ids for r in eng.run_requests(items)]
    assert outs == [eager_tokens(model, [p], prm)[0] for p, prm in items]
    st = eng.runner.stats
    assert st["replays"] > 0 and st["eager_reuse"] == 0
    assert any(g.ex and g.ex.tempered and g.ex.filtered for g in eng.runner.graphs.values())
    plain = [eager_tokens(model, [p], dict(PARAMS, temperature=0.8, seed=11 + i))[0]
             for i, p in enumerate(ps)]
    assert plain != outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(EOS_OF))
def test_captured_sampled_block_steps_give_the_eager_tokens(name):
    """On the GPU (captured graphs, fp32): sampled block requests (tempered), plain and with top-p (the fused
    bisection with the survivors' confidence) or top-k + min-p, replay and run ahead with the eager
    runner's tokens; nothing falls back to the eager runner."""
    m = tiny(name, "cuda")
    for filters in ({}, dict(top_p=0.9), dict(top_k=5, min_p=0.05)):
        items = [(p, dict(PARAMS, temperature=0.8, seed=3 + i, **filters))
                 for i, p in enumerate(prompts(5, seed=3))]
        eng = engine(m, 16, device="cuda", compile=False)
        got = [r.output_ids for r in eng.run_requests(items)]
        assert got == [eager_tokens(m, [p], prm)[0] for p, prm in items], filters
        st = eng.runner.stats
        assert st["replays"] > 0 and st["ahead_calls"] > 0 and st["eager_reuse"] == 0, (filters, st)
        assert any(g.graph is not None for g in eng.runner.graphs.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(EOS_OF))
def test_captured_block_rule_extras_give_the_eager_tokens(name):
    """On the GPU (captured graphs, fp32): block requests with entropy-bound, and with credit + smoothing +
    logprobs, replay every step (first steps as rows per block) and run ahead with the eager runner's tokens;
    logprobs within 1e-4 (fp32 GEMMs of other shapes)."""
    m = tiny(name, "cuda")
    ps = prompts(5, seed=9)
    for kind in ("entropy_bound", "all"):
        params = dict(PARAMS, **RULE_EXTRAS[kind])
        eng = engine(m, 16, device="cuda", compile=False)
        reqs = eng.run_requests([(p, params) for p in ps])
        ref = [generate(m, [p], GenerationConfig(**params, stop_at_eos=True)) for p in ps]
        assert [r.output_ids for r in reqs] == [g.token_ids[0] for g in ref], kind
        for r, g in zip(reqs, ref):
            for a, b in zip(r.state.token_logprobs or [], g.logprobs[0] if g.logprobs else []):
                assert (a is None) == (b is None) and (a is None or abs(a[0] - b[0]) < 1e-4), kind
        st = eng.runner.stats
        assert st["block_rows"] > 0 and st["eager_reuse"] == 0 and st["ahead_calls"] > 0, (kind, st)
        assert any(g.graph is not None for g in eng.runner.graphs.values())
