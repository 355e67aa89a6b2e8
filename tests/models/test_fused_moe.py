"""The fused MoE (``dlc.models.llada_moe.moe_fused``: tokens sorted by expert on the device, two
``torch._grouped_mm`` over the packed experts) against the per-expert ``dense`` loop, on tiny LLaDA-MoE and
LLaDA2 checkpoints written in the released HF layout and loaded by the real loader; its packed weights are the
named parameters (one copy); generation with it gives dense's tokens (``generate`` and the serving Engine).
The GPU test runs it in bf16 on the device and replays it inside a CUDA graph."""
import pytest
import torch
from hf_layouts import HF_CONFIGS, HF_NAMES, random_tensors, write_checkpoint

from dlc.models import build_model
from dlc.models.llada_moe import Experts, _packed, expert_offsets, grouped_mm_fits, pack_model_experts
from dlc.models.loading import load_model, load_weights
from dlc.models.presets import preset_config

TOL = dict(rtol=1e-5, atol=1e-5)      # fp32: the same products, summed in another order (per-expert GEMMs)
BF16_TOL = 3e-2                        # bf16 fused vs an fp32 dense reference, relative to the output's scale
FAMILIES = ["llada_moe", "llada2_moe"]


def _moe_blocks(model):
    return [m for m in model.modules() if hasattr(m, "route_tokens") and hasattr(m, "experts")]


@pytest.fixture(scope="module", params=FAMILIES)
def ckpt(request, tmp_path_factory):
    family = request.param
    t = random_tensors(HF_NAMES[family](HF_CONFIGS[family]), seed=7)
    path = write_checkpoint(tmp_path_factory.mktemp(f"fused-{family}"), HF_CONFIGS[family], t)
    return family, path, t


def _load(path):
    return load_model(str(path), dtype="float32", progress=False).model


def _block_out(block, impl, x):
    block.impl = impl
    try:
        with torch.no_grad():
            return block(x)
    finally:
        del block.impl                                                    # back to the class default


@pytest.mark.parametrize("n_tok", [2, 40])
def test_fused_block_equals_dense(ckpt, n_tok):
    family, path, _ = ckpt
    model = _load(path)
    block = _moe_blocks(model)[0]
    E = len(block.experts)
    d = HF_CONFIGS[family]["hidden_size"]
    x = 2 * torch.randn(1, n_tok, d, generator=torch.Generator().manual_seed(n_tok))     # [1, N, d]
    counts = torch.bincount(block.route_tokens(x[0])[1].flatten(), minlength=E)          # tokens per expert
    assert (counts > 0).sum() >= 2                                     # routing spreads over experts
    if n_tok == 2:
        assert (counts == 0).any()                                     # some experts get no rows at all
    else:
        assert (counts > 0).sum() >= E - 2
    assert grouped_mm_fits(x[0], _packed(block.experts)[1])           # the grouped-GEMM path, no fallback
    ref = _block_out(block, "dense", x)
    out = _block_out(block, "fused", x)
    torch.testing.assert_close(out, ref, **TOL)
    assert ref.abs().max() > 0.1                                       # a decisive comparison


def test_expert_offsets_group_rows_by_expert():
    """The counting sort gives the stable sort's grouping, its inverse and the ends."""
    idx = torch.tensor([[3, 0], [3, 1], [0, 5], [1, 3]])                 # [N=4, k=2], experts 2 and 4 empty
    order, dest, offs = expert_offsets(idx, 6)
    assert offs.dtype == torch.int32
    assert offs.tolist() == torch.bincount(idx.flatten(), minlength=6).cumsum(0).tolist()
    assert offs.tolist() == [2, 4, 4, 7, 7, 8]
    flat = idx.flatten()
    assert flat[order].tolist() == sorted(flat.tolist())
    assert order.tolist() == [1, 4, 3, 6, 0, 2, 7, 5]                  # stable: token order inside an expert
    assert dest[order].tolist() == list(range(8))                     # the inverse permutation
    twice = torch.tensor([[2, 2], [2, 0]])                               # an expert twice in one token
    order, dest, offs = expert_offsets(twice, 3)
    assert order.tolist() == [3, 0, 1, 2] and offs.tolist() == [1, 1, 4]
    assert dest[order].tolist() == list(range(4))
    big = torch.randint(0, 64, (300, 8), generator=torch.Generator().manual_seed(0))
    order, dest, offs = expert_offsets(big, 64)
    ref_ids, ref_order = big.flatten().sort(stable=True)
    assert order.tolist() == ref_order.tolist()
    assert dest[order].tolist() == list(range(2400))
    assert offs.tolist() == torch.bincount(big.flatten(), minlength=64).cumsum(0).tolist()


def test_fused_falls_back_where_grouped_mm_does_not_fit():
    """Hidden 33 (fp32 rows not a multiple of 16 bytes): torch._grouped_mm refuses the strides, so fused runs
    the per-expert loop and still gives dense's output."""
    cfg = preset_config("tiny-llada-moe")
    cfg.expert_hidden = 33
    torch.manual_seed(0)
    block = _moe_blocks(build_model(cfg).eval())[0]
    x = torch.randn(2, 5, cfg.d_model)
    assert not grouped_mm_fits(x[0], _packed(block.experts)[1])
    torch.testing.assert_close(_block_out(block, "fused", x), _block_out(block, "dense", x), **TOL)


def _storages(module):
    return {p.untyped_storage().data_ptr() for p in module.parameters()}


def test_packed_weights_are_the_named_parameters(ckpt, tmp_path):
    """After loading, the first forward packs each layer's experts into w_gu [E, 2H, d] / w_down [E, H, d]
    and re-points the checkpoint-named parameters into them: two storages per layer, the checkpoint's values
    under the checkpoint's names, the packed tensors held in the experts list's own declared field
    (``Experts.packed``; nothing else added to it). Loading another checkpoint into the packed model replaces
    the parameters; the next forward packs those (the new weights' output, one copy again)."""
    family, path, t = ckpt
    model = _load(path)
    model.set_moe_impl("fused")
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for block in _moe_blocks(model):
        w_gu, w_down = _packed(block.experts)
        assert _storages(block.experts) == {w_gu.untyped_storage().data_ptr(),
                                            w_down.untyped_storage().data_ptr()}
        held = sum(s.nbytes() for s in {id(p.untyped_storage()): p.untyped_storage()
                                        for p in block.experts.parameters()}.values())
        assert held == sum(p.numel() * p.element_size() for p in block.experts.parameters())   # one copy
        assert isinstance(block.experts, Experts) and block.experts.packed[1][0] is w_gu
        assert set(vars(block.experts)) - set(vars(torch.nn.ModuleList())) == {"packed"}
        H = w_down.shape[1]
        assert torch.equal(block.experts[2].gate_proj.weight, w_gu[2, :H])
        assert torch.equal(block.experts[2].down_proj.weight, w_down[2].t())
    sd = model.state_dict()
    assert set(sd) == set(t) and all(torch.equal(sd[k], t[k]) for k in t)

    t2 = random_tensors(HF_NAMES[family](HF_CONFIGS[family]), seed=8)
    path2 = write_checkpoint(tmp_path / "other", HF_CONFIGS[family], t2)
    load_weights(model, path2, torch.float32, progress=False)
    fresh = _load(path2)
    fresh.set_moe_impl("dense")
    with torch.no_grad():
        out, ref = model(ids), fresh(ids)
    torch.testing.assert_close(out, ref, **TOL)
    for block in _moe_blocks(model):
        w_gu, _ = _packed(block.experts)
        assert block.experts[0].up_proj.weight.data_ptr() == w_gu[0, w_gu.shape[1] // 2].data_ptr()
        assert len(_storages(block.experts)) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_traces_with_torch_export(dtype):
    """bf16: torch.export keeps the grouped GEMMs (sort, searchsorted, _grouped_mm: no data-dependent op);
    fp32 (refused by _grouped_mm's meta kernel): the traced program takes the static ``stacked`` path."""
    model = load_model("tiny-llada-moe", seed=2).model.to(dtype)
    model.set_moe_impl("fused")
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    T = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(model, (ids,), dynamic_shapes=({1: T},), strict=False)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not ops & {"aten.nonzero.default", "aten.item.default", "aten._local_scalar_dense.default",
                      "aten._assert_scalar.default"}                   # no guard on the token count
    assert [(r.lower, r.upper) for r in ep.range_constraints.values()] == [(2, 4096)]
    assert ("aten._grouped_mm.default" in ops) == (dtype == torch.bfloat16)
    ids = torch.randint(0, 256, (2, 700), generator=torch.Generator().manual_seed(4))   # another T
    with torch.no_grad():
        out, ref = ep.module()(ids), model(ids)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else TOL
    torch.testing.assert_close(out.float(), ref.float(), **tol)


# --- generation ---------------------------------------------------------------------------------------------

PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17], [60, 61, 62]]
GEN = {"tiny-llada-moe": dict(gen_length=16, block_length=8, steps=8, kv_cache="dual"),
       "tiny-llada2": dict(gen_length=16, block_length=8, steps_per_block=4, kv_cache="block",
                           decoder="llada2", threshold=0.5)}


@pytest.mark.parametrize("preset", sorted(GEN))
def test_generation_with_fused_gives_dense_tokens(preset):
    from dlc.runtime.generate import GenerationConfig, generate
    model = load_model(preset, seed=4).model
    cfg = GenerationConfig(**GEN[preset])
    out = {}
    for impl in ("dense", "fused"):
        model.set_moe_impl(impl)
        out[impl] = generate(model, PROMPTS, cfg).token_ids
    assert out["fused"] == out["dense"]
    assert len({tuple(t) for t in out["dense"]}) == len(PROMPTS)       # a decisive model: outputs vary


def test_graph_runner_steps_with_fused_give_dense_tokens():
    """The graph runner's static-shape Reuse steps (run without capture on the CPU) over the fused MoE."""
    from dlc.runtime.generate import GenerationConfig, generate
    from dlc.runtime.runners.graph import GraphRunner
    model = load_model("tiny-llada-moe", seed=4).model
    cfg = GenerationConfig(**GEN["tiny-llada-moe"])
    model.set_moe_impl("dense")
    ref = generate(model, PROMPTS, cfg).token_ids
    model.set_moe_impl("fused")
    runner = GraphRunner(model, decode="exact", capture=False)
    assert generate(runner, PROMPTS, cfg).token_ids == ref
    assert runner.stats["replays"] > 0


def test_engine_with_fused_gives_dense_tokens():
    """Requests batched by the serving Engine (Refresh and Reuse of several rows per forward) over the fused
    MoE decode what each decodes alone over the dense one."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.generate import GenerationConfig, generate
    from dlc.runtime.session import open_model
    sess = open_model("tiny-llada2", device="cpu", progress=False)
    model = sess.runner.model
    params = {k: v for k, v in GEN["tiny-llada2"].items()}
    model.set_moe_impl("dense")
    solo = [generate(model, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0] for p in PROMPTS]
    model.set_moe_impl("fused")
    eng = Engine(sess, ServeConfig(max_seq_len=64, kv_cache_mb=16, max_batch_size=8))
    reqs = [eng.make_request(p, params) for p in PROMPTS]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.output_ids for r in reqs] == solo
    assert len({tuple(t) for t in solo}) == len(PROMPTS)


def _compiled_ops(block, x):
    """(output, names of the ops Dynamo traced) of ``torch.compile(block, fullgraph=True)`` on x."""
    ops = []

    def backend(gm, example):
        ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm
    with torch.no_grad():
        return torch.compile(block, fullgraph=True, backend=backend)(x), ops


def _compiled_reads_packs_and_equals_eager(block, x, **tol):
    """The compiled block (compiled first: an eager forward would pack on its own): no stack / cat of the
    weights, its two grouped GEMMs, eager's output."""
    torch._dynamo.reset()
    out, ops = _compiled_ops(block, x)
    with torch.no_grad():
        ref = block(x)
    assert not [o for o in ops if "stack" in o or "cat" in o]
    assert sum("_grouped_mm" in o for o in ops) == 2
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("family", ["llada_moe", "llada2_moe"])
def test_compiled_blocks_read_the_packed_experts_without_copying(family):
    """torch.compile (the graph runner's compiled blocks) of a MoE block takes the experts' packed tensors as
    they are (module state, no stack or cat of the weights each forward) once ``pack_model_experts`` has
    packed them, and computes eager's output; unpacked (nothing to read yet) it stacks, as before."""
    model = load_model({"llada_moe": "tiny-llada-moe", "llada2_moe": "tiny-llada2"}[family], seed=2,
                       dtype=torch.bfloat16).model
    block = _moe_blocks(model)[0]
    block.impl = "fused"
    x = torch.randn(2, 7, model.config.d_model, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    torch._dynamo.reset()
    _, unpacked = _compiled_ops(block, x)
    assert any("stack" in o for o in unpacked)
    pack_model_experts(model)
    _compiled_reads_packs_and_equals_eager(block, x, rtol=0, atol=0)


def test_compiled_expert_parallel_shard_reads_its_packed_local_experts():
    """An expert-parallel shard (rank 0 of 2) holds its experts' compute view outside the module tree; the
    graph runner's packing reaches it, so its compiled block reads the packs too."""
    from dlc.models.expert_parallel import shard_moe_layer
    model = load_model("tiny-llada-moe", seed=2, dtype=torch.bfloat16).model
    shard = shard_moe_layer(_moe_blocks(model)[0], 0, 2, None)
    shard.impl = "fused"
    shard.combine = lambda y: y                       # one process: this rank's share, no all-reduce
    x = torch.randn(2, 7, model.config.d_model, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    pack_model_experts(shard)
    _compiled_reads_packs_and_equals_eager(shard, x, rtol=0, atol=0)


# --- GPU ----------------------------------------------------------------------------------------------------

def _gpu_block():
    """A LLaDA2-shaped MoE block (group-limited sigmoid routing, 64 experts of 256, top 8) on the GPU."""
    cfg = preset_config("tiny-llada2")
    cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers = 512, 4, 2, 2
    cfg.n_experts, cfg.n_experts_per_tok, cfg.expert_hidden = 64, 8, 256
    torch.manual_seed(0)
    model = build_model(cfg)
    return _moe_blocks(model)[0].to("cuda").eval().requires_grad_(False), cfg


@pytest.mark.gpu
def test_fused_bf16_on_gpu_matches_dense_and_replays_in_a_cuda_graph():
    import copy
    block, cfg = _gpu_block()
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch._grouped_mm's bf16 kernel needs sm90 / sm100")
    block = block.to(torch.bfloat16)
    xb = torch.randn(4, 32, cfg.d_model, device="cuda").to(torch.bfloat16)            # [B, T, d]
    # fp32 reference on the same (bf16-valued) weights and input: the fp32 router picks the same experts
    ref = _block_out(copy.deepcopy(block).float(), "dense", xb.float())
    assert grouped_mm_fits(xb[0], _packed(block.experts)[1])
    _block_out(block, "fused", xb)                                        # packs the experts (once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")                               # a host sync would raise here
    try:
        out = _block_out(block, "fused", xb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out.float() - ref).abs().max() <= BF16_TOL * ref.abs().max()
    # capture one fused forward, then replay it on new inputs: same as running them eagerly
    block.impl = "fused"
    static_x = xb.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        block(static_x)                                                    # warm-up (packs, cuBLAS handles)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = block(static_x)
    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x2 = torch.randn(xb.shape, device="cuda", generator=g).to(torch.bfloat16)
        static_x.copy_(x2)
        graph.replay()
        with torch.no_grad():
            eager = block(x2)
        torch.testing.assert_close(static_out, eager, rtol=1e-2, atol=1e-2)
        assert not torch.allclose(static_out, out, rtol=1e-2, atol=1e-2)   # the replay used the new input
    del block.impl


@pytest.mark.gpu
def test_compiled_block_on_gpu_runs_the_grouped_gemm_on_the_packed_experts():
    """On sm90 / sm100 in bf16 the default forward (``auto``) inside torch.compile is the grouped GEMM over
    the packed experts (no stack of the weights), as in eager mode, and equals eager."""
    block, cfg = _gpu_block()
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("torch._grouped_mm's bf16 kernel needs sm90 / sm100")
    block = block.to(torch.bfloat16)
    pack_model_experts(block)
    xb = torch.randn(4, 32, cfg.d_model, device="cuda").to(torch.bfloat16)
    _compiled_reads_packs_and_equals_eager(block, xb, rtol=1e-2, atol=1e-2)
