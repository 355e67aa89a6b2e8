"""The per-shard selected-row logits statistics (kernels/shard_logits.py) on a CUDA GPU: bf16, LLaDA-8B's head
split in two shards as TP=2 splits it (``vocab_range``), fresh random inputs each run.

Each shard's statistics are checked against the float64 ``vocab.shard_stats`` on the same bf16 values; the two
shards merged (``vocab.merge``: the combine without its collective) must decode the very tokens of TP=1's
fused kernel over the whole head (the same float32 logits from the same tiles; ties to the lowest id
everywhere), with its confidence up to float32 summation order. V = 50001 puts the shard boundary (25001)
inside one of TP=1's vocab tiles: a logit's dot product does not depend on its column's place in a tile."""
import math

import pytest
import torch

import dlc.kernels as K
from dlc.models.tensor_parallel import vocab_range
from dlc.runtime.distributed.vocab import STATS, merge, shard_stats

pytestmark = pytest.mark.gpu

ATOL = 2e-3               # bf16 operands, fp32 sweep, vs the float64 sweep on the same bf16 values
CONF_RTOL = 1e-5          # merged float64 sums of float32 partials vs TP=1's float32 sums
TOKEN_AGREE = 0.99        # vs float64: the argmax may flip only on float32 near-ties


@pytest.mark.parametrize("N,V,k,entropy", [(32, 126464, 0, False), (1024, 126464, 0, False),
                                           (32, 126464, 5, True), (96, 50001, 3, False)])
def test_shard_stats_kernel_vs_float64_and_tp1_fused(N, V, k, entropy):
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    d = 4096
    h = torch.randn(N, d, device="cuda", generator=g).bfloat16()
    w = (torch.randn(V, d, device="cuda", generator=g) / math.sqrt(d) * 4).bfloat16()
    ar, one = torch.arange(N, device="cuda"), torch.ones(1, device="cuda", dtype=torch.float64)
    z = torch.zeros(N, dtype=torch.int64, device="cuda")
    parts = []
    for rank in range(2):
        v0, v1 = vocab_range(V, rank, 2)
        ws = w[v0:v1].contiguous()                                           # the rank's own head tensor
        st = K.fused_shard_stats(h, ws, v0, entropy=entropy, topk=k)
        torch.cuda.synchronize()
        ref = shard_stats(h.double()[:, None], ws.double(), v0, ar, ar, one, 0.0, z, V, topk=k,
                          entropy=entropy)
        ref = {key: v[:, 0] for key, v in ref.items()}
        assert set(st) == set(ref) and all(not v.isnan().any() for v in st.values())
        same = st["tok"] == ref["tok"]
        assert same.float().mean() >= TOKEN_AGREE and st["tok"].min() >= v0 and st["tok"].max() < v1
        errs = {"bl": (st["bl"] - ref["bl"])[same], "m": st["m"] - ref["m"],
                "lse": st["m"] + st["s"].log() - ref["m"] - ref["s"].log()}
        if entropy:
            errs["a/s"] = st["a"] / st["s"] - ref["a"] / ref["s"]
        if k:
            errs["tv"] = st["tv"] - ref["tv"]
        for key, e in errs.items():
            assert e.abs().max().item() < ATOL, (key, e.abs().max().item())
        parts.append(st)
    ranks = torch.stack([torch.stack([p[key] for key in STATS]) for p in parts])[:, :, None]  # [2, 6, 1, N]
    tops = None
    if k:
        tops = (torch.cat([p["tv"] for p in parts], -1)[None], torch.cat([p["ti"] for p in parts], -1)[None])
    out = {key: v[0] for key, v in merge(ranks, k, tops).items()}
    if not (k or entropy):                                                    # TP=1's fused decode
        tok1, conf1 = K.fused_select_logits(h, w)
    else:                                                                     # with extras: its extras sweep
        ext = K.fused_select_extras(h, w, entropy=entropy, topk=k)
        tok1, conf1 = ext["tokens"], ext["confidence"]
        torch.testing.assert_close(out["logprob"], ext["logprob"].double(), rtol=0, atol=1e-5)
        if k:
            assert torch.equal(out["topk_ids"], ext["topk_ids"])
        if entropy:
            torch.testing.assert_close(out["entropy"], ext["entropy"].double(), rtol=0, atol=1e-4)
    assert torch.equal(out["tokens"], tok1)
    assert len(set(tok1.tolist())) > N // 2                                   # rows decode differently
    torch.testing.assert_close(out["confidence"], conf1.double(), rtol=CONF_RTOL, atol=1e-9)
