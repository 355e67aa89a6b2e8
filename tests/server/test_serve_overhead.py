"""The served path at the in-process engine's pace (issue 15, part 1), on CPU with the device's pace
emulated (bench/paced_device.py: fixed device time per call with the GIL released, Reuse steps run ahead):
what HTTP, threads and the GIL add must stay small next to the device time, the event loop must wake once per
non-streamed choice (not once per block, not on a timer), and an idle engine must sleep until a request
comes, never poll."""
import statistics
import sys
import time
from pathlib import Path

import openai
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from engine_path import build  # noqa: E402
from paced_device import PacedRunner  # noqa: E402
from served import Probe, Served, run_threaded  # noqa: E402

from dlc.runtime.config import ServeConfig  # noqa: E402
from dlc.runtime.engine import Engine  # noqa: E402
from dlc.runtime.session import Session  # noqa: E402

P, GEN, BLOCK = 24, 64, 16
PARAMS = dict(gen_length=GEN, block_length=BLOCK, steps=GEN)
STEP_S, REFRESH_S = 0.006, 0.018
# a request's device time: 4 blocks x (Refresh + 15 Reuse steps) = 0.43 s; the served path's own cost here is
# a few ms (bench/serve_overhead.py) and a loaded 2-core machine stretches the host work of both paths alike
MAX_SERVED_RATIO = 1.2


@pytest.fixture(scope="module")
def model():
    """tiny-llada, random, its head x4 (bench/engine_path.py): peaked logits, outputs that vary."""
    return build("tiny-llada", "cpu", torch.float32)


def engine(model, **over) -> Engine:
    sc = ServeConfig(model="bench", device="cpu", max_batch_size=2, max_num_tokens=4 * (P + GEN),
                     max_seq_len=P + GEN, kv_cache_mb=16, kv_cache="dual", log_interval_s=0, **over)
    eng = Engine(Session(PacedRunner(model, STEP_S, REFRESH_S), None, model.config, False, "t"), sc)
    eng.warmup()
    return eng


def prompt(model, seed=0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.mask_id, (P,), generator=g).tolist()


def test_served_request_keeps_the_engines_pace(model):
    """One request through HTTP (openai client) vs the same request on the engine's loop thread, alternating;
    the HTTP path may add only a small share of the device-paced time."""
    eng_http, eng_thread = engine(model), engine(model)
    eng_thread.start()
    probe = Probe(eng_http)
    srv = Served(eng_http)
    client = openai.OpenAI(base_url=srv.base, api_key="x", max_retries=0, timeout=60)
    p = prompt(model)

    def http():
        t = time.perf_counter()
        out = client.completions.create(model="bench", prompt=p, max_tokens=GEN, extra_body=PARAMS)
        return time.perf_counter() - t, out.choices[0].token_ids

    def thread():
        t = time.perf_counter()
        r, = run_threaded(eng_thread, [p], PARAMS)
        return time.perf_counter() - t, r.output_ids
    try:
        http(), thread()                                                    # warm
        times = {"http": [], "thread": []}
        for rnd in range(3):
            for name, fn in (("http", http), ("thread", thread))[::1 if rnd % 2 == 0 else -1]:
                secs, ids = fn()
                times[name].append(secs)
                assert len(ids) == GEN
        assert eng_thread.runner.stats["ahead_calls"] > 0 and eng_http.runner.stats["ahead_calls"] > 0
        http_s, thread_s = statistics.median(times["http"]), statistics.median(times["thread"])
        device_s = GEN // BLOCK * (REFRESH_S + (BLOCK - 1) * STEP_S)
        assert thread_s > device_s                         # the pace is the emulated device's
        assert http_s / thread_s < MAX_SERVED_RATIO, times
        r = probe.added[-1]
        # the engine learns of a request at once (notified, no polling): a tiny share of the request's time
        assert probe.admitted[id(r)] - r.arrival < 0.05 * thread_s, (probe.admitted[id(r)] - r.arrival)
    finally:
        srv.stop()
        probe.close()
        eng_http.shutdown()
        eng_thread.shutdown()


def test_non_streamed_choices_wake_the_event_loop_once_each(model):
    """The engine thread hands a non-streamed choice to the event loop once, when it ends (not once per
    block); a stream gets every block."""
    eng = engine(model)
    srv = Served(eng)
    client = openai.OpenAI(base_url=srv.base, api_key="x", max_retries=0, timeout=60)
    try:
        client.completions.create(model="bench", prompt=prompt(model), max_tokens=GEN, extra_body=PARAMS)
        w0 = srv.wakes_sent
        out = client.completions.create(model="bench", prompt=prompt(model), max_tokens=GEN, n=2,
                                        extra_body={**PARAMS, "seed": 1, "temperature": 1.0})
        woke = srv.wakes_sent - w0
        assert [len(c.token_ids) for c in out.choices] == [GEN, GEN]
        assert out.choices[0].token_ids != out.choices[1].token_ids        # two real samples
        # 2 choice ends + the tokenizer hop (asyncio.to_thread) of the handler
        assert woke <= 3, woke
        w0 = srv.wakes_sent
        chunks = list(client.completions.create(model="bench", prompt=prompt(model), max_tokens=GEN,
                                                stream=True, extra_body=PARAMS))
        assert sum(len(c.choices[0].token_ids) for c in chunks if c.choices) == GEN
        assert srv.wakes_sent - w0 >= GEN // BLOCK                         # one per finalized block
    finally:
        srv.stop()
        eng.shutdown()


def test_idle_engine_sleeps_until_a_request_comes(model):
    """An idle engine's loop waits on its condition without a timeout once its gauges have decayed: no
    wake-ups while idle; a request wakes it at once (it would never be served otherwise)."""
    eng = engine(model)
    eng.start()
    try:
        time.sleep(1.2)
        assert eng.idle_wakeups == 1                       # went to sleep once, nothing woke it
        r, = run_threaded(eng, [prompt(model)], PARAMS, timeout=60)
        assert len(r.output_ids) == GEN
        deadline = time.monotonic() + 10                   # the tokens/s gauge decays over ~2 s
        while eng._idle_timeout() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert eng._idle_timeout() is None
        assert eng.metrics.gauges["tokens_per_second"] == 0
        time.sleep(0.3)                                    # the loop's last timed wait ends
        settled = eng.idle_wakeups
        time.sleep(1.2)
        assert eng.idle_wakeups == settled, "the idle engine woke without work"
    finally:
        eng.shutdown()
    assert not eng._thread.is_alive()                      # shutdown's notify woke the sleeping loop


def test_paced_runner_decodes_as_the_eager_runner():
    """The emulated device changes when outputs land, never what they are: two requests of different lengths
    (dlc-tiny, trained: outputs differ) through the engine over the PacedRunner (Refresh, Reuse steps run
    ahead and landed step by step) give the eager runner's tokens; device time per call follows the H200
    cost model (Refresh per token, Reuse per step and row)."""
    from paced_device import H200_8B

    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.session import open_model
    from dlc.runtime.step import build_batch
    sess = open_model("dlc-tiny", progress=False)
    m = sess.runner.model
    prompts = [sess.tokenizer(q)["input_ids"] for q in ("12+34=", "sort: 9 3 7 1 =")]
    outs = []
    for runner in (EagerRunner(m), PacedRunner(m, 0.002, 0.004)):
        sc = ServeConfig(model="t", device="cpu", max_batch_size=2, max_num_tokens=1024, max_seq_len=128,
                         kv_cache_mb=16, kv_cache="dual")
        eng = Engine(Session(runner, None, m.config, False, "t"), sc)
        reqs = [eng.make_request(p, dict(gen_length=32, block_length=16, steps=32)) for p in prompts]
        for r in reqs:
            eng.add_request(r)
        eng.run_until_done()
        outs.append([r.output_ids for r in reqs])
    assert outs[1] == outs[0] and outs[0][0] != outs[0][1] and all(outs[0])
    assert runner.stats["ahead_calls"] > 0
    cost = PacedRunner(m, **H200_8B)
    ids = [torch.tensor(prompts[0] + [m.config.mask_id] * 32)]
    L = ids[0].shape[0]
    refresh = build_batch(cost, "refresh", ids, [L - 32], [L - 32], 16, slots=[(0,)], pool=eng.kv)
    assert cost._forward_s(refresh) == pytest.approx(max(H200_8B["refresh_s"], H200_8B["token_s"] * L))
    reuse = build_batch(cost, "reuse", ids * 2, [L - 32] * 2, [L - 32] * 2, 16, [(L - 32, L - 16)] * 2,
                        [(0,), (1,)], eng.kv)
    assert cost._step_s(reuse) == pytest.approx(H200_8B["step_s"] + 2 * H200_8B["row_s"])
