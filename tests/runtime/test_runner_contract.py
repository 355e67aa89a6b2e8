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


@pytest.mark.parametrize("kind", ["export", "onnx"])
def test_compiled_engines_refuse_what_they_cannot_decode(sessions, kind):
    from dlc.runtime.decoding import FieldError
    eng = Engine(sessions[kind], ServeConfig(max_seq_len=S_MAX, kv_cache_mb=16, max_batch_size=8))
    base = dict(gen_length=16, block_length=8, steps=16)
    for params, field in [(dict(smoothing=True), "smoothing"), (dict(temperature=0.8, top_p=0.5), "top_p"),
                          (dict(temperature=0.8, top_k=3), "top_k")]:
        with pytest.raises(FieldError) as e:
            eng.make_request([5, 6, 7], {**base, **params})
        assert e.value.field == field
    eng.make_request([5, 6, 7], {**base, "top_p": 0.5})        # T = 0: filters change nothing, accepted


def test_engines_without_decode_extras_refuse_the_rules_that_need_them(sessions, tmp_path):
    """A default build (no --decode-extras) serves plain requests and refuses, naming the field, the rules its
    programs cannot decode."""
    from dlc.compiler import in_memory_runner
    from dlc.runtime.decoding import FieldError
    from dlc.runtime.runners.compiled import CompiledRunner
    plain = CompiledRunner(sessions["export"].runner.config, sessions["export"].runner.phases,
                           {k: [n for n in v if not n.startswith("credit_")]
                            for k, v in sessions["export"].runner.input_names.items()},
                           weights=sessions["export"].runner.weights)
    assert not plain.extras and sessions["export"].runner.extras
    for params, field in [(dict(entropy_bound=1.0), "entropy_bound"),
                          (dict(threshold=0.5, credit=True), "credit"), (dict(logprobs=0), "logprobs")]:
        with pytest.raises(FieldError) as e:
            plain.check_generation(GenerationConfig(gen_length=16, block_length=8, steps=16, **params))
        assert e.value.field == field and "--decode-extras" in str(e.value)
    model = sessions["eager"].runner.model
    assert not in_memory_runner(model, block_length=8, device="cuda").extras     # GPU kernel lowering: none
