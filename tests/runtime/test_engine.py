"""The serving engine decodes every request exactly as generate() does for that prompt alone, in any batch."""
import pytest
import torch

from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine, QueueFull
from dlc.runtime.kv_cache import slot_bytes
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model

S_MAX = 160


@pytest.fixture(scope="module")
def session():
    return open_model("tiny-llada", progress=False)


def make_engine(session, **kw):
    kw = {"max_seq_len": S_MAX, "kv_cache_mb": 16, **kw}
    return Engine(session, ServeConfig(**kw))


def reference(session, prompt, params):
    return generate(session.runner, [prompt], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]


def random_specs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        prompt = torch.randint(0, 256, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
        bl = (4, 8)[i % 2]
        gl = bl * (1, 2, 3)[i % 3]
        specs.append((prompt, dict(gen_length=gl, block_length=bl, steps=gl if i % 4 else gl // 2,
                                   kv_cache=("none", "prefix", "dual")[i % 3],
                                   threshold=0.05 if i % 5 == 0 else None,
                                   temperature=0.8 if i % 6 == 1 else 0.0, seed=100 + i)))
    return specs


@pytest.mark.parametrize("kv", ["none", "prefix", "dual"])
def test_single_request_matches_generate(session, kv):
    eng = make_engine(session)
    params = dict(gen_length=16, block_length=8, steps=8, kv_cache=kv)
    prompt = [5, 17, 99, 3, 42]
    assert eng.generate([prompt], params)[0] == reference(session, prompt, params)
    assert eng.kv.num_used == 0 and not eng.scheduler.has_work()


@pytest.mark.parametrize("policy", ["phase", "fcfs"])
def test_mixed_batch_matches_generate(session, policy):
    """Different prompt lengths, block sizes, kv modes, decoding rules and seeded sampling in one busy
    batch."""
    specs = random_specs(9)
    eng = make_engine(session, policy=policy, max_num_tokens=S_MAX * 2, refresh_share=0.4)
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    for r, (p, params) in zip(reqs, specs):
        assert r.output_ids == reference(session, p, params), (policy, params)
        assert r.finish_reason in ("stop", "length")
    assert eng.kv.num_used == 0


def test_max_tokens_is_a_prefix_of_the_uncapped_output(session):
    eng = make_engine(session)
    params = dict(gen_length=24, block_length=8, steps=24, kv_cache="dual")
    prompt = [1, 2, 3, 4]
    full = reference(session, prompt, params)
    r = eng.make_request(prompt, params, max_tokens=11)
    eng.add_request(r)
    eng.run_until_done()
    assert r.output_ids == full[:11] and r.finish_reason == "length"
    assert r.forwards <= 16                                    # stopped after the second block, not the third


def test_bad_requests_name_the_problem(session):
    eng = make_engine(session)
    cases = [({"gen_length": 10, "block_length": 4}, "multiple of block_length"),
             ({"steps": 3, "gen_length": 16, "block_length": 8}, "steps"),
             ({"kv_cache": "paged"}, "kv_cache"),
             ({"remasking": "top"}, "remasking"),
             ({"threshold": 1.5}, "threshold"),
             ({"temperature": -1.0}, "temperature"),
             ({"gen_length": 256, "block_length": 32, "steps": 256}, "maximum sequence length"),
             ({"steps": 10 ** 30}, r"steps must be in \[1, 128\]"),
             ({"steps": 2 * 10 ** 12}, "steps must be in"),
             ({"seed": 2 ** 64, "temperature": 0.5}, "seed must be in"),
             ({"top_k": -3}, "top_k must be"), ({"frobnicate": 3}, "unknown generation fields")]
    for params, needle in cases:
        with pytest.raises(ValueError, match=needle):
            eng.make_request([1, 2, 3], params)
    with pytest.raises(ValueError, match="mask token"):
        eng.make_request([1, session.config.mask_id], {})
    with pytest.raises(ValueError, match="empty"):
        eng.make_request([], {})
    with pytest.raises(ValueError, match="max_tokens"):
        eng.make_request([1], {}, max_tokens=0)
    with pytest.raises(ValueError, match="prompt token ids"):
        eng.make_request([1, session.config.vocab_size], {})


def test_guidance_with_a_cache_uses_two_slots_and_matches_generate(session):
    """cfg_scale > 0 with a dual cache: the unconditional rows get their own KV slot;
    output equals generate()."""
    eng = make_engine(session)
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual", cfg_scale=1.5)
    prompts = [[5, 17, 99, 3, 42], [9, 8, 7]]
    reqs = [eng.make_request(p, params) for p in prompts]
    for r in reqs:
        eng.add_request(r)
    eng.step()
    assert sorted(len(r.slots) for r in reqs) == [2, 2] and eng.kv.num_used == 4
    eng.run_until_done()
    for r, p in zip(reqs, prompts):
        assert r.output_ids == reference(session, p, params)
    plain = reference(session, prompts[0], {**params, "cfg_scale": 0.0})
    assert reqs[0].output_ids != plain and eng.kv.num_used == 0


def test_unseeded_sampling_differs_and_the_server_seed_is_the_default(session, caplog):
    """OpenAI / vLLM semantics: a T > 0 request without a seed draws a fresh one (samples differ); with
    `--seed` (ServeConfig.seed) unseeded requests use it; an explicit seed always wins. Each finished request
    logs one line."""
    p = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual", temperature=1.5)
    prompt = [5, 17, 99, 3]
    free = make_engine(session)
    outs = [tuple(free.generate([prompt], p)[0]) for _ in range(4)]
    assert len(set(outs)) > 1
    pinned = make_engine(session, seed=7)
    with caplog.at_level("INFO", logger="dlc.engine"):
        a, b = pinned.generate([prompt], p)[0], pinned.generate([prompt], p)[0]
    assert a == b == free.generate([prompt], {**p, "seed": 7})[0]
    assert pinned.generate([prompt], {**p, "seed": 8})[0] != a
    lines = [r.getMessage() for r in caplog.records if r.name == "dlc.engine"]
    assert len(lines) == 2 and all(m.startswith("finished req-") and "4 prompt +" in m for m in lines)
    with pytest.raises(ValueError, match="seed must be an integer"):
        ServeConfig(seed=2 ** 64)


def test_queue_limit(session):
    eng = make_engine(session, max_queue=2)
    for _ in range(2):
        eng.add_request(eng.make_request([1, 2], {"gen_length": 8, "block_length": 8, "steps": 8}))
    with pytest.raises(QueueFull, match="queue is full"):
        eng.add_request(eng.make_request([1, 2], {}))


def test_cancel_frees_the_slot(session):
    eng = make_engine(session)
    r = eng.make_request([1, 2, 3], {"gen_length": 32, "block_length": 8, "steps": 32, "kv_cache": "dual"})
    eng.add_request(r)
    eng.step()
    eng.step()
    assert eng.kv.num_used == 1 and len(r.slots) == 1
    eng.abort(r)
    eng.step()
    assert r.status == "cancelled" and eng.kv.num_used == 0 and not eng.scheduler.has_work()


def test_no_head_of_line_blocking_and_preemption(session):
    """A long request that does not fit the Refresh share is passed by a short one; once aged it preempts the
    younger request for its KV slot; every output still equals generate()."""
    two_slots = 2.5 * slot_bytes(session.config, S_MAX, torch.float32) / 2**20
    eng = make_engine(session, kv_cache_mb=two_slots, max_num_tokens=S_MAX, refresh_share=0.5, age_iters=2)
    assert eng.kv.n_slots == 2
    p = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    first = eng.make_request([7] * 4, p)
    eng.add_request(first)
    eng.step()                                                   # first holds slot 0
    long_prompt = list(range(100, 210))                          # L = 158: does not fit next to first's step
    long = eng.make_request(long_prompt, {**p, "gen_length": 48, "steps": 48})
    short = eng.make_request([9, 8, 7], p)
    eng.add_request(long)
    eng.add_request(short)
    eng.step()
    assert short.status == "running" and long.status == "waiting"    # short passed long
    eng.run_until_done()
    assert eng.scheduler.preemptions >= 1 and short.preemptions >= 1
    for r, prompt, params in [(first, [7] * 4, p), (short, [9, 8, 7], p),
                              (long, long_prompt, {**p, "gen_length": 48, "steps": 48})]:
        assert r.output_ids == reference(session, prompt, params)
    assert eng.kv.num_used == 0


def test_fcfs_blocks_at_the_head(session):
    eng = make_engine(session, policy="fcfs", max_num_tokens=S_MAX)
    p = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    a = eng.make_request(list(range(100, 200)), {**p, "gen_length": 48, "steps": 48})
    b = eng.make_request([1, 2, 3], p)
    eng.add_request(a)
    eng.add_request(b)
    eng.step()
    assert a.status == "running" and b.status == "waiting"       # b does not fit next to a: static batch
    while a.status == "running":
        assert b.status == "waiting"
        eng.step()
    eng.run_until_done()
    assert b.status == "finished"


def test_refreshes_are_staggered(session):
    """A burst of block starts is spread over iterations, so later iterations mix Refresh and Reuse rows."""
    eng = make_engine(session, max_num_tokens=200, refresh_share=0.3)
    p = dict(gen_length=32, block_length=8, steps=16, kv_cache="dual")
    prompts = [[i + 1] * 8 for i in range(8)]                    # L = 40: 1 Refresh fits the 60-token share
    reqs = [eng.make_request(q, p) for q in prompts]
    for r in reqs:
        eng.add_request(r)
    mixed = 0
    while eng.has_work():
        eng.step()
        m = eng.metrics.gauges
        mixed += m["iteration_refresh_rows"] > 0 and m["iteration_reuse_rows"] > 0
        assert m["iteration_refresh_rows"] <= 1
    assert mixed >= 5
    assert [r.output_ids for r in reqs] == [reference(session, q, p) for q in prompts]


def _block_widths(eng, reqs) -> set[int]:
    """Run to completion, recording the width of every block the requests decode."""
    for r in reqs:
        eng.add_request(r)
    widths = set()
    while eng.has_work():
        eng.step()
        widths |= {r.state.be - r.state.bs for r in reqs if r.state.bs is not None}
    return widths


def test_elastic_chunk_follows_load(session):
    """Optimus-style granularity: with the saturation point at 32 tokens,
    one request decodes 16-wide chunks and
    eight concurrent requests 4-wide ones (fixed granularity would keep every block at block_length 8)."""
    eng = make_engine(session, granularity="elastic", chunk_sizes=(4, 8, 16))
    eng.warmup()
    assert eng.gran.saturation >= 8 and "dlc_granularity_chunk" in eng.metrics.render()
    eng.gran.saturation, eng.gran.observe = 32.0, lambda *a: None      # pin the measured knee
    p = dict(gen_length=32, block_length=8, steps=32, kv_cache="dual")
    assert _block_widths(eng, [eng.make_request([1, 2, 3], p)]) == {16}
    many = [eng.make_request([i + 1] * 5, p) for i in range(8)]
    for r in many:
        eng.add_request(r)
    eng.step()                                              # all eight admitted: 8 x 4 <= 32
    assert [r.state.be - r.state.bs for r in many] == [4] * 8
    eng.run_until_done()
    assert all(r.finish_reason in ("stop", "length") for r in many) and eng.kv.num_used == 0


def test_elastic_controller_follows_load():
    from dlc.runtime.granularity import Granularity

    class R:
        class gen:
            block_length = 8
    g = Granularity("elastic", (4, 8, 16, 32))
    g.calibrate([(8, 1.0), (16, 1.0), (32, 1.1), (64, 1.4), (128, 2.5)])
    assert g.saturation == 64
    assert g.width(R, 1) == 32 and g.width(R, 4) == 16 and g.width(R, 16) == 4
    g.observe(48, 3.0)                  # slower than flat below N*: N* moves down
    assert g.saturation < 64


def test_engine_imports_without_web_stack():
    """The GPU machine has no fastapi/uvicorn/pydantic: the engine and scheduler must not need them."""
    import subprocess
    import sys
    code = ("import sys\nfor m in ('fastapi', 'uvicorn', 'pydantic', 'starlette', 'prometheus_client'):\n"
            "    sys.modules[m] = None\nimport dlc.runtime.engine, dlc.runtime.scheduler, "
            "dlc.runtime.kv_cache\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["tiny-dream", "tiny-llada-moe"])
def test_other_families_match_generate(name):
    """Dream (shifted logits, GQA) and LLaDA-MoE through the slot pool, in one mixed batch."""
    s = open_model(name, progress=False)
    eng = make_engine(s)
    specs = [(p, {**params, "threshold": None}) for p, params in random_specs(6, seed=1)]
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    for r, (p, params) in zip(reqs, specs):
        assert r.output_ids == reference(s, p, params), (name, params)


def test_compiled_runner_through_the_engine(session):
    """A compiled (traced + passes) runner slots in: batched engine output equals generate() with it alone."""
    from dlc.compiler import in_memory_runner
    from dlc.models.loading import load_model
    from dlc.runtime.session import Session

    lm = load_model("tiny-llada")
    runner = in_memory_runner(lm.model, block_length=8)
    s = Session(runner, lm.tokenizer, lm.config, True, "tiny-llada", kind="in-memory")
    eng = make_engine(s)
    prompts = [[5, 17, 99, 3], [42, 8], list(range(40, 60))]
    params = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")
    assert eng.generate(prompts, params) == [reference(s, p, params) for p in prompts]


def test_a_block_that_cannot_progress_ends():
    """tiny-dream predicts the mask id itself for some positions: threshold decoding would loop forever at
    T = 0 (generate() hangs); the engine ends such a block after 2 x its width steps and the server carries
    on."""
    s = open_model("tiny-dream", progress=False)
    eng = make_engine(s)
    p, params = random_specs(6, seed=1)[5]
    assert params["threshold"] == 0.05
    r = eng.make_request(p, params)
    eng.add_request(r)
    eng.run_until_done()
    assert r.status == "finished" and r.forwards <= 2 * params["gen_length"]
