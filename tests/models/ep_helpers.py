"""The rank side of the expert-parallel tests: run by torch.multiprocessing.spawn in 2 gloo processes.

Every rank builds the same seeded tiny models, shards their MoE blocks (dlc.models.expert_parallel) and
records what it sees as JSON (``rank{r}.json`` in the work directory); the tests assert on both ranks'
records."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

WORLD = 2
PROMPTS = [[72, 101, 108, 108, 111, 33], [49, 43, 50, 61], [84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116]]
# (name, GenerationConfig fields): greedy with and without KV caches, and seeded sampling.
GEN_CASES = [("greedy", dict(kv_cache="none")), ("greedy_dual", dict(kv_cache="dual")),
             ("greedy_prefix", dict(kv_cache="prefix")), ("sampled", dict(temperature=0.8, seed=3))]


def _tiny(name: str, **overrides):
    from dlc.models import build_model
    from dlc.models.config import ModelConfig
    from dlc.models.loading import TINY_INIT_STD, init_weights
    from dlc.models.presets import PRESETS

    cfg = ModelConfig(**{**PRESETS[name]["config"], **overrides})
    torch.manual_seed(0)
    m = build_model(cfg)
    init_weights(m, 0, TINY_INIT_STD)
    with torch.no_grad():        # LLaDA2's expert bias is a buffer (zeros at init): make it matter
        for mod in m.modules():
            if hasattr(mod, "expert_bias"):
                mod.expert_bias.copy_(0.1 * torch.randn(mod.expert_bias.shape,
                                                            generator=torch.Generator().manual_seed(1)))
    return m.float().eval()


def _moe_block(model):
    from dlc.models.expert_parallel import MOE_BLOCKS
    return next(m for m in model.modules() if isinstance(m, MOE_BLOCKS))


def layer_case(name: str, rank: int, impl: str = "stacked", **overrides) -> dict:
    """One MoE block, unsharded vs this rank's shard: max |diff| with and without the all-reduce."""
    from dlc.models.expert_parallel import shard_moe_layer

    block = _moe_block(_tiny(name, **overrides))
    block.impl = impl
    d = block.gate.weight.shape[1]
    x = torch.randn(2, 7, d, generator=torch.Generator().manual_seed(2))                 # [B, T, d]
    with torch.no_grad():
        ref = block(x)                                                    # [B, T, d]
        shard = shard_moe_layer(block, rank, WORLD, None)
        out = shard(x)
        shard.combine = lambda y: y                                       # the feature broken: no all-reduce
        partial = shard(x)
        w, idx = shard._router.route_tokens(x.reshape(-1, x.shape[-1]))
    local = ((idx >= shard.lo) & (idx < shard.hi)).sum().item()
    return {"err": (out - ref).abs().max().item(), "err_no_reduce": (partial - ref).abs().max().item(),
            "ref_scale": ref.abs().max().item(), "routed_here": local, "routed_all": idx.numel(),
            "experts": sorted(int(k) for k in shard.experts), "shared_tp": shard.shared_tp,
            "has_shared": hasattr(shard, "shared_experts")}


def _generate(model, case: dict) -> list[list[int]]:
    from dlc.runtime.generate import GenerationConfig, generate
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, **case)
    return generate(model, PROMPTS, cfg).token_ids


def _full_and_shard(work: Path, preset: str, rank: int, shard_bytes: int):
    """Rank 0 writes the tiny preset as a multi-file checkpoint; every rank loads it whole and as its
    shard."""
    from dlc.models.expert_parallel import load_expert_parallel
    from dlc.models.loading import load_model, save_checkpoint

    ckpt = work / preset
    if rank == 0:
        save_checkpoint(_tiny(preset), ckpt, max_shard_bytes=shard_bytes)
    dist.barrier()
    full = load_model(str(ckpt), dtype="fp32", progress=False).model
    ep = load_expert_parallel(str(ckpt), rank, WORLD, None, dtype="fp32", progress=False).model
    return full, ep


def model_case(work: Path, rank: int) -> dict:
    """A whole tiny LLaDA-MoE checkpoint (several safetensors files) loaded whole and as this rank's shard."""
    full, ep = _full_and_shard(work, "tiny-llada-moe", rank, 200_000)
    names = set(ep.state_dict())
    out = {"expert_names": sorted(n for n in names if ".experts." in n),
           "n_params_full": sum(p.numel() for p in full.parameters()),
           "n_params_ep": sum(p.numel() for p in ep.parameters())}
    for case, fields in GEN_CASES:
        out[f"{case}_full"] = _generate(full, fields)
        out[f"{case}_ep"] = _generate(ep, fields)
    for mod in ep.modules():                                              # the feature broken: no all-reduce
        if hasattr(mod, "combine"):
            mod.combine = lambda y: y
    out["greedy_no_reduce"] = _generate(ep, dict(GEN_CASES[0][1]))
    out.update(llada2_model_case(work, rank))
    return out


BLOCK_CASES = [("bd_greedy", dict(kv_cache="block", threshold=0.95)),
               ("bd_sampled", dict(kv_cache="block", temperature=0.7, seed=5))]


def llada2_model_case(work: Path, rank: int) -> dict:
    """A tiny LLaDA2 checkpoint (dense first layer, shared expert sliced on load): hidden states and block
    decoding (the exact block cache) unsharded vs this rank's shard."""
    full, ep = _full_and_shard(work, "tiny-llada2", rank, 100_000)
    ids = torch.tensor([PROMPTS[2][:8]])
    with torch.no_grad():
        ref, got = full(ids), ep(ids)                                     # [1, 8, d]
    out = {"bd_hidden_err": (got - ref).abs().max().item(), "bd_hidden_scale": ref.abs().max().item()}
    for case, fields in BLOCK_CASES:
        out[f"{case}_full"] = _generate(full, fields)
        out[f"{case}_ep"] = _generate(ep, fields)
    return out


LAYER_CASES = {
    "llada_moe": ("tiny-llada-moe", "stacked", {}),
    "llada_moe_grouped": ("tiny-llada-moe", "grouped", {}),
    "llada_moe_dense": ("tiny-llada-moe", "dense", {}),
    "llada_moe_fused": ("tiny-llada-moe", "fused", {}),
    "llada2_fused": ("tiny-llada2", "fused", {}),
    "llada2": ("tiny-llada2", "stacked", {}),
    "llada2_shared_replicated": ("tiny-llada2", "stacked", {"expert_hidden": 33}),
    "sdar_moe": ("tiny-sdar", "stacked", dict(n_experts=8, n_experts_per_tok=2, expert_hidden=32,
                                             norm_topk_prob=True)),
}


def run_rank(rank: int, work: str, what: str) -> None:
    work = Path(work)
    dist.init_process_group("gloo", init_method=f"file://{work / 'init'}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        if what == "layers":
            rec = {k: layer_case(name, rank, impl, **kw) for k, (name, impl, kw) in LAYER_CASES.items()}
        else:
            rec = model_case(work, rank)
        (work / f"rank{rank}.json").write_text(json.dumps(rec))
    finally:
        dist.destroy_process_group()


def run_all(work: Path, what: str) -> list[dict]:
    """Spawn the 2 ranks on ``what`` ("layers" or "model"); returns each rank's record."""
    import torch.multiprocessing as mp
    mp.spawn(run_rank, args=(str(work), what), nprocs=WORLD, join=True)
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(WORLD)]
