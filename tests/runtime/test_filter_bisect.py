"""Sampling filters the top-64 candidates do not bound (top-p / min-p without a top-k, a top-k over 64,
filters with credit) decode without the vocabulary sort by ``kernels/filter_bisect.py``'s exact bisection on
the survivors' threshold: the same tokens as the eager sort (``sampling._decode_full``), ties in bf16 logits
split as the stable sort splits them, and the graph runner replays such steps from a captured variant
instead of falling back to the eager runner (tensor parallel: tests/runtime/test_tp_rules.py).

Decisive: every filter setting must change some tokens against the unfiltered draw, so equality means the
filter was applied, not skipped."""
import pytest
import torch

from dlc.kernels.sampling import decode_rows_ext, filter_route
from dlc.runtime.generate import GenerationConfig, generate
from test_graph_extras import reference, run, specs

B, N, D, V = 6, 5, 32, 1000          # B * N * V under torch's parallel grain: one thread, fast
# per row (top_k, top_p, min_p): top-p alone, min-p alone, top-p + min-p, top-k over 64 with top-p, a
# top-k the candidates hold (mixed in: the whole batch bisects), no filter
ROWS = [(0, 0.6, 0.0), (0, 1.0, 0.05), (0, 0.8, 0.02), (100, 0.7, 0.0), (5, 0.9, 0.0), (0, 1.0, 0.0)]


def _filters(rows=ROWS):
    k, p, m = zip(*rows)
    return torch.tensor(k), torch.tensor(p, dtype=torch.float64), torch.tensor(m, dtype=torch.float64)


def _decode(dtype, seed, route, filters, credit=False, filtered_conf=False):
    torch.manual_seed(seed)
    h = torch.randn(B, N, D).to(dtype)
    w = (torch.randn(V, D) * (0.5 + seed % 3)).to(dtype)                 # logits spread: filters bite
    ar, one = torch.arange(B), torch.ones(1, dtype=dtype)
    cred = None
    if credit:
        cred = (torch.randint(0, V, (B, N, 3)), torch.rand(B, N, 3, dtype=torch.float64),
                torch.full((B,), 0.7, dtype=torch.float64))
    temp = (0.6, 1.0, 1.7)[seed % 3]
    return decode_rows_ext(h, w, ar, ar, one, temp, torch.arange(B) * 13 + seed, vocab=V, chunk=256,
                           logprobs=True, credit=cred, filters=filters, filtered_conf=filtered_conf,
                           candidates=route)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("credit", [False, True])
def test_bisection_gives_the_sorts_tokens(dtype, credit):
    """Mixed batches (every filter kind, a candidates-bound top-k and an unfiltered row beside them): the
    bisection's tokens equal the eager sort's, confidences and logprobs within float64 summation order
    (fp32: 1e-8 relative, since two calls of one fp32 CPU GEMM can round a logit one ulp apart when the BLAS
    threads split the work otherwise under load, which moves a confidence by ~1e-10 relative; seen about once
    in 30 runs); bf16 logits tie often (8-bit mantissa), so ties at the top-p / top-k boundary are split by
    id as the stable sort splits them. fp32 keys bisect the raw logits (32 halvings), credit the float64
    fused ones."""
    tol = 1e-8 if dtype == torch.float32 else 1e-12
    f = _filters()
    route = filter_route(*f, credit=credit)
    assert route == "bisectkzp"
    changed = 0
    for seed in range(4):
        for fc in (False, True):
            want = _decode(dtype, seed, False, f, credit, fc)
            got = _decode(dtype, seed, route, f, credit, fc)
            assert torch.equal(got["tokens"], want["tokens"]), (seed, fc)
            torch.testing.assert_close(got["confidence"], want["confidence"], rtol=tol, atol=tol)
            torch.testing.assert_close(got["logprob"], want["logprob"], rtol=tol, atol=tol)
        plain = _decode(dtype, seed, None, None, credit)["tokens"]
        changed += int((plain != want["tokens"]).any(-1).sum())
    assert changed >= 4                                                   # decisive: the filters bite


@pytest.mark.parametrize("rows,plan", [([(0, 0.5, 0.0)] * B, "bisectp"), ([(0, 1.0, 0.1)] * B, "bisect"),
                                       ([(200, 1.0, 0.0)] * B, "bisectk")])
def test_each_plan_skips_what_no_row_needs(rows, plan):
    """A batch of one filter kind takes the plan without the other sums (top-p alone: no counts; min-p alone:
    no sum at all; a top-k alone: no mass): still the sort's tokens, bf16 ties included."""
    f = _filters(rows)
    assert filter_route(*f) == plan
    for seed in range(4):
        want = _decode(torch.bfloat16, seed, False, f)["tokens"]
        assert torch.equal(_decode(torch.bfloat16, seed, plan, f)["tokens"], want), seed
        if plan != "bisectk":                         # a top-k of 200 of 1000 rarely changes a draw
            assert not torch.equal(_decode(torch.bfloat16, seed, None, None)["tokens"], want)


@pytest.fixture(scope="module")
def model(decisive_tiny_llada):
    return decisive_tiny_llada


def test_graph_runner_replays_filters_beyond_the_candidates(model):
    """Top-p alone, min-p alone, top-p + min-p, a top-k over 64 with top-p and filters with credit, in mixed
    Engine batches beside plain sampled rows: every Reuse step replays a captured variant holding the
    bisection (no eager fallback), and each request's tokens equal generate() on the eager runner (the
    sort)."""
    rules = [dict(temperature=4.0, top_p=0.7), dict(temperature=4.0, min_p=0.1),
             dict(temperature=3.0, top_p=0.8, min_p=0.05), dict(temperature=4.0, top_k=100, top_p=0.6),
             dict(temperature=3.0, threshold=0.5, credit=True, top_p=0.8), dict(temperature=4.0)]
    items = specs(rules, 10, seed=11)
    eng, reqs = run(model, items, "exact")
    st = eng.runner.stats
    assert st["eager_reuse"] == 0 and st["replays"] > 0
    plans = {k[3].filtered for k in eng.runner.graphs if len(k) == 4}
    assert any(isinstance(p, str) and p.startswith("bisect") for p in plans), plans
    for r, (p, params) in zip(reqs, items):
        assert r.output_ids == reference(model, p, params), params
    changed = 0
    for p, params in items:                           # decisive (hot draws): the filters change the tokens
        plain = {k: v for k, v in params.items() if k not in ("top_k", "top_p", "min_p")}
        changed += reference(model, p, plain) != reference(model, p, params)
    assert changed >= 3


def _scaled_tiny_on_cuda():
    """tiny-llada in fp32 with its head x3: hot enough that top-p 0.7 and min-p 0.1 change the draws, not so
    hot that confidences saturate at 1.0 (x12 did: several positions of a block then tie at exactly 1.0 and
    the GPU's graph and eager forwards, ~1e-6 apart, pick different ones: other tokens without any decoding
    difference; that, not the bisection, was the 2026-11-28 "one GPU's bisection differs" report)."""
    from dlc.runtime.session import open_model
    sess = open_model("tiny-llada", device="cuda", dtype=torch.float32, progress=False)
    with torch.no_grad():
        sess.runner.model.head_weight().mul_(3.0)
    return sess


_GPU_FILTERS = (dict(top_p=0.7), dict(min_p=0.1), dict(top_k=100, top_p=0.6),
                dict(threshold=0.5, credit=True, top_p=0.8))


def _gpu_cfg(**params):
    return GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual", temperature=0.9, seed=3,
                            **params)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bisection_equals_the_sort_on_the_same_rows_on_the_gpu(monkeypatch):
    """On one GPU: every bisection decode of an (uncaptured) graph runner gives the sort's tokens on the same
    rows, seeds and filters (the decoding alone, whatever the forward's rounding), and its confidences within
    1e-4 (9.5e-6 seen on an H200): the bisection's head GEMM runs over a chunk's rows, the sort's over all
    rows, and cuBLAS may pick another kernel per row count (fp32 logits a few ulps apart; equal on CPU)."""
    import dlc.runtime.runners.graph as graph_mod
    from dlc.kernels.filter_bisect import is_plan
    from dlc.runtime.runners.graph import GraphRunner
    sess = _scaled_tiny_on_cuda()
    real, calls = graph_mod.decode_rows_ext, []

    def checked(rows, head, cond, un, cfg_w, temp, seeds, **kw):
        out = real(rows, head, cond, un, cfg_w, temp, seeds, **kw)
        if is_plan(kw.get("candidates")):
            ref = real(rows, head, cond, un, cfg_w, temp, seeds, **dict(kw, candidates=False))
            calls.append((torch.equal(out["tokens"], ref["tokens"]),
                          float((out["confidence"] - ref["confidence"]).abs().max())))
        return out
    monkeypatch.setattr(graph_mod, "decode_rows_ext", checked)
    gr = GraphRunner(sess.runner.model, decode="exact", capture=False)
    for params in _GPU_FILTERS:
        generate(gr, [[5, 17, 99, 3], [42, 8, 9, 1]], _gpu_cfg(**params))
    assert len(calls) >= 40                            # every config, ~14 Reuse steps each
    assert all(same for same, _ in calls)
    assert max(err for _, err in calls) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_bisection_equals_eager_on_the_gpu():
    """On the GPU, fp32: top-p alone, min-p alone, a top-k over 64 with top-p and credit with top-p capture
    (the bisection inside the CUDA graph: no host read) and give the eager runner's tokens; no eager Reuse;
    the filters change the tokens (decisive)."""
    from dlc.runtime.runners.graph import GraphRunner
    sess = _scaled_tiny_on_cuda()
    gr = GraphRunner(sess.runner.model, decode="exact")
    assert gr.capture
    prompts = [[5, 17, 99, 3], [42, 8, 9, 1]]
    changed = 0
    for params in _GPU_FILTERS:
        got = generate(gr, prompts, _gpu_cfg(**params)).token_ids
        assert got == generate(sess.runner, prompts, _gpu_cfg(**params)).token_ids, params
        plain = {k: v for k, v in params.items() if k not in ("top_k", "top_p", "min_p")}
        changed += got != generate(sess.runner, prompts, _gpu_cfg(**plain)).token_ids
    assert changed >= 3
    assert gr.stats["eager_reuse"] == 0 and gr.stats["replays"] > 0
    assert any(g.graph is not None and str(g.ex.filtered).startswith("bisect")
               for g in gr.graphs.values() if g.ex)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_unfiltered_sampling_equals_eager_on_the_gpu(monkeypatch):
    """On the GPU, fp32, head x3: sampled steps without filters (T 0.9 and 2.0) replay a captured variant
    whose decode is the fused unfiltered draw (``filter_bisect.plain_draw``, run at the variant's warm-up and
    capture) in the default ``fused`` mode, and give the eager runner's tokens (torch's float64 sweep,
    ``decode_rows``); no eager Reuse; the draw moves tokens off the T = 0 ones (decisive)."""
    from dataclasses import replace

    from dlc.kernels import sampling
    from dlc.runtime.runners.graph import GraphRunner
    real, calls = sampling.plain_draw, []
    monkeypatch.setattr(sampling, "plain_draw", lambda *a, **k: calls.append(1) or real(*a, **k))
    sess = _scaled_tiny_on_cuda()
    gr = GraphRunner(sess.runner.model)
    assert gr.capture and gr.decoding == "fused"
    prompts = [[5, 17, 99, 3], [42, 8, 9, 1]]
    changed = 0
    for t in (0.9, 2.0):
        cfg = replace(_gpu_cfg(), temperature=t)
        got = generate(gr, prompts, cfg).token_ids
        assert got == generate(sess.runner, prompts, cfg).token_ids, t
        changed += got != generate(sess.runner, prompts, replace(cfg, temperature=0.0)).token_ids
    assert changed >= 1
    assert calls and gr.stats["eager_reuse"] == 0 and gr.stats["replays"] > 0
    variants = [g.ex for g in gr.graphs.values() if g.ex and g.graph is not None]
    assert any(ex.sampled and not ex.filtered for ex in variants), variants


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_halving_kernel_and_bf16_bisection_on_the_gpu():
    """On the GPU the halvings' sums run in ``filter_bisect._above_kernel`` (compiled Triton): equal counts
    and masses to the CPU reference for bf16 / fp32 / float64 keys; then bf16 rows of an LLaDA-sized
    vocabulary (many exact ties), the captured bisection's tokens equal the eager sort's on the same
    device."""
    from dlc.kernels import filter_bisect as FB
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        keyed = (torch.randn(2, 3, 3 * FB.SPLIT + 77) * 3).to(dt)
        e = torch.rand(keyed.shape, dtype=torch.float64)
        u = keyed[..., 5].clone()
        want = FB.above_sums(keyed, e, u)
        got = FB.above_sums(keyed.cuda(), e.cuda(), u.cuda()).cpu()
        assert torch.equal(got[1], want[1]), dt
        torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=0)
    dev, B, N, V = "cuda", 4, 8, 126464
    torch.manual_seed(0)
    h = torch.randn(B, N, 256, device=dev, dtype=torch.bfloat16)
    w = torch.randn(V, 256, device=dev, dtype=torch.bfloat16) * 0.2
    ar, one = torch.arange(B, device=dev), torch.ones(1, device=dev, dtype=torch.bfloat16)
    temp = torch.full((1,), 0.8, dtype=torch.float64, device=dev)
    f = (torch.tensor([0, 0, 100, 0], device=dev), torch.tensor([0.9, 1.0, 0.8, 0.5], device=dev,
                                                                dtype=torch.float64),
         torch.tensor([0.0, 0.05, 0.0, 0.01], device=dev, dtype=torch.float64))
    route = filter_route(*f)

    def bisected():
        return decode_rows_ext(h, w, ar, ar, one, temp, ar + 3, vocab=V, chunk=32768, filters=f,
                               candidates=route)["tokens"]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        bisected()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tok = bisected()
    g.replay()
    want = decode_rows_ext(h, w, ar, ar, one, temp, ar + 3, vocab=V, chunk=32768, filters=f,
                           candidates=False)["tokens"]
    assert torch.equal(tok, want)
    plain = decode_rows_ext(h, w, ar, ar, one, temp, ar + 3, vocab=V, chunk=32768)["tokens"]
    assert not torch.equal(plain, want)                                 # decisive
