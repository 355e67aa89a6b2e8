"""fuse_projections: linears sharing one input (q|k|v, gate|up) become one GEMM + split; same numbers as
eager."""
import pytest
import torch

from passes_helpers import tiny, token_state, traced
from dlc.compiler.export import build_phases, export_phase, head_weight
from dlc.passes.fuse_projections import LINEAR, PREFIX
from dlc.passes.pipeline import PassContext, count_ops, run_pipeline

ATOL = 1e-5          # fp32: one wider GEMM vs separate GEMMs (the same products; blocking may differ)
_P: dict = {}


def fused(name):
    if name not in _P:
        m = tiny(name)
        ctx = PassContext(config=m.config, head_weight=head_weight(m), kv_inplace=False)
        _P[name] = run_pipeline(traced(name), ctx, ["cache_kv_reuse", "fuse_projections"]), ctx
    return _P[name]


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_fewer_linears_same_numbers(name):
    m = tiny(name)
    c = m.config
    phases, ctx = fused(name)
    before = count_ops(traced(name), LINEAR)
    groups = ctx.counts[("fuse_projections", "refresh")]
    assert groups == 2 * c.n_layers                             # q|k|v and gate|up per layer
    for ph in ("refresh", "reuse"):
        assert count_ops(phases[ph], LINEAR) == before - c.n_layers * (2 + 1)   # 5 projections -> 2 GEMMs
    ids, pos, km = token_state(c)
    qs = torch.tensor([10, 11, 12])
    cols = qs[:, None] + torch.arange(5)
    with torch.no_grad():
        ref = m(ids, pos, km)
        h, k, v = phases["refresh"](ids, pos, km)
        hq, _, _ = phases["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v,
                                   torch.arange(k.shape[1]))
    assert torch.allclose(h, ref, atol=ATOL), (h - ref).abs().max()
    assert torch.allclose(hq, ref.gather(1, cols[..., None].expand(-1, -1, ref.shape[-1])), atol=ATOL)


def test_weights_are_not_held_twice():
    """The model's projection parameters become views of the concatenated weight; the phase programs carry
    only the concatenated one (and an exported artifact lifts no per-projection copy)."""
    m = tiny("tiny-dream")
    phases, ctx = fused("tiny-dream")
    gm = phases["reuse"]
    cats = {n: p for n, p in gm.named_parameters() if n.startswith(PREFIX)}
    # q|k|v weight + bias (Dream has q/k/v biases), gate|up weight
    assert len(cats) == 3 * m.config.n_layers
    storages = {p.untyped_storage().data_ptr() for p in cats.values()}
    fused_names = [n for n, p in m.named_parameters()
                   if p.ndim >= 1 and p.untyped_storage().data_ptr() in storages]
    # 5 weights + 3 biases per layer
    assert len(fused_names) == 5 * m.config.n_layers + 3 * m.config.n_layers
    # shared by the phases
    assert phases["refresh"].get_parameter(next(iter(cats))) is cats[next(iter(cats))]
    ep = export_phase(gm, "reuse", m.config, torch.float32)
    lifted = set(ep.state_dict)
    assert not any(n.endswith(("q_proj.weight", "k_proj.weight", "up_proj.weight")) for n in lifted), lifted


def test_default_on_for_gpu_lowering_only():
    m = tiny("tiny-llada")
    _, _, gpu = build_phases(m, device="cuda")
    _, _, cpu = build_phases(m)
    assert gpu == ["cache_kv_reuse", "fuse_projections", "chunk_logits", "lift_weights"]
    assert cpu == ["cache_kv_reuse", "chunk_logits", "lift_weights"]
