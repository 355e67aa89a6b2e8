"""Tokens stream as soon as they are final (``DecodeState.final_prefix``; the engine's ``_after_apply``).

A committed token never changes (every rule but LLaDA2.1's editing), so the contiguous committed run from the
first token not yet returned is final before its block ends: the engine emits it at once instead of at the
block's end, which is what a streaming user sees as the time to the first token. The tokens, their order and
the stop cuts must stay exactly what ``generate()`` returns; a stop id stops the early run (the cut happens at
the block's end, as before)."""
import torch

from dlc.models.presets import preset_config
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import DecodeState, GenerationConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import generate
from dlc.runtime.session import open_model

BASE = dict(gen_length=32, block_length=16, steps=32, kv_cache="dual")          # the engine stops at EOS


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def state(**kw):
    mc = preset_config("tiny-llada")
    st = DecodeState.new([1, 2, 3], GenerationConfig(**dict(BASE, stop_at_eos=True, **kw)), mc)
    st.advance(16)
    return st, mc


def test_the_committed_run_from_the_block_start_is_returned_once():
    """Unit: positions 0, 1 committed, 2 masked, 3 committed -> [t0, t1]; nothing again until position 2
    commits, then [t2, t3]; a stop id ends the run before it (returned, cut, at the block's end)."""
    st, mc = state()
    P, m = st.P, mc.mask_id
    assert st.final_prefix() == []                                       # the block is all masks
    st.x[P:P + 2] = torch.tensor([7, 8])
    st.x[P + 3] = 9
    assert st.final_prefix() == [7, 8] and st.final_prefix() == []
    st.x[P + 2] = 10
    assert st.final_prefix() == [10, 9]
    stop = mc.stop_ids[0]
    st.x[P + 4:P + 7] = torch.tensor([11, stop, 12])
    assert st.final_prefix() == [11] and st.final_prefix() == []        # the stop id waits for the block end
    assert int(st.x[P + 7]) == m


def test_a_restarted_block_keeps_the_tokens_it_returned():
    """Preemption mid-block after tokens streamed: the block recomputes from its start; where the recompute
    gives other tokens there (batch variance), the block's end keeps the streamed ones (later blocks read
    what the user got) and returns only the rest; a second restart keeps what streamed since too."""
    st, mc = state()
    P, m = st.P, mc.mask_id
    st.x[P:P + 2] = torch.tensor([7, 8])
    assert st.final_prefix() == [7, 8]
    st.restart_block()
    assert bool((st.x[P:P + 16] == m).all())                            # rewound: the block recomputes
    st.x[P:P + 3] = torch.tensor([70, 80, 90])                            # a recompute that differs
    assert st.final_prefix() == [90]
    st.restart_block()
    st.x[P:P + 16] = torch.arange(100, 116)                               # the block completes
    out = st.advance(16)
    assert st.x[P:P + 3].tolist() == [7, 8, 90]                          # what streamed stands
    assert out == list(range(103, 116)) and st.streamed is None


def test_an_editing_rule_returns_nothing_early():
    """LLaDA2.1's token editing may change a committed token: its blocks return at their end only."""
    st, _ = state()
    st.x[st.P:st.P + 4] = torch.tensor([7, 8, 9, 10])

    class Editing:
        edits = True
    st.rule = Editing()
    assert st.final_prefix() == []


def serve_streamed(session, items):
    """items: (prompt, params) -> (outputs, per request its chunks, each with whether it came while its block
    was still decoding: tokens returned past the finished blocks' columns, ``emitted`` > ``done``)."""
    eng = Engine(session, ServeConfig(model="tiny-llada", max_seq_len=96, kv_cache_mb=16, max_batch_size=8,
                                      cuda_graphs=True, graph_decode="exact", lookahead_steps=16,
                                      lookahead_max_ms=0.0))
    chunks = []
    reqs = []
    for p, params in items:
        r = eng.make_request(p, params)
        log = []
        r.on_output = lambda r, new, done, log=log: log.append((list(new), r.state.emitted > r.state.done))
        chunks.append(log)
        reqs.append(r)
        eng.add_request(r)
    eng.run_until_done()
    return [r.output_ids for r in reqs], chunks


def test_streamed_tokens_arrive_before_their_block_ends_and_equal_generate():
    """Low-confidence, threshold and a stop id: every request's chunks add up to its output, which is
    generate()'s token for token; some chunks arrive while their block still has masks (before this change
    every chunk came at a block's end, with none left)."""
    session = open_model("tiny-llada", progress=False)
    ps = prompts(4, seed=3)
    full = generate(session.runner, [ps[0]], GenerationConfig(**BASE, stop_at_eos=True)).token_ids[0]
    j = next(j for j in range(3, len(full)) if full[j] not in full[:j])
    rules = [{}, dict(threshold=0.3), dict(stop_token_ids=[full[j]]), {}]
    items = [(p, dict(BASE, **rules[i])) for i, p in enumerate(ps)]
    items[2] = (ps[0], items[2][1])                                   # the stop id inside its output
    outs, chunks = serve_streamed(session, items)
    for (p, params), out, log in zip(items, outs, chunks):
        assert out == generate(session.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert [t for new, _ in log for t in new] == out
    assert outs[2] == full[:j]
    early = sum(1 for log in chunks for new, mid_block in log if new and mid_block)
    assert early > 0
    assert len({tuple(o) for o in outs}) > 1                           # a decisive model
