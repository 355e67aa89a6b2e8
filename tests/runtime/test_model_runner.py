"""The eager runner over StepBatches: a slot-pool batch of requests at different lengths and blocks decodes
exactly what each request decodes alone, and bad batches are refused with the reason."""
import pytest
import torch

from dlc.models.loading import load_model
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.step import build_batch

ATOL, RTOL = 1e-6, 1e-5
KV_ATOL, KV_RTOL = 1e-5, 1e-4     # K/V after a second layer: fp32 rounding of O(1) activations, other batch
MASK = 257


@pytest.fixture(scope="module")
def runner():
    return EagerRunner(load_model("tiny-llada", seed=2).model)


def _state(prompt, gen, fill=3):
    """Prompt, then gen masks with the first ``fill`` already decoded."""
    ids = torch.tensor(prompt + [MASK] * gen)
    ids[len(prompt):len(prompt) + fill] = 65 + torch.arange(fill)
    return ids


def _pool(runner, n, s_max):
    return KVCacheManager(runner.config, s_max, 1 << 40, torch.float32, "cpu", max_slots=n)


def test_slot_pool_batch_equals_each_request_alone(runner):
    prompts = [[5, 17, 99, 3], [42, 8, 9, 10, 11, 12, 13]]
    gens, blocks = [16, 8], [4, 0]              # request 0 is in its second block, request 1 in its first
    states = [_state(p, g) for p, g in zip(prompts, gens)]
    pool, slots = _pool(runner, 5, 32), [(3,), (1,)]
    starts = [len(p) + b for p, b in zip(prompts, blocks)]
    P = [len(p) for p in prompts]
    x_b, c_b = runner.refresh(build_batch(runner, "refresh", states, P, starts, 4, slots=slots, pool=pool))
    # token state unchanged: reuse must reproduce the refresh rows
    spans = [(a, a + 4) for a in starts]
    x_r, c_r = runner.reuse(build_batch(runner, "reuse", states, P, starts, 4, spans, slots, pool))
    for i, st in enumerate(states):
        own = _pool(runner, 1, len(st))
        x1, c1 = runner.refresh(build_batch(runner, "refresh", [st], [P[i]], [starts[i]], 4, slots=[(0,)],
                                            pool=own))
        assert torch.equal(x_b[i], x1[0]) and torch.equal(x_r[i], x1[0])
        torch.testing.assert_close(c_b[i], c1[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(c_r[i], c1[0], rtol=RTOL, atol=ATOL)
        n = len(st)
        for layer in range(runner.config.n_layers):   # the pool row holds this request's K/V
            torch.testing.assert_close(pool.k[layer][slots[i][0], :, :n], own.k[layer][0], rtol=KV_RTOL,
                                       atol=KV_ATOL)
    untouched = [r for r in range(5) if r not in (3, 1)]
    assert all(bool((pool.k[0][r] == 0).all()) for r in untouched)
    assert len(set(x_b.flatten().tolist())) > 1      # the model's predictions vary across positions


def test_mismatched_fed_widths_are_refused(runner):
    states = [_state([1, 2, 3], 8), _state([4, 5], 8)]
    pool = _pool(runner, 2, 16)
    with pytest.raises(ValueError, match="fed spans differ"):
        build_batch(runner, "reuse", states, [3, 2], [3, 2], 4, [(3, 7), (2, 8)], [(0,), (1,)], pool)


def test_refresh_refuses_a_small_cache(runner):
    small = _pool(runner, 1, 4)
    b = build_batch(runner, "refresh", [_state([1, 2, 3], 8)], [3], [3], 4, slots=[(0,)], pool=small)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        runner.refresh(b)


def test_cache_phases_need_slots(runner):
    with pytest.raises(ValueError, match="KV pool"):
        build_batch(runner, "reuse", [_state([1, 2, 3], 8)], [3], [3], 4, [(3, 7)])
