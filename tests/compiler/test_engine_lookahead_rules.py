"""Every decoding rule runs its Reuse steps ahead over an engine's phase programs (issues 18 / 15):
``CompiledRunner.reuse_ahead`` with the decoding core's ``AheadCommit`` over ``ProgramGraphs``' static
inputs (no capture on CPU: the same staging, commits and static buffers a CUDA graph replays).

An export engine directory built with ``--decode-extras --logprobs 2`` returns entropy, logprobs and credit's
top-1 per chunk and takes credit's and smoothing's inputs: threshold, factor, hierarchical, entropy-bound,
credit (carried in the static credit inputs, staged N columns wide), logprobs and smoothing (the device
writes the next soft input into the static ``embed_delta``; the soft embedding decoded from the programs'
hidden rows) all run ahead. A GPU-lowered ``--decode-extras`` build (its programs only return the hidden
rows; run here through the ops' CPU references) decodes every extra from the rows on the device, credit from
the run's own buffers. Through the serving Engine, lookahead 16 must give the tokens and logprobs of lookahead
1 exactly (the same programs over the same shapes) and the eager checkpoint's tokens; the steps ran ahead and
no device commit differed from the core's. Sampled steps (T > 0, no filters or extras: the programs draw)
run ahead too, each step with its row's seed staged in the static seeds."""
import pytest
import torch

from compiler_helpers import run_cli
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import Session, open_model

GEN = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
PROMPTS = [[72, 101, 108, 108, 111], [87, 111, 114], [1, 2, 3, 4, 5, 6, 7]]
RULES = {"threshold": dict(threshold=0.3), "factor": dict(factor=2.0),
         "hierarchical": dict(threshold=0.5, low_threshold=0.1), "entropy_bound": dict(entropy_bound=3.0),
         "credit": dict(threshold=0.3, credit=True), "credit_schedule": dict(credit=True),
         "logprobs": dict(threshold=0.3, logprobs=2), "smoothing": dict(threshold=0.3, smoothing=True),
         "smoothing_schedule": dict(smoothing=True, logprobs=0)}
EXTRAS = ("entropy_bound", "credit", "logprobs", "smoothing")


@pytest.fixture(scope="module")
def sessions(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine-ahead") / "export"
    res = run_cli(["compile", tiny_ckpt, "--target", "cpu", "--backend", "export", "-o", out,
                   "--max-seq-len", "96", "--max-batch-size", "4", "--block-length", "8", "--decode-extras",
                   "--logprobs", "2"])
    assert res.exit_code == 0, res.output
    return open_model(str(out), device="cpu"), open_model(str(tiny_ckpt), device="cpu")


def serve(session, items, lookahead):
    """(prompt, params) items through one Engine over the session's runner, its Reuse steps on fresh
    uncaptured graphs -> (engine, [(output ids, token logprobs)])."""
    runner = session.runner
    eng = Engine(session, ServeConfig(kv_cache_mb=16, max_batch_size=4, max_seq_len=96,
                                      lookahead_steps=lookahead, lookahead_max_ms=0))
    runner.enable_graphs(True, capture=False)                 # fresh graphs (and stats) per engine
    runner.bind_pool(eng.kv)
    reqs = eng.run_requests(items)
    assert all(r.error is None for r in reqs)
    return eng, [(r.output_ids, r.state.token_logprobs) for r in reqs]


def check(session, eager, items):
    """lookahead 16 == lookahead 1 (tokens and logprobs exactly) == eager generate's tokens; the rules ran
    ahead, no device commit differed. -> the outputs."""
    _, want = serve(session, items, 1)
    assert session.runner.graphs.stats["ahead_calls"] == 0
    eng, got = serve(session, items, 16)
    assert got == want
    st = session.runner.graphs.stats
    assert st["ahead_calls"] > 0 and st["direct"] == 0
    assert eng.metrics.counter("lookahead_runs_total", rule="rules") > 0
    dropped = eng.metrics.counter("lookahead_dropped_steps_total")
    assert dropped == eng.metrics.counter("lookahead_past_block_steps_total")      # no commit differed
    for (p, params), (ids, _) in zip(items, got):
        ref = generate(eager.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert ids == ref
    return [ids for ids, _ in got]


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_runs_ahead_over_the_engines_programs(sessions, rule):
    engine, eager = sessions
    outs = check(engine, eager, [(p, dict(GEN, **RULES[rule])) for p in PROMPTS])
    assert len({tuple(o) for o in outs}) == len(PROMPTS)                  # decisive: prompts matter


def test_the_rules_change_the_tokens(sessions):
    """Decisive: credit, smoothing and the variable-count rules each give other tokens than the plain
    schedule on these prompts (so equal tokens above mean the device carried them)."""
    _, eager = sessions
    plain = generate(eager.runner, PROMPTS, GenerationConfig(**GEN)).token_ids
    for rule in ("threshold", "entropy_bound", "credit_schedule", "smoothing_schedule"):
        cfg = GenerationConfig(**GEN, **{k: v for k, v in RULES[rule].items() if k != "logprobs"})
        assert generate(eager.runner, PROMPTS, cfg).token_ids != plain, rule


def test_a_mixed_batch_with_extras_runs_ahead_row_by_row(sessions):
    """Rows of entropy-bound, credit, logprobs and smoothing in one run (one group: every row has extras):
    each row's own rule and extras on the device."""
    engine, eager = sessions
    items = [(p, dict(GEN, **RULES[EXTRAS[i % 4]])) for i, p in enumerate(PROMPTS + [[9, 9, 40]])]
    assert len({tuple(o) for o in check(engine, eager, items)}) > 1


def test_gpu_lowered_engines_run_every_rule_ahead_from_the_hidden_rows(sessions):
    """A GPU-lowered --decode-extras build (hidden rows only; the ops' CPU references here): credit (carried
    in the run's own buffers) and a batch mixing every rule with extras run ahead, decoded from the rows on
    the device per step."""
    from dlc.compiler import in_memory_runner
    _, eager = sessions
    model = eager.runner.model
    runner = in_memory_runner(model, block_length=8, device="cuda", decode_extras=True)
    assert runner.row_decoding and not runner.extras
    sess = Session(runner, None, model.config, False, "gpu-lowered")
    check(sess, eager, [(p, dict(GEN, **RULES["credit"])) for p in PROMPTS])
    check(sess, eager, [(p, dict(GEN, **RULES[EXTRAS[i % 4]])) for i, p in enumerate(PROMPTS)])


def test_gpu_lowered_engines_decode_rows_with_the_graph_runners_kernels(sessions):
    """``fused`` row decoding (the CUDA default of a compiled engine; here through the kernels' CPU
    references): every rule with extras is decoded by ``graph.fused_extras_decode``, the graph runner's
    T = 0 kernels, instead of the float64 sweep; run ahead and synchronous agree and tokens are the eager
    checkpoint's; a batch with guidance (cfg_scale) keeps the float64 sweep."""
    from dlc.compiler import in_memory_runner
    _, eager = sessions
    model = eager.runner.model
    runner = in_memory_runner(model, block_length=8, device="cuda", decode_extras=True)
    assert runner.decoding == "exact"                            # a CPU runner's default
    runner.decoding = "fused"
    sess = Session(runner, None, model.config, False, "gpu-lowered")
    check(sess, eager, [(p, dict(GEN, **RULES[EXTRAS[i % 4]])) for i, p in enumerate(PROMPTS + [[9, 9, 40]])])
    check(sess, eager, [(p, dict(GEN, **RULES["smoothing_schedule"])) for p in PROMPTS])
    fused = runner.stats_fused
    assert fused > 0
    guided = dict(GEN, **RULES["logprobs"], cfg_scale=1.0)
    _, got = serve(sess, [(p, guided) for p in PROMPTS[:2]], 1)
    assert runner.stats_fused == fused
    for p, (ids, _) in zip(PROMPTS, got):
        assert ids == generate(eager.runner, [p], GenerationConfig(**guided, stop_at_eos=True)).token_ids[0]


def test_batches_decoded_from_the_rows_run_the_rows_only_program(sessions):
    """A GPU-lowered --decode-extras engine gets ``reuse_rows``, its Reuse program without the in-graph decode
    (one LM-head pass less a step): batches with extras run it, run ahead and synchronous, captured apart in
    the graphs (``GraphKey.rows_only``), with the eager checkpoint's tokens; plain batches keep the program
    that decodes; the variant returns the same hidden rows and writes the same K/V."""
    from dlc.compiler import in_memory_runner
    _, eager = sessions
    model = eager.runner.model
    runner = in_memory_runner(model, block_length=8, device="cuda", decode_extras=True)
    assert "reuse_rows" in runner.phases
    assert not any("fused_select_logits" in str(n.target) for n in runner.phases["reuse_rows"].graph.nodes)
    calls = {"reuse": 0, "reuse_rows": 0}
    for ph in calls:
        fn = runner.phases[ph]

        def counted(*a, fn=fn, ph=ph):
            calls[ph] += 1
            return fn(*a)
        runner.phases[ph] = counted
    sess = Session(runner, None, model.config, False, "gpu-lowered")
    check(sess, eager, [(p, dict(GEN, **RULES[EXTRAS[i % 4]])) for i, p in enumerate(PROMPTS)])
    assert calls["reuse_rows"] > 0
    assert any(k.rows_only for k in runner.graphs.graphs)
    before = dict(calls)
    check(sess, eager, [(p, dict(GEN, threshold=0.3)) for p in PROMPTS])
    assert calls["reuse_rows"] == before["reuse_rows"] and calls["reuse"] > before["reuse"]


def test_the_rows_only_program_keeps_the_rows_and_the_kv():
    """``inductor.without_decode`` on a GPU-lowered Reuse program (the ops' CPU references here): tokens and
    confidence become zeros, the hidden rows and the K/V it writes into the pool are the program's own."""
    from dlc.compiler import in_memory_runner
    from dlc.models import build_model
    from dlc.models.loading import TINY_INIT_STD, init_weights
    from dlc.models.presets import preset_config
    from dlc.runtime.runners.inductor import without_decode
    torch.manual_seed(0)
    model = build_model(preset_config("tiny-llada"))
    init_weights(model, 0, TINY_INIT_STD)
    runner = in_memory_runner(model.eval(), block_length=8, device="cuda", decode_extras=True)
    names, full = runner.input_names["reuse"], runner.phases["reuse"]
    rows = without_decode(full)
    nl, hkv, S, D = model.config.n_layers, model.config.n_kv_heads, 32, model.config.head_dim
    B, T = 2, 8
    feed = {"q_ids": torch.randint(0, 200, (B, T)), "q_pos": torch.arange(8, 16).repeat(B, 1),
            "key_mask": torch.ones(B, S, dtype=torch.bool), "q_start": torch.full((B,), 8),
            "rows": torch.tensor([0, 2]), "out_index": torch.arange(8, 8 + T).repeat(B, 1),
            "cond_rows": torch.arange(B), "un_rows": torch.arange(B), "cfg_weight": torch.ones(1),
            "temperature": torch.zeros(1),
            "seeds": torch.zeros(B, dtype=torch.long),
            "embed_delta": torch.zeros(B, T, model.config.d_model)}
    outs, pools = [], []
    for prog in (full, rows):
        k = torch.randn(nl, 3, hkv, S, D, generator=torch.Generator().manual_seed(1))
        v = torch.zeros(nl, 3, hkv, S, D)
        f = dict(feed, k_pool=k, v_pool=v)
        outs.append(prog(*[runner.weights[n] if n in runner.weights else f[n] for n in names]))
        pools.append((k, v))
    assert outs[0][0].unique().numel() > 1 and not outs[1][0].any() and not outs[1][1].any()
    assert outs[1][0].shape == outs[0][0].shape and outs[1][0].dtype == outs[0][0].dtype
    torch.testing.assert_close(outs[1][2], outs[0][2], rtol=0, atol=0)           # the hidden rows
    assert torch.equal(pools[0][0], pools[1][0]) and torch.equal(pools[0][1], pools[1][1])
    assert pools[0][1].abs().sum() > 0                                            # the step wrote K/V


@pytest.mark.parametrize("rule", ["schedule", "threshold"])
def test_sampled_steps_run_ahead_over_the_engines_programs(sessions, rule):
    """T > 0: the programs draw with the static seeds, which the run stages step by step (each row its own
    generator's next draws): lookahead 16 == lookahead 1 == the eager checkpoint's tokens, every Reuse step
    run ahead; other seeds give other tokens (decisive)."""
    engine, eager = sessions
    params = dict(GEN, temperature=1.5, **({} if rule == "schedule" else RULES[rule]))
    items = [(p, dict(params, seed=7 + i)) for i, p in enumerate(PROMPTS)]
    _, want = serve(engine, items, 1)
    eng, got = serve(engine, items, 16)
    assert got == want
    assert engine.runner.graphs.stats["ahead_calls"] > 0 and engine.runner.graphs.stats["direct"] == 0
    assert eng.metrics.counter("lookahead_dropped_steps_total") == \
        eng.metrics.counter("lookahead_past_block_steps_total")
    for (p, params), (ids, _) in zip(items, got):
        assert ids == generate(eager.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
    _, other = serve(engine, [(p, dict(params, seed=70 + i)) for i, (p, _) in enumerate(items)], 16)
    assert [o for o, _ in other] != [o for o, _ in got]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_rule_runs_ahead_on_captured_engine_graphs(tmp_path):
    """On the GPU: an export engine built for this GPU (fused decoding, --decode-extras: hidden rows), its
    Reuse program replayed as CUDA graphs: each rule and a mixed batch run ahead with the synchronous path's
    tokens and logprobs (the same graphs and row decoding)."""
    from dlc.compiler.build import compile_model
    out = tmp_path / "gpu-export"
    target = "h200" if "H200" in torch.cuda.get_device_name() else "h100"
    compile_model("tiny-llada", target, str(out), backend="export", dtype="fp32", block_length=8,
                  decode_extras=True, echo=lambda *a, **k: None)
    sess = open_model(str(out), device="cuda", progress=False)

    def served(items, la):
        eng = Engine(sess, ServeConfig(kv_cache_mb=64, max_batch_size=4, max_seq_len=96, cuda_graphs=True,
                                       compile=False, lookahead_steps=la, lookahead_max_ms=0))
        reqs = eng.run_requests(items)
        assert all(r.error is None for r in reqs)
        return eng, [(r.output_ids, r.state.token_logprobs) for r in reqs]
    sets = [[(p, dict(GEN, **kw)) for p in PROMPTS] for kw in RULES.values()]
    sets.append([(p, dict(GEN, **RULES[EXTRAS[i % 4]])) for i, p in enumerate(PROMPTS)])
    sets.append([(p, dict(GEN, temperature=1.5, seed=7 + i)) for i, p in enumerate(PROMPTS)])   # sampled
    for items in sets:
        sync, want = served(items, 1)
        calls = sync.runner.graphs.stats["ahead_calls"]
        eng, got = served(items, 16)
        assert got == want
        assert eng.runner.graphs.stats["ahead_calls"] > calls and eng.runner.graphs.stats["captures"] > 0
        assert sum(eng.metrics.counters["lookahead_runs_total"].values()) > 0
        dropped = eng.metrics.counter("lookahead_dropped_steps_total")
        assert dropped == eng.metrics.counter("lookahead_past_block_steps_total")
