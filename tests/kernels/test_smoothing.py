"""Iteration smoothing's one-pass decoding (``dlc.kernels.smoothing.smooth_select``, the CUDA-graph runner's
``fused`` smoothing step) against ``decode_rows_ext`` in float64 over the same model-dtype logits."""
import pytest
import torch

from dlc.kernels.sampling import decode_rows_ext
from dlc.kernels.smoothing import smooth_select

CONF_RTOL = 4e-3       # probabilities in bf16 (relative rounding 2^-9 each), summed in float32
SOFT_ATOL = 2e-3       # the soft embedding: a convex combination of W_e rows (|W_e| ~ 1) with those weights


def _case(B, N, d, V, seed, scale):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, N, d, generator=g) * scale).to(torch.bfloat16)
    w = torch.randn(V + 3, d, generator=g).to(torch.bfloat16)                  # head rows past V: padding
    we = torch.randn(V + 3, d, generator=g).to(torch.bfloat16)
    return h, w, we


@pytest.mark.parametrize("B,N,scale", [(1, 8, 0.4), (3, 4, 0.6), (2, 5, 0.5)])
def test_smooth_select_matches_decode_rows_ext_float64(B, N, scale):
    d, V, chunk = 64, 1000, 256                                                # 4 chunks, the last short
    h, w, we = _case(B, N, d, V, B * 10 + N, scale)
    ar = torch.arange(B)
    ref = decode_rows_ext(h, w, ar, ar, torch.ones(1, dtype=h.dtype), 0.0, torch.zeros_like(ar), vocab=V,
                          chunk=chunk, soft=(we, 1.0), acc=torch.float64)
    out = smooth_select(h, w, we, vocab=V, chunk=chunk)
    assert torch.equal(out["tokens"], ref["tokens"])                       # the same bf16 logits' argmax
    assert out["tokens"].unique().numel() > B * N // 2                     # decisive: rows pick differently
    conf = ref["confidence"]
    assert conf.max() - conf.min() > 0.2                                   # confidences vary
    torch.testing.assert_close(out["confidence"].double(), conf, rtol=CONF_RTOL, atol=0)
    soft = ref["soft"]
    assert soft.std(dim=(0, 1)).mean() > 0.05                              # rows' soft embeddings differ
    torch.testing.assert_close(out["soft"].double(), soft, rtol=0, atol=SOFT_ATOL)
    assert out["soft"].dtype == torch.float32 and out["soft"].shape == (B, N, d)


def test_smooth_select_ties_take_the_first_id_across_chunks():
    """Equal best logits in two chunks: the earlier id, as decode_rows."""
    d, V, chunk = 16, 40, 16
    h = torch.zeros(1, 1, d, dtype=torch.bfloat16)
    h[..., 0] = 1
    w = torch.zeros(V, d, dtype=torch.bfloat16)
    w[[5, 21, 37], 0] = 2.0                                                    # one in each chunk
    we = torch.randn(V, d).to(torch.bfloat16)
    out = smooth_select(h, w, we, vocab=V, chunk=chunk)
    assert out["tokens"].item() == 5
    ar = torch.arange(1)
    ref = decode_rows_ext(h, w, ar, ar, torch.ones(1, dtype=h.dtype), 0.0, torch.zeros_like(ar), vocab=V,
                          chunk=chunk, soft=(we, 1.0), acc=torch.float64)
    torch.testing.assert_close(out["confidence"].double(), ref["confidence"], rtol=CONF_RTOL, atol=0)


def test_chunk_columns_whole_vocab_for_small_batches():
    from dlc.kernels.smoothing import CHUNK_ELEMS, chunk_columns
    V = 126464
    assert chunk_columns(32, V, 32768) == V                                   # B = 1, N = 32: one chunk
    assert chunk_columns(1024, V, 32768) == 32768                             # B = 32: the transient cap
    assert chunk_columns(1024, V, 32768) * 1024 <= CHUNK_ELEMS
    assert chunk_columns(4096, V, 32768) == 32768                             # never below the runner's


def _ref(h, w, we, V, chunk, k=0):
    ar = torch.arange(h.shape[0])
    return decode_rows_ext(h, w, ar, ar, torch.ones(1, dtype=h.dtype), 0.0, torch.zeros_like(ar), vocab=V,
                           chunk=chunk, soft=(we, 1.0, k), acc=torch.float64)


def test_truncated_smoothing_is_the_top_k_softmax_of_the_logits():
    """``smoothing_top_k``: decode_rows_ext's soft embedding over each row's k largest logits, renormalised,
    against a transcription in float64 over the model-dtype logits; tokens and confidences as exact
    smoothing's; k = the whole vocabulary gives exact smoothing's soft embedding."""
    d, V, chunk, k = 64, 1000, 256, 5
    h, w, we = _case(2, 6, d, V, 21, 0.5)
    out = _ref(h, w, we, V, chunk, k)
    exact = _ref(h, w, we, V, chunk)
    l = torch.nn.functional.linear(h, w[:V]).double()                            # [B, N, V]
    tv, ti = l.topk(k, dim=-1)
    want = (torch.softmax(tv, -1)[..., None] * we[ti].double()).sum(-2)
    torch.testing.assert_close(out["soft"], want, rtol=0, atol=1e-9)
    assert torch.equal(out["tokens"], exact["tokens"]) and torch.equal(out["confidence"], exact["confidence"])
    assert (out["soft"] - exact["soft"]).abs().max() > 0.05                  # a different quantity
    assert "topk_ids" not in out                                               # the caller asked for none
    small_V = 40
    full = _ref(h, w, we, small_V, 16, small_V)
    # (exact smoothing multiplies W_e by its probabilities rounded to W_e's dtype, bf16 here: 2^-9 relative)
    torch.testing.assert_close(full["soft"], _ref(h, w, we, small_V, 16)["soft"], rtol=0, atol=2e-2)


@pytest.mark.parametrize("k", [1, 4])
def test_smooth_select_truncated_matches_decode_rows_ext(k):
    d, V, chunk = 64, 1000, 256
    # float32 rows: bf16 logits often tie at the k-th place, where torch.topk may keep either token
    h, w, we = (t.float() for t in _case(3, 4, d, V, 5 + k, 0.6))
    ref = _ref(h, w, we, V, chunk, k)
    out = smooth_select(h, w, we, vocab=V, chunk=chunk, top_k=k)
    assert torch.equal(out["tokens"], ref["tokens"])
    torch.testing.assert_close(out["confidence"].double(), ref["confidence"], rtol=CONF_RTOL, atol=0)
    torch.testing.assert_close(out["soft"].double(), ref["soft"], rtol=0, atol=1e-5)   # float32 softmax of k
    if k == 1:                                                               # the chosen token's embedding
        assert torch.equal(out["soft"], we[out["tokens"]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_stats_on_the_gpu_equal_torch_passes():
    """The two Triton launches of a chunk (``split_stats``: a B = 1 step's 32 rows x LLaDA's vocabulary)
    against torch's max / exp over the same bf16 logits: the first max id (ties planted across splits), the
    max itself, e = exp(l - max) rounded once (within one bf16 step of torch's float32 exp rounded), the sum;
    then ``smooth_select`` on the GPU against ``decode_rows_ext`` in float64."""
    from dlc.kernels.smoothing import split_columns, split_stats
    g = torch.Generator(device="cuda").manual_seed(0)
    R, C = 32, 126464
    l = (torch.randn(R, C, device="cuda", generator=g) * 3).to(torch.bfloat16)
    split = split_columns(R, C)
    l[1, [7, 5 * split + 3]] = 40.0                                       # a tie across two splits
    l[2, [split - 1, split]] = 40.0                                       # a tie at a split's edge
    l[3, [11, 900]] = 40.0                                                # two lanes of one split
    ref_m, ref_i = l.float().max(-1)
    ref_e = torch.exp(l.float() - ref_m[:, None]).to(torch.bfloat16)
    m, i, s, e = split_stats(l.clone())
    assert torch.equal(i, ref_i) and i[1:4].tolist() == [7, split - 1, 11]
    assert torch.equal(m, ref_m)
    step = torch.finfo(torch.bfloat16).eps * ref_e.float().abs()                 # one bf16 step
    assert ((e.float() - ref_e.float()).abs() <= step).all()
    assert (e != ref_e).float().mean() < 0.01
    torch.testing.assert_close(s, ref_e.float().sum(-1), rtol=1e-5, atol=0)
    d, V = 256, 5000
    h, w, we = (t.cuda() for t in _case(2, 7, d, V, 3, 0.2))
    for chunk in (V, 1800):
        ref = _ref(h.cpu(), w.cpu(), we.cpu(), V, chunk)                          # float64 on the host
        out = {k: v.cpu() for k, v in smooth_select(h, w, we, vocab=V, chunk=chunk).items()}
        assert torch.equal(out["tokens"], ref["tokens"])
        torch.testing.assert_close(out["confidence"].double(), ref["confidence"], rtol=CONF_RTOL, atol=0)
        # the chunk GEMM's bf16 output adds a rounding of 2^-9 x |soft| (~1) to the CPU test's SOFT_ATOL
        torch.testing.assert_close(out["soft"].double(), ref["soft"], rtol=0, atol=2 * SOFT_ATOL)
