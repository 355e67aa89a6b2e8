import torch

from dlc.runtime.decoding import FactorRule, ScheduleRule, ThresholdRule, num_transfer_tokens

NEG = float("-inf")


def test_schedule_remainder_first():
    assert num_transfer_tokens(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_schedule_rule_picks_top_k_masked():
    conf = torch.tensor([[0.1, 0.9, NEG, 0.5]], dtype=torch.float64)
    masked = torch.tensor([[True, True, False, True]])
    assert ScheduleRule().select(conf, masked, torch.tensor([2])).tolist() == [[False, True, False, True]]


def test_threshold_rule():
    conf = torch.tensor([[0.95, 0.2, 0.91, NEG], [0.3, 0.4, NEG, NEG]], dtype=torch.float64)
    masked = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sel = ThresholdRule(0.9).select(conf, masked, None)
    assert sel.tolist() == [[True, False, True, False], [False, True, False, False]]   # row 2: best only


def test_factor_rule_longest_prefix():
    # thresholds for n = 2, 3, 4 with factor 1: 1 - 1/3, 1 - 1/4, 1 - 1/5 = 0.667, 0.75, 0.8
    conf = torch.tensor([[0.99, 0.7, 0.76, 0.5]], dtype=torch.float64)   # sorted: 0.99, 0.76, 0.70, 0.5
    masked = torch.ones(1, 4, dtype=torch.bool)
    sel = FactorRule(1.0).select(conf, masked, None)
    assert sel.tolist() == [[True, False, True, False]]                  # 0.70 < 0.75 ends the prefix
    high = torch.tensor([[0.99, 0.7, 0.76, 0.81]], dtype=torch.float64)
    assert FactorRule(1.0).select(high, masked, None).tolist() == [[True, False, True, True]]
    low = torch.tensor([[0.3, 0.2, NEG, NEG]], dtype=torch.float64)
    assert FactorRule(1.0).select(low, torch.tensor([[True, True, False, False]]), None).sum() == 1


# -- the decoding core: DecodeState driven by hand-made candidates (no model) --------------------------------
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

from dlc.runtime.decoding import DecodeState, GenerationConfig  # noqa: E402

MC = SimpleNamespace(mask_id=9, eos_id=0, stop_ids=[0, 2])
PROMPT = [5, 6, 7]


def _state(**kw):
    gen = GenerationConfig(**{"gen_length": 8, "block_length": 4, "steps": 8, **kw})
    return DecodeState.new(PROMPT, gen, MC)


def _feed(st, token=4, conf=None):
    """Apply candidates ``token`` for every block column with confidences rising left to right
    (or ``conf``)."""
    K = st.be - st.bs
    c = torch.arange(1, K + 1, dtype=torch.float64) / (K + 1) if conf is None else conf
    st.apply(torch.full((K,), token), c)


@pytest.mark.parametrize("kv,phases", [
    ("none", ["full"] * 8),
    ("prefix", ["refresh", "reuse", "reuse", "reuse"] * 2),
    ("dual", ["refresh", "reuse", "reuse", "reuse"] * 2)])
def test_phases_per_kv_mode(kv, phases):
    st, seen = _state(kv_cache=kv), []
    st.advance(4)
    while st.phase is not None:
        seen.append(st.phase)
        _feed(st)
        st.advance(4)
    assert seen == phases and st.x[3:].tolist() == [4] * 8 and st.forwards == 8


def test_refresh_every_and_query_spans():
    st = _state(kv_cache="dual", refresh_every=2, vicinity=1)
    st.advance(4)
    seen = []
    for _ in range(4):
        seen.append((st.phase, st.q_span() if st.phase == "reuse" else None, st.cost()))
        _feed(st)
        st.advance(4)
    assert seen == [("refresh", None, 11), ("reuse", (2, 8), 6), ("refresh", None, 11), ("reuse", (2, 8), 6)]
    pre = _state(kv_cache="prefix")
    pre.advance(4)
    _feed(pre)
    pre.advance(4)
    assert pre.phase == "reuse" and pre.q_span() == (3, 11) and pre.cost() == 8


def test_schedule_unmasks_the_most_confident_first():
    st = _state(steps=4)                                    # 2 steps per block: 2 tokens each
    st.advance(4)
    st.apply(torch.tensor([11, 12, 13, 14]), torch.tensor([0.1, 0.9, 0.2, 0.8], dtype=torch.float64))
    assert st.x[3:7].tolist() == [9, 12, 9, 14] and st.n_now == 2


def test_eos_stops_at_the_block_end_and_cuts_the_output():
    st = _state(stop_at_eos=True)
    out = st.advance(4)
    while st.phase is not None:
        K = st.be - st.bs
        st.apply(torch.tensor([4, 2, 4, 4][:K]), torch.arange(K, 0, -1, dtype=torch.float64))
        out += st.advance(4)
    assert out == [4] and st.stopped and st.x[3:].tolist() == [4, 2, 0, 0, 0, 0, 0, 0]
    plain = _state()
    plain.advance(4)
    while plain.phase is not None:
        K = plain.be - plain.bs
        plain.apply(torch.tensor([4, 2, 4, 4][:K]), torch.arange(K, 0, -1, dtype=torch.float64))
        plain.advance(4)
    assert plain.x[3:].tolist() == [4, 2, 4, 4, 4, 2, 4, 4] and not plain.stopped


def test_a_stuck_row_ends_its_block():
    st = _state(threshold=0.5)
    st.advance(4)
    st.apply(torch.tensor([4, 9, 9, 9]), torch.ones(4, dtype=torch.float64))   # only the mask id predicted
    assert not st.stuck and st.x[3:7].tolist() == [4, 9, 9, 9]
    st.advance(4)
    st.apply(torch.tensor([9, 9, 9, 9]), torch.ones(4, dtype=torch.float64))
    assert st.stuck
    st.advance(4)
    assert st.bs == 7 and st.done == 4 and st.x[4:7].tolist() == [9, 9, 9]       # next block started


def test_elastic_chunks_get_steps_in_proportion():
    st = _state(gen_length=16, block_length=4, steps=8)          # 0.5 steps per token
    st.advance(8)
    assert (st.be - st.bs, st.sched.tolist()) == (8, [2, 2, 2, 2])
    wide = _state(gen_length=16, block_length=4, steps=8)
    wide.advance(2)
    assert (wide.be - wide.bs, wide.sched.tolist()) == (2, [2])


def test_restart_after_preemption_replays_the_block():
    st = _state(kv_cache="dual", temperature=0.7, remasking="random", seed=4)
    st.advance(4)
    _feed(st, conf=None)
    st.advance(4)
    seed_a = st.draw_seed()
    st.restart_block()
    st.advance(4)
    assert st.phase == "refresh" and st.x[3:7].tolist() == [9] * 4 and st.step == 0
    _feed(st)
    st.advance(4)
    assert st.draw_seed() == seed_a                              # the generator was rewound too


def test_random_remasking_draws_from_the_state_generator():
    a, b = _state(remasking="random", seed=1), _state(remasking="random", seed=1)
    c = _state(remasking="random", seed=2)
    for st in (a, b, c):
        st.advance(4)
        st.apply(torch.tensor([4, 5, 6, 7]), torch.zeros(4, dtype=torch.float64))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x)
