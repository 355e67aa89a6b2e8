"""Expert parallelism (dlc.models.expert_parallel) on CPU: 2 gloo processes, each holding half the experts.

The sharded MoE block must give the unsharded block's output (fp32) for LLaDA-MoE (every MoE implementation),
LLaDA2 (group-limited sigmoid routing with expert bias and routed scaling; shared expert tensor parallel, and
replicated when its hidden does not divide) and SDAR-MoE; whole tiny LLaDA-MoE and LLaDA2 checkpoints loaded
shard by shard must decode the same tokens as the unsharded models. Each case also runs with the all-reduce
removed, which must break it (so the comparison is decisive)."""
import pytest
import torch

from ep_helpers import BLOCK_CASES, GEN_CASES, LAYER_CASES, PROMPTS, WORLD, run_all
from dlc.models.expert_parallel import expert_range, shard_moe_layer
from dlc.models.presets import preset_config

ATOL = 1e-5          # fp32: the sharded sum adds the same products in another order (and over two ranks)


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("ep_layers"), "layers")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return run_all(tmp_path_factory.mktemp("ep_model"), "model")


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_sharded_moe_layer_equals_the_unsharded_layer(layers, case):
    recs = [r[case] for r in layers]
    assert [r["experts"] for r in recs] == [[0, 1, 2, 3], [4, 5, 6, 7]]       # 8 experts over 2 ranks
    assert all(0 < r["routed_here"] < r["routed_all"] for r in recs)           # both ranks' experts are used
    for r in recs:
        assert r["err"] <= ATOL * max(1.0, r["ref_scale"]), (case, r)
        assert r["err_no_reduce"] > 0.1 * r["ref_scale"], (case, r)           # without the all-reduce: wrong


def test_llada2_shared_expert_layouts(layers):
    assert all(r["llada2"]["has_shared"] and r["llada2"]["shared_tp"] for r in layers)
    assert all(r["llada2_shared_replicated"]["has_shared"] for r in layers)
    assert not any(r["llada2_shared_replicated"]["shared_tp"] for r in layers)   # hidden 33: replicated


@pytest.mark.slow
def test_expert_parallel_model_decodes_the_same_tokens(whole):
    r0, r1 = whole
    assert r0["expert_names"] and not set(r0["expert_names"]) & set(r1["expert_names"])
    assert all(".experts.0." not in n for n in r1["expert_names"])             # rank 1 never read expert 0
    assert r0["n_params_ep"] < r0["n_params_full"]
    for case, _ in GEN_CASES:
        full = r0[f"{case}_full"]
        assert len({tuple(t) for t in full}) == len(full), case               # outputs vary with the prompt
        for r in whole:
            assert r[f"{case}_ep"] == full, case
    assert r0["greedy_no_reduce"] != r0["greedy_full"]                        # the all-reduce matters
    for r in whole:                                                           # LLaDA2: shared expert sliced
        assert r["bd_hidden_err"] <= ATOL * max(1.0, r["bd_hidden_scale"])
        for case, _ in BLOCK_CASES:
            assert len({tuple(t) for t in r0[f"{case}_full"]}) == len(PROMPTS), case
            assert r[f"{case}_ep"] == r0[f"{case}_full"], case


def test_bad_splits_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="n_experts=8 does not divide by the world size 3"):
        expert_range(8, 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        expert_range(8, 2, WORLD)
    from dlc.models import build_model
    block = build_model(preset_config("tiny-llada")).blocks[0]
    with pytest.raises(ValueError, match=f"{type(block).__name__} is not a MoE block"):
        shard_moe_layer(block, 0, WORLD)


def test_world_one_is_the_unsharded_layer():
    """World 1 holds every expert and runs no collective: the block's output exactly."""
    from ep_helpers import _moe_block, _tiny
    block = _moe_block(_tiny("tiny-llada2"))
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block(x)
        torch.testing.assert_close(shard_moe_layer(block, 0, 1)(x), ref, rtol=0, atol=ATOL)


def test_a_rank_loads_only_its_experts_and_its_shared_expert_slice(tmp_path):
    """Rank 1 of 2 of a tiny LLaDA2 checkpoint (several files): experts 4..7 only, the shared expert's second
    half of the hidden (gate / up rows, down columns), everything else whole; loading needs no collective."""
    from safetensors.torch import load_file

    from ep_helpers import _tiny
    from dlc.models import build_model
    from dlc.models.expert_parallel import load_moe_shard, shard_moe_model, weight_slices
    from dlc.models.loading import read_config, save_checkpoint

    ckpt = save_checkpoint(_tiny("tiny-llada2"), tmp_path / "ckpt", max_shard_bytes=100_000)
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1
    stored = {}
    for f in ckpt.glob("model-*.safetensors"):
        stored.update(load_file(str(f)))
    with torch.device("meta"):
        m = build_model(read_config(ckpt))
        assert shard_moe_model(m, 1, WORLD) == 1                       # layer 0 is dense, layer 1 MoE
    load_moe_shard(m, ckpt, torch.float32, progress=False, rank=1, world=WORLD)
    sd = m.state_dict()
    experts = {n.split(".experts.")[1].split(".")[0] for n in sd if ".experts." in n}
    assert experts == {"4", "5", "6", "7"}
    pre = "model.layers.1.mlp.shared_experts."
    assert weight_slices(m) == {pre + "gate_proj.weight": (0, 16, 32), pre + "up_proj.weight": (0, 16, 32),
                                pre + "down_proj.weight": (1, 16, 32)}
    for name, t in sd.items():
        want = stored[name]
        if name in weight_slices(m):
            dim, a, b = weight_slices(m)[name]
            want = want.narrow(dim, a, b - a)
        assert torch.equal(t, want), name
    assert not any(t.is_meta for t in sd.values())


def test_loading_refuses_a_missing_expert_naming_it(tmp_path):
    from ep_helpers import _tiny
    from dlc.models.expert_parallel import load_expert_parallel
    from dlc.models.loading import CheckpointError, save_checkpoint

    model = _tiny("tiny-llada-moe")
    del model.model.layers[1].mlp.experts[7].up_proj.weight      # rank 1's expert 7: not in the checkpoint
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    assert load_expert_parallel(str(ckpt), 0, WORLD, progress=False).model is not None     # rank 0: not its
    with pytest.raises(CheckpointError, match=r"experts\.7\.up_proj\.weight.*rank 1 of 2"):
        load_expert_parallel(str(ckpt), 1, WORLD, progress=False)


def test_extra_slices_load_a_tensor_parallel_plan_in_the_same_pass(tmp_path):
    """The tensor-parallel plan of other parameters (here the LM head's vocabulary rows of rank 1 of 2) is
    read with get_slice in the same pass as the rank's experts."""
    from ep_helpers import _tiny
    from dlc.models import build_model
    from dlc.models.expert_parallel import load_moe_shard, shard_moe_model
    from dlc.models.loading import read_config, save_checkpoint

    full = _tiny("tiny-llada-moe")
    ckpt = save_checkpoint(full, tmp_path / "ckpt")
    V, d = full.lm_head.weight.shape
    with torch.device("meta"):
        m = build_model(read_config(ckpt))
        shard_moe_model(m, 1, WORLD)
        m.lm_head = torch.nn.Linear(d, V - V // 2, bias=False)
    load_moe_shard(m, ckpt, torch.float32, progress=False, rank=1, world=WORLD,
                   slices={"lm_head.weight": (0, V // 2, V)})
    assert torch.equal(m.lm_head.weight, full.lm_head.weight[V // 2:])
    assert torch.equal(m.model.layers[0].mlp.experts["5"].down_proj.weight,
                       full.model.layers[0].mlp.experts[5].down_proj.weight)
