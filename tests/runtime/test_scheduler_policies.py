"""The three scheduler policies (runtime/scheduler.py): static FCFS, continuous (iteration-level) FCFS and the
phase-multiplexed batcher. Admission order, no starvation, the continuous-vs-static difference, and tokens
equal to generate() under each."""
import pytest
import torch

from dlc.runtime.config import POLICIES, ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model

S_MAX = 160
P = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")


@pytest.fixture(scope="module")
def session():
    return open_model("tiny-llada", progress=False)


def make_engine(session, **kw):
    return Engine(session, ServeConfig(**{"max_seq_len": S_MAX, "kv_cache_mb": 16, **kw}))


def reference(session, prompt, params):
    return generate(session.runner, [prompt], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]


def run_recording_starts(eng, arrivals):
    """Step the engine; ``arrivals`` maps iteration -> requests added before it. -> {rid: first iteration it
    ran in}, {rid: iteration it finished in}."""
    started, done, it = {}, {}, 0
    reqs = [r for rs in arrivals.values() for r in rs]
    while it <= max(arrivals) or eng.has_work():
        for r in arrivals.get(it, []):
            eng.add_request(r)
        eng.step()
        for r in reqs:
            if r.state.started and r.rid not in started:
                started[r.rid] = it
            if r.finished and r.rid not in done:
                done[r.rid] = it
        it += 1
    return started, done


@pytest.mark.parametrize("policy", POLICIES)
def test_late_arrivals_match_generate_under_every_policy(session, policy):
    """Requests arriving while others run (different lengths, kv modes, a seeded sample) decode exactly as
    generate() decodes each alone, under each policy; the outputs vary with the prompt (a decisive model)."""
    g = torch.Generator().manual_seed(1)
    specs = []
    for i in range(6):
        prompt = torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        specs.append((prompt, dict(P, gen_length=(8, 16, 24)[i % 3], steps=(8, 16, 12)[i % 3],
                                   kv_cache=("dual", "prefix", "none")[i % 3],
                                   temperature=0.7 if i == 4 else 0.0, seed=7 + i)))
    eng = make_engine(session, policy=policy, max_batch_size=3, max_num_tokens=2 * S_MAX)
    reqs = [eng.make_request(p, params) for p, params in specs]
    run_recording_starts(eng, {0: reqs[:3], 2: reqs[3:5], 5: reqs[5:]})
    outs = [r.output_ids for r in reqs]
    assert outs == [reference(session, p, params) for p, params in specs], policy
    assert len({tuple(o) for o in outs}) == len(outs) and eng.kv.num_used == 0


@pytest.mark.parametrize("policy,late_before_first_batch_ends", [("fcfs", False), ("fcfs-continuous", True)])
def test_continuous_admits_a_late_request_before_the_first_batch_finishes(session, policy,
                                                                          late_before_first_batch_ends):
    """Batch of two: a long and a short request, then a late one. Continuous FCFS admits the late request in
    the slot the short one frees while the long one still runs; static FCFS waits for the whole batch."""
    eng = make_engine(session, policy=policy, max_batch_size=2)
    long = eng.make_request([3] * 10, dict(P, gen_length=48, steps=48))
    short = eng.make_request([4] * 10, dict(P, gen_length=8, steps=4))
    late = eng.make_request([5] * 10, P)
    started, done = run_recording_starts(eng, {0: [long, short], 1: [late]})
    assert started[long.rid] == started[short.rid] == 0 and done[short.rid] < done[long.rid]
    assert (started[late.rid] < done[long.rid]) is late_before_first_batch_ends, (started, done)
    if late_before_first_batch_ends:
        assert started[late.rid] == done[short.rid] + 1          # the freed slot is taken at once


def test_continuous_admits_in_arrival_order_and_blocks_at_the_head(session):
    """One running request at a time: requests start in arrival order. A long request at the head that does
    not fit the budget beside the running one is not passed by a younger short one (phase would let it pass:
    test_engine.py test_no_head_of_line_blocking_and_preemption)."""
    eng = make_engine(session, policy="fcfs-continuous", max_batch_size=1)
    reqs = [eng.make_request([i + 1] * (4 + i), P) for i in range(4)]
    started, _ = run_recording_starts(eng, {0: reqs})
    assert sorted(started, key=started.get) == [r.rid for r in reqs]
    assert len(set(started.values())) == 4

    eng = make_engine(session, policy="fcfs-continuous", max_num_tokens=S_MAX)
    first = eng.make_request([7] * 4, P)                                      # L = 20
    long = eng.make_request(list(range(100, 210)), dict(P, gen_length=48, steps=48))   # L = 158
    short = eng.make_request([9, 8, 7], P)
    started, done = run_recording_starts(eng, {0: [first], 1: [long, short]})
    assert started[long.rid] > 1 and started[short.rid] >= started[long.rid]    # short waits behind long
    assert started[long.rid] == done[first.rid] + 1


def test_continuous_never_starves_the_head(session):
    """A stream of short requests arrives every iteration behind a long one that does not fit beside them:
    the long request starts as soon as the running ones drain, before any request that arrived after it."""
    eng = make_engine(session, policy="fcfs-continuous", max_num_tokens=S_MAX, max_batch_size=4)
    shorts = [eng.make_request([i + 1] * 4, P) for i in range(12)]
    long = eng.make_request(list(range(100, 210)), dict(P, gen_length=48, steps=48))
    arrivals = {0: shorts[:2], 1: [long], **{2 + i: [r] for i, r in enumerate(shorts[2:])}}
    started, done = run_recording_starts(eng, arrivals)
    assert all(started[long.rid] < started[r.rid] for r in shorts[2:]), started
    assert started[long.rid] == max(done[r.rid] for r in shorts[:2]) + 1
    assert len(done) == 13 and eng.kv.num_used == 0


def test_continuous_steps_running_requests_in_arrival_order_under_the_budget(session):
    """Every iteration's rows are the running requests, oldest first, while the budget lasts (the youngest
    wait when it runs out); phases are not prioritised: Refresh and Reuse rows share iterations in arrival
    order (phase would put Reuse rows first)."""
    eng = make_engine(session, policy="fcfs-continuous", max_num_tokens=100, max_batch_size=4)
    sched, iterations = eng.scheduler, []

    def schedule():
        picked = type(sched).schedule(sched)
        waiting_rows = [r for r in sched.running if r not in picked and not r.state.finished]
        iterations.append(([(r.seq, r.cost()) for r in picked], [r.seq for r in waiting_rows]))
        return picked
    sched.schedule = schedule
    a = eng.make_request([1] * 20, dict(P, gen_length=32, steps=32))      # L = 52, a block start every 8
    b = eng.make_request([2] * 28, dict(P, gen_length=32, steps=16))      # L = 60, every 4 from iteration 4
    reqs = [a, b]
    run_recording_starts(eng, {0: [a], 4: [b]})                           # iteration 8: 52 + 60 > 100
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    for picked, waiting_rows in iterations:
        seqs = [s for s, _ in picked]
        assert seqs == sorted(seqs) and sum(c for _, c in picked) <= 100
        assert all(w > max(seqs) for w in waiting_rows)                 # only younger rows wait
    assert any(waiting_rows for _, waiting_rows in iterations)          # the budget did run out
    mixed = [p for p, _ in iterations if len({c for _, c in p}) > 1 and min(c for _, c in p) == 8]
    assert mixed                                    # a Reuse row (8) beside a Refresh row in one iteration


def test_set_policy_switches_an_idle_engine_only(session):
    from dlc.runtime.scheduler import SCHEDULERS
    eng = make_engine(session, policy="fcfs")
    r = eng.make_request([1, 2, 3], P)
    eng.add_request(r)
    with pytest.raises(RuntimeError, match="in flight"):
        eng.set_policy("phase")
    eng.run_until_done()
    with pytest.raises(ValueError, match="policy must be one of"):
        eng.set_policy("lifo")
    assert type(eng.scheduler) is SCHEDULERS["fcfs"] and eng.cfg.policy == "fcfs"
    eng.set_policy("fcfs-continuous")
    assert type(eng.scheduler) is SCHEDULERS["fcfs-continuous"] and eng.cfg.policy == "fcfs-continuous"
    r2 = eng.make_request([1, 2, 3], P)
    eng.add_request(r2)
    eng.run_until_done()
    assert r2.output_ids == r.output_ids == reference(session, [1, 2, 3], P) and eng.kv.num_used == 0


def first_block_delays(session, policy, arrive_at=8):
    """Three running requests (L = 76, 68, 60: a block start every 8 iterations each, staggered) and a new one
    arriving at iteration ``arrive_at`` when the older ones' block starts fill the budget (100 tokens, no
    Refresh share). -> (iterations from the new request's arrival to its first block, the whole run's
    iterations, the requests' outputs and their references)."""
    eng = make_engine(session, policy=policy, max_num_tokens=100, max_batch_size=4, refresh_share=1.0)
    specs = [(0, [1] * 44, 32), (0, [2] * 36, 32), (1, [3] * 28, 32), (arrive_at, [4] * 40, 8)]
    reqs = [eng.make_request(p, dict(P, gen_length=g, steps=g)) for _, p, g in specs]
    arrivals: dict[int, list] = {}
    for (t, _, _), r in zip(specs, reqs):
        arrivals.setdefault(t, []).append(r)
    first, it = None, 0
    while it <= arrive_at or eng.has_work():
        for r in arrivals.get(it, []):
            eng.add_request(r)
        eng.step()
        if first is None and reqs[-1].output_ids:
            first = it
        it += 1
    refs = [reference(session, p, dict(P, gen_length=g, steps=g)) for _, p, g in specs]
    return first - arrive_at, it, [r.output_ids for r in reqs], refs


def test_phase_puts_a_new_requests_first_block_before_later_blocks(session):
    """Budget binds at the new request's arrival: continuous FCFS steps the older requests first, their block
    starts' Refresh rows included, so the new request's admission and first-block steps wait for budget left
    over; the phase batcher admits it (its first block is on the TTFT path) and steps its first block before
    the older requests' later-block Refreshes, which wait an iteration: its first block takes its 8 steps,
    no more, and the run as a whole about as many iterations."""
    ttft_fcfs, its_fcfs, outs, refs = first_block_delays(session, "fcfs-continuous")
    assert outs == refs
    ttft_phase, its_phase, outs, refs = first_block_delays(session, "phase")
    assert outs == refs and len({tuple(o) for o in outs}) == 4
    assert ttft_phase == 7                                  # admitted at arrival; 8 steps (1 token each)
    assert ttft_fcfs >= ttft_phase + 3, (ttft_fcfs, ttft_phase)
    assert its_phase <= its_fcfs + 1                        # the older requests' blocks only moved


def test_phase_ageing_bounds_the_wait_of_a_later_blocks_refresh(session):
    """New requests arrive every iteration and each takes the Refresh budget first (TTFT path), so a running
    request at a later block start waits; after ``age_iters`` iterations it goes first: it never waits
    longer, and it finishes with generate()'s tokens."""
    eng = make_engine(session, max_num_tokens=70, max_batch_size=4, refresh_share=1.0, age_iters=4)
    old = eng.make_request([1] * 20, dict(P, gen_length=32, steps=32))                  # L = 52
    news = [eng.make_request([i + 2] * 52, dict(P, gen_length=8, steps=4)) for i in range(24)]   # L = 60
    eng.add_request(old)
    worst, it = 0, 0
    while eng.has_work() or it < len(news):
        if it < len(news) and it >= 2:
            eng.add_request(news[it])
        eng.step()
        worst = max(worst, old.waited)
        it += 1
    assert 0 < worst <= 4                                   # it did wait, never past age_iters
    assert old.output_ids == reference(session, [1] * 20, dict(P, gen_length=32, steps=32))


@pytest.mark.parametrize("defer", [0, 3])
def test_ttft_defer_iters_holds_later_blocks_back_while_a_first_block_runs(session, defer):
    """With ``ttft_defer_iters`` N, a running request's later-block Refresh waits up to N iterations while
    another request's first block runs (the budget does not bind here); with 0 it never waits. Tokens are
    generate()'s either way."""
    eng = make_engine(session, max_num_tokens=1000, refresh_share=1.0, ttft_defer_iters=defer)
    params = dict(P, gen_length=32, steps=32)                        # 8 steps per block: starts at 0, 8, ...
    old, new = eng.make_request([1] * 20, params), eng.make_request([2] * 30, params)
    eng.add_request(old)
    waits, it = [], 0
    while eng.has_work() or it < 7:
        if it == 6:
            eng.add_request(new)                                     # its first block: iterations 6..13
        eng.step()
        waits.append(old.waited)
        it += 1
    assert max(waits) == defer, waits
    assert old.output_ids == reference(session, [1] * 20, params)
    assert new.output_ids == reference(session, [2] * 30, params) != old.output_ids
