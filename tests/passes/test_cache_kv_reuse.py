"""cache_kv_reuse: refresh/reuse phase programs from the traced full forward."""
import pytest
import torch

from passes_helpers import kv_phases, tiny, token_state
from dlc.compiler import in_memory_runner
from dlc.passes.graph_utils import SDPA, SYM_SIZE, outputs, placeholders
from dlc.passes.pipeline import count_ops, input_names
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.step import build_batch

ATOL = 1e-5          # fp32: reuse over a cache of the same token state vs the full forward
PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]


def _writes(gm, what):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and what in str(n.target))


def test_graph_structure():
    phases, ctx = kv_phases("tiny-llada")
    c = tiny("tiny-llada").config
    r, u = phases["refresh"], phases["reuse"]
    assert input_names(r) == ["input_ids", "position_ids", "key_mask", "k_pool", "v_pool", "rows"]
    assert input_names(u) == ["q_ids", "q_pos", "key_mask", "q_start", "k_pool", "v_pool", "rows"]
    assert count_ops(r, SDPA) == count_ops(u, SDPA) == c.n_layers
    # in place: one K and one V pool write per layer in each phase, no functional copy of a cache
    assert _writes(u, "index_put_") == _writes(r, "index_put_") == 2 * c.n_layers
    assert _writes(u, "scatter") == _writes(r, "scatter") == 0
    assert len(outputs(r)) == len(outputs(u)) == 1                  # hidden only: K/V are in the pool
    km = placeholders(u)["key_mask"]
    assert not any(n.target == SYM_SIZE and n.args[0] is km for n in u.graph.nodes)   # T comes from q_ids
    assert ctx.counts[("cache_kv_reuse", "refresh")] == c.n_layers
    f, _ = kv_phases("tiny-llada", inplace=False)                     # ONNX / TensorRT: K/V returned
    assert _writes(f["reuse"], "index_put_") == 0 and _writes(f["reuse"], "scatter") == 2 * c.n_layers
    assert len(outputs(f["refresh"])) == len(outputs(f["reuse"])) == 3


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("layout", ["prefix", "dual", "dual-per-row"])
def test_reuse_equals_full_forward_rows(family, layout, inplace):
    """Refresh fills pool rows 4, 0, 2 (of a 5-slot pool); the fed columns are then made stale; Reuse over
    the pool equals the full forward on the fed rows and leaves the fresh K/V in the pool (in place) or
    returns them (functional)."""
    m = tiny(family)
    c = m.config
    phases, _ = kv_phases(family, inplace)
    ids, pos, km = token_state(c)
    B, L = ids.shape
    rows = torch.tensor([4, 0, 2])
    shape = (c.n_layers, 5, c.n_kv_heads, L, c.head_dim)
    kp, vp = torch.zeros(shape), torch.zeros(shape)
    with torch.no_grad():
        full = m(ids, pos, km)                                                 # [B, L, d]
        res = phases["refresh"](ids, pos, km, *((kp, vp, rows) if inplace else ()))
        h = res[0]
        if not inplace:
            kp[:, rows], vp[:, rows] = res[1], res[2]
        assert torch.allclose(h, full, atol=ATOL)
        assert not kp[:, [1, 3]].any() and kp[:, rows].abs().amax() > 0       # only the batch's rows
        _, kvs = m(ids, pos, km, return_kv=True)
        assert torch.allclose(kp[0, rows], kvs[0][0], atol=ATOL)              # layer 0's K of every row
        k = kp.clone()
        if layout == "prefix":
            qs, T = torch.full((B,), 12), L - 12
        elif layout == "dual":
            qs, T = torch.full((B,), 10), 6
        else:
            qs, T = torch.tensor([9, 11, 13]), 5
        cols = qs[:, None] + torch.arange(T)
        # the fed columns are rewritten by reuse: stale values vanish
        for b in range(B):
            kp[:, rows[b], :, cols[b]] = 0.0
        res = phases["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, kp, vp, rows)
    hq = res[0]
    ref = full.gather(1, cols[..., None].expand(-1, -1, full.shape[-1]))
    assert torch.allclose(hq, ref, atol=ATOL), (hq - ref).abs().max()
    kref = torch.stack([k[:, rows[b], :, cols[b]] for b in range(B)], 1)     # [nl, B, Hkv, T, D]
    if inplace:
        assert torch.allclose(torch.stack([kp[:, rows[b], :, cols[b]] for b in range(B)], 1), kref, atol=ATOL)
    else:
        assert torch.allclose(res[1], kref, atol=ATOL)


@pytest.mark.parametrize("kv,extra", [("prefix", {}), ("dual", {}), ("dual", {"vicinity": 2}),
                                      ("dual", {"cfg_scale": 1.0}), ("none", {}),
                                      ("prefix", {"refresh_every": 2})])
def test_schedules_give_identical_tokens(family, kv, extra):
    m = tiny(family)
    runner = _runner(family)
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache=kv, **extra)
    eager = generate(m, PROMPTS, cfg).token_ids
    assert len({t for row in eager for t in row}) > 3               # varied tokens: a real comparison
    assert generate(runner, PROMPTS, cfg).token_ids == eager


_RUNNERS: dict = {}


def _runner(name):
    if name not in _RUNNERS:
        _RUNNERS[name] = in_memory_runner(tiny(name), block_length=8, logit_chunk=100)
    return _RUNNERS[name]


def test_slot_pool_cache_matches_eager():
    """The runtime's slot pool: refresh fills pool rows 3 and 1 (rows of 16 and 13 tokens, the second
    right-padded in the batch), reuse reads them and writes the fed span's K/V back in place; the compiled
    runner's pool equals the eager runner's and the other slots are untouched."""
    m = tiny("tiny-llada")
    c = m.config
    ids, _, _ = token_state(c, B=2, L=16)
    seqs, P, slots = [ids[0], ids[1, 3:]], [4, 4], [(3,), (1,)]
    changed = [x.clone() for x in seqs]
    for x in changed:
        x[8:10] = 7                                   # the token state moves on: reuse must write new K/V
    pools = [KVCacheManager(c, 20, 1 << 40, torch.float32, "cpu", max_slots=5) for _ in range(2)]
    outs = []
    for runner, pool in zip([_runner("tiny-llada"), EagerRunner(m)], pools):
        x0, conf = runner.refresh(build_batch(runner, "refresh", seqs, P, [8, 8], 4, slots=slots, pool=pool))
        y0, conf2 = runner.reuse(build_batch(runner, "reuse", changed, P, [8, 9], 4, [(8, 12), (9, 13)],
                                             slots, pool))
        outs.append((x0, conf, y0, conf2))
    for a, b in zip(*outs):
        assert torch.equal(a, b) if a.dtype == torch.long else torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    for i in range(c.n_layers):
        assert torch.allclose(pools[0].k[i], pools[1].k[i], atol=ATOL)
        assert torch.allclose(pools[0].v[i], pools[1].v[i], atol=ATOL)
        assert not pools[0].k[i][[0, 2, 4]].any()                               # other slots untouched
    with torch.no_grad():                     # the pool holds the changed state's K/V (layer 0: per token)
        _, kvs = m(changed[0][None], torch.arange(16)[None], torch.ones(1, 16, dtype=torch.bool),
                   return_kv=True)
    assert torch.allclose(pools[0].k[0][3, :, 8:12], kvs[0][0][0, :, 8:12], atol=ATOL)
