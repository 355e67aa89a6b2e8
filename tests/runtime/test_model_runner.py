"""Per-row spans and slot-pool caches in the eager runner: a batch of requests at different lengths and blocks
decodes exactly what each request decodes alone."""
import pytest
import torch

from dlc.models.common import KVCache
from dlc.models.loading import load_model
from dlc.runtime.model_runner import EagerRunner
from dlc.runtime.sampling import Sampling

ATOL, RTOL = 1e-6, 1e-5
MASK = 257


@pytest.fixture(scope="module")
def runner():
    return EagerRunner(load_model("tiny-llada", seed=2).model)


def _state(prompt, gen, fill=3):
    """Right-padded layout: prompt, then gen masks with the first ``fill`` already decoded."""
    ids = torch.tensor(prompt + [MASK] * gen)
    ids[len(prompt):len(prompt) + fill] = 65 + torch.arange(fill)
    return ids


def _batch(states, L):
    B = len(states)
    ids = torch.full((B, L), 256)
    km = torch.zeros(B, L, dtype=torch.bool)
    for i, s in enumerate(states):
        ids[i, :len(s)] = s
        km[i, :len(s)] = True
    return ids, torch.arange(L).expand(B, L).clone(), km


def test_per_row_bounds_equal_shared_bounds(runner):
    ids, pos, km = _batch([_state([1, 2, 3], 16), _state([4, 5, 6], 16)], 19)
    s = Sampling()
    x_int, c_int = runner.full(ids, pos, km, (3, 11), s)
    x_row, c_row = runner.full(ids, pos, km, (torch.tensor([3, 3]), torch.tensor([11, 11])), s)
    assert torch.equal(x_int, x_row)
    torch.testing.assert_close(c_int, c_row, rtol=0, atol=0)


def test_slot_pool_batch_equals_each_request_alone(runner):
    prompts = [[5, 17, 99, 3], [42, 8, 9, 10, 11, 12, 13]]
    gens, blocks = [16, 8], [4, 0]              # request 0 is in its second block, request 1 in its first
    states = [_state(p, g) for p, g in zip(prompts, gens)]
    s = Sampling()
    S_max, slots = 32, torch.tensor([3, 1])
    pool = KVCache.empty(runner.config, 5, S_max, torch.float32, "cpu")
    L = max(len(x) for x in states)
    ids, pos, km = _batch(states, L)
    starts = torch.tensor([len(p) + b for p, b in zip(prompts, blocks)])
    out = (starts, starts + 4)
    x_b, c_b, _ = runner.refresh(ids, pos, km, out, s, cache=KVCache(pool.k, pool.v, rows=slots))
    ids[:, 0] = ids[:, 0]                        # token state unchanged: reuse must reproduce the refresh rows
    x_r, c_r = runner.reuse(KVCache(pool.k, pool.v, rows=slots), ids, pos, km, out, out, s)
    for i, st in enumerate(states):
        one_ids, one_pos, one_km = _batch([st], len(st))
        a = int(starts[i])
        x1, c1, cache1 = runner.refresh(one_ids, one_pos, one_km, (a, a + 4), s)
        assert torch.equal(x_b[i], x1[0]) and torch.equal(x_r[i], x1[0])
        torch.testing.assert_close(c_b[i], c1[0], rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(c_r[i], c1[0], rtol=RTOL, atol=ATOL)
        n = len(st)
        for layer in range(runner.config.n_layers):   # the pool row holds this request's K/V
            torch.testing.assert_close(pool.k[layer][slots[i], :, :n], cache1.k[layer][0], rtol=RTOL, atol=ATOL)
    untouched = [r for r in range(5) if r not in slots.tolist()]
    assert all(bool((pool.k[0][r] == 0).all()) for r in untouched)


def test_mismatched_widths_are_refused(runner):
    ids, pos, km = _batch([_state([1, 2, 3], 8), _state([4, 5], 8)], 11)
    with pytest.raises(ValueError, match="one width"):
        runner.full(ids, pos, km, (torch.tensor([3, 2]), torch.tensor([7, 8])), Sampling())


def test_refresh_refuses_a_small_cache(runner):
    ids, pos, km = _batch([_state([1, 2, 3], 8)], 11)
    small = KVCache.empty(runner.config, 1, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cache holds"):
        runner.refresh(ids, pos, km, (3, 7), Sampling(), cache=small)
