"""Every decoding rule tensor parallelism serves runs its Reuse steps ahead on every rank (issues 18,
15, 16), sampled steps too (each step's seeds travel with the frames; block decoders' tempered draws,
filtered or not): threshold, factor, hierarchical, entropy-bound and logprobs rows commit on each rank's
device with the decoding core's ``AheadCommit``, which each worker rebuilds from the rules the AHEAD frame
carries
(runtime/distributed/ahead_rules.py); the vocab-parallel combine gives every rank the same tokens,
confidences, entropies and logprobs, so every rank commits the same block and the ranks stay in lockstep
with no collective of their own. Credit and smoothing run ahead too: the frame carries each row's credit
column and smoothing state, and each rank carries credit and the soft input in its static inputs from the
step's extras, equal on every rank (``shard_runner.rules_decode``).

On CPU (2 processes, gloo, fp32) the ``ShardGraphRunner`` runs its static-buffer steps uncaptured. Through
the serving Engine, lookahead 16 must give the tokens and logprobs of lookahead 1 (each step a host round
trip) and of one process (TP=1), the steps must have run ahead (the runner's ``ahead_calls``, the engine's
"rules" runs) and no device commit may differ from the core's. A rank that committed otherwise would feed
other ids: its K/V and then its partial sums would differ and the tokens with them."""
import pytest
import torch

from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import GenerationConfig, ahead_commit
from dlc.runtime.engine import Engine, graph_runner_for
from dlc.runtime.generate import generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, write_tiny

PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 64], [9, 8, 7, 6, 5]]
GEN = dict(gen_length=24, block_length=12, steps=24, kv_cache="dual")
RULES = {"threshold": dict(threshold=0.3), "factor": dict(factor=2.0),
         "hierarchical": dict(threshold=0.5, low_threshold=0.1), "entropy_bound": dict(entropy_bound=3.0),
         "logprobs": dict(threshold=0.3, logprobs=2), "schedule_logprobs": dict(logprobs=0)}
# logprobs vs lookahead 1 and vs one process: fp32 models, whose GEMMs round by shape (a row's next Refresh
# may run in another batch when its block ends mid-run; TP sums partial products in another order)
LOGPROB_TOL = 1e-5


@pytest.fixture(scope="module", params=["llada"])
def pair(request, tmp_path_factory):
    """(one process, TP=2) of a tiny checkpoint (``MODELS[param]``; one TP group per process at a time: a test
    of another layout parametrizes this fixture indirectly, which tears the previous pair down first)."""
    path = write_tiny(tmp_path_factory.mktemp("tp-ahead"), MODELS[request.param])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2)
    assert graph_runner_for(tp.runner, cuda_graphs=True) is tp.runner and tp.runner.graphed
    yield one, tp
    tp.runner.close()


def serve(session, items, lookahead):
    """(prompt, params) items through one Engine -> (engine, [(output ids, token logprobs)], forwards)."""
    eng = Engine(session, ServeConfig(max_seq_len=64, kv_cache_mb=4, max_batch_size=4, cuda_graphs=True,
                                      compile=False, lookahead_steps=lookahead, lookahead_max_ms=0.0))
    reqs = eng.run_requests(items)
    assert all(r.error is None for r in reqs)
    return eng, [(r.output_ids, r.state.token_logprobs) for r in reqs], [r.state.forwards for r in reqs]


def same_logprobs(a, b, tol):
    for la, lb in zip(a, b):
        assert (la is None) == (lb is None)
        for ea, eb in zip(la or [], lb or []):
            assert (ea is None) == (eb is None)
            if ea is not None:
                assert abs(ea[0] - eb[0]) < tol and list(ea[1]) == list(eb[1])
                assert all(abs(x - y) < tol for x, y in zip(ea[2], eb[2]))


def check(pair, items, runs="rules"):
    """TP lookahead 16 == TP lookahead 1 == one process (tokens; logprobs within the tolerances); the rules
    (``runs``: the engine's run label) ran ahead on every rank and no device commit differed from the
    core's. -> outputs, forwards."""
    one, tp = pair
    calls = tp.runner.stats["ahead_calls"]
    _, sync, fw_sync = serve(tp, items, 1)
    assert tp.runner.stats["ahead_calls"] == calls
    eng, got, fw = serve(tp, items, 16)
    assert [o for o, _ in got] == [o for o, _ in sync] and fw == fw_sync
    same_logprobs([lp for _, lp in got], [lp for _, lp in sync], LOGPROB_TOL)
    assert tp.runner.stats["ahead_calls"] > calls
    assert eng.metrics.counter("lookahead_runs_total", rule=runs) > 0
    dropped = eng.metrics.counter("lookahead_dropped_steps_total")
    assert dropped == eng.metrics.counter("lookahead_past_block_steps_total")     # no commit differed
    for (p, params), (ids, lps) in zip(items, got):
        ref = generate(one.runner, [p], GenerationConfig(**params, stop_at_eos=True))
        assert ids == ref.token_ids[0]
        if params.get("logprobs") is not None:
            same_logprobs([lps], ref.logprobs, LOGPROB_TOL)
    return [o for o, _ in got], fw


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_runs_ahead_on_every_rank(pair, rule):
    """One rule, B=3 (bucket 4: a padding row): tokens and logprobs as synchronous TP and as one process;
    outputs vary by prompt, and (variable-count rules) some step unmasked several tokens."""
    outs, fw = check(pair, [(p, dict(GEN, **RULES[rule])) for p in PROMPTS])
    assert len({tuple(o) for o in outs}) == len(PROMPTS)                  # decisive: prompts matter
    if rule != "schedule_logprobs":
        assert min(fw) < GEN["gen_length"]


def test_credit_and_smoothing_run_ahead_on_every_rank(pair):
    """Credit and smoothing rows beside a plain threshold row: every rank carries the credit and the soft
    input in its static inputs (the frame: each row's credit column and smoothing state), so the tokens and
    forwards equal synchronous TP's and one process's; the rules change the tokens (decisive)."""
    items = [(PROMPTS[0], dict(GEN, threshold=0.3, credit=True)), (PROMPTS[1], dict(GEN, smoothing=True)),
             (PROMPTS[2], dict(GEN, threshold=0.3))]
    outs, _ = check(pair, items)
    one, _ = pair
    plain = [generate(one.runner, [p], GenerationConfig(**dict(GEN, threshold=0.3) if i != 1 else GEN,
                                                        stop_at_eos=True)).token_ids[0]
             for i, (p, _) in enumerate(items[:2])]
    assert outs[0] != plain[0] and outs[1] != plain[1]


@pytest.mark.parametrize("rule", ["schedule", "threshold_top_p"])
def test_sampled_steps_run_ahead_on_every_rank(pair, rule):
    """T > 0: each step's seeds travel with the AHEAD / MORE frames (after the counts), so every rank stages
    the same seeds and draws the same tokens (the vocab-parallel draw); tokens equal synchronous TP's and one
    process's, and other seeds give other tokens (decisive)."""
    params = dict(GEN, temperature=1.5, **({} if rule == "schedule" else dict(threshold=0.3, top_p=0.8)))
    items = [(p, dict(params, seed=5 + i)) for i, p in enumerate(PROMPTS)]
    outs, _ = check(pair, items, runs="schedule" if rule == "schedule" else "rules")
    one, _ = pair
    other = [generate(one.runner, [p], GenerationConfig(**dict(params, seed=50 + i), stop_at_eos=True))
             .token_ids[0] for i, (p, _) in enumerate(items)]
    assert other != outs


@pytest.mark.parametrize("pair", ["sdar"], indirect=True)
@pytest.mark.parametrize("filters", [{}, dict(top_p=0.8), dict(top_k=5, min_p=0.05)],
                         ids=["plain", "top_p", "top_k_min_p"])
def test_sampled_block_steps_replay_on_every_rank(pair, filters):
    """Block decoders at T > 0 (confidence from rows / T), unfiltered and filtered (the survivors'
    confidence): every rank replays the tempered draw of its vocab shard instead of the eager step, run
    ahead and one step at a time; tokens as one process's, and the seeds matter."""
    one, tp = pair
    params = dict(gen_length=24, block_length=8, steps_per_block=8, threshold=0.5, kv_cache="block",
                  temperature=0.5, **filters)
    items = [(p, dict(params, seed=5 + i)) for i, p in enumerate(PROMPTS)]
    eager = tp.runner.stats["eager_reuse"]
    outs, _ = check(pair, items)
    assert tp.runner.stats["eager_reuse"] == eager
    other = [generate(one.runner, [p], GenerationConfig(**dict(params, seed=50 + i), stop_at_eos=True))
             .token_ids[0] for i, (p, _) in enumerate(items)]
    assert other != outs


@pytest.mark.parametrize("pair", ["sdar"], indirect=True)
@pytest.mark.parametrize("extras", [dict(credit=True, smoothing=True, logprobs=1),
                                    dict(threshold=None, entropy_bound=0.5)],
                         ids=["credit_smooth_lp", "entropy"])
def test_block_rule_extras_replay_on_every_rank(pair, extras):
    """Block decoders with the rules' extras (credit, smoothing, logprobs; entropy-bound): every rank replays
    every step, a block's first step as rows per block, run ahead and one step at a time; tokens and
    logprobs as one process's."""
    _, tp = pair
    params = {**dict(gen_length=24, block_length=8, steps_per_block=8, threshold=0.5, kv_cache="block"),
              **extras}
    eager = tp.runner.stats["eager_reuse"]
    rows = tp.runner.stats["block_rows"]
    check(pair, [(p, params) for p in PROMPTS])
    assert tp.runner.stats["eager_reuse"] == eager and tp.runner.stats["block_rows"] > rows


@pytest.mark.slow                 # ~60 s on 2 cores: two mixed runs, each served twice and by one process
def test_a_mixed_batch_runs_ahead_rule_by_rule_on_every_rank(pair):
    """Rows of different rules in one run (one group: the frame carries each row's rule), and rows of
    different logprobs / entropy needs: each row selects with its own rule on every rank."""
    rules = list(RULES.values())
    items = [(p, dict(GEN, **rules[i % 4])) for i, p in enumerate(PROMPTS + [[11, 12]])]
    outs, _ = check(pair, items)
    assert len({tuple(o) for o in outs}) > 1
    items = [(p, dict(GEN, **rules[3 + i % 3])) for i, p in enumerate(PROMPTS)]
    check(pair, items)


@pytest.mark.parametrize("pair", ["sdar"], indirect=True)
def test_block_threshold_runs_ahead_on_every_rank(pair):
    """LLaDA2.0's / SDAR's block threshold (``BlockThresholdRule``, kind 5 of the AHEAD frame) runs the later
    steps of each block ahead on both ranks (each replays the ordinary captured step over the prefix up to
    the block's end): tokens as synchronous TP and as one process, no device commit differed."""
    from dlc.runtime.decoding import DecodeState
    from dlc.runtime.distributed.ahead_rules import decode_commit, encode_commit
    one, _ = pair
    params = dict(gen_length=24, block_length=8, steps_per_block=8, threshold=0.9, kv_cache="block")
    st = DecodeState.new([1, 2, 3], GenerationConfig(**params), one.config)
    commit = ahead_commit([st, st], "cpu")
    back = decode_commit(encode_commit(commit), 2, one.config.mask_id, "cpu")
    assert [(type(r), vars(r)) for r in back.rules] == [(type(r), vars(r)) for r in commit.rules]
    outs, _ = check(pair, [(p, params) for p in PROMPTS])
    assert len({tuple(o) for o in outs}) > 1


def test_the_frame_carries_what_the_commit_needs():
    """ahead_rules: the words rebuild each row's rule (parameters bit for bit, hierarchical's None high),
    logprobs; one word group for a batch of one rule; credit's and smoothing's per-row state."""
    from dlc.models.presets import preset_config
    from dlc.runtime.decoding import DecodeState
    from dlc.runtime.distributed.ahead_rules import decode_commit, encode_commit
    mc = preset_config("tiny-llada")

    def states(*kws):
        out = []
        for kw in kws:
            st = DecodeState.new([1, 2, 3], GenerationConfig(**dict(GEN, **kw)), mc)
            st.advance(16)
            out.append(st)
        return out
    kws = [dict(threshold=0.3), dict(low_threshold=0.1), dict(factor=2.0), dict(entropy_bound=0.7),
           dict(threshold=0.3, logprobs=1), {}]
    commit = ahead_commit(states(*kws), "cpu")
    words = encode_commit(commit)
    back = decode_commit(words, len(kws), mc.mask_id, "cpu")
    assert [(type(r), vars(r)) for r in back.rules] == [(type(r), vars(r)) for r in commit.rules]
    assert back.entropy and back.logprobs and back.reads == commit.reads
    assert [r.high for r in back.rules if hasattr(r, "high")] == [None]
    one = encode_commit(ahead_commit(states(*[dict(threshold=0.3)] * 8), "cpu"))
    assert one.numel() == 5
    # credit and smoothing: each row's state (next credit column, on; smoothing on, forwards) travels too
    mixed = states(dict(threshold=0.3, credit=True), dict(threshold=0.3), dict(smoothing=True))
    mixed[0].credit = (torch.zeros(16, 3, dtype=torch.long), torch.zeros(16, 3, dtype=torch.float64))
    mixed[2].iters = 5
    commit = ahead_commit(mixed, "cpu")
    back = decode_commit(encode_commit(commit), 3, mc.mask_id, "cpu")
    assert back.credit_at.tolist() == commit.credit_at.tolist() == [3, 0, 0]
    assert back.credit_on.tolist() == [True, False, False] and back.smooth_on.tolist() == [False, False, True]
    assert back.smooth_it.tolist() == commit.smooth_it.tolist() and commit.smooth_it.tolist()[2] == 5
    assert back.reads == commit.reads and back.keeps == ("soft",)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices")
def test_every_rule_runs_ahead_on_two_gpus(tmp_path):
    """2 GPUs, NCCL, captured steps (fused decoding, fp32): each rule and a mixed batch run ahead on both
    ranks with the tokens of synchronous TP (and of one GPU's graph runner), no commit differing."""
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        runner = graph_runner_for(tp.runner, compile=False)
        assert runner.graphed and runner.capture
        rules = list(RULES.values())
        sets = [[(p, dict(GEN, **kw)) for p in PROMPTS] for kw in rules]
        sets.append([(p, dict(GEN, **rules[i % 4])) for i, p in enumerate(PROMPTS + [[11, 12]])])
        for items in sets:
            calls = runner.stats["ahead_calls"]
            _, sync, _ = serve(tp, items, 1)
            eng, got, _ = serve(tp, items, 16)
            assert [o for o, _ in got] == [o for o, _ in sync]
            same_logprobs([lp for _, lp in got], [lp for _, lp in sync], LOGPROB_TOL)
            assert runner.stats["ahead_calls"] > calls and runner.stats["eager_reuse"] == 0
            assert eng.metrics.counter("lookahead_runs_total", rule="rules") > 0
            ref = serve(one, items, 16)[1]
            assert [o for o, _ in got] == [o for o, _ in ref]
    finally:
        tp.runner.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampled_steps_run_ahead_on_two_gpus(tmp_path):
    """2 GPUs, NCCL, fp32, captured steps on both ranks: sampled runs (plain, and threshold with top-p) with
    each step's seeds in the frames give the synchronous TP engine's tokens and one GPU's generate()'s."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)

    def served(items, la):
        eng = Engine(tp, ServeConfig(max_seq_len=64, kv_cache_mb=16, max_batch_size=4, device="cuda",
                                     cuda_graphs=True, compile=False, lookahead_steps=la,
                                     lookahead_max_ms=0.0))
        reqs = eng.run_requests(items)
        assert all(r.error is None for r in reqs)
        return eng, [r.output_ids for r in reqs]
    try:
        assert graph_runner_for(tp.runner, cuda_graphs=True) is tp.runner and tp.runner.capture
        for kw in (dict(temperature=1.5), dict(temperature=1.5, threshold=0.3, top_p=0.8)):
            items = [(p, dict(GEN, **kw, seed=5 + i)) for i, p in enumerate(PROMPTS)]
            calls = tp.runner.stats["ahead_calls"]
            _, want = served(items, 1)
            assert tp.runner.stats["ahead_calls"] == calls
            eng, got = served(items, 16)
            assert got == want, kw
            assert tp.runner.stats["ahead_calls"] > calls and tp.runner.graphed
            for (p, params), ids in zip(items, got):
                ref = generate(one.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
                assert ids == ref, kw
    finally:
        tp.runner.close()
