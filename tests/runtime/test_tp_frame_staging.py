"""Reuse steps staged straight from the tensor-parallel control frame (runtime/distributed/shard_graph.py,
``stage_frame``; issue 16), in one process, no ranks: a worker (and rank 0) writes a compact Reuse step into
its graph's static inputs without rebuilding a StepBatch. Over a sequence of batches that changes the bucket,
the rows inside a bucket (a real row becoming padding), the fed span and the pool, a ``GraphRunner`` staged
from the frames must hold the same static inputs as one staged from the rebuilt batches
(``GraphRunner._stage``) and decode the same tokens (padding rows' ids and positions may differ: they only
touch the scratch slot). A padding row left with a real row's slot (stale meta) would write that row's K/V and
fail both checks."""
import pytest
import torch

from dlc.runtime.distributed.channel import encode
from dlc.runtime.distributed.shard_graph import stage_frame
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import open_model
from dlc.runtime.step import build_batch, run_batch
from test_tensor_parallel import MODELS, write_tiny

L, P, BLK = 40, 12, 8
# (pool rows of the batch's sequences, first fed column): bucket 4 with 4 rows, then 3 (the 4th row's slot
# becomes padding), bucket 1, bucket 4 again with other rows and another block
STEPS = [((1, 2, 3, 4), 16), ((2, 3, 4), 16), ((3,), 16), ((4, 1, 2), 24)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_tiny(tmp_path_factory.mktemp("dream"), MODELS["dream_gqa"])   # GQA and shifted logits
    return open_model(str(path), dtype="fp32", progress=False).runner.model


def _side(model, seqs):
    """A graph runner (uncaptured) over its own pool, every sequence's cache refreshed in slot 1 + i."""
    r = GraphRunner(model, capture=False, decode="exact")
    pool = KVCacheManager(r.config, L, 1 << 62, torch.float32, "cpu", max_slots=len(seqs) + 2)
    r.bind_pool(pool)                                                  # slot 0: the padding rows' scratch
    slots = [pool.allocate_n(1) for _ in seqs]
    run_batch(r, build_batch(r, "refresh", seqs, [P] * len(seqs), [P] * len(seqs), BLK, slots=slots,
                             pool=pool))
    return r, pool, slots


def _batch(r, pool, seqs, rows, q0):
    picked = [seqs[i - 1] for i in rows]
    n = len(rows)
    return build_batch(r, "reuse", picked, [P] * n, [q0] * n, BLK, [(q0, q0 + BLK)] * n, [(s,) for s in rows],
                       pool)


def test_frame_staging_equals_batch_staging_across_buckets_and_rows(model):
    g0 = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.config.vocab_size, (L,), generator=g0) for _ in range(4)]
    a, pool_a, slots_a = _side(model, seqs)                            # staged from the rebuilt batches
    b, pool_b, slots_b = _side(model, seqs)                            # staged from the frames
    assert slots_a == slots_b == [(1,), (2,), (3,), (4,)] and a.scratch == b.scratch == 0
    arange = lambda n: torch.arange(n)                                 # noqa: E731
    varied = set()
    for rows, q0 in STEPS:
        batch = _batch(a, pool_a, seqs, rows, q0)
        head, payload = encode(batch)
        B, T = len(rows), batch.n_fed
        ga = a._stage(batch, ())
        gb = b._graph(b.bucket(B), T, batch.n_out)
        stage_frame(gb, head.tolist(), payload, b.scratch, b.config.logit_shift, arange)
        assert ga.bb == gb.bb == b.bucket(B)
        assert torch.equal(ga.meta, gb.meta), (rows, ga.meta, gb.meta)
        assert torch.equal(ga.ids[:B], gb.ids[:B]) and torch.equal(ga.pos[:B], gb.pos[:B])
        assert torch.equal(ga.key_mask, gb.key_mask)          # padding rows: the scratch block's T keys
        tok_a, conf_a = a._launch(ga)
        tok_b, conf_b = b._launch(gb)
        assert torch.equal(tok_a[:B], tok_b[:B])
        torch.testing.assert_close(conf_a[:B], conf_b[:B])
        varied |= set(tok_a[:B].flatten().tolist())
    assert len(varied) > 4                                             # a decisive model: tokens vary
    for l in range(model.config.n_layers):         # the sequences' rows saw the same K/V writes (the scratch
        torch.testing.assert_close(pool_a.k[l][1:], pool_b.k[l][1:])     # slot: padding positions differ)
