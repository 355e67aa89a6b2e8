"""``dlc.kernels.fused_shard_stats`` on CPU (the op's float32 reference; the Triton kernels run in
interpret_check.py and on the GPU): two vocab shards merged by ``vocab.merge`` (the combine without its
collective) decode what one float64 sweep over the whole vocabulary decodes; a TP rank's fused credit and
smoothing routes (runtime/distributed/shard_runner.py), merged the same way, decode what one process's fused
ops decode (the collectives themselves: tests/runtime/test_tp_graphs.py)."""
import pytest
import torch

from dlc.kernels import fused_shard_stats
from dlc.kernels.sampling import decode_rows_ext
from dlc.runtime.distributed.vocab import STATS, merge

TOL = 1e-5                # float32 sweep vs float64, logits of a few units


@pytest.mark.parametrize("entropy,k", [(False, 0), (True, 4)])
def test_two_shards_merged_equal_the_full_vocab_decode(entropy, k):
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(3, 4, 32, generator=g), torch.randn(301, 32, generator=g) * 0.5
    parts = []
    for v0, v1 in ((0, 151), (151, 301)):
        st = fused_shard_stats(h.reshape(12, 32), w[v0:v1], v0, entropy=entropy, topk=k)
        assert all(v.dtype == (torch.int64 if key == "ti" else torch.float64) for key, v in st.items())
        assert ((st["tok"] >= v0) & (st["tok"] < v1)).all()                 # global ids of the shard
        parts.append({key: v.view(3, 4, *v.shape[1:]) for key, v in st.items()})
    ranks = torch.stack([torch.stack([p[key] for key in STATS]) for p in parts])          # [2, 6, 3, 4]
    tops = (torch.cat([p["tv"] for p in parts], -1), torch.cat([p["ti"] for p in parts], -1)) if k else None
    out = merge(ranks, k, tops)
    ar, one = torch.arange(3), torch.ones(1)
    ref = decode_rows_ext(h.double(), w.double(), ar, ar, one, 0.0, torch.zeros(3, dtype=torch.int64),
                          vocab=301, chunk=64, topk=k, logprobs=True, entropy=entropy)
    assert torch.equal(out["tokens"], ref["tokens"])
    assert len(set(ref["tokens"].flatten().tolist())) > 6                  # rows decode differently
    assert (ref["tokens"] >= 151).any() and (ref["tokens"] < 151).any()    # both shards win some rows
    keys = ["confidence", "logprob"] + (["entropy"] if entropy else []) + (["topk_logprobs"] if k else [])
    for key in keys:
        assert (out[key] - ref[key]).abs().max().item() < TOL, key
    if k:
        assert torch.equal(out["topk_ids"], ref["topk_ids"])


def test_bad_arguments_name_the_field():
    h, w = torch.randn(2, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="v0"):
        fused_shard_stats(h, w, -1)
    with pytest.raises(ValueError, match="topk"):
        fused_shard_stats(h, w, 0, topk=11)
    with pytest.raises(ValueError, match="d=8"):
        fused_shard_stats(h, torch.randn(10, 4))


def _two_shards(V: int) -> list[tuple[int, int]]:
    return [(0, V // 2), (V // 2, V)]


def test_fused_credit_two_shards_equal_one_process_fused():
    """A TP rank's fused credit route (``shard_runner``: ``fused_shard_stats`` + the credited ids' logits in
    its shard, ``credit_finish`` after the combine; here merged without collectives) decodes what one
    process's fused op decodes (``fused_select_extras``: the plain sweep, then the sparse correction): the
    same tokens and raw top-1s, confidences within float32 rounding; credit flips some rows."""
    from dlc.kernels import fused_select_extras
    from dlc.runtime.distributed.shard_runner import credit_finish, credit_logits
    g = torch.Generator().manual_seed(3)
    B, N, d, V, M = 3, 4, 32, 301, 3
    h, w = torch.randn(B, N, d, generator=g), torch.randn(V, d, generator=g) * 0.3
    raw = (h @ w.t()).topk(M, dim=-1).indices                                   # [B, N, M]: the runners-up
    ids = torch.cat([raw[..., 1:], torch.randint(0, V, (B, N, 1), generator=g)], -1)
    vals = torch.rand(B, N, M, generator=g, dtype=torch.float64) * 2
    alpha = torch.tensor([0.7, 0.0, 0.9], dtype=torch.float64)                 # row 1: credit off
    parts, sums = [], 0
    for v0, v1 in _two_shards(V):
        st = fused_shard_stats(h.reshape(B * N, d), w[v0:v1], v0)
        parts.append(torch.stack([st[k].view(B, N) for k in STATS]))
        sums = sums + credit_logits(h, w[v0:v1], v0, ids)                        # [M, B, N]
    out = merge(torch.stack(parts))
    out["_sums"] = sums
    got = credit_finish(out, (ids, vals, alpha))
    ref = fused_select_extras(h.reshape(B * N, d), w, credit_ids=ids.reshape(B * N, M),
                              credit_vals=vals.reshape(B * N, M),
                              credit_alpha=alpha[:, None].expand(B, N).reshape(-1))
    ref = {k: v.view(B, N) for k, v in ref.items()}
    assert torch.equal(got["tokens"], ref["tokens"]) and torch.equal(got["top1_ids"], ref["top1_ids"])
    assert (got["tokens"] != got["top1_ids"]).sum() >= 2                        # credit decided some rows
    assert torch.equal(got["tokens"][1], got["top1_ids"][1])                    # alpha 0: the raw token
    for key in ("confidence", "logprob", "top1_prob"):
        torch.testing.assert_close(got[key].double(), ref[key].double(), rtol=1e-5, atol=1e-6)


# fused smoothing, shards vs one process: fp32 within float32 rounding; bf16 within bf16 rounding, as each
# shard's probabilities e^(l - max) round relative to its own max (one GPU's chunks round to theirs) and its
# unnormalised soft sum e @ W_e (|.| up to ~4 here) is a bf16 GEMM output (2^-9 relative)
SMOOTH_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (4e-3, 1e-2)}        # confidence rtol, soft atol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("soft_k", [0, 5])
def test_fused_smoothing_two_shards_equal_one_process_fused(soft_k, dtype):
    """A TP rank's fused smoothing route (``shard_runner.smooth_shard_stats``: ``smooth_stats`` over its
    shard in the model dtype; the ranks' soft shares moved to the global max, ``soft_share``, and summed;
    here merged without collectives) decodes what one process's ``smooth_select`` decodes: the same tokens
    (the argmax of the same model-dtype logits), confidences and soft embeddings within ``SMOOTH_TOL``."""
    from dlc.kernels.sampling import top_soft
    from dlc.kernels.smoothing import smooth_select
    from dlc.runtime.distributed.shard_runner import smooth_shard_stats, soft_share
    g = torch.Generator().manual_seed(5)
    B, N, d, V = 2, 4, 64, 512
    h = (torch.randn(B, N, d, generator=g) * 0.5).to(dtype)
    w, we = (torch.randn(V, d, generator=g).to(dtype) for _ in range(2))
    parts = [smooth_shard_stats(h, w[v0:v1], we[v0:v1], v0, soft_k) for v0, v1 in _two_shards(V)]
    tops = None
    if soft_k:
        tops = (torch.cat([st["tv"] for st, _ in parts], -1), torch.cat([st["ti"] for st, _ in parts], -1))
    out = merge(torch.stack([torch.stack([st[k] for k in STATS]) for st, _ in parts]), soft_k, tops)
    if soft_k:
        soft = top_soft(out["topk_ids"], out["topk_logprobs"], we, 1.0)
    else:
        soft = sum(soft_share(sa, st["m"], out["_m"]) for st, sa in parts) / out["_s"].float()[..., None]
    ref = smooth_select(h, w, we, vocab=V, chunk=V, top_k=soft_k)
    assert torch.equal(out["tokens"], ref["tokens"]) and ref["tokens"].unique().numel() > B * N // 2
    assert (ref["tokens"] >= V // 2).any() and (ref["tokens"] < V // 2).any()     # both shards win rows
    conf = ref["confidence"].double()
    assert conf.max() - conf.min() > 0.1                                          # confidences vary
    rtol, atol = SMOOTH_TOL[dtype]
    torch.testing.assert_close(out["confidence"], conf, rtol=rtol, atol=0)
    torch.testing.assert_close(soft.float(), ref["soft"], rtol=0, atol=atol)
    assert ref["soft"].std(dim=(0, 1)).mean() > 0.05                             # rows' embeddings differ
