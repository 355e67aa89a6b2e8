"""Tensor parallelism decodes the rules one process decodes (issues 16, 18): credit, iteration smoothing
(whole vocabulary and truncated) and the sampling filters at T > 0 (over the merged top 64 candidates when a
top_k bounds them, else by an exact bisection on the survivors' threshold: vocab_filters.py).

Each rank sweeps its vocab shard with the decoding core's chunk loop (``sampling.sweep_stats``: credit of the
ids in its shard, the hash noise of the global id), ``vocab.combine_sweep`` merges the statistics (smoothing's
soft embedding by one all-reduce of [rows, d]) and every rank finishes as one process does
(shard_runner.rules_decode). On CPU (2 processes, gloo) with decisive fp32 tiny models (LLaDA; Dream with a
tied head and one replicated KV head: the embedding shard is the head shard), the tokens must equal one
process's, through ``generate`` (eager and graph runners; the graph runner's static-buffer variants run
uncaptured on CPU) and through the serving Engine in mixed batches. Each setting's tokens must differ from the
same request without the rule, so equality means the rule was decoded, not skipped. The GPU test of the
``fused`` routes (credit and smoothing at T = 0 per shard in float32, as one GPU's fused graph runner)
compares with one GPU's fused runner; their CPU test is tests/runtime/test_tp_graphs.py's."""
import pytest

from dlc.runtime.config import ServeConfig
from dlc.runtime.distributed import channel
from dlc.runtime.engine import Engine, graph_runner_for
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, PROMPTS, write_tiny

BASE = dict(gen_length=16, block_length=8, steps=8)
HOT = dict(temperature=0.9, seed=3)
RULES = {                                   # T = 0 rules: credit, smoothing
    "credit": dict(kv_cache="dual", threshold=0.3, credit=True),
    "smoothing": dict(kv_cache="none", smoothing=True, logprobs=2),
    "smoothing_top_k": dict(kv_cache="prefix", smoothing=True, smoothing_top_k=5),
}
FILTERS = {                                 # seeded T > 0: the filters, and credit while sampling
    "top_k_top_p": dict(kv_cache="dual", top_k=20, top_p=0.6, **HOT),
    "top_k_min_p": dict(kv_cache="none", top_k=30, min_p=0.2, **HOT),
    "credit_sampled": dict(kv_cache="dual", credit=True, **HOT),
}
BEYOND = {                                  # filters the top-64 candidates do not bound: the bisection
    "top_p": dict(kv_cache="dual", top_p=0.6, **HOT),
    "min_p": dict(kv_cache="prefix", min_p=0.2, **HOT),
    "top_p_min_p": dict(kv_cache="dual", top_p=0.8, min_p=0.05, **HOT),
    "top_k_100_top_p": dict(kv_cache="dual", top_k=100, top_p=0.7, **HOT),
    "credit_top_p": dict(kv_cache="dual", threshold=0.3, credit=True, top_p=0.8, **HOT),
}
FEATURES = ("credit", "smoothing", "smoothing_top_k", "top_k", "top_p", "min_p")


@pytest.fixture(scope="module", params=["llada", "dream_mqa_tied"])
def pair(request, tmp_path_factory):
    """(one-process session, TP=2 session) of one tiny checkpoint."""
    path = write_tiny(tmp_path_factory.mktemp(request.param), MODELS[request.param])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2)
    yield one, tp
    tp.runner.close()


def _tokens(runner, params):
    return generate(runner, PROMPTS, GenerationConfig(**BASE, **params)).token_ids


def _check(one, tp, cases):
    for name, params in cases.items():
        want = _tokens(one.runner, params)
        assert _tokens(tp.runner, params) == want, name
        without = {k: v for k, v in params.items() if k not in FEATURES}
        assert _tokens(one.runner, without) != want, name           # decisive: the rule changes the tokens
        assert want[0] != want[1] and len(set(want[0])) > 2, name


def _no_pickled_steps(monkeypatch) -> list:
    """Record the batches rank 0 sends pickled: the rules' tensors follow a compact frame instead, over the
    model's group (channel.send_rule_tensors), so a rule's step costs no host copy and no pickling."""
    pickled = []
    real = channel.pack_batch

    def spy(batch):
        pickled.append(batch.phase)
        return real(batch)
    monkeypatch.setattr(channel, "pack_batch", spy)
    return pickled


def test_tp2_credit_and_smoothing_equal_one_process(pair, monkeypatch):
    one, tp = pair
    pickled = _no_pickled_steps(monkeypatch)
    _check(one, tp, RULES)
    assert pickled == []


def test_tp2_sampling_filters_equal_one_process(pair, monkeypatch):
    one, tp = pair
    if one.config.tie_embeddings:
        pytest.skip("one model is enough (the tied head matters to smoothing's embedding shard)")
    pickled = _no_pickled_steps(monkeypatch)
    _check(one, tp, FILTERS)
    assert pickled == []


def test_tp2_graph_runner_replays_the_rules(pair):
    """The rank's graph runner holds the rules' variants (credit and smoothing inputs, filters in static
    buffers; on CPU uncaptured): the same tokens, every Reuse step replayed, none eager; filters the
    candidates do not bound too (the bisection with its all_reduces inside the variant's step)."""
    one, tp = pair
    if one.config.tie_embeddings:
        pytest.skip("one model is enough")
    assert graph_runner_for(tp.runner, cuda_graphs=True) is tp.runner and tp.runner.graphed
    try:
        before = dict(tp.runner.stats)
        for params in (RULES["credit"], RULES["smoothing_top_k"]):   # staged from the control frame
            assert _tokens(tp.runner, params) == _tokens(one.runner, params), params
        framed = tp.runner.stats["frame_replays"] - before["frame_replays"]
        assert framed >= 2 * (BASE["steps"] - 2), framed          # all but each key's first Reuse step
        for params in (FILTERS["top_k_top_p"], *BEYOND.values()):
            assert _tokens(tp.runner, params) == _tokens(one.runner, params), params
        assert tp.runner.stats["replays"] > before["replays"]
        assert tp.runner.stats["eager_reuse"] == before["eager_reuse"]
    finally:
        tp.runner.enable_graphs(False)


def _engine_items():
    """A mixed batch at T = 0 (credit, smoothing, plain rows) and one at T > 0 (top-k filters, a top-p row
    the candidates do not bound, a credit row: the bisection for the whole batch)."""
    p = [[5, 17, 99, 3], [42, 8, 9], [7, 7, 100, 31, 2], [60, 61]]
    base = dict(BASE, kv_cache="dual")
    cold = [dict(threshold=0.3, credit=True), dict(smoothing=True), {}, dict(threshold=0.3, smoothing=True)]
    hot = [dict(top_k=5), dict(top_k=20, top_p=0.6), dict(top_p=0.7), dict(credit=True)]
    return ([(q, {**base, **kw}) for q, kw in zip(p, cold)]
            + [(q, {**base, **HOT, "seed": 4 + i, **kw}) for i, (q, kw) in enumerate(zip(p, hot))])


def test_tp2_engine_mixed_batches_equal_solo_one_process(pair, monkeypatch):
    """Through the serving Engine: rows with credit, smoothing and filters share batches with plain rows; each
    request gets exactly one process's solo output, no batch failing and split."""
    one, tp = pair
    if one.config.tie_embeddings:
        pytest.skip("one model is enough")
    seen = []
    for phase in ("refresh", "reuse"):
        call = getattr(tp.runner, phase)

        def spy(batch, call=call):
            seen.append((batch.n_seqs, batch.credit_ids is not None, batch.soft_tau is not None,
                         batch.top_k is not None))
            return call(batch)
        monkeypatch.setattr(tp.runner, phase, spy)
    items = _engine_items()
    eng = Engine(tp, ServeConfig(max_seq_len=64, kv_cache_mb=4, max_batch_size=8))
    reqs = eng.run_requests(items)
    for r, (p, params) in zip(reqs, items):
        want = generate(one.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert r.error is None and r.output_ids == want, params
    assert eng.metrics.counter("isolated_batches_total") == 0
    assert any(n == 4 and credit and soft for n, credit, soft, _ in seen)     # credit, smoothing, plain
    assert any(n == 4 and credit and filt for n, credit, _, filt in seen)     # 3 filters + credit at T > 0


def test_tp2_filters_beyond_the_candidates_equal_one_process(pair):
    """top_p / min_p without a top_k, a top_k over 64, filters with credit: the survivors' threshold found by
    the bisection over the ranks' counts and masses (vocab_filters.py), the Gumbel-max over each rank's
    survivors merged: one process's tokens (seeded T > 0)."""
    one, tp = pair
    if one.config.tie_embeddings:
        pytest.skip("one model is enough")
    _check(one, tp, BEYOND)


@pytest.mark.gpu
def test_tp2_rules_captured_on_two_gpus(tmp_path):
    """2 GPUs, NCCL: every rank captures the rules' Reuse variants (the shard sweep, the statistics'
    all-gather and smoothing's all-reduce inside the graph); in fp32 the tokens equal one GPU's eager runner
    for credit, smoothing (whole and truncated) and seeded filters (over the top-k candidates, and the
    bisection's top-p / min-p alone, top-k over 64, credit with top-p), every Reuse step replayed;
    through the Engine with lookahead 16, credit and smoothing rows run ahead with one GPU's tokens."""
    import torch
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        runner = graph_runner_for(tp.runner, compile=False, decode="exact")   # plain steps: eager's float64
        assert runner.graphed and runner.capture and runner.shard.decoding == "exact"
        for params in [*RULES.values(), *FILTERS.values(), *BEYOND.values()]:    # BEYOND: the bisection
            assert _tokens(runner, params) == _tokens(one.runner, params), params
        assert runner.stats["replays"] > 0 and runner.stats["captures"] > 0
        assert runner.stats["eager_reuse"] == 0
        items = _engine_items()[:4]                                    # the T = 0 rows: they run ahead
        eng = Engine(tp, ServeConfig(max_seq_len=64, kv_cache_mb=4, max_batch_size=8, cuda_graphs=True,
                                     compile=False, graph_decode="exact", lookahead_steps=16,
                                     lookahead_max_ms=0.0))
        calls = runner.stats["ahead_calls"]
        reqs = eng.run_requests(items)
        for r, (p, params) in zip(reqs, items):
            want = generate(one.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
            assert r.error is None and r.output_ids == want, params
        assert runner.stats["ahead_calls"] > calls
    finally:
        tp.runner.close()


FUSED = {                                   # T = 0 rules on each route of runners.graph.fused_route
    "credit_logprobs": dict(kv_cache="dual", threshold=0.3, credit=True, logprobs=3),       # extras
    "smoothing": dict(kv_cache="dual", smoothing=True),                                     # smooth
    "smoothing_top_k": dict(kv_cache="prefix", threshold=0.3, smoothing=True, smoothing_top_k=5),
    "smoothing_logprobs": RULES["smoothing"],                                               # sweep
}


@pytest.mark.gpu
def test_tp2_fused_rules_captured_equal_one_gpu_fused(tmp_path, monkeypatch):
    """2 GPUs, NCCL, ``decode="fused"`` on both sides (the CUDA default): credit and smoothing at T = 0 take
    one GPU's fused routes per shard inside the captured steps (``shard_runner.fused_rules_decode``: the
    per-shard Triton sweep with credit's sparse correction, the credited logits summed in the combine's
    all-gather; smoothing's model-dtype pass with the soft embedding all-reduced; the float32 sweep beside
    logprobs), never the float64 shard sweep. In fp32 on a decisive tiny model the tokens, forward counts and
    logprobs equal one GPU's captured ``fused`` graph runner's, every Reuse step replayed."""
    import torch
    from dlc.runtime.distributed import shard_graph, shard_runner
    from dlc.runtime.runners.graph import GraphRunner
    from test_tensor_parallel import assert_same_logprobs
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    calls, accs = [], []
    fused_rules, rules = shard_runner.fused_rules_decode, shard_runner.rules_decode

    def counted(*a, **kw):
        calls.append(1)
        return fused_rules(*a, **kw)

    def sweep(*a, **kw):
        accs.append(kw.get("acc", torch.float64))
        return rules(*a, **kw)
    for mod in (shard_graph, shard_runner):                    # rank 0's calls (captures and eager steps)
        monkeypatch.setattr(mod, "fused_rules_decode", counted)
        monkeypatch.setattr(mod, "rules_decode", sweep)
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        ref = GraphRunner(one.runner.model)                    # captured, fused (the CUDA default)
        runner = graph_runner_for(tp.runner, compile=False)
        assert ref.decoding == "fused" and runner.shard.decoding == "fused" and runner.capture
        for name, params in FUSED.items():
            cfg = GenerationConfig(**BASE, **params)
            a, b = generate(ref, PROMPTS, cfg), generate(runner, PROMPTS, cfg)
            assert b.token_ids == a.token_ids and b.nfe == a.nfe, name
            if "logprobs" in params:
                assert_same_logprobs(a, b, alternatives=True)
            without = {k: v for k, v in params.items() if k not in FEATURES}
            assert generate(ref, PROMPTS, GenerationConfig(**BASE, **without)).token_ids != a.token_ids, name
        assert runner.stats["replays"] > 0 and runner.stats["eager_reuse"] == 0
        assert len(calls) >= 2 * len(FUSED) and accs and set(accs) == {torch.float32}
    finally:
        tp.runner.close()
