"""sparsify_heads: per-head top-retention cached positions; retention 1.0 equals dense exactly."""
import math

import pytest
import torch
import torch.nn.functional as F

from passes_helpers import greedy, tiny, token_state, traced
from dlc.compiler import in_memory_runner
from dlc.passes.pipeline import PassContext, run_pipeline
from dlc.models.sparse_heads import head_scores, max_pool
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.step import build_batch

ATOL = 1e-5
PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]
_P: dict = {}


def phases(name, sparse: bool):
    key = (name, sparse)
    if key not in _P:
        m = tiny(name)
        ctx = PassContext(config=m.config, sparse_retention=0.5 if sparse else None, kv_inplace=False)
        names = ["cache_kv_reuse", "sparsify_heads"] if sparse else ["cache_kv_reuse"]
        _P[key] = run_pipeline(traced(name), ctx, names), ctx
    return _P[key]


def test_graph_has_per_head_gathers():
    (ph, ctx) = phases("tiny-dream", True)
    c = tiny("tiny-dream").config
    names = [n.target for n in ph["reuse"].graph.nodes if n.op == "placeholder"]
    assert "keep_idx" in names
    gathers = sum(1 for n in ph["reuse"].graph.nodes if n.op == "call_function" and "gather" in str(n.target))
    assert gathers == 3 * c.n_layers                      # K, V and key mask per layer
    assert ctx.counts[("sparsify_heads", "reuse")] == ctx.counts[("sparsify_heads", "refresh")] == c.n_layers


def _loop_scores(q, k, v, km, out, group, pool):
    """Per (row, kv head, key): mean over the block's queries of softmax(q.k/sqrt(D)) * ||v||, max over the
    group's query heads, then a width-``pool`` max over neighbours; padding keys -inf."""
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    ref = torch.empty(B, Hkv, L)
    for b in range(B):
        valid = [j for j in range(L) if km[b, j]]
        for h in range(Hkv):
            raw = []
            for j in range(L):
                best = float("-inf")
                for hq in range(h * group, (h + 1) * group):
                    acc = 0.0
                    for t in out[b].tolist():
                        logits = {i: float(q[b, hq, t] @ k[b, h, i]) / math.sqrt(D) for i in valid}
                        z = sum(math.exp(x) for x in logits.values())
                        acc += math.exp(logits[j]) / z if j in logits else 0.0
                    best = max(best, acc / len(out[b]) * float(v[b, h, j].norm()))
                raw.append(best)
            r = pool // 2
            for j in range(L):
                ref[b, h, j] = max(raw[max(0, j - r):j + r + 1]) if km[b, j] else float("-inf")
    return ref


@pytest.mark.parametrize("pool", [1, 3])
def test_head_scores_match_a_loop_reference(pool):
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, L, D = 2, 4, 2, 9, 8
    q, k, v = (torch.randn(B, H, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g),
               torch.randn(B, Hkv, L, D, generator=g))
    km = torch.ones(B, L, dtype=torch.bool)
    km[1, :2] = False
    out = torch.tensor([[4, 5, 6], [5, 6, 7]])
    s = head_scores(q, k, v, km, out, H // Hkv, pool)
    assert torch.allclose(s, _loop_scores(q, k, v, km, out, H // Hkv, pool), atol=1e-5)


def test_max_pool_equals_max_pool1d():
    s = torch.randn(2, 3, 11)
    for kernel in (1, 3, 5):
        assert torch.equal(max_pool(s, kernel), F.max_pool1d(s, kernel, 1, kernel // 2))
    with pytest.raises(ValueError, match="odd"):
        max_pool(s, 2)


def test_scores_follow_each_query_not_the_mean_query():
    """Two block queries that attend to different keys: both keys outrank a key neither query attends to,
    although the mean query (Sparse-dLLM's score) ranks that key first."""
    D = 4
    e = torch.eye(D) * 8
    k = torch.stack([e[0], e[1], (e[0] + e[1]) * 0.6, e[3] * 0, e[2] * 0])[None, None]      # [1, 1, 5, D]
    q = torch.zeros(1, 1, 5, D)
    # block = rows 3, 4
    q[0, 0, 3], q[0, 0, 4] = e[0], e[1]
    v = torch.ones(1, 1, 5, D)
    km = torch.ones(1, 5, dtype=torch.bool)
    s = head_scores(q, k, v, km, torch.tensor([[3, 4]]), 1)[0, 0]
    assert s[0] > s[2] and s[1] > s[2]
    mean_q = (q[0, 0, 3:5].mean(0) @ k[0, 0].T)
    assert mean_q[2] > mean_q[0] and mean_q[2] > mean_q[1]


def test_retention_one_equals_dense_exactly(family):
    m = tiny(family)
    c = m.config
    dense, _ = phases(family, False)
    sparse, _ = phases(family, True)
    ids, pos, km = token_state(c)
    B, L = ids.shape
    qs = torch.tensor([10, 11, 12])
    cols = qs[:, None] + torch.arange(5)
    keep = torch.arange(L).expand(c.n_layers, B, c.n_kv_heads, L).contiguous()
    with torch.no_grad():
        _, k, v = dense["refresh"](ids, pos, km)
        a = dense["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v, torch.arange(k.shape[1]))
        b = sparse["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v, torch.arange(k.shape[1]),
                            keep)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_per_head_gather_drops_exactly_the_unkept_columns():
    """Keeping the same columns in every head equals dense attention with the others masked out."""
    name = "tiny-dream"
    m = tiny(name)
    c = m.config
    dense, _ = phases(name, False)
    sparse, _ = phases(name, True)
    ids, pos, km = token_state(c)
    B, L = ids.shape
    qs = torch.tensor([10, 10, 10])
    cols = qs[:, None] + torch.arange(5)
    kept = torch.tensor([0, 2, 3, 5, 8, 10, 11, 12, 13, 14, 16, 19])
    keep = kept.expand(c.n_layers, B, c.n_kv_heads, len(kept)).contiguous()
    km_dense = torch.zeros_like(km)
    km_dense[:, kept] = km[:, kept]
    with torch.no_grad():
        _, k, v = dense["refresh"](ids, pos, km)
        ref = dense["reuse"](ids.gather(1, cols), pos.gather(1, cols), km_dense, qs, k, v,
                             torch.arange(k.shape[1]))
        got = sparse["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v,
                              torch.arange(k.shape[1]), keep)
    assert torch.allclose(got[0], ref[0], atol=ATOL)


def test_runner_keeps_top_fraction_per_head():
    """Refresh writes each row's per-head scores into its pool row; the Reuse batch keeps, per layer, row and
    head, the fed columns plus the top half of the others by its own row's scores; reuse attends over exactly
    those (the sparse reuse program with that selection, decoded by the eager head)."""
    name = "tiny-llada"
    m = tiny(name)
    c = m.config
    runner = in_memory_runner(m, sparse_retention=0.5, block_length=8)
    ids, _, _ = token_state(c, B=2, L=24)
    seqs, P, slots, S = [ids[0], ids[1, 3:]], [4, 4], [(2,), (0,)], 24      # row 1: 21 tokens, right-padded
    pool = KVCacheManager(c, S, 1 << 40, torch.float32, "cpu", max_slots=3, head_scores=True)
    runner.refresh(build_batch(runner, "refresh", seqs, P, [12, 12], 4, slots=slots, pool=pool))
    assert pool.scores.shape == (c.n_layers, 3, c.n_kv_heads, S)
    sc = pool.scores[:, [2, 0]]                                                 # [nl, 2, Hkv, S]
    assert torch.isfinite(sc[:, 0]).all() and torch.isfinite(sc[:, 1, :, :21]).all()
    assert bool((sc[:, 1, :, 21:] == float("-inf")).all())                     # row 1's padding
    assert bool((pool.scores[:, 1] == float("-inf")).all())                    # the free slot
    sparse, _ = phases(name, True)                                              # the same scores, unfused
    ids_b = torch.stack([ids[0], torch.cat([ids[1, 3:], torch.full((3,), c.mask_id)])])
    km = torch.arange(S)[None] < torch.tensor([[24], [21]])
    with torch.no_grad():
        ref_scores = sparse["refresh"](ids_b, torch.arange(S).expand(2, S), km,
                                       torch.arange(12, 16).expand(2, 4))[-1]
    assert torch.allclose(sc, ref_scores, atol=ATOL)
    batch = build_batch(runner, "reuse", seqs, P, [12, 12], 4, [(12, 16), (12, 16)], slots, pool)
    keep = batch.keep_idx
    n = [4 + math.ceil(0.5 * (L - 4)) for L in (24, 21)]       # each row's count from its own length: 14, 13
    assert keep.shape == (c.n_layers, 2, c.n_kv_heads, n[0])
    fed = list(range(12, 16))
    for i in range(c.n_layers):
        for b in range(2):
            for h in range(c.n_kv_heads):          # fed columns + the top others by this row's scores
                others = [j for j in range(S) if j not in fed]
                top = sorted(others, key=lambda j: -float(sc[i, b, h, j]))[:n[b] - 4]
                pad = [S - 1] * (n[0] - n[b])      # row 1's last entry: its padding key 23 (masked)
                assert keep[i, b, h].tolist() == sorted(fed + top) + pad, (i, b, h)
    assert any(not torch.equal(keep[0, 0, 0], keep[0, 0, h]) for h in range(1, c.n_kv_heads))  # heads differ
    k_rows = torch.stack([k[[2, 0]] for k in pool.k])                          # the refreshed K/V
    v_rows = torch.stack([v[[2, 0]] for v in pool.v])
    x0, conf = runner.reuse(batch)
    q = (ids_b[:, 12:16], torch.arange(12, 16).expand(2, 4), km, torch.tensor([12, 12]), k_rows, v_rows,
         torch.arange(2))
    with torch.no_grad():
        ref_tok, ref_conf = greedy(m.logits(sparse["reuse"](*q, keep)[0]))
        _, dense_conf = greedy(m.logits(phases(name, False)[0]["reuse"](*q)[0]))
    assert torch.equal(x0, ref_tok)
    assert torch.allclose(conf, ref_conf, rtol=1e-6)
    assert not torch.allclose(dense_conf, ref_conf, rtol=1e-3)                 # the kept half matters


@pytest.mark.parametrize("kv", ["dual", "prefix"])
def test_retention_one_generates_eager_tokens(kv):
    m = tiny("tiny-dream")
    runner = in_memory_runner(m, sparse_retention=1.0, block_length=8)
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache=kv)
    assert generate(runner, PROMPTS, cfg).token_ids == generate(m, PROMPTS, cfg).token_ids


class _KernelCtx(PassContext):
    use_kernels = True            # what a GPU target sets; on CPU tensors the op runs its reference


def test_gpu_lowering_emits_the_sparse_attention_op_and_matches_gather(family):
    """GPU targets attend through torch.ops.dlc.sparse_attention (kept columns by index, fed block and padding
    skipped in the index, the block's K/V appended); same outputs as the gather + SDPA program."""
    m = tiny(family)
    c = m.config
    dense, _ = phases(family, False)
    sparse, _ = phases(family, True)
    ctx = _KernelCtx(config=c, sparse_retention=0.5, kv_inplace=False)
    lowered = run_pipeline(traced(family), ctx, ["cache_kv_reuse", "sparsify_heads"])["reuse"]
    ops = [n for n in lowered.graph.nodes if n.op == "call_function" and "sparse_attention" in str(n.target)]
    assert len(ops) == c.n_layers
    assert not any("scaled_dot_product" in str(n.target) for n in lowered.graph.nodes
                   if n.op == "call_function")
    ids, pos, km = token_state(c)
    B, L = ids.shape
    qs = torch.tensor([10, 11, 12])
    cols = qs[:, None] + torch.arange(5)
    g = torch.Generator().manual_seed(1)
    keep = torch.empty(c.n_layers, B, c.n_kv_heads, 12, dtype=torch.long)
    for i in range(c.n_layers):
        for b in range(B):
            others = torch.tensor([j for j in range(L) if j not in cols[b].tolist()])
            for h in range(c.n_kv_heads):        # fed columns + 7 others per head (row 1's padding included)
                pick = others[torch.randperm(len(others), generator=g)[:7]]
                keep[i, b, h] = torch.cat([cols[b], pick]).sort().values
    with torch.no_grad():
        _, k, v = dense["refresh"](ids, pos, km)
        ref = sparse["reuse"](ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v,
                              torch.arange(k.shape[1]), keep)
        got = lowered(ids.gather(1, cols), pos.gather(1, cols), km, qs, k, v, torch.arange(k.shape[1]), keep)
    for x, y in zip(got, ref):
        assert torch.allclose(x, y, atol=ATOL)

