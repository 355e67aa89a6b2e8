"""The fused bisection kernels compiled on the GPU (kernels/filter_bisect.py ``fused_draw``): the torch path's
survivors and draws on LLaDA-sized rows (bisect_check.py's cases: bf16 ties, top-p keeping one token and
thousands, min-p, top-k over 64 with top-p, top-k alone, fp32), the recomputed weights bit for bit equal to
torch's float64 exp, and decode_rows_ext's fused bisection == its torch path == the sort, captured in a CUDA
graph (no host read); the unfiltered sampled draw (``plain_draw``) == the torch sweep, captured too."""
import pytest
import torch

from dlc.kernels import filter_bisect as FB
from dlc.kernels.sampling import decode_rows_ext, filter_route

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fused_kernels_equal_the_torch_path_on_llada_sized_rows():
    from bisect_check import PLANS, check, check_pass
    check_pass(device="cuda")
    for seed in range(2):
        assert check(device="cuda", seed=seed, V=126464, split=FB.FUSED_SPLIT, block=FB.FUSED_BLOCK,
                     fp32_plans=tuple(PLANS), fp16_plans=("bisectkzp", "bisectp"), weights=False)


def test_recomputed_weights_are_torchs_bits():
    """The kernels' e = exp(s - M) from the model-dtype value (division or torch's reciprocal multiply,
    subtraction, libdevice's exp, no FMA contraction) equals torch's float64 ``exp(l64 / temp - M)`` bit for
    bit: the same survivors' sums as the torch path up to summation order."""
    from bisect_check import _logits, check_weights
    for dt, temp in ((torch.bfloat16, torch.tensor([1.3], dtype=torch.float64, device="cuda")),
                     (torch.float32, 0.7)):
        lraw = _logits(dt, 3, 2, 126464, 0, "cuda")
        check_weights(lraw, lraw.to(torch.float64).amax(-1) / temp, temp)


def _decode(route, fused, h, w, f, temp, filtered_conf=False):
    B, V = h.shape[0], w.shape[0]
    ar, one = torch.arange(B, device="cuda"), torch.ones(1, device="cuda", dtype=h.dtype)
    saved, FB.FUSED = FB.FUSED, fused
    try:
        return decode_rows_ext(h, w, ar, ar, one, temp, ar * 7 + 3, vocab=V, chunk=32768, filters=f,
                               candidates=route, logprobs=True, filtered_conf=filtered_conf)
    finally:
        FB.FUSED = saved


def test_captured_fused_bisection_equals_torch_path_and_sort():
    """bf16 head of LLaDA's vocabulary: per sequence top-p alone, min-p, top-k 100 + top-p, none; captured
    (the fused path under CUDA-graph capture: no host sync) == eager fused == the torch path (tokens; the
    confidences and logprobs within 1e-12) == the sort's tokens; the filters change the draw (decisive)."""
    dev, B, N, V = "cuda", 4, 16, 126464
    torch.manual_seed(1)
    h = torch.randn(B, N, 512, device=dev, dtype=torch.bfloat16)
    w = torch.randn(V, 512, device=dev, dtype=torch.bfloat16) * 0.15
    temp = torch.full((1,), 0.8, dtype=torch.float64, device=dev)
    f = (torch.tensor([0, 0, 100, 0], device=dev),
         torch.tensor([0.9, 1.0, 0.7, 1.0], device=dev, dtype=torch.float64),
         torch.tensor([0.0, 0.05, 0.0, 0.0], device=dev, dtype=torch.float64))
    route = filter_route(*f)
    assert route == "bisectkzp"
    for fc in (False, True):
        fused, ref = _decode(route, True, h, w, f, temp, fc), _decode(route, False, h, w, f, temp, fc)
        assert torch.equal(fused["tokens"], ref["tokens"]), fc
        for key in ("confidence", "logprob"):
            torch.testing.assert_close(fused[key], ref[key], rtol=1e-12, atol=1e-12)
        assert torch.equal(fused["tokens"], _decode(False, False, h, w, f, temp, fc)["tokens"]), fc
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _decode(route, True, h, w, f, temp)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tok = _decode(route, True, h, w, f, temp)["tokens"]
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(tok, fused["tokens"])
    plain = _decode(None, True, h, w, None, temp)["tokens"]
    assert not torch.equal(plain[:3], tok[:3])                           # decisive: the filters bite


def test_fused_unfiltered_draw_equals_the_sweep_on_llada_sized_rows():
    """A sampled step without filters (``plain_draw``, compiled) on LLaDA's vocabulary: the tokens of the
    torch path (``decode_rows``) and of ``_decode_chunked``, confidences within 1e-12 relative (bisect_check's
    ``check_plain``: fp32 and bf16 ties, T 0.3 / 1 / 2.5, guidance, tiles whose noise is skipped; 32 rows:
    the split halved to 1024 columns), and two vocab shards' statistics merged (``check_plain_shards``)."""
    from bisect_check import check_plain, check_plain_shards
    for seed in range(2):
        assert check_plain(device="cuda", seed=seed, V=126464, chunk=32768, split=FB.FUSED_SPLIT,
                           block=FB.FUSED_BLOCK, B=4, N=8)
    assert check_plain_shards(device="cuda", V=126464, cut=63300, chunk=32768, split=FB.FUSED_SPLIT,
                              block=FB.FUSED_BLOCK, B=4, N=8)


def test_captured_unfiltered_draw_equals_the_torch_path():
    """bf16 rows of LLaDA's width and vocabulary at B = 8, N = 32 (the bench's shape): decode_rows_ext at
    T = 0.8 without filters takes the fused draw (captured in a CUDA graph: no host read) and gives the
    torch path's tokens, confidences within 1e-12; the draw moves tokens off the T = 0 argmax (decisive)."""
    from dlc.kernels import sampling
    dev, B, N, V, d = "cuda", 8, 32, 126464, 4096
    torch.manual_seed(2)
    h = torch.randn(B, N, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(V, d, device=dev, dtype=torch.bfloat16) * 0.05
    ar, one = torch.arange(B, device=dev), torch.ones(1, device=dev, dtype=torch.bfloat16)
    temp = torch.full((1,), 0.8, dtype=torch.float64, device=dev)
    seeds = ar * 7 + 3

    def decode(fused, t=temp):
        saved, FB.FUSED = FB.FUSED, fused
        try:
            return decode_rows_ext(h, w, ar, ar, one, t, seeds, vocab=V, chunk=32768)
        finally:
            FB.FUSED = saved
    real, calls = sampling.plain_draw, []
    sampling.plain_draw = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        fused, ref = decode(True), decode(False)
        assert len(calls) == 1                                            # the fused route, then torch's
        assert torch.equal(fused["tokens"], ref["tokens"])
        torch.testing.assert_close(fused["confidence"], ref["confidence"], rtol=1e-12, atol=0)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            decode(True)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = decode(True)
    finally:
        sampling.plain_draw = real
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out["tokens"], ref["tokens"])
    torch.testing.assert_close(out["confidence"], ref["confidence"], rtol=1e-12, atol=0)
    greedy = decode(False, 0.0)["tokens"]
    assert (greedy != ref["tokens"]).float().mean() > 0.1                 # decisive: the noise draws
