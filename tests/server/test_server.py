"""`dlc serve tiny-llada` driven by the official openai client and httpx."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from server_helpers import GEN, MODEL
from dlc.runtime.generate import GenerationConfig, generate



def expected_text(session, prompt: str, chat: bool = False, **params):
    from dlc.runtime.session import decode_tokens, encode_prompt
    ids = encode_prompt(session, prompt, chat)
    out = generate(session.runner, [ids],
                   GenerationConfig(**{**GEN, **params}, stop_at_eos=True)).token_ids[0]
    return decode_tokens(session, out), out


def test_models_and_health(client, tiny_server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(tiny_server.base + "/health").json() == {"status": "ok"}


def test_completion_matches_generate(client, session):
    r = client.completions.create(model=MODEL, prompt="Hello there")
    text, ids = expected_text(session, "Hello there")
    assert r.choices[0].text == text
    assert r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens == len("Hello there")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert len(set(r.choices[0].model_extra["token_ids"])) > 3     # a decisive model: ordering bugs show


def test_diffusion_fields_and_max_tokens(client, session):
    extra = {"gen_length": 24, "block_length": 8, "steps": 12, "kv_cache": "prefix"}
    r = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, extra_body=extra)
    _, ids = expected_text(session, "abc", **extra)
    assert r.choices[0].model_extra["token_ids"] == ids[:10]
    assert r.usage.completion_tokens == min(10, len(ids))


def test_chat_uses_the_template(client, session):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    text, _ = expected_text(session, "hi", chat=True)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    c = client.completions.create(model=MODEL, prompt="hi")
    assert c.id.startswith("cmpl-") and not c.id.startswith("chatcmpl-")


@pytest.mark.parametrize("chat", [False, True])
def test_stream_equals_non_stream(client, chat):
    extra = {"gen_length": 32, "block_length": 8, "steps": 16}
    if chat:
        msgs = [{"role": "user", "content": "stream me"}]
        full = client.chat.completions.create(model=MODEL, messages=msgs, extra_body=extra)
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, stream=True,
                                                     extra_body=extra))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert streamed == full.choices[0].message.content
    else:
        full = client.completions.create(model=MODEL, prompt="stream me", extra_body=extra)
        chunks = list(client.completions.create(model=MODEL, prompt="stream me", stream=True,
                                                extra_body=extra))
        streamed = "".join(c.choices[0].text for c in chunks)
        assert streamed == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert len(chunks) >= 2
    assert all(c.id.startswith("chatcmpl-" if chat else "cmpl-") for c in chunks)


def test_sse_wire_format(tiny_server):
    body = {"model": MODEL, "prompt": "x", "stream": True}
    with httpx.stream("POST", tiny_server.base + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_32_concurrent_requests_equal_single(client, session):
    prompts = [f"request {i} " + "x" * (i % 7) for i in range(32)]
    extra = [{"temperature": 0.7, "seed": i} if i % 4 == 3 else {} for i in range(32)]

    def call(i):
        return client.completions.create(model=MODEL, prompt=prompts[i], extra_body=extra[i])

    with ThreadPoolExecutor(32) as ex:
        results = list(ex.map(call, range(32)))
    for i, r in enumerate(results):
        want = expected_text(session, prompts[i], **extra[i])[1]
        assert r.choices[0].model_extra["token_ids"] == want, i
    single = call(5)                                   # and alone through the server
    assert single.choices[0].text == results[5].choices[0].text


def _wait_idle(server, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = server.metrics()
        if m["dlc_running_requests"] == 0 and m["dlc_kv_cache_used_slots"] == 0 \
                and m["dlc_queue_length"] == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"server did not return to idle: {m}")


def test_disconnect_mid_stream_frees_the_cache(tiny_server):
    before = _wait_idle(tiny_server).get('dlc_requests_total{status="cancelled"}', 0)
    body = {"model": MODEL, "prompt": "long one", "stream": True, "gen_length": 96, "block_length": 8,
            "steps": 96}
    for _ in range(3):
        with httpx.stream("POST", tiny_server.base + "/v1/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break                               # first block arrived: hang up mid-stream
        m = tiny_server.metrics()
    m = _wait_idle(tiny_server)
    assert m['dlc_requests_total{status="cancelled"}'] >= before + 3
    assert httpx.get(tiny_server.base + "/health").status_code == 200


BAD = [
    ("malformed JSON", '{"model": "tiny-llada", "prompt": ', None),
    ("wrong type max_tokens", {"prompt": "a", "max_tokens": "ten"}, "max_tokens"),
    ("wrong type temperature", {"prompt": "a", "temperature": "hot"}, "temperature"),
    ("wrong type prompt", {"prompt": 5}, "prompt"),
    ("missing prompt", {}, "prompt"),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ("negative gen_length", {"prompt": "a", "gen_length": -8}, "gen_length"),
    ("zero steps", {"prompt": "a", "steps": 0}, "steps"),
    ("oversize gen_length", {"prompt": "a", "gen_length": 4096, "block_length": 32, "steps": 4096},
     "maximum"),
    ("prompt past max sequence", {"prompt": "y" * 200}, "maximum"),
    ("block not dividing", {"prompt": "a", "gen_length": 20, "block_length": 8}, "multiple"),
    ("bad kv_cache", {"prompt": "a", "kv_cache": "paged"}, "kv_cache"),
    ("threshold out of range", {"prompt": "a", "threshold": 2.0}, "threshold"),
    ("unknown field", {"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ("n past 128", {"prompt": "a", "n": 129}, "Input should be less than or equal to 128"),
    ("best_of > 1", {"prompt": "a", "best_of": 2}, "best_of > 1 is not supported"),
    ("too many stop strings", {"prompt": "a", "stop": [str(i) for i in range(17)]}, "at most 16"),
    ("empty stop string", {"prompt": "a", "stop": [""]}, "1 to 256 characters"),
    ("stop id out of vocab", {"prompt": "a", "stop_token_ids": [10 ** 6]}, "stop_token_ids must be"),
    ("stop id is the mask", {"prompt": "a", "stop_token_ids": [257]}, "mask id"),
    ("presence penalty", {"prompt": "a", "presence_penalty": 0.5}, "Input should be less than or equal to 0"),
    ("provisional without stream", {"prompt": "a", "provisional": True}, "stream"),
    ("stream_options without stream", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream"),
    ("steps past gen_length", {"prompt": "a", "steps": 10 ** 30}, "steps must be in [1, 16]"),
    ("seed past 2^63 - 1", {"prompt": "a", "seed": 2 ** 64, "temperature": 0.5}, "seed must be in"),
    ("empty prompt", {"prompt": ""}, "empty"),
]


@pytest.mark.parametrize("name,body,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_400(tiny_server, name, body, needle):
    url = tiny_server.base + "/v1/completions"
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if needle:
        assert needle in err["message"], err


def test_bad_chat_input_and_server_stays_up(tiny_server, client):
    url = tiny_server.base + "/v1/chat/completions"
    for body in ({"model": MODEL, "messages": "hi"}, {"model": MODEL, "messages": []},
                 {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}):
        r = httpx.post(url, json=body)
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt="still alive").choices


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-5", prompt="a")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "a"}])


def test_metrics_names(tiny_server):
    m = tiny_server.metrics()
    for name in ("dlc_queue_length", "dlc_running_requests", "dlc_phase_refresh_share",
                 "dlc_tokens_per_second", "dlc_step_seconds_count", "dlc_time_to_first_token_seconds_count",
                 "dlc_kv_cache_usage_ratio", "dlc_granularity_chunk"):
        assert name in m
    assert m["dlc_step_seconds_count"] > 0 and m["dlc_time_to_first_token_seconds_count"] > 0
    assert m['dlc_phase_tokens_total{phase="refresh"}'] > 0 and m['dlc_phase_tokens_total{phase="reuse"}'] > 0


def test_non_streaming_disconnect_cancels(tiny_server):
    before = _wait_idle(tiny_server).get('dlc_requests_total{status="cancelled"}', 0)
    body = {"model": MODEL, "prompt": "long long", "gen_length": 96, "block_length": 8,
            "steps": 96}   # no EOS
    # The generation takes ~0.5 s on a 2-core CPU; the server reads the hang-up as it happens (no poll), so
    # the client hangs up at 0.1 s, well before the request could finish.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server.base + "/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.1))
    m = _wait_idle(tiny_server)
    assert m['dlc_requests_total{status="cancelled"}'] >= before + 1


def test_echo_and_token_prompts(client):
    plain = client.completions.create(model=MODEL, prompt="echo me")
    echoed = client.completions.create(model=MODEL, prompt="echo me", echo=True)
    assert echoed.choices[0].text == "echo me" + plain.choices[0].text
    by_ids = client.completions.create(model=MODEL, prompt=list(b"echo me"))
    assert by_ids.choices[0].text == plain.choices[0].text
    two = client.completions.create(model=MODEL, prompt=["echo me", "other"])
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == plain.choices[0].text
