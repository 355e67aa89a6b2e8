"""The dry-run planner's tensor / expert parallel layouts: per-GPU memory checked against a hand computation
from the presets' shapes; `dlc compile --tensor-parallel-size`; `dlc models --target`."""
import json

import pytest

from compiler_helpers import run_cli
from dlc.compiler.plan import plan_build, weights_per_gpu
from dlc.models.presets import preset_config
from dlc.targets import get_target

GIB = 1 << 30
BF16 = 2


def flash_per_gpu_by_hand(n: int) -> dict:
    """LLaDA2.0-flash (32 layers of 4096, 32 heads, 4 KV heads of 128, first layer dense 9216, 256 experts of
    1024 top-8 + 1 shared, vocab 157184, untied) on n GPUs, TP n for attention / MLPs / shared expert / LM
    head, EP n for the routed experts; bytes per GPU in bf16."""
    d, L, H, K, hd, moe_layers = 4096, 32, 32, 4, 128, 31
    kv_heads = max(1, K // n)                                   # one replicated KV head when K < n
    attn = 2 * d * (H * hd) // n + 2 * d * kv_heads * hd        # q, o split by head; k, v by KV head
    sharded = L * attn + 3 * d * 9216 // n + moe_layers * 3 * d * 1024 // n + (157184 // n) * d
    experts = moe_layers * (256 // n) * 3 * d * 1024
    replicated = L * (2 * hd + 2 * d) + d + 157184 * d + moe_layers * d * 256    # norms, embedding, routers
    return {"sharded": sharded * BF16, "experts": experts * BF16, "replicated": replicated * BF16,
            "kv_per_token": 2 * L * kv_heads * hd * BF16}


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_flash_layouts_per_gpu_match_the_hand_computation(n):
    c = preset_config("llada2-flash")
    want = flash_per_gpu_by_hand(n)
    assert weights_per_gpu(c, n, BF16) == (want["sharded"], want["experts"], want["replicated"])
    p = plan_build(c, get_target("h100"), "bf16", None, 4096, 32)
    lay = next(x for x in p.layouts if x["gpus"] == n)
    assert lay["name"] == ("TP 1" if n == 1 else f"TP/EP {n}")
    assert lay["weights"] == want["sharded"] + want["experts"] + want["replicated"]
    assert lay["kv_cache"] == want["kv_per_token"] * 4096                  # batch 1 x seq 4096, its KV heads
    assert lay["total"] == lay["weights"] + lay["kv_cache"] + lay["activations"]


def test_flash_on_h100_needs_tp_ep_4():
    c = preset_config("llada2-flash")
    p = plan_build(c, get_target("h100"), "bf16", None, 4096, 32)
    fits = {x["name"]: x["fits"] for x in p.layouts}
    assert fits == {"TP 1": False, "TP/EP 2": False, "TP/EP 4": True, "TP/EP 8": True}
    assert not p.fits and p.parallel == 4 and "layout TP/EP 4 fits" in p.parallel_note
    assert "64 of 256 experts per GPU" in p.parallel_note and "--tensor-parallel-size 4" in p.parallel_note
    budget = 80 * GIB * 0.9
    assert sum(flash_per_gpu_by_hand(1)[k] for k in ("sharded", "experts", "replicated")) > budget
    assert sum(flash_per_gpu_by_hand(4)[k] for k in ("sharded", "experts", "replicated")) < budget
    # planned at TP/EP 4: the numbers are one GPU's and the batch grows into the freed memory
    p4 = plan_build(c, get_target("h100"), "bf16", None, 4096, 32, tensor_parallel=4)
    want = flash_per_gpu_by_hand(4)
    assert p4.fits and p4.tensor_parallel == 4 and p4.weights == want["sharded"] + want["experts"] + \
        want["replicated"]
    assert p4.kv_cache == want["kv_per_token"] * p4.max_batch_size * 4096 and p4.max_batch_size > 1
    assert p4.weights + p4.kv_cache + p4.activations <= p4.memory_budget


def test_dense_tp_and_bad_splits():
    llada = preset_config("llada-8b")
    assert sum(weights_per_gpu(llada, 1, BF16)) == llada.num_parameters() * BF16
    d, L, V = 4096, 32, 126464                                      # TP 2: everything but embedding and norms
    by_hand = (L * (4 * d * d + 3 * d * 12288) // 2 + V // 2 * d) * BF16
    assert weights_per_gpu(llada, 2, BF16)[0] == by_hand
    assert weights_per_gpu(llada, 2, BF16)[1] == 0
    dream = plan_build(preset_config("dream-7b"), get_target("h100"), "bf16", None, 4096, 32)
    eight = next(x for x in dream.layouts if x["gpus"] == 8)
    assert eight["invalid"] == "28 attention heads do not split over 8"
    with pytest.raises(ValueError, match="--tensor-parallel-size 3: 32 attention heads do not split over 3"):
        plan_build(llada, get_target("h100"), "bf16", None, 4096, 32, tensor_parallel=3)


def test_flash_dry_run_says_the_layout():
    one = run_cli(["compile", "llada2-flash", "--target", "h100", "--dry-run", "--max-seq-len", "4096"])
    assert one.exit_code != 0 and "Traceback" not in one.output
    lines = one.output.splitlines()
    assert any("TP 1" in x and "does not fit 72.00 GiB" in x for x in lines)
    assert any("TP/EP 4" in x and ": fits 72.00 GiB" in x for x in lines)
    assert "needs 4 x h100" in one.output and "--tensor-parallel-size 4" in one.output
    four = run_cli(["compile", "llada2-flash", "--target", "h100", "--dry-run", "--max-seq-len", "4096",
                    "--tensor-parallel-size", "4", "--json"])
    assert four.exit_code == 0, four.output
    assert "plan for llada2-flash on 4 x h100" in four.output and "per GPU, TP/EP 4" in four.output
    plan = json.loads(four.output.strip().splitlines()[-1])["plan"]
    assert plan["fits"] and plan["tensor_parallel"] == 4


def test_compile_tensor_parallel_refuses_in_one_line(tmp_path):
    out = tmp_path / "engine"
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "-o", out, "--tensor-parallel-size", "2"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    msg = [x for x in res.output.splitlines() if x.strip()]
    assert len(msg) == 1 and msg[0].startswith("Error: --tensor-parallel-size 2")
    assert "later step" in msg[0] and "dlc serve tiny-llada --tensor-parallel-size 2" in msg[0]
    assert "dlc generate tiny-llada PROMPT --tensor-parallel-size 2" in msg[0]
    assert not out.exists()
    assert run_cli(["compile", "tiny-llada", "--target", "cpu", "--tp", "0", "--dry-run"]).exit_code != 0


def test_models_lists_layouts_for_a_target():
    res = run_cli(["models", "--target", "h100", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert (rows["llada2-flash"]["layout"], rows["llada2-flash"]["gpus"]) == ("TP/EP 4", 4)
    assert (rows["llada-8b"]["layout"], rows["llada-8b"]["gpus"]) == ("TP 1", 1)
    assert rows["llada2-flash"]["gib_per_gpu"] < 72
    text = run_cli(["models", "--target", "h100"]).output
    assert "TP/EP 4" in text and "layout on h100" in text
    bad = run_cli(["models", "--target", "tpu"])
    assert bad.exit_code != 0 and "unknown target 'tpu'" in bad.output
