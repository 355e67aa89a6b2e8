"""Steps run ahead of the host (step.LookaheadRunner, GraphRunner.reuse_ahead / continue_ahead,
Engine._run_ahead, runtime/ahead_window.py).

A fixed-schedule Reuse step's only input from the host is the previous step's commit, so the graph runner runs
several back to back, committing on the device (``decoding.commit_ahead``); the engine keeps a window of them
in flight over the rest of the block, launching the next as each lands, applies each step's outputs through
the decoding core and drops steps whose device-side input differs from the core's own commit. On CPU the same
code path runs without capture. Tokens must equal generate()'s exactly."""
import pytest
import torch

from dlc.runtime import decoding
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import DecodeState, GenerationConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import generate
from dlc.runtime.session import open_model


@pytest.fixture(scope="module", params=["tiny-llada", "tiny-dream"])
def session(request):
    return open_model(request.param, progress=False)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine(session, lookahead, max_ms=0.0):
    """max_ms 0: a window of ``lookahead`` steps whatever this machine's step time (counts are asserted)."""
    return Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=16, max_batch_size=8, cuda_graphs=True,
                                       graph_decode="exact", lookahead_steps=lookahead,
                                       lookahead_max_ms=max_ms))


def refs_of(session, ps, params):
    return [generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
            for p in ps]


def run(session, ps, params, lookahead, max_ms=0.0):
    eng = engine(session, lookahead, max_ms)
    reqs = [eng.make_request(p, params) for p in ps]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    return eng, [r.output_ids for r in reqs]


@pytest.mark.parametrize("kv_cache", ["dual", "prefix"])
def test_steps_ahead_give_generate_tokens(session, kv_cache):
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache=kv_cache)
    ps = prompts(5)
    eng, outs = run(session, ps, params, lookahead=16)
    refs = [generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
            for p in ps]
    assert outs == refs
    assert len({tuple(o) for o in outs}) > 1                     # a decisive model: outputs vary by prompt
    st = eng.runner.stats
    assert st["ahead_calls"] > 0 and st["eager_reuse"] == 0
    assert eng.metrics.counter("lookahead_dropped_steps_total") == 0
    # 2 blocks of 8 steps each: 1 Refresh + 7 Reuse steps per block, the 7 run as one call each
    assert st["ahead_calls"] == 2 and st["replays"] == 14 and st["ahead_continued"] == 0
    off, outs_off = run(session, ps, params, lookahead=1)
    assert outs_off == refs and off.runner.stats["ahead_calls"] == 0


def test_a_window_runs_the_whole_block(session):
    """A window of 3 steps in flight goes on over the block's 7 Reuse steps: one run per block, the next step
    launched from the device's own commits as each lands (``continue_ahead``), never more than 3 in flight;
    tokens are generate()'s."""
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    ps = prompts(5)
    eng, outs = run(session, ps, params, lookahead=3)
    assert outs == refs_of(session, ps, params)
    st = eng.runner.stats
    # per block: 3 launched, then one more as each of the first 4 lands
    assert st["ahead_calls"] == 2 and st["ahead_continued"] == 8 and st["replays"] == 14
    assert eng.metrics.gauges["lookahead_in_flight_max"] == 3
    assert eng.metrics.counter("lookahead_dropped_steps_total") == 0


def test_an_arrival_stops_the_window(session):
    """A request that arrives during a run waits for the steps in flight only: the window launches no more,
    the steps in flight land and apply, and the next iteration admits it. Both requests' tokens are
    generate()'s."""
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    pa, pb = prompts(2, seed=3)
    eng = engine(session, 3)
    a, b = eng.make_request(pa, params), eng.make_request(pb, params)
    after = []                                     # a's steps applied from b's arrival until b started

    def on_step(req, *_):
        if req.state.bs - req.P == 0 and req.state.step == 2 and not after:
            eng.add_request(b)                     # a's 2nd Reuse step of its first block: b arrives
            after.append(0)
        elif after and not b.state.started:
            after[0] += 1
    a.on_step = on_step
    eng.add_request(a)
    eng.run_until_done()
    assert [a.output_ids, b.output_ids] == refs_of(session, [pa, pb], params)
    assert 1 <= after[0] <= 3                      # the window (3), not the rest of the block (5)
    assert eng.runner.stats["ahead_calls"] >= 2

def test_runs_ahead_are_bounded_by_their_measured_step_time(session):
    """``lookahead_max_ms``: once a run of this batch size has been timed, the next runs keep only the steps
    that fit the bound in flight (at least 2), so an arrival waits for those only; tokens are generate()'s."""
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    ps = prompts(5)
    eng, outs = run(session, ps, params, lookahead=16, max_ms=1e-6)
    refs = [generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
            for p in ps]
    assert outs == refs
    st = eng.runner.stats
    # block 1: one untimed window of 7 steps; block 2: a window of 2 (timed: over the bound), the next step
    # launched as each lands
    assert st["ahead_calls"] == 2 and st["ahead_continued"] == 5 and st["replays"] == 14
    assert eng.metrics.gauges["lookahead_in_flight_max"] == 2
    assert eng._ahead_step_s[5] > 0


def test_a_wrong_device_commit_is_dropped(session, monkeypatch):
    """The core checks the device's commit: a device rule that unmasks the least confident position makes
    every step after the first of a run differ; those are dropped and recomputed, and the tokens still equal
    generate()'s."""
    def worst(self, conf, masked, n_sched):
        return decoding._topk_mask(torch.where(masked, -conf, torch.full_like(conf, float("-inf"))),
                                   n_sched) & masked
    monkeypatch.setattr(decoding.ScheduleRule, "select_batched", worst)
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    ps = prompts(3, seed=1)
    eng, outs = run(session, ps, params, lookahead=16)
    refs = [generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
            for p in ps]
    assert outs == refs
    assert eng.metrics.counter("lookahead_dropped_steps_total") > 0


def test_lookahead_counts_follow_the_schedule():
    mc = open_model("tiny-llada", progress=False).config
    st = DecodeState.new([1, 2, 3], GenerationConfig(gen_length=16, block_length=8, steps=8,
                                                          kv_cache="dual"), mc)
    st.advance(8)
    assert st.phase == "refresh" and st.lookahead(16) == []        # a Refresh is not run ahead
    st.apply(torch.full((8,), 5), torch.linspace(0, 1, 8, dtype=torch.float64))
    st.advance(8)
    assert st.phase == "reuse" and st.lookahead(16) == [2, 2, 2] and st.lookahead(2) == [2, 2]
    assert st.lookahead(1) == []
    # threshold rules, smoothing and logprobs run ahead too (test_lookahead_rules.py,
    # test_lookahead_extras.py), sampling too (test_lookahead_sampled.py); random remasking stays synchronous
    for bad in (dict(threshold=0.9, remasking="random"), dict(refresh_every=2), dict(kv_cache="none")):
        gen = GenerationConfig(**{**dict(gen_length=16, block_length=8, steps=8, kv_cache="dual"), **bad})
        s = DecodeState.new([1, 2, 3], gen, mc)
        s.advance(8)
        s.apply(torch.full((8,), 5), torch.linspace(0, 1, 8, dtype=torch.float64))
        s.advance(8)
        got = s.lookahead(16)
        assert got == ([2] if "refresh_every" in bad else []), bad


def test_the_next_refresh_launches_behind_the_last_step(session):
    """One request, 4 blocks: each block's Refresh after the first is launched behind the run's last step
    (runtime/boundary.py), from the device's final block, and used once the core's state matches; tokens are
    generate()'s."""
    params = dict(gen_length=32, block_length=8, steps=32, kv_cache="dual")
    ps = prompts(1, seed=4)
    eng, outs = run(session, ps, params, lookahead=3)
    assert outs == refs_of(session, ps, params)
    m = eng.metrics
    assert m.counter("lookahead_refresh_prelaunched_total", status="used") == 3        # blocks 2, 3, 4
    assert m.counter("lookahead_refresh_prelaunched_total", status="dropped") == 0
    assert eng.runner.stats["ahead_calls"] == 4


def test_a_refresh_launched_on_a_wrong_block_is_dropped(session, monkeypatch):
    """A device commit that gets a block's last step wrong: the Refresh launched behind it read that block;
    the core's state differs, so it is dropped and the Refresh runs again over the core's tokens (tokens are
    generate()'s)."""
    from dlc.runtime.runners import ahead
    real = ahead.commit_ahead

    def wrong_last(blk, x0, conf, n_now, mask_id):
        new = real(blk, x0, conf, n_now, mask_id)
        done = (new != mask_id).all(dim=1, keepdim=True)                  # [B, 1] the block's last step
        return torch.where(done & (blk == mask_id), (new + 1) % 200, new)
    monkeypatch.setattr(ahead, "commit_ahead", wrong_last)
    params = dict(gen_length=32, block_length=8, steps=32, kv_cache="dual")
    ps = prompts(1, seed=4)
    eng, outs = run(session, ps, params, lookahead=3)
    assert outs == refs_of(session, ps, params)
    m = eng.metrics
    assert m.counter("lookahead_refresh_prelaunched_total", status="dropped") == 3
    assert m.counter("lookahead_refresh_prelaunched_total", status="used") == 0


def test_the_refresh_goes_ahead_for_the_rows_that_go_on(session):
    """Two requests in one run, one in its last block: the Refresh launched behind the run's last step holds
    only the row that starts a new block; tokens are generate()'s for both."""
    short, long_ = (dict(gen_length=n, block_length=8, steps=n, kv_cache="dual") for n in (16, 32))
    pa, pb = prompts(2, seed=5)
    eng = engine(session, 3)
    a, b = eng.make_request(pa, short), eng.make_request(pb, long_)
    for r in (a, b):
        eng.add_request(r)
    eng.run_until_done()
    assert a.output_ids == refs_of(session, [pa], short)[0]
    assert b.output_ids == refs_of(session, [pb], long_)[0]
    m = eng.metrics                     # after block 1: both rows; after block 2: b alone; after block 3: b
    assert m.counter("lookahead_refresh_prelaunched_total", status="used") == 3
    assert m.counter("lookahead_refresh_prelaunched_total", status="dropped") == 0


def test_continue_ahead_goes_on_from_the_device_state(session):
    """``continue_ahead`` (step.LookaheadRunner): 2 steps then 2 more of one run give the 4 steps of a single
    launch, token for token; after another call of the runner restaged its static inputs, it refuses."""
    from dlc.runtime.step import draw_seeds, make_batch
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    eng = engine(session, 16)
    r = eng.make_request(prompts(1, seed=6)[0], params)
    eng.add_request(r)
    eng.step()                                                       # the Refresh
    st, runner = r.state, eng.runner
    assert st.phase == "reuse"
    batch = make_batch(runner, [st], [r.slots], eng.kv, draw_seeds([st]))
    counts = torch.tensor([st.lookahead(4)])                         # [1, 4]
    whole = runner.reuse_ahead(batch, counts)
    first = runner.reuse_ahead(batch, counts[:, :2])
    more = runner.continue_ahead(first, counts[:, 2:])
    assert torch.equal(torch.cat([first.x0, more.x0]), whole.x0)
    assert torch.equal(torch.cat([first.blocks, more.blocks]), whole.blocks)
    assert len({tuple(b.tolist()) for b in whole.blocks[:, 0]}) == 4    # each step committed a token
    runner.reuse(batch)                                              # restages the static inputs
    with pytest.raises(ValueError, match="latest run"):
        runner.continue_ahead(more, counts[:, :1])


def test_a_refused_launch_ends_the_window_only(session, monkeypatch):
    """A runner that refuses to go on with a run (``continue_ahead`` raises): the steps in flight apply, the
    rest of the block runs one step at a time, and no request fails; tokens are generate()'s."""
    from dlc.runtime.runners.graph import GraphRunner

    def refuse(self, steps, counts):
        raise ValueError("no more")
    monkeypatch.setattr(GraphRunner, "continue_ahead", refuse)
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    ps = prompts(2, seed=7)
    eng, outs = run(session, ps, params, lookahead=3)
    assert outs == refs_of(session, ps, params)
    assert eng.runner.stats["ahead_calls"] >= 2 and eng.metrics.counter("requests_total", status="error") == 0
