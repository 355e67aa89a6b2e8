"""Logprobs and iteration smoothing run their Reuse steps ahead on the device too (issues 18 / 15).

``logprobs``: each step's logprob and top alternatives land with the step (``AheadSteps.extras``) and the host
records the selected positions' as the synchronous path does. Smoothing: the device builds the next step's
soft input from the step's soft embedding (``decoding.AheadCommit.carry_smoothing``: w x soft where still
masked, the host's ops in its order and dtypes) in the runner's static embedding delta. Tokens AND the
logprobs returned must equal the synchronous path's (the same engine with ``lookahead_steps=1``) exactly: the
same kernels over the same shapes. On CPU the graph runner runs uncaptured (the same staging, commits and
static inputs); bench/paced_device.py's emulated device runs the eager runner's steps ahead."""
import sys
from pathlib import Path

import pytest
import torch

from dlc.runtime import decoding
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.runners.eager import embed_add
from dlc.runtime.session import Session, open_model
from dlc.runtime.step import draw_seeds, make_batch

BASE = dict(gen_length=32, block_length=16, steps=32, kv_cache="dual")
EXTRAS = {"logprobs": dict(logprobs=3), "logprobs_threshold": dict(threshold=0.3, logprobs=0),
          "smoothing": dict(smoothing=True), "smoothing_threshold": dict(threshold=0.3, smoothing=True),
          "smoothing_top_k": dict(threshold=0.3, smoothing=True, smoothing_top_k=4)}


@pytest.fixture(scope="module")
def session():
    return open_model("tiny-llada", progress=False)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine(session, lookahead, runner=None):
    if runner is None:
        return Engine(session, ServeConfig(model="tiny-llada", max_seq_len=96, kv_cache_mb=16,
                                           max_batch_size=8, cuda_graphs=True, graph_decode="exact",
                                           lookahead_steps=lookahead, lookahead_max_ms=0.0))
    return Engine(Session(runner, None, runner.config, False, "t"),
                  ServeConfig(model="t", device="cpu", max_batch_size=8, max_num_tokens=1024, max_seq_len=96,
                              kv_cache_mb=16, lookahead_steps=lookahead, lookahead_max_ms=0.0))


def serve(session, items, lookahead, runner=None):
    """items: (prompt, params) -> (engine, [(output ids, token logprobs)])."""
    eng = engine(session, lookahead, runner)
    reqs = eng.run_requests(items)
    return eng, [(r.output_ids, r.state.token_logprobs) for r in reqs]


def counter(eng, name, **labels):
    return eng.metrics.counter(name, **labels)


def check_ahead(session, items, runner=None):
    """Served with steps ahead == served one step at a time (tokens and logprobs, exactly); the rows ran
    ahead, every device commit was the core's. Returns the outputs."""
    sync, want = serve(session, items, 1, runner and runner())
    eng, got = serve(session, items, 16, runner and runner())
    assert got == want
    assert counter(sync, "lookahead_runs_total", rule="rules") == 0
    assert counter(eng, "lookahead_runs_total", rule="rules") > 0
    assert counter(eng, "lookahead_dropped_steps_total") == counter(eng, "lookahead_past_block_steps_total")
    st = eng.runner.stats
    assert st["ahead_calls"] > 0 and st.get("eager_reuse", 0) == 0
    return got


@pytest.mark.parametrize("kind", list(EXTRAS))
def test_extras_run_ahead_with_the_synchronous_tokens_and_logprobs(session, kind):
    """B=1, two prompts one after another: the steps run ahead; tokens, and each token's logprob and
    alternatives (floats compared exactly), are the synchronous path's."""
    ps = prompts(2, seed=11)
    outs = [check_ahead(session, [(p, dict(BASE, **EXTRAS[kind]))])[0] for p in ps]
    assert outs[0][0] != outs[1][0]                                       # a decisive model: outputs vary
    if "logprobs" in kind:
        lps = [lp for ids, lps in outs for lp in lps[:len(ids)]]
        assert all(lp is not None for lp in lps)                          # every returned token recorded
        assert len({lp[0] for lp in lps}) > 5                             # and their values vary
        k = EXTRAS[kind]["logprobs"]
        assert all(len(lp[1]) == len(lp[2]) == k for lp in lps)


def test_a_mixed_batch_with_extras_runs_ahead(session):
    """One run over rows with logprobs, smoothing, both, credit and entropy-bound beside each other (the graph
    runner groups rows with extras as one call): tokens and logprobs are the synchronous path's."""
    mix = [dict(logprobs=2), dict(threshold=0.3, smoothing=True), dict(smoothing=True, logprobs=1),
           dict(threshold=0.3, credit=True), dict(entropy_bound=3.0), dict(threshold=0.3, logprobs=5)]
    ps = prompts(6, seed=12)
    outs = check_ahead(session, [(p, dict(BASE, **mix[i])) for i, p in enumerate(ps)])
    assert len({tuple(o) for o, _ in outs}) > 1
    assert outs[0][1][0] is not None and outs[1][1] is None


def test_smoothing_changes_the_tokens_and_the_device_writes_its_input(session, monkeypatch):
    """Smoothing is decisive on this model (its tokens differ from the same rule without it), and a run ahead
    reads the soft input the device writes: with ``carry_smoothing`` a no-op (the run's later steps fed the
    first step's soft input) the tokens differ from the synchronous path's."""
    ps = prompts(3, seed=13)
    items = [(p, dict(BASE, threshold=0.3, smoothing=True)) for p in ps]
    _, want = serve(session, items, 1)
    _, plain = serve(session, [(p, dict(BASE, threshold=0.3)) for p in ps], 1)
    assert [o for o, _ in want] != [o for o, _ in plain]
    monkeypatch.setattr(decoding.AheadCommit, "carry_smoothing", lambda self, embed, new, soft: None)
    _, got = serve(session, items, 16)
    assert got != want


def test_soft_input_written_on_the_device_is_the_hosts(session):
    """After a run of smoothing steps ahead (two rows, different forwards so far), the graph variant's static
    embedding delta (what the next launch adds) is bit for bit what the synchronous path would stage from
    the host's states having applied the same steps (``smoothing_delta`` + ``embed_add``)."""
    eng = engine(session, 1)
    reqs = [eng.make_request(p, dict(BASE, smoothing=True)) for p in prompts(2, seed=14)]
    for r in reqs:
        eng.add_request(r)
    eng.step()                                                             # the Refresh
    states = [r.state for r in reqs]
    states[1].iters += 3                      # another weight w = 0.15 + 0.02 i for row 1
    assert all(s.phase == "reuse" for s in states)
    runner, n = eng.runner, 3
    commit = decoding.ahead_commit(states, runner.device)
    batch = make_batch(runner, states, [r.slots for r in reqs], eng.kv, draw_seeds(states))
    steps = runner.reuse_ahead(batch, torch.tensor([s.lookahead(n) for s in states]), commit=commit)
    for s in range(n):
        for j, st in enumerate(states):
            out = steps.output(s, j)
            st.apply(out.x0, out.conf, out)
            assert torch.equal(st.x[st.bs:st.be], steps.blocks[s, j])
            st.advance(16)
    host = make_batch(runner, states, [r.slots for r in reqs], eng.kv, [0, 0])
    want = embed_add(host, host.n_fed, host.q_start_dev, runner.dtype)                # [B, T, d]
    g = next(g for g in runner.graphs.values() if g.embed is not None)
    assert torch.equal(g.embed[:2], want)
    assert want.abs().sum() > 0 and states[0].soft_w != states[1].soft_w


def test_the_emulated_device_runs_logprobs_and_smoothing_ahead(session):
    """bench/paced_device.py's emulated GPU (the eager runner's steps run ahead) takes logprobs and smoothing
    too (its own static soft input): tokens and logprobs are the synchronous path's over the same runner."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from paced_device import PacedRunner
    m = session.runner.model
    ps = prompts(3, seed=15)
    mix = [dict(logprobs=2), dict(threshold=0.3, smoothing=True), dict(smoothing=True, logprobs=1)]
    for kw in mix:
        check_ahead(session, [(p, dict(BASE, **kw)) for p in ps[:2]], lambda: PacedRunner(m, 0.0005, 0.001))
