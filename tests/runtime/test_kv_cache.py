"""KV slot pool: sizing from the memory budget, allocation, freeing, pool views the model writes through."""
import pytest
import torch

from dlc.models.presets import preset_config
from dlc.runtime.kv_cache import KVCacheManager, slot_bytes

CFG = preset_config("tiny-llada")


def test_sized_from_budget():
    per = slot_bytes(CFG, 64, torch.float32)
    assert per == 2 * CFG.n_layers * CFG.n_kv_heads * 64 * CFG.head_dim * 4
    kv = KVCacheManager(CFG, 64, 5 * per + per // 2, torch.float32, "cpu")
    assert kv.n_slots == 5 and kv.k[0].shape == (5, CFG.n_kv_heads, 64, CFG.head_dim)
    assert KVCacheManager(CFG, 64, 100 * per, torch.float32, "cpu", max_slots=3).n_slots == 3
    with pytest.raises(ValueError, match="too small for one slot"):
        KVCacheManager(CFG, 64, per - 1, torch.float32, "cpu")


def test_allocate_free():
    kv = KVCacheManager(CFG, 16, 3 * slot_bytes(CFG, 16, torch.float32), torch.float32, "cpu")
    slots = [kv.allocate() for _ in range(3)]
    assert slots == [0, 1, 2] and kv.allocate() is None and kv.usage() == 1.0
    kv.free(1)
    assert kv.num_free == 1 and kv.allocate() == 1
    kv.free(0)
    with pytest.raises(ValueError, match="not allocated"):
        kv.free(0)
    with pytest.raises(ValueError, match="not allocated"):
        kv.free(7)


def test_view_writes_into_pool_rows():
    """A forward through a pool view writes each row's K/V into its slot, like a private cache would."""
    from dlc.models.loading import load_model
    from dlc.models.common import KVCache

    model = load_model("tiny-llada", seed=1).model
    kv = KVCacheManager(CFG, 32, 4 * slot_bytes(CFG, 32, torch.float32), torch.float32, "cpu")
    ids = torch.randint(0, 256, (2, 10))
    pos = torch.arange(10)[None].expand(2, 10)
    km = torch.ones(2, 32, dtype=torch.bool)
    km[:, 10:] = False
    with torch.no_grad():                     # pools are inference state (views of one tensor per K / V)
        model(ids, pos, km, cache=kv.view([3, 1]), start=0)
        private = KVCache.empty(CFG, 2, 10, torch.float32, "cpu")
        model(ids, pos, km[:, :10], cache=private, start=0)
    for layer in range(CFG.n_layers):
        torch.testing.assert_close(kv.k[layer][[3, 1], :, :10], private.k[layer])
        torch.testing.assert_close(kv.v[layer][[3, 1], :, :10], private.v[layer])
        assert kv.k[layer][[0, 2]].abs().sum() == 0
