"""Every decoding rule's Reuse steps run ahead on the device (issues 18 / 15): threshold, factor,
hierarchical, entropy-bound and credit decoding select on the device with the decoding core's
``AheadCommit`` (each rule's own ``select``: the host's float values and ties), credit carried on the device
across the run's steps, so the served engine keeps a window of steps in flight for them as for low-confidence
decoding.

Tokens must equal the synchronous path's (the same engine with ``lookahead_steps=1``) exactly, at B=1 and in
mixed batches, blocks completing mid-run (variable-count rules: the run is the masks left long, an upper
bound); the core's check of the device's block must never disagree (``dropped`` minus ``past block`` = 0).
On CPU the graph runner's path runs without capture (the same staging, commits and static credit inputs). A
tiny model whose steps mostly unmask one token, several at times, makes the rules' choices vary."""
import pytest
import torch

from dlc.runtime import decoding
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import DecodeState, GenerationConfig
from dlc.runtime.engine import Engine
from dlc.runtime.session import open_model
from dlc.runtime.step import draw_seeds, make_batch

BASE = dict(gen_length=32, block_length=16, steps=32, kv_cache="dual")
# thresholds where tiny-llada's steps unmask one token mostly, several at times (blocks end mid-run)
RULES = {"threshold": dict(threshold=0.3), "factor": dict(factor=2.0),
         "hierarchical": dict(threshold=0.5, low_threshold=0.1), "entropy_bound": dict(entropy_bound=3.0),
         "credit": dict(threshold=0.3, credit=True), "credit_schedule": dict(credit=True)}


@pytest.fixture(scope="module")
def session():
    return open_model("tiny-llada", progress=False)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 200, (int(torch.randint(3, 25, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def cuda_engine(sess, lookahead: int) -> Engine:
    """The GPU tests' engine: captured graphs, no compile, ``lookahead`` steps ahead without a time bound."""
    return Engine(sess, ServeConfig(max_seq_len=96, kv_cache_mb=16, max_batch_size=8, device="cuda",
                                    cuda_graphs=True, compile=False, lookahead_steps=lookahead,
                                    lookahead_max_ms=0.0))


def serve(session, items, lookahead):
    """items: (prompt, params) -> (engine, outputs, forwards per request)."""
    eng = Engine(session, ServeConfig(model="tiny-llada", max_seq_len=96, kv_cache_mb=16, max_batch_size=8,
                                      cuda_graphs=True, graph_decode="exact", lookahead_steps=lookahead,
                                      lookahead_max_ms=0.0))
    reqs = eng.run_requests(items)
    return eng, [r.output_ids for r in reqs], [r.state.forwards for r in reqs]


def counter(eng, name, **labels):
    return eng.metrics.counter(name, **labels)


def check_ahead(session, items):
    """Served with steps ahead == served one step at a time; the rules ran ahead, no device commit differed
    from the core's. Returns the engine run ahead and the outputs."""
    sync, want, fw_sync = serve(session, items, 1)
    eng, got, fw = serve(session, items, 16)
    assert got == want and fw == fw_sync
    check_ahead.forwards = fw
    assert sync.runner.stats["ahead_calls"] == 0
    st = eng.runner.stats
    assert st["ahead_calls"] > 0 and st["eager_reuse"] == 0
    runs = counter(eng, "lookahead_runs_total", rule="rules")
    assert runs > 0 and runs + counter(eng, "lookahead_runs_total", rule="schedule") == st["ahead_calls"]
    dropped = counter(eng, "lookahead_dropped_steps_total")
    assert dropped - counter(eng, "lookahead_past_block_steps_total") == 0     # no commit differed
    return eng, got


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_runs_ahead_with_the_synchronous_tokens(session, rule):
    """B=1, several prompts one after another: the rule's Reuse steps run ahead, tokens are the synchronous
    path's, and (variable-count rules) blocks complete mid-run: fewer forwards than one per token."""
    ps = prompts(4, seed=1)
    outs = [check_ahead(session, [(p, dict(BASE, **RULES[rule]))])[1][0] for p in ps]
    assert len({tuple(o) for o in outs}) > 1                        # a decisive model: outputs vary
    if rule != "credit_schedule":
        _, _, fw = serve(session, [(p, dict(BASE, **RULES[rule])) for p in ps], 1)
        assert min(fw) < BASE["gen_length"]                         # some step unmasked several tokens


def test_a_mixed_batch_runs_ahead_rule_by_rule(session):
    """One run over rows of different rules (low-confidence, threshold, factor, hierarchical: one group),
    and one over the rules with extras (entropy-bound and credit beside each other: the graph runner groups
    rows with extras apart): each row selects with its own rule on the device; tokens are the synchronous
    path's, including rows whose block completes while the others' run goes on."""
    ps = prompts(8, seed=2)
    plain = [{}, RULES["threshold"], RULES["factor"], RULES["hierarchical"]]
    items = [(p, dict(BASE, **plain[i % 4])) for i, p in enumerate(ps)]
    eng, outs = check_ahead(session, items)
    assert len({tuple(o) for o in outs}) > 1
    assert min(check_ahead.forwards) < BASE["gen_length"]           # a row's steps unmasked several tokens
    extras = [RULES["entropy_bound"], RULES["credit"], RULES["credit_schedule"]]
    _, outs = check_ahead(session, [(p, dict(BASE, **extras[i % 3])) for i, p in enumerate(ps[:6])])
    assert len({tuple(o) for o in outs}) > 1


def test_steps_past_a_blocks_end_commit_nothing_and_are_dropped(session, monkeypatch):
    """Without the horizon (every run launches its whole bound, the masks left), steps launch after rows'
    blocks completed: they commit nothing on the device, the core drops them (counted as past the block's
    end, and nothing else is dropped), and the tokens are the synchronous path's."""
    monkeypatch.setattr(DecodeState, "ahead_horizon", lambda self: 1 << 30)
    ps = prompts(4, seed=5)
    plain = [RULES["threshold"], RULES["hierarchical"]]
    eng, _ = check_ahead(session, [(p, dict(BASE, **plain[i % 2])) for i, p in enumerate(ps)])
    assert counter(eng, "lookahead_past_block_steps_total") > 0
    eng, _ = check_ahead(session, [(p, dict(BASE, **RULES["credit"])) for p in ps[:1]])
    assert counter(eng, "lookahead_past_block_steps_total") > 0


def test_a_wrong_device_selection_is_caught(session, monkeypatch):
    """The core checks every device commit: a device threshold rule that commits the least confident mask
    makes the runs' later steps differ; they are dropped and run again, the tokens stay the synchronous
    path's, and the drops are not steps past a block's end."""
    def worst(self, conf, masked, n_sched):
        low = torch.where(masked, -conf, torch.full_like(conf, float("-inf")))
        return decoding._best_one(low, masked)
    items = [(p, dict(BASE, **RULES["threshold"])) for p in prompts(3, seed=3)]
    _, want, _ = serve(session, items, 1)
    monkeypatch.setattr(decoding.ThresholdRule, "select_ahead", worst, raising=False)   # select otherwise
    eng, got, _ = serve(session, items, 16)
    assert got == want
    assert counter(eng, "lookahead_dropped_steps_total") > counter(eng, "lookahead_past_block_steps_total")


# variable-count rules that unmask one token a step on tiny-llada: a block ends on its last mask
ONE_A_STEP = {"threshold": dict(threshold=1.0), "entropy_bound": dict(entropy_bound=1e-9),
              "credit": dict(threshold=1.0, credit=True), "smoothing": dict(threshold=1.0, smoothing=True)}
FOUR_BLOCKS = dict(gen_length=32, block_length=8, steps=32, kv_cache="dual")


def prelaunched(eng, status):
    return counter(eng, "lookahead_refresh_prelaunched_total", status=status)


@pytest.mark.parametrize("rule", list(ONE_A_STEP))
def test_a_variable_count_run_launches_the_next_refresh_behind_its_last_step(session, rule):
    """A variable-count rule ends a block by its masks, not by a schedule: once the row has one mask left and
    the step that unmasks it is launched, the next block's Refresh is launched behind that step
    (runtime/boundary.py, the copy's block closed) and used. One request, 4 blocks of 8, a token a step:
    3 Refreshes launched ahead, none dropped, tokens the synchronous path's."""
    eng, _ = check_ahead(session, [(prompts(1, seed=4)[0], dict(FOUR_BLOCKS, **ONE_A_STEP[rule]))])
    assert check_ahead.forwards == [32]                                 # one token a forward
    assert prelaunched(eng, "used") == 3 and prelaunched(eng, "dropped") == 0


def test_a_refresh_goes_ahead_only_where_the_block_surely_ends(session):
    """Rules whose steps unmask several tokens at times: a Refresh is launched ahead only where each row has
    one mask left (its launched step surely ends the block), so none is ever dropped; blocks whose last step
    unmasks several refresh the normal way. Tokens are the synchronous path's."""
    used = 0
    for i, p in enumerate(prompts(6, seed=7)):
        rule = ("threshold", "entropy_bound", "credit")[i % 3]
        eng, _ = check_ahead(session, [(p, dict(FOUR_BLOCKS, **RULES[rule]))])
        assert prelaunched(eng, "dropped") == 0
        used += prelaunched(eng, "used")
    assert 0 < used < 6 * 3                               # some blocks' last step unmasked several tokens


def test_a_variable_count_refresh_on_a_wrong_block_is_dropped(session, monkeypatch):
    """A device commit that gets a block's last token wrong: the Refresh launched behind it read that block;
    the core's state differs, so it is dropped and the Refresh runs again over the core's tokens."""
    real = decoding.AheadCommit.step

    def wrong_last(self, blk, x0, conf, n_now, extras=None):
        new = real(self, blk, x0, conf, n_now, extras)
        done = (new != self.mask_id).all(dim=1, keepdim=True)                 # [B, 1] the block's last step
        return torch.where(done & (blk == self.mask_id), (new + 1) % 200, new)
    items = [(prompts(1, seed=4)[0], dict(FOUR_BLOCKS, **ONE_A_STEP["threshold"]))]
    _, want, _ = serve(session, items, 1)
    monkeypatch.setattr(decoding.AheadCommit, "step", wrong_last)
    eng, got, _ = serve(session, items, 16)
    assert got == want
    assert prelaunched(eng, "dropped") == 3 and prelaunched(eng, "used") == 0


def test_credit_carried_on_the_device_is_the_hosts(session):
    """After a run of credit steps ahead, the graph variant's static credit inputs (what the next launch
    reads) hold exactly the credit the host's state computed applying the same steps (ids and float64
    values, in the layout the runner stages from the host: the row's columns first, zeros after)."""
    eng = Engine(session, ServeConfig(model="tiny-llada", max_seq_len=96, kv_cache_mb=16, max_batch_size=8,
                                      cuda_graphs=True, graph_decode="exact", lookahead_steps=1))
    reqs = [eng.make_request(p, dict(BASE, **RULES["credit"]))
            for p in prompts(2, seed=4)]
    for r in reqs:
        eng.add_request(r)
    eng.step()                                                       # the Refresh
    states = [r.state for r in reqs]
    assert all(s.phase == "reuse" for s in states)
    runner, n = eng.runner, 3
    commit = decoding.ahead_commit(states, runner.device)
    batch = make_batch(runner, states, [r.slots for r in reqs], eng.kv, draw_seeds(states))
    steps = runner.reuse_ahead(batch, torch.zeros(2, n, dtype=torch.long), commit=commit)
    for s in range(n):
        for j, st in enumerate(states):
            out = steps.output(s, j)
            st.apply(out.x0, out.conf, out)
            assert torch.equal(st.x[st.bs:st.be], steps.blocks[s, j])     # the device committed as the core
            st.advance(16)
            assert st.phase == "reuse"                                   # the block goes on
    g = next(g for g in runner.graphs.values() if g.credit is not None)
    for j, st in enumerate(states):
        ids, vals = st.credit                                            # [K, M] as the next step sends it
        M = ids.shape[1]
        assert M == 1 + n                                                # the Refresh's column + n steps'
        assert torch.equal(g.credit[0][j, :, :M], ids) and torch.equal(g.credit[1][j, :, :M], vals)
        assert not g.credit[1][j, :, M:].any()
        assert vals.max() > 0 and len(set(ids.flatten().tolist())) > 1


def test_lookahead_of_a_variable_count_rule_is_bounded_by_its_masks():
    """``lookahead`` of a variable-count rule: one entry (0: no count) per mask left in the block, the exact
    upper bound of its steps; ``ahead_horizon``: the masks left at the block's tokens per step so far;
    smoothing, logprobs and sampling run ahead too (tests/runtime/test_lookahead_extras.py,
    test_lookahead_sampled.py), random remasking stays synchronous."""
    from dlc.models.presets import preset_config
    mc = preset_config("tiny-llada")

    def state(**kw):
        st = DecodeState.new([1, 2, 3], GenerationConfig(**dict(BASE, **kw)), mc)
        st.advance(8)
        st.phase, st.has_cache = "reuse", True
        return st
    st = state(threshold=0.7)
    st.x[st.bs:st.bs + 2] = 5                                           # 2 of 8 unmasked in 1 step (Refresh)
    st.step = 1
    assert st.lookahead(16) == [0] * 6 and st.lookahead(4) == [0] * 4
    assert st.ahead_horizon() == 3                                      # 6 masks at 2 tokens per step
    assert st.fed_ahead(0) and not st.fed_ahead(6)
    sched = state()
    assert sched.lookahead(16) == sched.sched[sched.step:].tolist()
    assert sched.ahead_horizon() > 100
    for kw in (dict(threshold=0.7, smoothing=True), dict(threshold=0.7, logprobs=2),
               dict(threshold=0.7, temperature=0.5)):
        assert state(**kw).lookahead(16) == [0] * 8
    assert state(threshold=0.7, remasking="random").lookahead(16) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_rule_runs_ahead_on_captured_graphs():
    """On the GPU (captured graphs, fused decoding, bf16): each rule and a mixed batch of them run ahead with
    the synchronous path's tokens (the same captured variants; the host's credit is computed on the CPU, the
    device's on the GPU: equal to the last bit or a token would differ here); no device commit differs from
    the core's except an entropy-bound prefix a GPU cumsum rounds the other way (dropped, run again)."""
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)

    def served(items, la):
        eng = cuda_engine(sess, la)
        reqs = eng.run_requests(items)
        return eng, [r.output_ids for r in reqs]
    ps = prompts(6, seed=8)
    sets = [[(p, dict(BASE, **RULES[k])) for p in ps] for k in RULES]
    sets.append([(p, dict(BASE, **list(RULES.values())[i % 4])) for i, p in enumerate(ps)])
    for items in sets:
        _, want = served(items, 1)
        eng, got = served(items, 16)
        assert got == want
        st = eng.runner.stats
        assert st["ahead_calls"] > 0 and st["eager_reuse"] == 0
        assert counter(eng, "lookahead_runs_total", rule="rules") > 0
        assert any(g.graph is not None for g in eng.runner.graphs.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_logprobs_and_smoothing_run_ahead_on_captured_graphs():
    """On the GPU (captured graphs, fused decoding, bf16): logprobs (the fused sweep's), smoothing (the
    one-pass bf16 smoothing kernel; the device writes the next soft input), truncated smoothing, and a batch
    mixing them with other rules run ahead; tokens and logprobs (floats exactly: the same kernels and
    shapes) are the synchronous path's, and no device commit differs from the core's."""
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)

    def served(items, la):
        eng = cuda_engine(sess, la)
        reqs = eng.run_requests(items)
        return eng, [(r.output_ids, r.state.token_logprobs) for r in reqs]
    ps = prompts(6, seed=10)
    kinds = [dict(logprobs=5), dict(threshold=0.3, logprobs=1), dict(smoothing=True),
             dict(threshold=0.3, smoothing=True), dict(threshold=0.3, smoothing=True, smoothing_top_k=8)]
    sets = [[(p, dict(BASE, **kw)) for p in ps] for kw in kinds]
    mix = kinds + [dict(smoothing=True, logprobs=2)]           # one group: every row has extras
    sets.append([(p, dict(BASE, **mix[i % len(mix)])) for i, p in enumerate(ps)])
    for items in sets:
        _, want = served(items, 1)
        eng, got = served(items, 16)
        assert got == want
        st = eng.runner.stats
        assert st["ahead_calls"] > 0 and st["eager_reuse"] == 0
        assert counter(eng, "lookahead_runs_total", rule="rules") > 0
        dropped = counter(eng, "lookahead_dropped_steps_total")
        assert dropped == counter(eng, "lookahead_past_block_steps_total")
        assert any(g.graph is not None for g in eng.runner.graphs.values())


def test_the_emulated_device_runs_every_rule_ahead(session):
    """bench/paced_device.py's emulated GPU (the eager runner whose Reuse steps run ahead, landing one device
    step apart) takes the core's commit too, credit in static inputs of its own: every rule's tokens are the
    synchronous path's over the same runner, and every rule ran ahead."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from paced_device import PacedRunner

    from dlc.runtime.session import Session
    m = session.runner.model

    def served(items, la):
        runner = PacedRunner(m, 0.0005, 0.001)
        eng = Engine(Session(runner, None, m.config, False, "t"),
                     ServeConfig(model="t", device="cpu", max_batch_size=8, max_num_tokens=1024,
                                 max_seq_len=96, kv_cache_mb=16, lookahead_steps=la, lookahead_max_ms=0.0))
        reqs = eng.run_requests(items)
        return eng, [r.output_ids for r in reqs]
    ps = prompts(6, seed=9)
    for k in RULES:
        items = [(p, dict(BASE, **RULES[k])) for p in ps[:3]]
        _, want = served(items, 1)
        eng, got = served(items, 16)
        assert got == want, k
        assert counter(eng, "lookahead_runs_total", rule="rules") > 0, k
    mixed = [(p, dict(BASE, **list(RULES.values())[i % 4])) for i, p in enumerate(ps)]
    assert served(mixed, 16)[1] == served(mixed, 1)[1]
