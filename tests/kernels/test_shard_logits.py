"""``dlc.kernels.fused_shard_stats`` on CPU (the op's float32 reference; the Triton kernels run in
interpret_check.py and on the GPU): two vocab shards merged by ``vocab.merge`` (the combine without its
collective) decode what one float64 sweep over the whole vocabulary decodes."""
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
