"""Sampled requests (T > 0) run their Reuse steps ahead on the device too (issue 15).

A sampled step's only other input from the host is its seed, the next draw of the request's generator. The
engine peeks a run's seeds from a copy of each row's generator (``DecodeState.peek_seeds``), the runner stages
step s's into its static seeds before launching it, and the host draws each seed from the real generator as
it applies that step, so a dropped step runs again with its own seed and a pre-launched Refresh samples with
the seed the synchronous path would draw. Tokens must equal the synchronous path's (the same engine with
``lookahead_steps=1``) and generate()'s exactly; on CPU the graph runner runs uncaptured (the same staging,
commits and static inputs)."""
import pytest
import torch

from dlc.runtime import decoding
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import DecodeState, GenerationConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import generate
from dlc.runtime.session import open_model
from test_lookahead_extras import prompts, session  # noqa: F401 - the tiny-llada session fixture

BASE = dict(gen_length=24, block_length=8, steps=24, kv_cache="dual")          # 3 blocks, a token a step
SAMPLED = {"plain": dict(temperature=1.5), "top_p": dict(temperature=1.5, top_p=0.8),
           "min_p": dict(temperature=1.5, min_p=0.05), "top_k": dict(temperature=1.5, top_k=5),
           "threshold": dict(temperature=1.5, threshold=0.3)}


def run(session, items, lookahead):
    """items: (prompt, params) -> (engine, outputs)."""
    eng = Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=16, max_batch_size=8, cuda_graphs=True,
                                      graph_decode="exact", lookahead_steps=lookahead, lookahead_max_ms=0.0))
    return eng, [r.output_ids for r in eng.run_requests(items)]


def refs_of(session, items):
    return [generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
            for p, params in items]


def test_peeked_seeds_are_the_next_draws():
    """``peek_seeds`` leaves the generator where it was; its seeds are the ones ``draw_seed`` draws next."""
    mc = open_model("tiny-llada", progress=False).config
    st = DecodeState.new([1, 2, 3], GenerationConfig(**BASE, temperature=0.7, seed=5), mc)
    peeked = st.peek_seeds(4)
    assert st.peek_seeds(4) == peeked and len(set(peeked)) == 4
    assert [st.draw_seed() for _ in range(4)] == peeked
    greedy = DecodeState.new([1, 2, 3], GenerationConfig(**BASE), mc)
    assert greedy.peek_seeds(3) == [0, 0, 0]


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_steps_ahead_give_the_synchronous_tokens(session, name):
    """Three requests of one temperature, each its own seed, in one run: every Reuse step runs ahead (none
    eager, none dropped) and the tokens equal the synchronous engine's and generate()'s; the sampling is
    decisive (other seeds, other tokens)."""
    params = dict(BASE, **SAMPLED[name])
    items = [(p, dict(params, seed=11 + i)) for i, p in enumerate(prompts(3))]
    eng, outs = run(session, items, lookahead=16)
    sync, want = run(session, items, lookahead=1)
    assert outs == want == refs_of(session, items)
    st = eng.runner.stats
    assert st["ahead_calls"] > 0 and st["eager_reuse"] == 0 and sync.runner.stats["ahead_calls"] == 0
    assert st["replays"] >= sync.runner.stats["replays"] > 0
    if name != "threshold":                          # the fixed schedule: a block's 7 Reuse steps, one run
        assert st["ahead_calls"] == 3 and st["replays"] == 3 * 7
    assert eng.metrics.counter("lookahead_dropped_steps_total") == 0
    _, other = run(session, [(p, dict(params, seed=99 + i)) for i, (p, _) in enumerate(items)], lookahead=16)
    assert other != outs                                                  # decisive: the seeds matter


def test_a_dropped_sampled_step_runs_again_with_its_seed(session, monkeypatch):
    """A device rule that unmasks the least confident position makes every step after a run's first differ;
    those are dropped and run again synchronously, each with the seed it had (the generator moved only past
    the applied steps): tokens still equal generate()'s."""
    def worst(self, conf, masked, n_sched):
        return decoding._topk_mask(torch.where(masked, -conf, torch.full_like(conf, float("-inf"))),
                                   n_sched) & masked
    monkeypatch.setattr(decoding.ScheduleRule, "select_batched", worst)
    items = [(p, dict(BASE, temperature=1.5, seed=3 + i)) for i, p in enumerate(prompts(2, seed=1))]
    eng, outs = run(session, items, lookahead=16)
    assert outs == refs_of(session, items)
    assert eng.metrics.counter("lookahead_dropped_steps_total") > 0


@pytest.mark.parametrize("rule", [{}, dict(threshold=1.0)], ids=["schedule", "threshold"])
def test_the_refresh_behind_a_sampled_run_draws_the_next_seed(session, rule):
    """One sampled request, 4 blocks: each later block's Refresh is launched behind the run's last step with
    the seed the synchronous path draws for it, and used (tokens are generate()'s); a variable-count rule
    (threshold 1: one token a step) too, its run closing the block on its last mask."""
    items = [(prompts(1, seed=4)[0], dict(gen_length=32, block_length=8, steps=32, kv_cache="dual",
                                          temperature=1.2, seed=22, **rule))]
    eng, outs = run(session, items, lookahead=3)
    assert outs == refs_of(session, items)
    m = eng.metrics
    assert m.counter("lookahead_refresh_prelaunched_total", status="used") == 3
    assert m.counter("lookahead_refresh_prelaunched_total", status="dropped") == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampled_steps_run_ahead_on_captured_graphs():
    """On the GPU (captured graphs, bf16): plain sampling, top-p alone (the fused bisection), a top-k with
    top-p (the candidates) and sampled threshold rows run ahead, each step's seeds copied into the captured
    variant's static seeds before its replay: the synchronous path's tokens (the same captured variants)."""
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)

    def served(items, la):
        eng = Engine(sess, ServeConfig(max_seq_len=96, kv_cache_mb=64, max_batch_size=8, device="cuda",
                                       cuda_graphs=True, compile=False, lookahead_steps=la,
                                       lookahead_max_ms=0.0))
        return eng, [r.output_ids for r in eng.run_requests(items)]
    ps = prompts(6, seed=8)
    kinds = [dict(temperature=1.5), dict(temperature=1.5, top_p=0.8),
             dict(temperature=1.5, top_k=20, top_p=0.9), dict(temperature=1.5, threshold=0.3)]
    for kw in kinds:
        items = [(p, dict(BASE, **kw, seed=40 + i)) for i, p in enumerate(ps)]
        _, want = served(items, 1)
        eng, got = served(items, 16)
        assert got == want, kw
        st = eng.runner.stats
        assert st["ahead_calls"] > 0 and st["eager_reuse"] == 0, kw
        assert any(g.graph is not None for g in eng.runner.graphs.values())
