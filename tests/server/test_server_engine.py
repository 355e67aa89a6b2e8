"""`dlc serve ENGINE_DIR` (an export engine of the bundled dlc-tiny)
through the official openai client: sampled
and random-remasking requests run beside greedy ones without failing them, and values that can never be
served are refused with a 400 that names the field, while the other requests finish normally."""
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import decode_tokens, encode_prompt, open_model
from dlc.tiny.tasks import eval_set

LONG = {"gen_length": 16, "block_length": 4, "steps": 16, "kv_cache": "dual"}


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from dlc.compiler.build import compile_model
    out = tmp_path_factory.mktemp("served") / "dlc-tiny-export"
    compile_model("dlc-tiny", "cpu", str(out), backend="export", max_seq_len=64, max_batch_size=8,
                  block_length=4, echo=lambda *a, **k: None)
    return out


@pytest.fixture(scope="module")
def server(server_process, engine_dir):
    srv = server_process(str(engine_dir), "--served-model-name", "tiny-engine")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=120)


def _ask(client, prompt, extra):
    r = client.chat.completions.create(model="tiny-engine", messages=[{"role": "user", "content": prompt}],
                                       extra_body={**LONG, **extra})
    return r.choices[0].message.content, r.choices[0].finish_reason


@pytest.mark.slow
def test_sampling_requests_never_fail_their_neighbours(client, engine_dir):
    prompts = [p for p, _ in eval_set(4)]
    extras = [{}, {}, {}, {}, {"temperature": 0.7, "seed": 3}, {"remasking": "random", "seed": 4},
              {"temperature": 0.9, "remasking": "random"}]
    jobs = [(prompts[i % 4], e) for i, e in enumerate(extras)]
    with ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(lambda j: _ask(client, *j), jobs))
    s = open_model(str(engine_dir))
    for (prompt, extra), (text, reason) in zip(jobs[:4], answers[:4]):
        cfg = GenerationConfig(**LONG, stop_at_eos=True)
        ids = generate(s.runner, [encode_prompt(s, prompt, True)], cfg).token_ids[0]
        assert text == decode_tokens(s, ids) and reason in ("stop", "length")
    assert all(reason in ("stop", "length") for _, reason in answers[4:])
    # different prompts, different answers
    assert len({t for t, _ in answers[:4]}) > 1


@pytest.mark.parametrize("field,value,needle", [
    ("steps", 10 ** 30, "steps must be in [1, 16]"),
    ("steps", 2 * 10 ** 12, "steps must be in [1, 16]"),
    ("seed", 2 ** 64, "seed must be in [0, 9223372036854775807]"),
    ("block_length", 32, "block_length must be in [1, 16]"),
    ("vicinity", 3, None)])
def test_unservable_values_get_a_400_naming_the_field(server, field, value, needle):
    body = {"model": "tiny-engine", "messages": [{"role": "user", "content": "64+78"}], **LONG, field: value}
    if field == "seed":
        body["temperature"] = 0.5
    r = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field
    if needle:
        assert needle in err["message"]
    ok = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                    json={"model": "tiny-engine", "messages": [{"role": "user", "content": "64+78"}]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "142"
