"""GraphRunner's captured Reuse variants with decoding extras (issue 18): entropy-bounded, credit, logprobs,
iteration-smoothing and sampled batches replay their own graph variant (``stats["eager_reuse"]`` stays 0)
instead of falling back to the eager runner, and decode exactly as the eager runner does (``exact``, and
every sampled step) or within the fused kernel's float32 (``fused`` at T = 0).

On CPU the graph path runs without capture (the static buffers, bucket padding and staging are the same code);
the GPU test at the end captures. A decisive tiny model (head scaled) makes the rules' choices vary."""
import pytest
import torch

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import Session

LOGPROB_ATOL = 1e-4       # fused (float32 online logsumexp) vs exact (float64) logprobs, fp32 tiny model
BATCH_ATOL = 5e-5         # a row batched (other widths: other fp32 GEMM rounding) vs alone, logits ~ 1e2

# every rule whose extras the captured variants compute, with threshold rules and the fixed schedule beside
EXTRAS_RULES = [dict(entropy_bound=1.0), dict(threshold=0.6, credit=True), dict(credit=True),
                dict(threshold=0.6, logprobs=2), dict(logprobs=0),
                dict(entropy_bound=0.5, credit=True, logprobs=3),
                dict(threshold=0.6, smoothing=True), dict(factor=1.0, credit=True, smoothing=True)]


@pytest.fixture(scope="module")
def model(decisive_tiny_llada):
    return decisive_tiny_llada


def specs(rules, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, 250, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        bl = (4, 8)[i % 2]
        out.append((prompt, dict(gen_length=2 * bl, block_length=bl, steps=2 * bl,
                                 kv_cache=("dual", "prefix")[i % 2], seed=100 + i, **rules[i % len(rules)])))
    return out


def reference(model, prompt, params) -> list[int]:
    return generate(model, [prompt], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]


def close_logprobs(got, want, atol) -> bool:
    """Per generated token (logprob, top ids, top logprobs): the same ids, values within atol."""
    assert len(got) == len(want) and all(g is not None for g in got)
    for (lp, ids, lps), (lp2, ids2, lps2) in zip(got, want):
        if ids != ids2 or abs(lp - lp2) > atol or any(abs(a - b) > atol for a, b in zip(lps, lps2)):
            return False
    return True


def run(model, items, decode):
    sess = Session(EagerRunner(model), None, model.config, None, "tiny-llada")
    eng = Engine(sess, ServeConfig(model="tiny-llada", max_seq_len=64, kv_cache_mb=16, max_num_tokens=512,
                                   cuda_graphs=True, graph_decode=decode))
    eng.runner.mixes = False       # as with capture on a GPU: one call per group, Reuse groups replay
    reqs = eng.run_requests(items)
    return eng, reqs


def test_extras_rules_replay_graphs_and_equal_generate(model):
    """Mixed batches of every extras rule (and plain rows): tokens and logprobs equal generate() on the eager
    runner, and no Reuse step fell back to it."""
    items = specs(EXTRAS_RULES + [dict()], 14)
    eng, reqs = run(model, items, "exact")
    st = eng.runner.stats
    assert st["eager_reuse"] == 0 and st["replays"] > 0
    variants = {k[3] for k in eng.runner.graphs if len(k) == 4}
    # (entropy, logprobs k, credit width, smoothing tau, ...): a group's rows share one variant (their union)
    assert all(any(ex[i] not in (False, -1, 0) for ex in variants) for i in range(4)), variants
    outs = set()
    for r, (p, params) in zip(reqs, items):
        ref = generate(model, [p], GenerationConfig(**params, stop_at_eos=True))
        assert r.finish_reason in ("stop", "length") and r.output_ids == ref.token_ids[0], params
        if params.get("logprobs") is not None:
            got, want = r.state.token_logprobs[:len(r.output_ids)], ref.logprobs[0][:len(r.output_ids)]
            assert close_logprobs(got, want, BATCH_ATOL), params
        outs.add(tuple(r.output_ids))
    assert len(outs) > 8


def test_fused_extras_decode_matches_exact(model):
    """``fused`` (the GPU default: fused_select_extras, float32) vs ``exact`` (float64): the same tokens on
    this decisive model, logprobs within LOGPROB_ATOL, still no eager Reuse step."""
    items = specs(EXTRAS_RULES, 6, seed=3)
    eng_f, fused = run(model, items, "fused")
    _, exact = run(model, items, "exact")
    assert eng_f.runner.stats["eager_reuse"] == 0 and eng_f.runner.stats["replays"] > 0
    for f, e, (_, params) in zip(fused, exact, items):
        assert f.output_ids == e.output_ids, params
        if params.get("logprobs") is not None:
            n = len(f.output_ids)
            got, want = f.state.token_logprobs[:n], e.state.token_logprobs[:n]
            assert close_logprobs(got, want, LOGPROB_ATOL), params


def test_fused_smoothing_steps_select_in_one_pass(model, monkeypatch):
    """``fused`` smoothing steps (nothing else in their variant) run ``kernels.smoothing.smooth_select`` (one
    pass of logits: selection + soft embedding) and generate the tokens of the float32 ``decode_rows_ext``
    path it replaces; the threshold rows also those of ``exact`` (float64). (The fixed-schedule rows of
    ``fused`` and ``exact`` differ on this model with either path: near-equal confidences.)"""
    import dlc.kernels.smoothing as sm
    from dlc.kernels.sampling import decode_rows_ext
    calls = []
    real = sm.smooth_select

    def old(h, w, we, *, vocab, chunk, top_k):              # the path before smooth_select, float32
        ar = torch.arange(h.shape[0])
        return decode_rows_ext(h, w, ar, ar, torch.ones(1, dtype=h.dtype), 0.0, torch.zeros_like(ar),
                               vocab=vocab, chunk=chunk, soft=(we, 1.0), acc=torch.float32)
    items = specs([dict(threshold=0.6, smoothing=True), dict(smoothing=True)], 6, seed=5)
    monkeypatch.setattr(sm, "smooth_select", lambda *a, **k: calls.append(1) or real(*a, **k))
    eng_f, fused = run(model, items, "fused")
    assert calls and eng_f.runner.stats["eager_reuse"] == 0
    monkeypatch.setattr(sm, "smooth_select", old)
    _, before = run(model, items, "fused")
    _, exact = run(model, items, "exact")
    assert [r.output_ids for r in fused] == [r.output_ids for r in before]
    assert [r.output_ids for r in fused[::2]] == [r.output_ids for r in exact[::2]]
    assert len({tuple(r.output_ids) for r in fused}) > 3


def test_truncated_smoothing_replays_and_equals_generate(model, monkeypatch):
    """``smoothing_top_k`` (the soft embedding over each position's top k): ``exact`` replays give
    generate()'s tokens on the eager runner; ``fused`` (``smooth_select`` with a top-k per chunk) the same."""
    items = specs([dict(threshold=0.6, smoothing=True, smoothing_top_k=4),
                   dict(smoothing=True, smoothing_top_k=1), dict(threshold=0.6, smoothing=True)], 6, seed=9)
    eng, exact = run(model, items, "exact")
    assert eng.runner.stats["eager_reuse"] == 0 and eng.runner.stats["replays"] > 0
    assert {k[3].smooth_k for k in eng.runner.graphs if len(k) == 4} >= {0, 1}     # apart from exact
    for r, (p, params) in zip(exact, items):
        assert r.output_ids == reference(model, p, params), params
    import dlc.kernels.smoothing as sm
    seen, real = set(), sm.smooth_select
    monkeypatch.setattr(sm, "smooth_select", lambda *a, **k: seen.add(k["top_k"]) or real(*a, **k))
    _, fused = run(model, items, "fused")
    assert seen >= {0, 1}                                       # each variant's k reaches the one-pass path
    assert [r.output_ids for r in fused[::3]] == [r.output_ids for r in exact[::3]]
    assert len({tuple(r.output_ids) for r in exact}) > 3


def test_sampled_steps_replay_and_equal_generate(model):
    """T > 0 (plain sampling, top-k filters with top-p / min-p on top, with extras) replays captured variants
    decoding as the eager runner (float64, the same hash noise): tokens equal generate(); filters the top-k
    candidates do not cover (top-p alone) replay too (the bisection: tests/runtime/test_filter_bisect.py)."""
    rules = [dict(temperature=0.8), dict(temperature=4.0, top_k=2, top_p=0.9),
             dict(temperature=1.2, top_k=4, min_p=0.05, logprobs=2, entropy_bound=1.0),
             dict(temperature=0.6, threshold=0.6, credit=True, smoothing=True)]
    items = specs(rules, 8, seed=5)
    eng, reqs = run(model, items, "fused")
    assert eng.runner.stats["eager_reuse"] == 0 and any(len(k) == 4 and k[3][4] for k in eng.runner.graphs)
    outs = set()
    for r, (p, params) in zip(reqs, items):
        assert r.output_ids == reference(model, p, params)
        outs.add(tuple(r.output_ids))
    assert len(outs) > 5
    top_p = specs([dict(temperature=0.8, top_p=0.7)], 2, seed=6)
    eng, reqs = run(model, top_p, "exact")
    assert eng.runner.stats["eager_reuse"] == 0 and eng.runner.stats["replays"] > 0
    for r, (p, params) in zip(reqs, top_p):
        assert r.output_ids == reference(model, p, params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode", ["exact", "fused"])
def test_captured_extras_variants_match_eager_runner(decode):
    """On the GPU: captured Reuse variants with extras give the eager runner's tokens at T = 0 (bf16;
    ``fused`` decodes in float32, so a near-tie may flip: most requests agree)."""
    from dlc.runtime.session import open_model
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        sess.runner.model.head_weight().mul_(12.0)
    items = specs(EXTRAS_RULES, 12, seed=7)
    outs = []
    for graphs in (True, False):
        eng = Engine(sess, ServeConfig(max_seq_len=64, kv_cache_mb=16, max_batch_size=8, device="cuda",
                                       cuda_graphs=graphs, graph_decode=decode if graphs else None,
                                       compile=False))
        reqs = eng.run_requests(items)
        outs.append([r.output_ids for r in reqs])
        if graphs:
            gr = eng.runner
            assert isinstance(gr, GraphRunner) and gr.stats["eager_reuse"] == 0 and gr.stats["replays"] > 0
            assert any(len(k) == 4 and g.graph is not None for k, g in gr.graphs.items())
    agree = sum(a == b for a, b in zip(*outs)) / len(items)
    assert agree >= (0.9 if decode == "exact" else 0.75), outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_sampled_variants_run_on_the_gpu():
    """On the GPU: sampled steps with top-k filters, logprobs and credit capture and replay (no eager Reuse
    step, every request finishes; sampled tokens are not compared: bf16 rounding of the graph's and the eager
    forward's logits differs, which moves near-tied Gumbel draws)."""
    from dlc.runtime.session import open_model
    sess = open_model("tiny-llada", device="cuda", dtype=torch.bfloat16, progress=False)
    rules = [dict(temperature=0.8), dict(temperature=1.5, top_k=5, top_p=0.9, logprobs=2),
             dict(temperature=0.7, threshold=0.6, credit=True, smoothing=True)]
    items = specs(rules, 6, seed=9)
    eng = Engine(sess, ServeConfig(max_seq_len=64, kv_cache_mb=16, max_batch_size=8, device="cuda",
                                   cuda_graphs=True, compile=False))
    reqs = eng.run_requests(items)
    gr = eng.runner
    assert [r.error for r in reqs] == [None] * len(reqs) and all(r.output_ids for r in reqs)
    assert gr.stats["eager_reuse"] == 0 and any(len(k) == 4 and k[3][4] and g.graph is not None
                                                for k, g in gr.graphs.items())


def test_fused_credit_correction_equals_exact_credit_where_credit_decides():
    """Credit in the graph runner's ``fused`` variants (the plain sweep + the sparse correction over the
    credited ids, float32) vs ``exact`` (credit in every vocab chunk, float64), on tiny-llada with its head x2
    (less decisive, so credit changes the outputs): identical tokens; without credit they differ."""
    from dlc.models.loading import load_model
    m = load_model("tiny-llada", seed=1).model
    with torch.no_grad():
        m.head_weight().mul_(2.0)
    items = specs([dict(threshold=0.3, credit=True), dict(credit=True), dict(factor=2.0, credit=True)], 9,
                  seed=3)
    eng, fused = run(m, items, "fused")
    _, exact = run(m, items, "exact")
    _, plain = run(m, [(p, {k: v for k, v in q.items() if k != "credit"}) for p, q in items], "exact")
    assert eng.runner.stats["eager_reuse"] == 0 and any(len(k) == 4 and k[3][2] for k in eng.runner.graphs)
    assert [r.output_ids for r in fused] == [r.output_ids for r in exact]
    assert sum(e.output_ids != p.output_ids for e, p in zip(exact, plain)) >= 3       # credit decides
