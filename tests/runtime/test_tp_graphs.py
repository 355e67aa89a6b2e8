"""Tensor parallelism with the graph runner on every rank (runtime/distributed/shard_graph.py, issue 16).

On CPU (2 processes, gloo) the ``ShardGraphRunner`` runs its static-buffer Reuse steps uncaptured
(``capture=False``): the same bucket, staging, scratch-slot padding and vocab-parallel combine that a CUDA
graph replays. Tokens must equal one process's (fp32, decisive tiny checkpoints written as
test_tensor_parallel.py writes them): three prompts pad the Reuse batch to bucket 4, so every rank's padding
row reads and writes its own pool's scratch slot. A rank whose calls left lockstep (another bucket, an eager
step where rank 0 replays) would pass collectives of other sizes and fail the step, so equal tokens also say
every rank replayed the same steps. The GPU test captures on 2 GPUs (NCCL collectives inside the graphs)."""
import pytest
import torch

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine, graph_runner_for
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, assert_same_logprobs, write_tiny

PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 64], [9, 8, 7, 6, 5]]      # B=3: Reuse pads to bucket 4
GEN = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")


@pytest.fixture(scope="module", params=["llada", "dream_gqa"])
def pair(request, tmp_path_factory):
    """(one-process session, TP=2 session with graph runners on both ranks) of one tiny checkpoint."""
    path = write_tiny(tmp_path_factory.mktemp(request.param), MODELS[request.param])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2)
    assert graph_runner_for(tp.runner, cuda_graphs=True) is tp.runner and tp.runner.graphed
    yield one, tp
    tp.runner.close()


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_tp2_graph_runner_tokens_equal_one_process(pair, temperature):
    one, tp = pair
    cfg = GenerationConfig(**GEN, temperature=temperature, seed=11)
    before = dict(tp.runner.stats)
    got = generate(tp.runner, PROMPTS, cfg).token_ids
    want = generate(one.runner, PROMPTS, cfg).token_ids
    assert got == want
    assert len({tuple(t) for t in want}) == 3 and len(set(want[0])) > 2       # decisive: prompts matter
    st = tp.runner.stats
    assert st["replays"] - before["replays"] == 2 * 3         # 2 blocks of 4 steps: 1 Refresh + 3 Reuse
    assert st["eager_reuse"] == before["eager_reuse"]
    assert any(k[0] == 4 for k in tp.runner.shard.graphs)     # B=3 padded to bucket 4 (scratch slot)


def test_tp2_graph_logprobs_and_entropy_variants(pair):
    """Captured variants with extras: top-k logprobs and entropy through the vocab-parallel combine."""
    one, tp = pair
    cfg = GenerationConfig(**GEN, threshold=0.3, logprobs=3)
    n_graphs = len(tp.runner.shard.graphs)
    a, b = generate(one.runner, PROMPTS, cfg), generate(tp.runner, PROMPTS, cfg)
    assert b.token_ids == a.token_ids and b.nfe == a.nfe
    assert_same_logprobs(a, b, alternatives=False)
    assert len(tp.runner.shard.graphs) > n_graphs            # a logprobs variant was built on every rank
    eb_cfg = GenerationConfig(**GEN, entropy_bound=2.0)
    a, b = generate(one.runner, PROMPTS, eb_cfg), generate(tp.runner, PROMPTS, eb_cfg)
    assert b.token_ids == a.token_ids and b.nfe == a.nfe


def test_tp2_reuse_steps_replay_from_the_frame_on_every_rank(pair):
    """Every rank stages compact Reuse steps straight from the control frame
    (``ShardGraphRunner.reuse_frame``) once a step of the same frame key (bucket, widths, sampling, pool) has
    replayed: batches of 3, 1 and 2 rows, greedy and sampled, give one process's tokens; both ranks replay the
    same steps from the frame, and ``step_times`` reports each rank's phases. With frame staging off every
    step takes the batch path and the tokens are the same."""
    one, tp = pair
    tp.runner.step_times(reset=True)
    runs = [(PROMPTS, 0.0), (PROMPTS[1:2], 0.9), (PROMPTS[:2], 0.0)]
    for prompts, temperature in runs:
        cfg = GenerationConfig(**GEN, temperature=temperature, seed=5)
        assert generate(tp.runner, prompts, cfg).token_ids == generate(one.runner, prompts, cfg).token_ids
    ranks = tp.runner.step_times(reset=True, frames=False)
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["steps"] == ranks[1]["steps"] >= 18
    assert ranks[0]["frame_replays"] == ranks[1]["frame_replays"] >= 3 * 4   # a run: 6 Reuse, 1 batch path
    assert all(r["stage_us"] > 0 and r["launch_us"] > 0 for r in ranks)
    assert ranks[0]["encode_us"] > 0 and ranks[0]["send_us"] > 0 and ranks[1]["latency_us"] > 0
    try:
        prompts, temperature = runs[1]
        cfg = GenerationConfig(**GEN, temperature=temperature, seed=5)
        assert generate(tp.runner, prompts, cfg).token_ids == generate(one.runner, prompts, cfg).token_ids
        assert all(r["frame_replays"] == 0 for r in tp.runner.step_times(reset=True))
    finally:
        tp.runner.step_times(reset=True, frames=True)


def _engine_outputs(session, params: dict, lookahead: int) -> tuple[Engine, list[list[int]]]:
    """Requests that arrive while others run (Refresh beside Reuse in one iteration), to the end."""
    eng = Engine(session, ServeConfig(max_seq_len=64, kv_cache_mb=4, max_batch_size=4, cuda_graphs=True,
                                      lookahead_steps=lookahead))
    eng.warmup()                                             # every rank: buckets 1, 2, 4 of the block
    assert sorted(k[0] for k in session.runner.shard.graphs) == [1, 2, 4]
    reqs = [eng.make_request(p, {**params, "seed": 3 + i}) for i, p in enumerate(PROMPTS + [[11, 12]])]
    for r in reqs[:2]:
        eng.add_request(r)
    eng.step()                                               # their Refresh; next iteration: Reuse beside
    for r in reqs[2:]:                                       # the newcomers' Refresh
        eng.add_request(r)
    eng.run_until_done()
    assert all(r.error is None for r in reqs)
    return eng, [r.output_ids for r in reqs]


@pytest.mark.parametrize("temperature,lookahead", [(0.0, 16), (0.0, 2), (0.8, 1)])
def test_tp2_engine_with_graphs_equals_generate(pair, temperature, lookahead):
    """The serving engine over the TP graph runner: mixed Refresh / Reuse iterations, Reuse steps run ahead on
    every rank (T = 0, lookahead 16; or a window of 2 in flight, each later step a MORE message every rank
    goes on with) or one step per call (sampled); each request's tokens equal one-process generate with its
    seed."""
    one, tp = pair
    params = dict(GEN, temperature=temperature, steps=16 if lookahead == 2 else 8)   # 2: 7 Reuse steps/block
    eng, outs = _engine_outputs(tp, params, lookahead)
    assert eng.runner is tp.runner and eng.runner.graphed
    refs = [generate(one.runner, [p], GenerationConfig(**params, seed=3 + i, stop_at_eos=True)).token_ids[0]
            for i, p in enumerate(PROMPTS + [[11, 12]])]
    assert outs == refs
    assert eng.metrics.counter("phase_mixed_iterations_total") > 0
    if lookahead > 1:
        assert tp.runner.stats["ahead_calls"] > 0
    if lookahead == 2:                 # later steps: MORE messages; Refreshes launched behind a last step
        assert tp.runner.stats["ahead_continued"] > 0
        assert eng.metrics.counter("lookahead_refresh_prelaunched_total", status="used") > 0


def test_tp2_fused_decode_equals_one_process_fused(pair, monkeypatch):
    """``decode="fused"`` on every rank (the CUDA default; on CPU the op's float32 reference; set as
    ``--graph-decode`` sets it): each rank reduces its vocab shard by ``fused_shard_stats`` at T = 0, in the
    replayed Reuse steps and the eager Refresh steps alike, and the combine decodes what one process's
    ``fused`` graph runner decodes: same tokens and forward counts, with logprobs and entropy variants.
    Sampled steps keep the float64 shard path (tokens equal one process's). Rank 0's calls of the fused path
    are counted (the workers make the same ones: the combine's collectives would not match otherwise)."""
    from dlc.runtime.distributed import shard_graph, shard_runner
    from dlc.runtime.runners.graph import GraphRunner
    one, tp = pair
    calls = {"graph": 0, "eager": 0}

    def counted(key, fn):
        def wrapped(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return wrapped
    monkeypatch.setattr(shard_graph, "fused_stats", counted("graph", shard_graph.fused_stats))
    monkeypatch.setattr(shard_runner, "fused_stats", counted("eager", shard_runner.fused_stats))
    fused_one = GraphRunner(one.runner.model, decode="fused", capture=False)
    assert graph_runner_for(tp.runner, cuda_graphs=True, decode="fused") is tp.runner     # --graph-decode
    try:
        assert tp.runner.shard.decoding == "fused"
        for extra in ({}, dict(threshold=0.3, logprobs=3), dict(entropy_bound=2.0)):
            cfg = GenerationConfig(**GEN, **extra)
            a, b = generate(fused_one, PROMPTS, cfg), generate(tp.runner, PROMPTS, cfg)
            assert b.token_ids == a.token_ids and b.nfe == a.nfe, extra
            if "logprobs" in extra:
                assert_same_logprobs(a, b, alternatives=True)
        assert len({tuple(t) for t in a.token_ids}) == 3 and len(set(a.token_ids[0])) > 2      # decisive
        assert calls["graph"] >= 3 * 3 and calls["eager"] >= 3 * 2      # per run: 2 Refresh, 6 Reuse steps
        fused = dict(calls)
        cfg = GenerationConfig(**GEN, temperature=0.9, seed=11)
        assert generate(tp.runner, PROMPTS, cfg).token_ids == generate(one.runner, PROMPTS, cfg).token_ids
        assert calls == fused                                           # sampled: the float64 path
    finally:
        tp.runner.enable_graphs(True, decode="exact")
    assert tp.runner.shard.decoding == "exact"


FUSED_RULES = {                    # T = 0 rules -> one GPU's fused route (runners.graph.fused_route)
    "credit_logprobs": (dict(threshold=0.3, credit=True, logprobs=3), "extras"),
    "smoothing": (dict(kv_cache="none", smoothing=True), "smooth"),
    "smoothing_top_k": (dict(threshold=0.3, smoothing=True, smoothing_top_k=5), "smooth"),
    "smoothing_logprobs": (dict(smoothing=True, logprobs=2), "sweep"),
}
RULE_FIELDS = ("credit", "smoothing", "smoothing_top_k")


def test_tp2_fused_rules_equal_one_process_fused(pair, monkeypatch):
    """Credit and smoothing at T = 0 under ``decode="fused"`` (the CUDA default) take one GPU's fused routes
    per shard (``shard_runner.fused_rules_decode``: the fused sweep + credit's sparse correction over the
    ranks' gathered credited logits; smoothing's model-dtype pass with the soft embedding all-reduced; the
    float32 sweep beside other extras), in the replayed Reuse steps and the eager Refresh steps alike, never
    the float64 shard sweep: tokens, forward counts and logprobs equal one process's ``fused`` graph runner
    (on CPU the ops' float32 references), and each rule changes the tokens (it was decoded, not skipped).
    Rank 0's calls are counted per route (the workers make the same ones, or the collectives would not
    match)."""
    from collections import Counter

    from dlc.runtime.distributed import shard_graph, shard_runner
    from dlc.runtime.runners.graph import GraphRunner, fused_route
    one, tp = pair
    if one.config.logit_shift:
        pytest.skip("one model is enough")
    routes, sweeps = Counter(), []
    fused_rules, rules = shard_runner.fused_rules_decode, shard_runner.rules_decode

    def counted(shard, rows, ex, credit):
        routes[fused_route(ex)] += 1
        return fused_rules(shard, rows, ex, credit)

    def sweep(*a, **kw):
        sweeps.append(kw.get("acc", torch.float64))
        return rules(*a, **kw)
    for mod in (shard_graph, shard_runner):
        monkeypatch.setattr(mod, "fused_rules_decode", counted)
        monkeypatch.setattr(mod, "rules_decode", sweep)
    fused_one = GraphRunner(one.runner.model, decode="fused", capture=False)
    assert graph_runner_for(tp.runner, cuda_graphs=True, decode="fused") is tp.runner
    try:
        for name, (extra, route) in FUSED_RULES.items():
            before = dict(routes)
            cfg = GenerationConfig(**{**GEN, **extra})
            a, b = generate(fused_one, PROMPTS, cfg), generate(tp.runner, PROMPTS, cfg)
            assert b.token_ids == a.token_ids and b.nfe == a.nfe, name
            if "logprobs" in extra:
                assert_same_logprobs(a, b, alternatives=True)
            assert routes[route] - before.get(route, 0) >= 2 * 2, name     # 2 blocks: Refresh + Reuse
            plain = GenerationConfig(**{**GEN, **{k: v for k, v in extra.items() if k not in RULE_FIELDS}})
            assert generate(fused_one, PROMPTS, plain).token_ids != a.token_ids, name
        assert len({tuple(t) for t in a.token_ids}) == 3 and len(set(a.token_ids[0])) > 2      # decisive
        assert sweeps == [torch.float32] * routes["sweep"]                   # no float64 shard sweep
    finally:
        tp.runner.enable_graphs(True, decode="exact")


def test_graphs_toggle_back_to_eager_on_every_rank(pair):
    one, tp = pair
    tp.runner.enable_graphs(False)
    try:
        assert not tp.runner.graphed and tp.runner.stats is None
        cfg = GenerationConfig(**GEN)
        assert generate(tp.runner, PROMPTS, cfg).token_ids == generate(one.runner, PROMPTS, cfg).token_ids
    finally:
        tp.runner.enable_graphs(True)
    assert tp.runner.graphed


@pytest.mark.gpu
def test_tp2_fused_decode_on_two_gpus_equals_tp1_fused(tmp_path):
    """2 GPUs, NCCL: the CUDA default decodes ``fused`` on every rank (the per-shard Triton sweep and the
    combine inside the captured steps; vocab 262 splits at 131, inside a vocab tile of TP=1's). In fp32 on a
    decisive tiny model the tokens equal one GPU's ``fused`` graph runner's (plain and logprobs variants) and
    TP=2's ``exact`` mode's."""
    from dlc.runtime.runners.graph import GraphRunner
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        ref = GraphRunner(one.runner.model)                   # captured, fused (the CUDA default)
        runner = graph_runner_for(tp.runner)
        assert ref.decoding == "fused" and runner.shard.decoding == "fused" and runner.capture
        for extra in ({}, dict(threshold=0.3, logprobs=3)):
            cfg = GenerationConfig(**GEN, **extra)
            a, b = generate(ref, PROMPTS, cfg), generate(runner, PROMPTS, cfg)
            assert b.token_ids == a.token_ids and b.nfe == a.nfe, extra
        assert len({tuple(t) for t in a.token_ids}) == 3 and len(set(a.token_ids[0])) > 2
        assert_same_logprobs(a, b, alternatives=True)
        assert runner.stats["replays"] > 0 and runner.stats["eager_reuse"] == 0
        runner.enable_graphs(True, decode="exact")
        assert runner.shard.decoding == "exact"
        assert generate(runner, PROMPTS, cfg).token_ids == a.token_ids
    finally:
        tp.runner.close()


@pytest.mark.gpu
def test_tp2_sampled_steps_on_two_gpus_take_the_fused_draw(tmp_path, monkeypatch):
    """2 GPUs, NCCL, fp32: sampled steps without filters (T = 0.9) decode every rank's shard by one GPU's
    fused unfiltered draw (``filter_bisect.plain_stats`` in ``vocab.shard_stats``; rank 0's calls counted),
    captured with the combine; the tokens of one GPU's captured graph runner (``plain_draw``) and of its
    eager runner (the torch sweep); the draw moves tokens off the T = 0 ones (decisive)."""
    from dlc.runtime.distributed import vocab
    from dlc.runtime.runners.graph import GraphRunner
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    real, calls = vocab.plain_stats, []
    monkeypatch.setattr(vocab, "plain_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        runner = graph_runner_for(tp.runner)
        assert runner.capture
        cfg = GenerationConfig(**GEN, temperature=0.9, seed=11)
        want = generate(GraphRunner(one.runner.model), PROMPTS, cfg).token_ids
        assert generate(one.runner, PROMPTS, cfg).token_ids == want
        assert generate(runner, PROMPTS, cfg).token_ids == want
        assert want != generate(one.runner, PROMPTS, GenerationConfig(**GEN, seed=11)).token_ids
        assert calls and runner.stats["replays"] > 0 and runner.stats["eager_reuse"] == 0
    finally:
        tp.runner.close()


def test_serve_config_allows_tp_graphs_and_compile():
    assert ServeConfig(tensor_parallel_size=2, cuda_graphs=True).cuda_graphs
    assert ServeConfig(tensor_parallel_size=2, cuda_graphs=True, compile=True).compile   # test_tp_compile.py


def test_tp_graph_and_compile_defaults_are_one_gpus(pair):
    """graph_runner_for over a TP runner takes TP=1's defaults: on CPU graphs and compiled blocks stay off
    (on CUDA both on: the GPU tests); --compile without the graph runner is refused before any message."""
    _, tp = pair
    with pytest.raises(ValueError, match="compile: .*--cuda-graphs"):
        graph_runner_for(tp.runner, cuda_graphs=False, compile=True)
    assert tp.runner.graphed                                 # refused: nothing changed on any rank
    try:
        assert graph_runner_for(tp.runner) is tp.runner
        assert not tp.runner.graphed and not tp.runner.compiled
    finally:
        tp.runner.enable_graphs(True)


@pytest.mark.gpu
def test_tp2_cuda_graphs_on_two_gpus(tmp_path):
    """2 GPUs, NCCL: every rank captures its Reuse steps with the all-reduces and the vocab combine inside;
    tokens equal TP=2 eager at T = 0 in fp32, and the steps replayed."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = write_tiny(tmp_path, MODELS["dream_gqa"])
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        cfg = GenerationConfig(**GEN)
        eager = generate(tp.runner, PROMPTS, cfg).token_ids
        runner = graph_runner_for(tp.runner, compile=False)   # the CUDA default: graphs on (compiled
        assert runner.graphed and runner.capture and not runner.compiled   # blocks: test_tp_compile.py)
        got = generate(runner, PROMPTS, cfg).token_ids
        assert got == eager and len({tuple(t) for t in eager}) == 3
        assert runner.stats["replays"] > 0 and runner.stats["captures"] > 0
        assert runner.stats["eager_reuse"] == 0
    finally:
        tp.runner.close()


@pytest.mark.parametrize("phase,cfg_scale", [("reuse", 0.0), ("reuse", 1.5), ("refresh", 1.5), ("full", 0.0)])
def test_compact_message_rebuilds_the_batch(phase, cfg_scale):
    """channel.encode / decode (no processes): what a worker rebuilds from the compact frame is the batch
    rank 0 built (Dream's shift, guidance twins, unequal lengths); a Reuse step's ids only on its fed span."""
    from types import SimpleNamespace

    from dlc.models.presets import preset_config
    from dlc.runtime.distributed.channel import Compact, decode, encode
    from dlc.runtime.kv_cache import KVCacheManager
    from dlc.runtime.step import build_batch
    mc = preset_config("tiny-dream")
    runner = SimpleNamespace(device=torch.device("cpu"), config=mc, sparse_retention=None)
    pool = KVCacheManager(mc, 40, 1 << 62, torch.float32, "cpu", max_slots=8)
    seqs = [torch.arange(10, 40), torch.arange(50, 74)]                    # lengths 30 and 24
    slots = [pool.allocate_n(2 if cfg_scale else 1) for _ in seqs] if phase != "full" else None
    spans = [(16, 24), (12, 20)] if phase == "reuse" else None
    b = build_batch(runner, phase, seqs, [12, 8], [16, 12], 8, spans, slots, pool if slots else None,
                    temperature=0.7, cfg_scale=cfg_scale, seeds=[5, 9])
    b.entropy, b.logprobs = True, 3
    head, payload = encode(b, torch.tensor([[2, 1], [1, 1]]) if phase == "reuse" else None)
    got, key, counts = decode(Compact(head, payload), mc, torch.device("cpu"))
    assert (key is None) == (phase == "full") and (counts is None) == (phase != "reuse")
    for f in ("phase", "n_seqs", "n_out", "n_fed", "temperature", "cfg_scale", "block_size", "entropy",
              "logprobs"):
        assert getattr(got, f) == getattr(b, f), f
    for f in ("pos", "key_mask", "lengths", "out_start", "hid_start", "seeds", "cond_rows", "un_rows",
              "slots", "q_start", "q_start_dev"):
        x, y = getattr(got, f), getattr(b, f)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f
    if phase == "reuse":                                                   # the fed span, masks elsewhere
        cols = b.q_start[:, None] + torch.arange(b.n_fed)
        assert torch.equal(got.ids.gather(1, cols), b.ids.gather(1, cols))
        assert torch.equal(counts, torch.tensor([[2, 1], [1, 1]]))
    else:
        assert torch.equal(got.ids, b.ids)

