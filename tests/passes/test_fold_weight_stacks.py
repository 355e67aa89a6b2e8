"""fold_weight_stacks: a MoE program reads its experts' packed weights (built once at build time) instead of
stacking every expert's weight each forward; same numbers as eager, one copy of the experts."""
import torch

from passes_helpers import kv_phases, tiny, token_state, traced
from dlc.compiler.export import build_phases, trace_forward
from dlc.models.loading import load_model
from dlc.passes.fold_weight_stacks import PREFIX
from dlc.passes.pipeline import PassContext, count_ops, run_pipeline

ATOL = 1e-5           # fp32: the same products (a stack moves elements); GEMM blocking may differ
STACK, CAT = torch.ops.aten.stack.default, torch.ops.aten.cat.default
_P: dict = {}


def folded(name: str):
    if name not in _P:
        m = tiny(name)
        ctx = PassContext(config=m.config, kv_inplace=False)
        _P[name] = run_pipeline(traced(name), ctx, ["fold_weight_stacks", "cache_kv_reuse"]), ctx
    return _P[name]


def test_moe_programs_stack_no_weights_and_compute_the_same():
    m = tiny("tiny-llada-moe")
    c = m.config
    plain, _ = kv_phases("tiny-llada-moe", inplace=False)
    phases, ctx = folded("tiny-llada-moe")
    assert count_ops(plain["refresh"], STACK) == 3 * c.n_layers          # gate, up, down stacks a layer
    assert ctx.counts[("fold_weight_stacks", "refresh")] == 2 * c.n_layers   # w_gu and w_down a layer
    for ph in ("refresh", "reuse"):
        assert count_ops(phases[ph], STACK) == 0
        assert count_ops(phases[ph], CAT) == count_ops(plain[ph], CAT) - c.n_layers   # gate|up: folded
        n_attrs = sum(1 for n in phases[ph].graph.nodes if n.op == "get_attr")
        assert n_attrs < sum(1 for n in plain[ph].graph.nodes if n.op == "get_attr") - 3 * c.n_experts
    ids, pos, km = token_state(c)
    qs = torch.tensor([10, 11, 12])
    cols = qs[:, None] + torch.arange(5)
    with torch.no_grad():
        ref = m(ids, pos, km)
        assert ref.std() > 0.1                                          # a model whose outputs vary
        h, k, v = phases["refresh"](ids, pos, km)
        hq, _, _ = phases["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v,
                                   torch.arange(k.shape[1]))
    assert torch.allclose(h, ref, atol=ATOL), (h - ref).abs().max()
    assert torch.allclose(hq, ref.gather(1, cols[..., None].expand(-1, -1, ref.shape[-1])), atol=ATOL)


def test_experts_live_in_the_folded_weights_once():
    """The model's expert parameters become views of the folded tensors (the build holds one copy), the
    phases share them, and the programs no longer carry any per-expert attribute."""
    m = load_model("tiny-llada-moe", seed=1).model       # its own model: an eager call would repack it
    phases = run_pipeline(trace_forward(m), PassContext(config=m.config), ["fold_weight_stacks"])
    gm = phases["reuse"]
    packs = {n: p for n, p in gm.named_parameters() if n.startswith(PREFIX)}
    assert len(packs) == 2 * m.config.n_layers
    assert not [n for n, _ in gm.named_parameters() if ".experts." in n]
    storages = {p.untyped_storage().data_ptr() for p in packs.values()}
    experts = [(n, p) for n, p in m.named_parameters() if ".experts." in n]
    assert experts and all(p.untyped_storage().data_ptr() in storages for _, p in experts)
    name = next(iter(packs))
    assert phases["refresh"].get_parameter(name) is packs[name]


def test_dense_models_fold_nothing_and_keep_their_weights():
    """A dense model's constant views (the LM head's transpose, ...) copy nothing: no fold, no second copy;
    the pass is on by default for MoE builds only."""
    m = tiny("tiny-llada")
    ctx = PassContext(config=m.config, kv_inplace=False)
    run_pipeline(traced("tiny-llada"), ctx, ["fold_weight_stacks", "cache_kv_reuse"])
    assert ctx.counts[("fold_weight_stacks", "refresh")] == 0
    assert build_phases(m)[2][0] == "cache_kv_reuse"
    assert build_phases(tiny("tiny-llada-moe"))[2][0] == "fold_weight_stacks"


def test_a_weight_cast_every_forward_is_stored_cast_once():
    """LLaDA2's router reads its gate weight and expert bias in fp32: a bf16 build stores them in fp32 once
    (folded) instead of casting every forward, and lifts no bf16 copy of them; no constant cast is left."""
    m = load_model("tiny-llada2", seed=1).model.to(torch.bfloat16)
    phases, ctx, names = build_phases(m)
    assert names[0] == "fold_weight_stacks"
    w = ctx.shared["weights"]
    routers = [k for k in w if k.endswith("mlp__gate__weight") or k.endswith("expert_bias")]
    assert not routers                                               # lifted as folded tensors instead
    folded = {k: v for k, v in w.items() if PREFIX in k}
    assert sum(v.dtype == torch.float32 for v in folded.values()) == 2 * sum(
        1 for n, _ in m.named_modules() if n.endswith("mlp.gate"))   # gate weight + bias a MoE layer
    for gm in phases.values():
        weights = {n for n in gm.graph.nodes if n.op == "placeholder" and n.target.startswith("w__")}
        casts = [n for n in gm.graph.nodes if n.op == "call_function" and n.args and n.args[0] in weights
                 and n.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)]
        assert not casts


class _Weights(torch.nn.Module):
    """Two ways to read weights: a stack -> transpose -> reshape chain (copies: folded) and a reshape of one
    contiguous weight (a view: left alone, never stored twice)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1, self.w2 = (torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(2))
        self.w3 = torch.nn.Parameter(torch.randn(12, generator=g))

    def forward(self, x):                                            # x [n, 4]
        packed = torch.stack([self.w1, self.w2]).transpose(1, 2).reshape(6, 4)   # [2, 4, 3] -> [6, 4]
        return torch.nn.functional.linear(x, packed), torch.nn.functional.linear(x, self.w3.reshape(3, 4))


def test_only_chains_that_copy_are_folded_and_weights_become_views():
    from dlc.passes import fold_weight_stacks
    m = _Weights()
    x = torch.randn(5, 4)
    ref = m(x)
    gm = torch.export.export(m, (x,)).module()
    ctx = PassContext(config=None)
    assert fold_weight_stacks.run(gm, ctx) == 1                      # the stack chain; not w3's reshape
    names = {n for n, _ in gm.named_parameters()}
    assert names == {f"{PREFIX}_0", "w3"}
    folded = gm.get_parameter(f"{PREFIX}_0")
    assert folded.shape == (6, 4) and folded.is_contiguous()
    assert m.w1.untyped_storage().data_ptr() == folded.untyped_storage().data_ptr()   # re-pointed: a view
    gm.recompile()
    out = gm(x)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
