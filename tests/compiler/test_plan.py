"""Targets and build planning; the dry run."""
import json

import pytest

from compiler_helpers import run_cli
from dlc.compiler.plan import plan_build
from dlc.models.presets import preset_config
from dlc.targets import TARGETS, get_target

LLADA = preset_config("llada-8b")


def test_targets_have_the_hardware_facts():
    assert set(TARGETS) == {"rtx4090", "l40s", "a100-40g", "a100-80g", "h100", "h200", "cpu"}
    for t in TARGETS.values():
        assert t.arch and t.memory_gib > 0 and t.bandwidth_gbs > 0 and t.bf16_tflops > 0
    assert get_target("h200").memory_gib > get_target("rtx4090").memory_gib


def test_unknown_target_lists_the_targets():
    with pytest.raises(ValueError, match="unknown target 'tpu'.*rtx4090.*h200.*cpu"):
        get_target("tpu")
    res = run_cli(["compile", "tiny-llada", "--target", "tpu", "--dry-run"])
    assert res.exit_code != 0 and "rtx4090" in res.output and "l40s" in res.output


def test_plan_fits_llada_8b_on_rtx4090_in_bf16():
    p = plan_build(LLADA, get_target("rtx4090"), "bf16", None, 1024, 32)
    assert p.fits
    assert p.weights + p.kv_cache + p.activations <= p.memory_budget
    assert p.max_batch_size >= 1 and p.max_tokens >= p.max_batch_size * p.max_seq_len
    assert p.logit_chunk <= LLADA.vocab_size and (p.logit_chunk % 128 == 0
                                                  or p.logit_chunk == LLADA.vocab_size)
    big = plan_build(LLADA, get_target("h200"), "bf16", None, 1024, 32)
    assert big.max_tokens > 5 * p.max_tokens


def test_plan_refuses_with_the_reason():
    p = plan_build(LLADA, get_target("rtx4090"), "fp32", None, 1024, 32)
    assert not p.fits and "weights alone" in p.reason and "rtx4090" in p.reason
    p = plan_build(LLADA, get_target("rtx4090"), "bf16", 64, 4096, 32)
    assert not p.fits and "at most" in p.reason and "--max-batch-size" in p.reason
    with pytest.raises(ValueError, match="max-seq-len"):
        plan_build(LLADA, get_target("h100"), "bf16", None, 10 ** 6, 32)


def test_logit_chunk_shrinks_with_the_decoded_rows():
    small = plan_build(LLADA, get_target("h200"), "bf16", 8, 1024, 32)
    large = plan_build(LLADA, get_target("h200"), "bf16", 128, 1024, 32)
    assert large.logit_chunk < small.logit_chunk
    per_elem = 36
    assert large.max_batch_size * 32 * large.logit_chunk * per_elem <= large.logit_budget


def test_tiny_dry_run_prints_the_plan():
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--json", "--sparse-retention",
                   "0.5"])
    assert res.exit_code == 0, res.output
    out = res.output
    for word in ("plan for tiny-llada", "refresh", "reuse", "cache_kv_reuse", "sparsify_heads",
                 "chunk_logits", "max batch x sequence", "would write"):
        assert word in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["counts"]["cache_kv_reuse/refresh"] == 2 and summary["counts"]["sparsify_heads/reuse"] == 2
    assert "refresh.aoti.pt2" in summary["files"] and "dlc_engine.json" in summary["files"]


def test_bad_options_are_named():
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--passes",
                   "chunk_logits,fuse_all"])
    assert res.exit_code != 0 and "fuse_all" in res.output
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--passes", "chunk_logits"])
    assert res.exit_code != 0 and "cache_kv_reuse" in res.output
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--sparse-retention", "1.5"])
    assert res.exit_code != 0 and "--sparse-retention" in res.output
    res = run_cli(["compile", "tiny-llada", "--target", "cpu"])
    assert res.exit_code != 0 and "OUT_DIR" in res.output


def test_dump_graph_after_a_pass():
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--dump-graph-after",
                   "cache_kv_reuse"])
    assert res.exit_code == 0, res.output
    assert "# graph after cache_kv_reuse [reuse]" in res.output and "k_pool" in res.output
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--dump-graph-after",
                   "sparsify_heads"])
    assert res.exit_code != 0 and "not a pass of this build" in res.output


def test_compile_without_weights_gives_the_loader_error(tmp_path):
    res = run_cli(["compile", "llada-8b", "--target", "rtx4090", "-o", tmp_path / "e"])
    assert res.exit_code != 0
    assert "GSAI-ML/LLaDA-8B-Instruct" in res.output and "--weights" in res.output


@pytest.mark.slow
def test_llada_8b_dry_run_on_rtx4090():
    """The real 8B architecture on the meta device: no weights, the plan and rewrite counts of 32 layers."""
    res = run_cli(["compile", "llada-8b", "--target", "rtx4090", "--dry-run", "--max-seq-len", "1024",
                   "--json"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "weights      14.93 GiB" in out and "rtx4090" in out
    summary = json.loads(out.strip().splitlines()[-1])
    plan = summary["plan"]
    assert plan["fits"] and plan["max_batch_size"] >= 4 and plan["max_seq_len"] == 1024
    assert summary["counts"]["cache_kv_reuse/refresh"] == 32          # one per layer
    assert summary["counts"]["cache_kv_reuse/reuse"] >= 32            # + re-derived sequence sizes
    assert "must be built on a sm_89 GPU" in out


@pytest.mark.parametrize("target", sorted(t for t in TARGETS if t != "cpu"))
def test_llada2_plans_at_every_target(target):
    """LLaDA2.0-mini (16.3B, 30.3 GiB in bf16) and -flash (102.9B, 191.7 GiB): the plan counts every expert's
    weights, says when one GPU cannot hold them and the smallest tensor + expert parallel degree that can."""
    t = get_target(target)
    for name in ("llada2-mini", "llada2-flash"):
        c = preset_config(name)
        p = plan_build(c, t, "bf16", None, 4096, 32)
        assert p.weights == c.num_parameters() * 2 and "experts" in p.moe_note
        budget = t.memory_bytes * t.utilisation
        if p.weights < budget:
            assert p.parallel == 1 and p.parallel_note == ""
            continue
        assert not p.fits
        if p.parallel == 0:                                   # flash on 24 GiB cards: 24 GiB / GPU even at 8
            assert p.weights / 8 > budget and "more than one node" in p.parallel_note
            continue
        assert p.parallel in (2, 4, 8) and p.weights / p.parallel < budget
        assert f"{p.parallel} x {target}" in p.reason and f"expert parallel {p.parallel}" in p.reason
    mini = plan_build(preset_config("llada2-mini"), get_target("rtx4090"), "bf16", None, 4096, 32)
    flash = plan_build(preset_config("llada2-flash"), get_target("h100"), "bf16", None, 4096, 32)
    # 15.1 GiB / GPU on 2 x 24 GiB; 47.9 GiB on 4 x 80 GiB
    assert (mini.parallel, flash.parallel) == (2, 4)
    assert plan_build(preset_config("llada2-mini"), get_target("h100"), "bf16", None, 4096, 32).fits


def test_llada2_dry_run_cli():
    """rtx4090: refused at the plan (before tracing). The h100 dry run traces the 16B MoE (passes, files):
    tests/compiler/test_block_engines.py (slow)."""
    small = run_cli(["compile", "llada2-mini", "--target", "rtx4090", "--dry-run"])
    assert small.exit_code != 0 and "needs 2 x rtx4090" in small.output and \
        "expert parallel 2" in small.output and "Traceback" not in small.output


def test_stacked_moe_programs_plan_every_experts_transients():
    """A ``stacked`` MoE program (ONNX / TensorRT, GPUs without the device grouped GEMM) holds every
    expert's hidden for every token (E / k times the routed MLP transients: 32x for LLaDA2's top 8 of 256), so
    its plan supports fewer tokens than the grouped-GEMM (``fused``) programs' and the runtime's."""
    from dlc.compiler.plan import act_bytes_per_token
    c, h200 = preset_config("llada2-mini"), get_target("h200")
    fused = plan_build(c, h200, "bf16", None, 4096, 32, moe_impl="fused")
    stacked = plan_build(c, h200, "bf16", None, 4096, 32, moe_impl="stacked")
    assert fused.max_tokens == plan_build(c, h200, "bf16", None, 4096, 32).max_tokens
    assert c.ffn_hidden(every_expert=True) == c.expert_hidden * (c.n_experts + c.n_shared_experts)
    assert c.ffn_hidden() == max(c.mlp_hidden, c.expert_hidden * (c.n_experts_per_tok + c.n_shared_experts))
    assert act_bytes_per_token(c, 2, "stacked") - act_bytes_per_token(c, 2, "fused") == \
        3 * 2 * (c.ffn_hidden(every_expert=True) - c.ffn_hidden())       # gate, up, act in bf16
    assert stacked.max_tokens < fused.max_tokens / 4
    assert stacked.max_batch_size < fused.max_batch_size
