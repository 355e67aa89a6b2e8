"""The fused bisection kernels compiled on the GPU (kernels/filter_bisect.py ``fused_draw``): the torch path's
survivors and draws on LLaDA-sized rows (bisect_check.py's cases: bf16 ties, top-p keeping one token and
thousands, min-p, top-k over 64 with top-p, top-k alone, fp32), the recomputed weights bit for bit equal to
torch's float64 exp, and decode_rows_ext's fused bisection == its torch path == the sort, captured in a CUDA
graph (no host read)."""
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
