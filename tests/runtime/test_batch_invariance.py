"""Batch invariance on CPU: a request's tokens at T = 0 and at seeded T > 0 do not depend on what else runs.

Each probe request runs alone through the engine, then again inside a busy mix (other prompts, lengths, block
sizes, KV modes, decoding rules, temperatures), at two batch limits so the probes meet different batch
compositions, Refresh/Reuse mixes and group sizes. Outputs must be identical token for token, in the default
mode and with ``batch_invariant`` on (on CPU the mode's overrides are CUDA-only, so it must change nothing
here: the solo outputs of the default mode stay the reference; tests/kernels/test_batch_invariant_kernels.py
checks the mode's kernels bit for bit on CPU through the Triton interpreter)."""
import pytest
import torch

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.session import open_model


@pytest.fixture(scope="module")
def session():
    return open_model("tiny-llada", progress=False)


def spec(g: torch.Generator, i: int, sampled: bool) -> tuple[list[int], dict]:
    prompt = torch.randint(0, 256, (int(torch.randint(3, 24, (1,), generator=g)),), generator=g).tolist()
    bl = (4, 8)[i % 2]
    gl = bl * (1 + i % 3)
    params = dict(gen_length=gl, block_length=bl, steps=gl if i % 4 else gl // 2,
                  kv_cache=("none", "prefix", "dual")[i % 3], threshold=0.3 if i % 5 == 4 else None,
                  temperature=0.8 if sampled else 0.0, seed=1000 + i)
    return prompt, params


def run(session, specs, **cfg) -> list[list[int]]:
    eng = Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=16, **cfg))
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert eng.kv.num_used == 0
    return [r.output_ids for r in reqs]


G = torch.Generator().manual_seed(7)
PROBES = [spec(G, i, sampled=i % 2 == 1) for i in range(8)]              # T = 0 and seeded T = 0.8
OTHERS = [spec(G, 20 + i, sampled=i % 3 == 0) for i in range(14)]


@pytest.fixture(scope="module")
def alone(session):
    out = [run(session, [p])[0] for p in PROBES]
    assert len({tuple(o) for o in out}) == len(out)                     # a decisive model: outputs vary
    greedy = run(session, [(PROBES[1][0], {**PROBES[1][1], "temperature": 0.0})])[0]
    assert greedy != out[1]                                             # the sampled probes really sample
    return out


@pytest.mark.parametrize("max_batch_size,refresh_share,batch_invariant",
                         [(4, 0.3, False), (32, 1.0, False), (32, 1.0, True)])
def test_outputs_do_not_depend_on_the_batch(session, alone, max_batch_size, refresh_share, batch_invariant):
    mix = OTHERS[:7] + PROBES + OTHERS[7:]                              # probes in the middle of the load
    mixed = run(session, mix, max_batch_size=max_batch_size, refresh_share=refresh_share,
                max_num_tokens=384, batch_invariant=batch_invariant)[7:15]
    assert mixed == alone


def test_batch_invariant_engine_refuses_compiled_blocks():
    """Blocks already compiled in place (an earlier GraphRunner with compile on) would bypass the mode's
    kernels: the Engine refuses them with a one-line error instead of serving variant outputs."""
    s = open_model("tiny-llada", progress=False)
    for b in s.runner.model.blocks:
        b.compile()                                  # lazy: nothing compiles until a call
    with pytest.raises(ValueError, match="batch_invariant: this model's blocks are compiled"):
        Engine(s, ServeConfig(max_seq_len=96, kv_cache_mb=16, batch_invariant=True))
    Engine(s, ServeConfig(max_seq_len=96, kv_cache_mb=16))                 # the default mode takes them


def test_batch_invariant_engine_never_runs_a_ragged_mixed_forward(session, monkeypatch):
    """A mixed iteration's one ragged forward attends through ``attend_ragged``, not the mode's kernels, so in
    the mode the Engine runs a mixed iteration's Refresh and Reuse groups as separate calls (on an H100 the
    eager runner's probes differed from their solo runs exactly at the first mixed iteration,
    bench/probes/invariance_timeline.py). The same staggered traffic mixes in the default mode."""
    from dlc.runtime.runners.eager import EagerRunner
    calls = {"mixed": 0}
    orig = EagerRunner.mixed

    def counting(self, batch):
        calls["mixed"] += 1
        return orig(self, batch)
    monkeypatch.setattr(EagerRunner, "mixed", counting)
    for on in (False, True):
        calls["mixed"] = 0
        eng = Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=16, batch_invariant=on))
        reqs = [eng.make_request(p, {**params, "kv_cache": "dual"}) for p, params in PROBES[:4]]
        for r in reqs:                       # one request per iteration: each Refresh meets earlier Reuses
            eng.add_request(r)
            eng.step()
        eng.run_until_done()
        assert all(r.error is None for r in reqs)
        assert (calls["mixed"] > 0) != on, (on, calls)


def test_invariant_attention_hands_the_kernel_k_and_v_with_one_stride_set(monkeypatch):
    """The mode's Refresh attention runs the pool-attention kernel, which reads K and V with K's strides. In
    the models, k is fresh from RoPE and v a transposed view of its projection (other strides): the kernel
    must get both with the same layout, else it reads wrong values of v (on an H100 a row's outputs then
    depended on its batch index). The kernel is emulated on CPU (Triton absent) by reading v with k's
    strides, exactly as its pointer arithmetic does; the result must equal SDPA on the padded batch."""
    from dlc.kernels import pool_attn
    from dlc.runtime import batch_invariant as BI

    def kernel(q, k_pool, v_pool, rows, kv_len, splits=None):
        v_read = torch.as_strided(v_pool, v_pool.shape, k_pool.stride(), v_pool.storage_offset())
        return pool_attn.pool_attention_reference(q, k_pool, v_read, rows, kv_len)
    monkeypatch.setattr(BI, "HAS_TRITON", True)
    monkeypatch.setattr(BI, "INTERPRET", True)
    monkeypatch.setattr(pool_attn, "pool_attention_triton", kernel)
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 3, 4, 12, 8
    qkv = torch.randn(B, T, 3 * H, D, generator=g)                           # a fused q|k|v projection
    q, k, v = (x.transpose(1, 2) for x in qkv.split(H, dim=2))              # views [B, H, T, D]
    k = k.contiguous()                                                       # as RoPE leaves it
    lens = torch.tensor([10, 5, 12])
    mask = (torch.arange(T)[None] < lens[:, None])[:, None, None, :]
    out = BI.invariant_attention(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
