"""chunk_logits: decode inside the graph in vocab chunks; never a [B, L, V] tensor."""
import pytest
import torch
from torch.fx.passes.shape_prop import ShapeProp

from passes_helpers import (decode_args, greedy, guided_refresh, reuse_case, traced, tiny, token_state,
                            wide_llada)
from dlc.compiler.export import trace_forward
from dlc.kernels.logits import uniform_noise
from dlc.passes.pipeline import PassContext, run_pipeline

CONF_RTOL = 1e-12     # float64 softmax probability: chunked logsumexp vs torch.softmax (summation order only)


def decode_phases(model, chunk, logprobs=0, base=None):
    ctx = PassContext(config=model.config, head_weight=model.head.weight, logit_chunk=chunk,
                      logprobs=logprobs, kv_inplace=False)
    return run_pipeline(base or trace_forward(model), ctx, ["cache_kv_reuse", "chunk_logits"]), ctx


@pytest.fixture(scope="module")
def wide():
    return wide_llada()


def test_no_vocab_tensor_larger_than_budget(wide):
    m, base = wide
    V, chunk = m.config.vocab_size, 128
    phases, ctx = decode_phases(m, chunk, base=base)
    gm = phases["refresh"]
    B, L, N = 2, 48, 8
    ids, pos, km = token_state(m.config, B=B, L=L)
    ShapeProp(gm).propagate(ids, pos, km, *decode_args(B, N, 30))
    budget = B * N * chunk                                   # elements of one chunk's logits
    vocab_dims = {V, chunk, V % chunk}
    big = []
    for n in gm.graph.nodes:
        tm = n.meta.get("tensor_meta")
        if n.op in ("placeholder", "get_attr") or not hasattr(tm, "shape"):
            continue
        shape = tuple(tm.shape)
        numel = torch.Size(shape).numel()
        if shape and shape[-1] in vocab_dims and numel > budget:
            big.append((n.name, shape))
        # no [B, L, V*]
        assert not (len(shape) == 3 and shape[1] == L and shape[2] >= chunk), (n.name, shape)
    assert not big, big
    linears = [n for n in gm.graph.nodes if "linear" in str(n.target) and n.args[1].op != "get_attr"]
    # one head matmul per chunk
    assert len(linears) == ctx.counts[("chunk_logits", "refresh")] == -(-V // chunk)
    assert not any("softmax" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("chunk", [1000, 128, 256, 37])
def test_tokens_equal_unchunked_at_temperature_0(wide, chunk):
    """The planner's chunks are multiples of 128 (or the whole vocab): their GEMMs give the unchunked logits'
    bits, so tokens are identical and confidences differ only by the float64 summation order. An odd width
    (37) may take another GEMM kernel (last-bit logit differences): tokens still match here, confidences to
    fp32 rounding."""
    m, base = wide
    phases, _ = decode_phases(m, chunk, base=base)
    B, L, N, a = 3, 24, 6, 14
    ids, pos, km = token_state(m.config, B=B, L=L)
    with torch.no_grad():
        tok, conf, _, _ = phases["refresh"](ids, pos, km, *decode_args(B, N, a))
        ref_tok, ref_conf = greedy(m.logits(m(ids, pos, km)[:, a:a + N]))
    assert torch.equal(tok, ref_tok)
    assert conf.dtype == torch.float64
    assert torch.allclose(conf, ref_conf, rtol=CONF_RTOL if chunk % 128 == 0 or chunk >= 1000 else 1e-5,
                          atol=0)


def test_guidance_and_logprobs(wide):
    m, base = wide
    phases, _ = decode_phases(m, 128, logprobs=5, base=base)
    (tok, conf, top_i, top_lp, _, _), _, _, (ref_tok, ref_conf), (ref_lp, ref_i) = \
        guided_refresh(m, phases["refresh"])
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(conf, ref_conf, rtol=CONF_RTOL, atol=0)
    assert torch.equal(top_i, ref_i)
    assert torch.allclose(top_lp, ref_lp, atol=1e-10)


def test_sampling_at_temperature_is_chunking_invariant_and_seeded(wide):
    m, base = wide
    B, L, N, a = 2, 20, 8, 10
    ids, pos, km = token_state(m.config, B=B, L=L)
    seeds = torch.tensor([11, 12])
    toks = []
    for chunk in (1000, 128):
        phases, _ = decode_phases(m, chunk, base=base)
        with torch.no_grad():
            toks.append(phases["refresh"](ids, pos, km, *decode_args(B, N, a, temp=1.0, seeds=seeds))[0])
            other = phases["refresh"](ids, pos, km, *decode_args(B, N, a, temp=1.0, seeds=seeds + 7))[0]
            greedy = phases["refresh"](ids, pos, km, *decode_args(B, N, a))[0]
    # the noise depends on (seed, row, id), not the chunking
    assert torch.equal(toks[0], toks[1])
    assert not torch.equal(toks[0], other)
    assert not torch.equal(toks[0], greedy)


def test_uniform_noise_is_uniform():
    u = uniform_noise(torch.tensor([1, 2]), 50, 0, 1000, 1000, "cpu")          # [2, 50, 1000]
    assert u.shape == (2, 50, 1000) and u.dtype == torch.float64
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01
    hist = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.01
    assert torch.equal(u[:, :, 100:200], uniform_noise(torch.tensor([1, 2]), 50, 100, 200, 1000, "cpu"))


def test_reuse_decodes_rows_relative_to_q_start():
    m = tiny("tiny-llada")
    phases, _ = decode_phases(m, 100, base=traced("tiny-llada"))
    tok, conf, lg = reuse_case(phases, m)
    ref_tok, ref_conf = greedy(lg)
    assert torch.equal(tok, ref_tok)
    assert torch.allclose(conf, ref_conf, rtol=1e-6)
