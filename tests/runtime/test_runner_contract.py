"""Every runner kind behind the one seam: the same StepBatches give the same tokens (and confidences within
tolerance) from the eager runner, the CUDA-graph runner (CPU: no capture, exact decoding), and compiled engine
directories (export and ONNX); and in every kind a request whose own data breaks a runner call fails alone
while the others in its batch finish with exactly their solo output."""
import pytest
import torch

from dlc.models.loading import load_model, save_checkpoint
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import DecodeState, GenerationConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import generate
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.request import Request
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import Session, open_model
from dlc.runtime.step import build_batch

KINDS = ["eager", "graph", "export", "onnx"]
CONF_RTOL, CONF_ATOL = 1e-4, 1e-5     # fp32 model; ONNX Runtime's kernels round differently from torch's
S_MAX = 96


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    lm = load_model("tiny-llada", seed=3)
    path = tmp_path_factory.mktemp("contract-ckpt")
    save_checkpoint(lm.model, path, tokenizer=lm.tokenizer)
    return path


@pytest.fixture(scope="module")
def sessions(ckpt, tmp_path_factory):
    from dlc.compiler.build import compile_model
    eager = open_model(str(ckpt), device="cpu", progress=False)
    out = {"eager": eager}
    gr = GraphRunner(eager.runner.model, decode="exact", capture=False)
    out["graph"] = Session(gr, eager.tokenizer, eager.config, eager.chat, str(ckpt))
    for backend in ("export", "onnx"):
        d = tmp_path_factory.mktemp("contract-engines") / backend
        compile_model(str(ckpt), "cpu", str(d), backend=backend, max_seq_len=S_MAX, max_batch_size=8,
                      block_length=8, echo=lambda *a, **k: None, decode_extras=True)
        out[backend] = open_model(str(d), device="cpu")
    return out


def _pool(runner, n=6):
    kv = KVCacheManager(runner.config, S_MAX, 1 << 40, torch.float32, "cpu", max_slots=n + 1,
                        head_scores=runner.sparse_retention is not None)
    if isinstance(runner, GraphRunner):
        runner.bind_pool(kv)                       # takes a scratch slot for padding rows
    return kv


def _steps(runner, pool, temperature, cfg_scale):
    """full, refresh and reuse over three rows of different lengths at different blocks
    -> list of (x0, conf)."""
    mc = runner.config
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 11, 3)]
    seqs = [torch.tensor(p + [mc.mask_id] * 16) for p in prompts]
    for s, p in zip(seqs, prompts):
        s[len(p):len(p) + 5] = torch.randint(3, 250, (5,), generator=g)            # some decoded already
    P = [len(p) for p in prompts]
    starts = [n + 8 for n in P]
    rows = 2 if cfg_scale > 0 else 1
    free = [i for i in range(pool.n_slots) if getattr(runner, "scratch", None) != i]
    slots = [tuple(free[rows * i:rows * i + rows]) for i in range(3)]
    kw = dict(temperature=temperature, cfg_scale=cfg_scale, seeds=[7, 8, 9])
    out = [runner.full(build_batch(runner, "full", seqs, P, starts, 8, **kw))]
    out.append(runner.refresh(build_batch(runner, "refresh", seqs, P, starts, 8, None, slots, pool, **kw)))
    spans = [(a, a + 8) for a in starts]
    out.append(runner.reuse(build_batch(runner, "reuse", seqs, P, starts, 8, spans, slots, pool, **kw)))
    return out


@pytest.mark.parametrize("temperature,cfg_scale", [(0.0, 0.0), (0.9, 0.0), (0.0, 1.5)])
@pytest.mark.parametrize("kind", KINDS[1:])
def test_same_step_batches_same_tokens(sessions, kind, temperature, cfg_scale):
    ref_runner, runner = sessions["eager"].runner, sessions[kind].runner
    ref = _steps(ref_runner, _pool(ref_runner), temperature, cfg_scale)
    got = _steps(runner, _pool(runner), temperature, cfg_scale)
    for (x_r, c_r), (x_g, c_g) in zip(ref, got):
        assert x_g.dtype == torch.long and c_g.dtype == torch.float64
        assert torch.equal(x_g.cpu(), x_r.cpu())
        torch.testing.assert_close(c_g.cpu(), c_r.cpu(), rtol=CONF_RTOL, atol=CONF_ATOL)
    assert len(set(ref[0][0].flatten().tolist())) > 3                    # a decisive model: tokens vary


def test_sampling_and_guidance_change_the_tokens(sessions):
    """The three settings above really differ (so equal tokens across runners mean something)."""
    r = sessions["eager"].runner
    runs = [_steps(r, _pool(r), t, c)[0][0] for t, c in [(0.0, 0.0), (0.9, 0.0), (0.0, 1.5)]]
    assert not torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kind", KINDS[1:])
def test_generate_with_every_rule_matches_eager(sessions, kind):
    """Whole generations through the decoding core: seeded T > 0, random remasking, threshold, guidance."""
    prompts = [[72, 101, 108, 108], [87, 111, 114, 108, 100, 33, 32, 65, 66]]
    for params in [dict(kv_cache="dual", temperature=0.8, seed=5),
                   dict(kv_cache="prefix", remasking="random", seed=6),
                   dict(kv_cache="dual", threshold=0.3),
                   dict(kv_cache="none", cfg_scale=1.0)]:
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, **params)
        ref = generate(sessions["eager"].runner, prompts, cfg).token_ids
        assert generate(sessions[kind].runner, prompts, cfg).token_ids == ref, params


def _solo(session, prompt, params):
    return generate(session.runner, [prompt], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]


@pytest.mark.parametrize("kind", KINDS)
def test_a_poisoned_request_fails_alone(sessions, kind):
    """Four good long requests and two whose prompt holds an id outside the embedding (past validation, as a
    bug upstream could send) share runner calls; the poisoned ones fail with the error, the others finish with
    exactly their solo output (seeded T > 0 included: the retry reuses the step's seeds)."""
    sess = sessions[kind]
    eng = Engine(sess, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8))
    base = dict(gen_length=32, block_length=8, steps=32, kv_cache="dual")
    good = [([5, 17, 99, 3], {**base}), ([42, 8, 9], {**base}),
            ([7, 7, 100, 31, 2], {**base, "temperature": 0.8, "seed": 11}),
            ([60, 61], {**base, "temperature": 0.8, "seed": 12})]
    reqs = [eng.make_request(p, params) for p, params in good]
    bad = [Request(DecodeState.new([1, 10 ** 6, 2], GenerationConfig(**params, stop_at_eos=True),
                                   sess.config))
           for params in (base, {**base, "temperature": 0.8, "seed": 13})]
    for r in reqs[:2] + bad[:1] + reqs[2:] + bad[1:]:
        eng.add_request(r)
    eng.run_until_done()
    for r in bad:
        assert r.finish_reason == "error" and r.status == "cancelled" and "Error" in r.error
    for r, (p, params) in zip(reqs, good):
        assert r.finish_reason in ("stop", "length")
        assert r.output_ids == _solo(sessions["eager"], p, params)
    assert eng.metrics.counter("isolated_batches_total") >= 2
    assert eng.kv.num_used == (1 if kind == "graph" else 0) and not eng.scheduler.has_work()


@pytest.mark.parametrize("kind", KINDS[1:])
def test_the_parallel_decoders_match_eager(sessions, kind):
    """Hierarchical, entropy-bounded and credit decoding (T = 0 and seeded T > 0), and token logprobs:
    compiled programs decode the extras (chunk_logits' EXTRA_OUTPUTS), the graph runner falls back to eager
    for them."""
    prompts = [[72, 101, 108, 108], [87, 111, 114, 108, 100, 33, 32, 65, 66]]
    fewer = 0
    for params in [dict(kv_cache="dual", threshold=0.3, low_threshold=0.1),
                   dict(kv_cache="none", entropy_bound=8.0),
                   dict(kv_cache="dual", threshold=0.3, credit=True),
                   dict(kv_cache="prefix", threshold=0.3, credit=True, temperature=0.8, seed=3),
                   dict(kv_cache="dual", threshold=0.3, logprobs=0)]:
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, **params)
        ref = generate(sessions["eager"].runner, prompts, cfg)
        assert generate(sessions[kind].runner, prompts, cfg).token_ids == ref.token_ids, params
        fewer += sum(ref.steps_per_row) < 32
    assert fewer >= 3                                          # the rules really decode several tokens a step


SMOOTH = [dict(kv_cache="dual", threshold=0.3, smoothing=True), dict(kv_cache="prefix", smoothing=True),
          dict(kv_cache="none", temperature=0.8, seed=2, smoothing=True)]
FILTERS = [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3)]
HOT = dict(kv_cache="dual", temperature=1.5, seed=2)                # seeded T > 0, where filters act


def _gen(runner, prompts, params):
    return generate(runner, prompts, GenerationConfig(gen_length=16, block_length=8, steps=16,
                                                      **params)).token_ids


@pytest.fixture(scope="module")
def eager_refs(sessions):
    """Eager generate() of every smoothing / filter setting (and the same without the feature), once."""
    prompts = [[72, 101, 108, 108], [87, 111, 114, 108, 100, 33, 32, 65, 66]]
    runs = {}
    for params in SMOOTH + [{**HOT, **f} for f in FILTERS]:
        without = {k: v for k, v in params.items() if k not in ("smoothing", "top_k", "top_p", "min_p")}
        runs[str(params)] = (_gen(sessions["eager"].runner, prompts, params),
                             _gen(sessions["eager"].runner, prompts, without))
    return prompts, runs


def test_smoothing_and_filters_change_the_tokens(eager_refs):
    """Decisive: each setting's eager tokens differ from the same request without the feature (so compiled ==
    eager below means the programs really took the soft inputs / the runner really filtered)."""
    _, runs = eager_refs
    for key, (with_f, without) in runs.items():
        assert with_f != without, key
        assert len({t for row in with_f for t in row}) > 4, key          # and the outputs vary


@pytest.mark.parametrize("kind", ["export", "onnx"])
def test_compiled_engines_decode_smoothing_and_filters_as_eager(sessions, eager_refs, kind):
    """Engines built with --decode-extras take smoothing's soft inputs (embed_delta) and return the decoded
    hidden rows, from which the runner decodes the soft embedding and T > 0 filters with the eager runner's
    function: generate() tokens equal eager's for smoothing (dual / prefix / no cache, T = 0 and seeded T > 0)
    and for each filter at seeded T > 0 (fp32)."""
    prompts, runs = eager_refs
    runner = sessions[kind].runner
    assert runner.row_decoding
    for params in SMOOTH + [{**HOT, **f} for f in FILTERS]:
        runner.check_generation(GenerationConfig(gen_length=16, block_length=8, steps=16, **params))
        assert _gen(runner, prompts, params) == runs[str(params)][0], params


def _export_copy(sessions):
    """The export engine's programs in a new runner (its Reuse steps will go through ProgramGraphs)."""
    from dlc.runtime.runners.compiled import CompiledRunner
    r = sessions["export"].runner
    g = CompiledRunner(r.config, r.phases, r.input_names, weights=r.weights, max_batch_size=8,
                       max_seq_len=S_MAX)
    return Session(g, None, r.config, False, "graphed-export")


@pytest.mark.parametrize("kind", ["eager", "export", "onnx", "export-graphs"])
def test_engine_mixes_smoothing_and_filter_rows_with_plain_ones(sessions, kind, monkeypatch):
    """Through the serving Engine: smoothing rows share Reuse batches with plain rows (T = 0), filtered rows
    (each filter) with an unfiltered one (seeded T > 0), no batch failing and split into single requests;
    every request gets exactly its solo eager output. With graphs, the soft inputs travel through the
    bucket's padded static buffers."""
    sess = _export_copy(sessions) if kind == "export-graphs" else sessions[kind]
    runner = sess.runner
    eng = Engine(sess, ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8))
    if kind == "export-graphs":          # no capture on CPU: the static, padded buffers called directly
        runner.enable_graphs(True, capture=False)
        runner.bind_pool(eng.kv)
    seen, graphed = [], []
    for phase in ("refresh", "reuse"):
        call = getattr(runner, phase)

        def spy(batch, call=call):
            seen.append((batch.n_seqs, batch.soft_tau is not None, batch.top_k is not None))
            return call(batch)
        monkeypatch.setattr(runner, phase, spy)
    if getattr(runner, "graphs", None) is not None:
        run = runner.graphs.run
        monkeypatch.setattr(runner.graphs, "run", lambda feed, *a: graphed.append(
            bool(feed["embed_delta"].abs().sum() > 0)) or run(feed, *a))
    base = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    cold = [([5, 17, 99, 3], dict(smoothing=True)), ([42, 8, 9], {}),
            ([7, 7, 100, 31, 2], dict(threshold=0.3, smoothing=True)), ([60, 61], dict(threshold=0.3))]
    hot = [(p, dict(temperature=1.5, seed=s, **f))
           for (p, _), s, f in zip(cold, (4, 5, 6, 7), FILTERS + [{}])]
    jobs = [(p, {**base, **params}) for p, params in cold + hot]
    reqs = [eng.make_request(p, params) for p, params in jobs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    for r, (p, params) in zip(reqs, jobs):
        assert r.finish_reason in ("stop", "length") and r.output_ids == _solo(sessions["eager"], p, params)
    assert eng.metrics.counter("isolated_batches_total") == 0          # no batch failed and was split
    assert any(n == 4 and soft for n, soft, _ in seen)        # 2 smoothing + 2 plain rows in one batch
    assert any(n == 4 and filt for n, _, filt in seen)        # 3 filtered + 1 unfiltered
    if kind == "export-graphs":
        assert any(graphed) and runner.graphs.stats["replays"] > 0


def test_engines_without_decode_extras_refuse_the_rules_that_need_them(sessions, tmp_path):
    """A default build (no --decode-extras) serves plain requests and refuses, naming the field, the rules its
    programs cannot decode."""
    from dlc.compiler import in_memory_runner
    from dlc.runtime.decoding import FieldError
    from dlc.runtime.runners.compiled import CompiledRunner
    r = sessions["export"].runner

    def without(*names):            # the runner of an engine whose programs lack these inputs
        return CompiledRunner(r.config, r.phases, {k: [n for n in v if n not in names]
                                                   for k, v in r.input_names.items()}, weights=r.weights)
    plain = without("credit_ids", "credit_vals", "credit_alpha", "embed_delta")
    older = without("embed_delta")            # built with --decode-extras before smoothing's inputs existed
    assert not plain.extras and r.extras and r.row_decoding and older.extras and not older.row_decoding
    cold = [(dict(entropy_bound=1.0), "entropy_bound"), (dict(threshold=0.5, credit=True), "credit"),
            (dict(logprobs=0), "logprobs")]
    rows = [(dict(smoothing=True), "smoothing"), (dict(temperature=0.8, top_p=0.5), "top_p"),
            (dict(temperature=0.8, top_k=3), "top_k"), (dict(temperature=0.8, min_p=0.2), "min_p")]
    for runner, cases in ((plain, cold + rows), (older, rows)):
        for params, field in cases:
            with pytest.raises(FieldError) as e:
                runner.check_generation(GenerationConfig(gen_length=16, block_length=8, steps=16, **params))
            assert e.value.field == field and "--decode-extras" in str(e.value)
    for runner in (plain, older):                                     # T = 0: filters change nothing
        runner.check_generation(GenerationConfig(gen_length=16, block_length=8, steps=16, top_p=0.5))
    older.check_generation(GenerationConfig(gen_length=16, block_length=8, steps=16, credit=True))
    model = sessions["eager"].runner.model
    assert not in_memory_runner(model, block_length=8, device="cuda").extras     # GPU kernel lowering: none


def test_gpu_lowered_engines_decode_every_rule_from_the_hidden_rows(sessions, eager_refs):
    """A --decode-extras build of the GPU kernel lowering (dlc.fused_select_logits; run here through the ops'
    CPU references) has no chunked extras, only smoothing's input and the hidden rows: the runner decodes
    every batch that wants extras from them with the eager runner's function, so smoothing, each filter,
    credit, entropy-bounded and logprobs give eager's tokens; without the flag it refuses them, naming it."""
    from dlc.compiler import in_memory_runner
    from dlc.runtime.decoding import FieldError
    model = sessions["eager"].runner.model
    gpu = in_memory_runner(model, block_length=8, device="cuda", decode_extras=True)
    assert gpu.row_decoding and not gpu.extras
    prompts, runs = eager_refs
    for params in [SMOOTH[0], {**HOT, **FILTERS[1]}]:
        assert _gen(gpu, prompts, params) == runs[str(params)][0], params
    for params in [dict(kv_cache="dual", threshold=0.3, credit=True),
                   dict(kv_cache="none", entropy_bound=8.0),
                   dict(kv_cache="dual", threshold=0.3, logprobs=2)]:
        ref = generate(sessions["eager"].runner, prompts, GenerationConfig(gen_length=16, block_length=8,
                                                                          steps=16, **params))
        got = generate(gpu, prompts, GenerationConfig(gen_length=16, block_length=8, steps=16, **params))
        assert got.token_ids == ref.token_ids, params
    plain = in_memory_runner(model, block_length=8, device="cuda")
    with pytest.raises(FieldError) as e:
        plain.check_generation(GenerationConfig(gen_length=16, block_length=8, steps=16, smoothing=True))
    assert e.value.field == "smoothing" and "--decode-extras" in str(e.value)
