"""chunk_logits lowered for a GPU target: one dlc.fused_select_logits node (no vocab loop), checked on CPU.

The GPU lowering is forced on CPU models (``device="cuda"``); on CPU tensors the op runs its reference, so the
graph's numbers are checked here against eager PyTorch. The Triton kernel itself is checked against the same
reference in tests/kernels (interpreter on CPU, GPU tests on the device)."""
import pytest
import torch

from passes_helpers import (decode_args, greedy, guided_refresh, reuse_case, tiny, token_state, traced,
                            wide_llada)
from dlc.compiler import in_memory_runner
from dlc.compiler.export import export_phase, head_weight, trace_forward
from dlc.kernels.logits import key_uniform, row_key
from dlc.models import build_model
from dlc.models.config import ModelConfig
from dlc.models.loading import init_weights
from dlc.passes.chunk_logits import HEAD_ATTR
from dlc.passes.pipeline import PassContext, input_names, run_pipeline
from dlc.runtime.generate import GenerationConfig, generate

CONF_RTOL = 1e-5      # float32 online softmax (the op) vs float64 softmax of eager logits
CFG_CONF_RTOL = 1e-4  # guidance on hidden rows, then one head GEMM, vs guidance on two heads' logits (fp32)
LOGPROB_ATOL = 1e-4   # float32 log-softmax of the op vs float64 of eager logits
MARGIN = 1e-3         # top-2 gap (logits or Gumbel scores) beyond which float32 rounding cannot flip a token
FUSED = "dlc.fused_select_logits"
PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]


def gpu_phases(model, base=None, logprobs=0, chunk=128):
    ctx = PassContext(config=model.config, head_weight=head_weight(model), logit_chunk=chunk,
                      logprobs=logprobs, device="cuda", kv_inplace=False)
    return run_pipeline(base or trace_forward(model), ctx, ["cache_kv_reuse", "chunk_logits"]), ctx


def clear(scores: torch.Tensor) -> torch.Tensor:
    """[..., V] -> bool [...]: rows whose top-2 scores are further apart than MARGIN."""
    top = scores.double().topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]) > MARGIN


@pytest.fixture(scope="module")
def wide():
    return wide_llada()


@pytest.fixture(scope="module")
def lowered(wide):
    m, base = wide
    return gpu_phases(m, base=base)


def test_graph_has_one_fused_op_and_no_vocab_loop(wide, lowered):
    m, _ = wide
    phases, ctx = lowered
    for ph, gm in phases.items():
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        assert sum(FUSED in str(n.target) for n in calls) == 1, ph
        head = next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == HEAD_ATTR)
        assert all("linear" not in str(u.target) and "matmul" not in str(u.target) for u in head.users), ph
        assert not any("topk" in str(n.target) or "softmax" in str(n.target) or "logsumexp" in str(n.target)
                       for n in calls), ph                      # the vocab reduction lives in the op
        assert ctx.counts[("chunk_logits", ph)] == 1
    assert ctx.params("chunk_logits")["lowering"] == "fused_select_logits"
    assert ctx.params("chunk_logits")["device"] == "cuda"
    cpu_ctx = PassContext(config=m.config, head_weight=head_weight(m))
    assert cpu_ctx.params("chunk_logits")["lowering"] == "chunked"


def test_temperature_0_matches_eager(wide, lowered):
    m, _ = wide
    phases, _ = lowered
    B, L, N, a = 3, 24, 6, 14
    ids, pos, km = token_state(m.config, B=B, L=L)
    with torch.no_grad():
        tok, conf, _, _ = phases["refresh"](ids, pos, km, *decode_args(B, N, a))
        lg = m.logits(m(ids, pos, km)[:, a:a + N])
        ref_tok, ref_conf = greedy(lg)
    ok = clear(lg)
    assert ok.float().mean() > 0.9
    assert torch.equal(tok[ok], ref_tok[ok])
    assert tok.dtype == torch.long and conf.dtype == torch.float64 and conf.shape == (B, N)
    assert torch.allclose(conf[ok], ref_conf[ok], rtol=CONF_RTOL, atol=0)


def test_guidance_on_hidden_rows_matches_guided_logits(wide):
    m, base = wide
    phases, _ = gpu_phases(m, base=base, logprobs=5)
    B, N = 2, 5
    (tok, conf, top_i, top_lp, _, _), lg, g, (ref_tok, ref_conf), (ref_lp, ref_i) = guided_refresh(
        m, phases["refresh"], B=B, N=N)
    assert not torch.equal(g, lg[:B])                                # guidance changes the logits
    ok = clear(g)
    assert ok.float().mean() > 0.9
    assert torch.equal(tok[ok], ref_tok[ok])
    assert torch.allclose(conf[ok], ref_conf[ok], rtol=CFG_CONF_RTOL, atol=0)
    assert top_lp.dtype == torch.float64 and top_i.shape == (B, N, 5)
    assert torch.allclose(top_lp, ref_lp, atol=LOGPROB_ATOL)
    # distinct top-5 order
    gap = (ref_lp[..., :-1] - ref_lp[..., 1:]).min(-1).values > MARGIN
    assert torch.equal(top_i[gap], ref_i[gap])


def test_sampling_uses_per_request_seeds(wide, lowered):
    """T > 0: Gumbel-max with the op's hash noise keyed by (request seed, decoded row): the tokens are the
    argmax of eager logits - T log(-log u) with that noise, independent of the request's batch position."""
    m, _ = wide
    phases, _ = lowered
    B, L, N, a, T = 3, 20, 8, 10, 1.0
    ids, pos, km = token_state(m.config, B=B, L=L)
    seeds = torch.tensor([2 ** 40 + 11, 12, 987654321])
    with torch.no_grad():
        tok = phases["refresh"](ids, pos, km, *decode_args(B, N, a, temp=T, seeds=seeds))[0]
        again = phases["refresh"](ids, pos, km, *decode_args(B, N, a, temp=T, seeds=seeds))[0]
        other = phases["refresh"](ids, pos, km, *decode_args(B, N, a, temp=T, seeds=seeds + 7))[0]
        greedy = phases["refresh"](ids, pos, km, *decode_args(B, N, a))[0]
        perm = torch.tensor([2, 0, 1])
        swapped = phases["refresh"](ids[perm], pos[perm], km[perm],
                                    *decode_args(B, N, a, temp=T, seeds=seeds[perm]))[0]
        lg = m.logits(m(ids, pos, km)[:, a:a + N]).float()                               # [B, N, V]
    V = m.config.vocab_size
    u = torch.stack([key_uniform(row_key(int(s), torch.arange(N))[:, None], torch.arange(V)[None])
                     for s in seeds])
    score = lg - T * torch.log(-torch.log(u))
    ok = clear(score)
    assert ok.float().mean() > 0.9
    assert torch.equal(tok[ok], score.argmax(-1)[ok])
    assert torch.equal(tok, again)
    assert not torch.equal(tok, other) and not torch.equal(tok, greedy)
    assert torch.equal(swapped, tok[perm])


def test_reuse_decodes_rows_relative_to_q_start():
    m = tiny("tiny-llada")
    phases, _ = gpu_phases(m, base=traced("tiny-llada"), chunk=100)
    tok, conf, lg = reuse_case(phases, m)
    ref_tok, ref_conf = greedy(lg)
    ok = clear(lg)
    assert ok.any()
    assert torch.equal(tok[ok], ref_tok[ok])
    assert torch.allclose(conf[ok], ref_conf[ok], rtol=1e-5)


@pytest.mark.parametrize("family", ["tiny-llada", "tiny-dream"])
def test_generation_matches_eager(family):
    """Whole generations (none/dual caches, CFG): the GPU graph run on CPU gives eager's tokens (these tiny
    models' top-2 margins are far above fp32 rounding)."""
    m = tiny(family)
    runner = in_memory_runner(m, block_length=8, device="cuda")
    assert sum(FUSED in str(n.target) for n in runner.phases["reuse"].graph.nodes) == 1
    for kv, extra in [("none", {}), ("dual", {}), ("dual", {"cfg_scale": 1.0})]:
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache=kv, **extra)
        eager = generate(m, PROMPTS, cfg).token_ids
        assert len({t for row in eager for t in row}) > 3
        assert generate(runner, PROMPTS, cfg).token_ids == eager


def test_lowered_phases_export_with_the_op(wide, lowered):
    m, _ = wide
    phases, _ = lowered
    eps = {ph: export_phase(gm, ph, m.config, torch.float32) for ph, gm in phases.items()}
    for ph, ep in eps.items():
        assert FUSED in str(ep.graph), ph
    B, L, N, a = 2, 18, 4, 9
    ids, pos, km = token_state(m.config, B=B, L=L)
    args = (ids, pos, km, *decode_args(B, N, a, temp=0.7, seeds=torch.tensor([3, 4])))
    with torch.no_grad():
        want = phases["refresh"](*args)
        got = eps["refresh"].module()(*args)
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=1e-6)


@pytest.mark.slow
def test_lowered_phase_builds_with_aotinductor(tmp_path):
    """AOTInductor compiles a GPU-lowered refresh phase (fused projections, the fused op and top-k logprobs;
    on CPU the ops' reference bodies) and the package computes what the FX graph computes."""
    cfg = ModelConfig(family="llada", d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, mlp_hidden=48,
                      vocab_size=300, embedding_size=300, mask_id=299, eos_id=298, pad_id=298, max_seq_len=64)
    torch.manual_seed(0)
    m = build_model(cfg)
    init_weights(m, 3)
    m.eval()
    from dlc.compiler.export import build_phases
    phases, ctx, names = build_phases(m, device="cuda", logprobs=3)
    assert "fuse_projections" in names
    weights = ctx.shared["weights"]
    ep = export_phase(phases["refresh"], "refresh", cfg, torch.float32, weights=weights)
    pkg = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(
        ep, package_path=str(tmp_path / "refresh.pt2")))
    ids, pos, km = token_state(cfg, B=2, L=16)
    pools = [torch.zeros(2, cfg.n_layers, 3, cfg.n_kv_heads, 16, cfg.head_dim) for _ in range(2)]
    w = [weights[n] for n in input_names(phases["refresh"]) if n in weights]

    def args(pool):
        return (ids, pos, km, pool[0], pool[1], torch.tensor([2, 0]), torch.arange(8, 12)[None].repeat(2, 1),
                torch.arange(2), torch.arange(2), torch.ones(1), torch.tensor([0.8], dtype=torch.float64),
                torch.tensor([5, 6]), *w)
    with torch.no_grad():
        want = phases["refresh"](*args(pools[0]))
    got = pkg(*args(pools[1]))
    assert torch.equal(got[0], want[0])
    assert torch.allclose(got[1], want[1], rtol=1e-5)
    assert torch.allclose(got[3], want[3], atol=LOGPROB_ATOL)                       # top-k logprobs
    gap = (want[3][..., :-1] - want[3][..., 1:]).min(-1).values > MARGIN             # distinct top-k order
    assert torch.equal(got[2][gap], want[2][gap])
    # K/V written in place
    assert pools[0].abs().amax() > 0 and torch.allclose(pools[1], pools[0], atol=1e-5)
