"""MoE engines for sm90 / sm100 GPUs trace the grouped-GEMM expert forward (``moe_fused``: each expert on its
routed tokens only), the forward the runtime's CUDA graphs replay there, instead of ``moe_stacked`` (every
expert on every token: E / k times the routed FLOPs); elsewhere (ONNX / TensorRT, older GPUs, fp16 / fp32) the
static stacked forward. The programs run anywhere torch does (CPU here: torch's reference grouped GEMM)."""
from types import SimpleNamespace

import pytest
import torch

from dlc.compiler.build import compile_model, traced_moe_impl
from dlc.compiler.export import trace_forward
from dlc.manifest import EngineError
from dlc.models.loading import load_model
from dlc.models.presets import preset_config
from dlc.passes.pipeline import PassContext, count_ops, run_pipeline
from dlc.runtime.runners.engine_dir import check_device
from dlc.targets import get_target

GROUPED, STACK = torch.ops.aten._grouped_mm.default, torch.ops.aten.stack.default
BF16 = dict(rtol=2e-2, atol=2e-2)      # bf16 GEMMs blocked differently (eager vs traced program)


def moe_config():
    return preset_config("tiny-llada-moe")


@pytest.mark.parametrize("target,backend,dtype,want", [
    ("h100", "export", torch.bfloat16, "fused"), ("h200", "aoti", torch.bfloat16, "fused"),
    ("rtx4090", "export", torch.bfloat16, "stacked"),     # sm89: grouped GEMM reads offsets on the host
    ("a100-80g", "aoti", torch.bfloat16, "stacked"), ("h100", "onnx", torch.bfloat16, "stacked"),
    ("h100", "export", torch.float16, "stacked"), ("cpu", "export", torch.bfloat16, "stacked")])
def test_gpu_targets_with_device_grouped_gemm_trace_the_fused_forward(target, backend, dtype, want):
    assert traced_moe_impl(moe_config(), get_target(target), dtype, backend) == want


def test_moe_impl_option_and_dense_models():
    cfg, h100 = moe_config(), get_target("h100")
    assert traced_moe_impl(cfg, h100, torch.bfloat16, "export", "stacked") == "stacked"
    assert traced_moe_impl(cfg, get_target("cpu"), torch.bfloat16, "export", "fused") == "fused"
    with pytest.raises(ValueError, match=r"--moe-impl fused needs .* rtx4090 \(sm_89\)"):
        traced_moe_impl(cfg, get_target("rtx4090"), torch.bfloat16, "export", "fused")
    with pytest.raises(ValueError, match="--moe-impl fused needs"):
        traced_moe_impl(cfg, h100, torch.bfloat16, "onnx", "fused")
    dense = load_model("tiny-llada", seed=1).model.config
    assert traced_moe_impl(dense, h100, torch.bfloat16, "export") is None


def test_fused_programs_run_grouped_gemms_and_equal_eager():
    """The traced fused forward through the pipeline (experts folded once, K/V phases): two grouped GEMMs a
    MoE layer, no expert stacked per forward, at a batch and length other than the trace's; the Refresh
    and Reuse programs' hidden states equal the eager model's (bf16 tolerance), and the model is back on
    its own forward afterwards."""
    model = load_model("tiny-llada-moe", seed=2, dtype=torch.bfloat16).model
    c = model.config
    model.set_moe_impl("dense")
    base = trace_forward(model, "fused")
    assert {layer.mlp.impl for layer in model.model.layers} == {"dense"}       # the model's own again
    ctx = PassContext(config=c, kv_inplace=False)
    phases = run_pipeline(base, ctx, ["fold_weight_stacks", "cache_kv_reuse"])
    for ph in ("refresh", "reuse"):
        assert count_ops(phases[ph], GROUPED) == 2 * c.n_layers
        assert count_ops(phases[ph], STACK) == 0
    g = torch.Generator().manual_seed(5)
    B, L = 2, 23
    ids = torch.randint(0, 250, (B, L), generator=g)
    pos = torch.arange(L)[None].expand(B, L).contiguous()
    km = torch.ones(B, L, dtype=torch.bool)
    qs = torch.tensor([9, 14])
    cols = qs[:, None] + torch.arange(6)
    with torch.no_grad():
        model.set_moe_impl("fused")
        ref = model(ids, pos, km).float()                          # eager bf16, the same grouped GEMMs
        model.set_moe_impl("stacked")
        stacked = model(ids, pos, km).float()
        model.set_moe_impl("auto")
        assert ref.std() > 0.1
        h, k, v = phases["refresh"](ids, pos, km)
        hq, _, _ = phases["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v, torch.arange(B))
    torch.testing.assert_close(h.float(), ref, **BF16)
    assert (h.float() - stacked).abs().max() < 0.05 * stacked.abs().max()      # the stacked forward's sums
    fed = ref.gather(1, cols[..., None].expand(-1, -1, ref.shape[-1]))          # [B, 6, d]
    torch.testing.assert_close(hq.float(), fed, **BF16)


def test_dry_run_for_an_sm90_target_traces_the_fused_forward_on_meta():
    """Dry runs and CUDA builds trace a meta-device model (trace_forward's twin): the grouped GEMMs trace
    there too; the manifest / plan records the forward."""
    from dlc.models import build_model
    with torch.device("meta"):
        twin = build_model(moe_config()).to(torch.bfloat16).eval()
    assert count_ops(trace_forward(twin, "fused"), GROUPED) == 2 * twin.config.n_layers
    plans = {}
    for target, impl, want in (("h100", "auto", "fused"), ("rtx4090", "auto", "stacked"),
                               ("h100", "stacked", "stacked")):
        res = compile_model("tiny-llada-moe", target, None, backend="export", dry_run=True, moe_impl=impl,
                            echo=lambda line: None)
        assert res["moe"] == want
        plans[target, want] = res["plan"]
    # the plan sizes the programs built: a stacked one holds every expert's transients (fewer tokens fit)
    assert plans["h100", "stacked"]["max_tokens"] < plans["h100", "fused"]["max_tokens"]


def test_a_fused_engine_refuses_a_gpu_without_the_device_grouped_gemm(monkeypatch, tmp_path):
    m = {"build": {"moe": "fused"}, "target": {"name": "h100", "arch": "sm_90"}, "source": "llada-moe-7b"}
    gpu = SimpleNamespace(major=8, minor=9)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev=None: gpu)
    with pytest.raises(EngineError, match=r"sm90 / sm100 GPU; this one is sm_89.*--target"):
        check_device(tmp_path, m, "cuda")
    check_device(tmp_path, m, "cpu")                               # runs on the CPU (reference kernels)
    check_device(tmp_path, {**m, "build": {"moe": "stacked"}}, "cuda")
    gpu.major, gpu.minor = 9, 0
    check_device(tmp_path, m, "cuda")


def test_an_engine_trace_of_a_packed_model_stacks_the_parameters():
    """A model whose experts were packed (any eager forward, the graph runner before compiling) still
    traces its experts as a stack of its parameters (program_trace), which fold_weight_stacks computes once
    at build; without the flag torch.export (which counts as compiling) would read the packs made before."""
    from dlc.models.llada_moe import pack_model_experts
    model = load_model("tiny-llada-moe", seed=2).model
    pack_model_experts(model)
    gm = trace_forward(model)
    assert count_ops(gm, STACK) == 3 * model.config.n_layers          # gate, up, down of every layer
    phases = run_pipeline(gm, PassContext(config=model.config, kv_inplace=False), ["fold_weight_stacks",
                                                                                   "cache_kv_reuse"])
    assert count_ops(phases["refresh"], STACK) == 0


def test_inspect_names_the_engines_moe_forward():
    from dlc.manifest import summary_lines
    lines = summary_lines({"build": {"moe": "fused"}, "model": {}, "passes": []})
    assert "moe         fused (grouped GEMMs over routed tokens)" in lines
    assert not [s for s in summary_lines({"build": {}, "model": {}, "passes": []}) if s.startswith("moe")]
