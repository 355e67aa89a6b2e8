"""OpenAI API features of `dlc serve` (the shared tiny-llada server of conftest) through the official openai
client: max_tokens as the generation length, stop strings and stop_token_ids (streamed and not), n > 1,
stream_options.include_usage, provisional step events; malformed bodies through raw httpx."""
import json
import time

import httpx
import pytest

from server_helpers import MODEL, reference
from dlc.runtime.session import decode_tokens



def test_max_tokens_sets_the_generation_length(client, session):
    r = client.completions.create(model=MODEL, prompt="long answer", max_tokens=37)
    want = reference(session, "long answer", gen_length=40, steps=20)     # 37 -> 5 blocks of 8, 4 steps each
    assert len(want) > 16                         # more than the server's default gen_length 16
    assert r.choices[0].model_extra["token_ids"] == want[:37]
    assert r.usage.completion_tokens == len(want[:37])
    assert r.choices[0].finish_reason == ("length" if len(want) >= 37 else "stop")
    small = client.completions.create(model=MODEL, prompt="long answer", max_tokens=3)   # one block of 8
    assert small.choices[0].model_extra["token_ids"] == \
        reference(session, "long answer", gen_length=8, steps=4)[:3]
    assert small.usage.completion_tokens == 3


def test_max_tokens_past_the_model_maximum_is_clamped(client, session):
    prompt = "clamp"                                  # 5 tokens: 128 - 5 -> 120 generated columns at most
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1000)
    want = reference(session, prompt, gen_length=120, steps=60)
    assert r.choices[0].model_extra["token_ids"] == want and r.usage.completion_tokens == len(want) > 16
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=20)
    assert c.usage.completion_tokens <= 20
    text = decode_tokens(session, reference(session, "hi", chat=True, gen_length=24, steps=12)[:20])
    assert c.choices[0].message.content == text


def _fresh_substring(text: str, start: int) -> str:
    """A 2-character substring of ``text`` at or after ``start`` whose first occurrence is there."""
    for i in range(start, len(text) - 1):
        s = text[i:i + 2]
        if "\ufffd" not in s and text.find(s) == i:
            return s
    raise AssertionError(f"no fresh substring in {text!r}")


@pytest.mark.parametrize("chat", [False, True])
def test_stop_strings_cut_the_text(client, chat):
    extra = {"gen_length": 32, "block_length": 8, "steps": 16}
    ask = (lambda **kw: client.chat.completions.create(model=MODEL,
                                                       messages=[{"role": "user", "content": "s"}],
                                                       extra_body=extra, **kw)) if chat else \
        (lambda **kw: client.completions.create(model=MODEL, prompt="stop here", extra_body=extra, **kw))
    get = (lambda c: c.message.content) if chat else (lambda c: c.text)
    full = ask()
    text = get(full.choices[0])
    stop = _fresh_substring(text, len(text) // 3)
    cut = ask(stop=[stop, "\x00never"])
    assert get(cut.choices[0]) == text[:text.find(stop)] and stop not in get(cut.choices[0])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens
    chunks = list(ask(stop=stop, stream=True))
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks]
    assert "".join(pieces) == get(cut.choices[0]) and all(stop not in p for p in pieces)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids_end_the_request_at_the_block(client, session):
    extra = {"gen_length": 32, "block_length": 8, "steps": 16}
    full = client.completions.create(model=MODEL, prompt="ids", extra_body=extra)
    ids = full.choices[0].model_extra["token_ids"]
    # in the second block, first occurrence
    j = next(j for j in range(9, len(ids)) if ids[j] not in ids[:j])
    r = client.completions.create(model=MODEL, prompt="ids", extra_body={**extra, "stop_token_ids": [ids[j]]})
    assert r.choices[0].model_extra["token_ids"] == ids[:j] and r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == decode_tokens(session, ids[:j])
    assert r.model_extra["dlc"]["forwards"][0] < full.model_extra["dlc"]["forwards"][0]   # ended at block 2
    chunks = list(client.completions.create(model=MODEL, prompt="ids", stream=True,
                                            extra_body={**extra, "stop_token_ids": [ids[j]]}))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_n_samples_use_consecutive_seeds(client, session):
    r = client.completions.create(model=MODEL, prompt="sample", n=3, temperature=0.9, seed=11)
    got = [c.model_extra["token_ids"] for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert got == [reference(session, "sample", temperature=0.9, seed=11 + j) for j in range(3)]
    assert len({tuple(g) for g in got}) == 3
    assert r.usage.prompt_tokens == len("sample") and r.usage.completion_tokens == sum(len(g) for g in got)
    unseeded = client.completions.create(model=MODEL, prompt="sample", n=3, temperature=0.9)
    assert len({c.text for c in unseeded.choices}) == 3
    greedy = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    two = client.completions.create(model=MODEL, prompt=["a", "b"], n=2, temperature=0.9, seed=3)
    assert [c.model_extra["token_ids"] for c in two.choices] == [
        reference(session, p, temperature=0.9, seed=3 + j) for p in ("a", "b") for j in range(2)]


def test_streamed_n_and_include_usage(client):
    kw = dict(model=MODEL, prompt=["one", "two"], n=2, temperature=0.9, seed=5)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = {i: "" for i in range(4)}
    for c in chunks[:-1]:
        assert c.usage is None
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    finishes = {ch.index: ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason}
    assert finishes == {c.index: c.finish_reason for c in full.choices}
    plain = list(client.completions.create(model=MODEL, prompt="one", stream=True))
    assert all(c.usage is None for c in plain)


@pytest.mark.parametrize("chat", [False, True])
def test_provisional_stream(client, chat):
    extra = {"gen_length": 24, "block_length": 8, "steps": 24, "provisional": True}
    if chat:
        msgs = [{"role": "user", "content": "watch"}]
        chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, stream=True,
                                                     extra_body=extra))
        full = client.chat.completions.create(model=MODEL, messages=msgs,
                                              extra_body={**extra, "provisional": False})
        want, streamed = full.choices[0].message.content, "".join(c.choices[0].delta.content or ""
                                                                  for c in chunks)
    else:
        chunks = list(client.completions.create(model=MODEL, prompt="watch", stream=True, extra_body=extra))
        full = client.completions.create(model=MODEL, prompt="watch",
                                         extra_body={**extra, "provisional": False})
        want, streamed = full.choices[0].text, "".join(c.choices[0].text for c in chunks)
    assert streamed == want                              # text deltas carry committed text only
    steps = [c.choices[0].model_extra["dlc"]["provisional"] for c in chunks
             if (c.choices[0].model_extra or {}).get("dlc")]
    assert len(steps) == 24                               # one event per step (1 token per step here)
    seen: dict[int, int] = {}
    for s in steps:
        assert len(s["positions"]) == len(s["token_ids"]) == len(s["tokens"]) == 1
        for p, t in zip(s["positions"], s["token_ids"]):
            assert s["block_start"] + p not in seen       # each position is unmasked once
            seen[s["block_start"] + p] = t
    assert sorted(seen) == list(range(24))
    committed = [t for c in chunks for t in c.choices[0].model_extra.get("token_ids", [])]
    assert committed and [seen[k] for k in range(len(committed))] == committed


def _post(server, body, **kw):
    return httpx.post(server.base + "/v1/completions", timeout=30,
                      **({"content": body} if isinstance(body, bytes)
                                                                    else {"json": body}), **kw)


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("name,body,headers,status,needle", [
    ("invalid UTF-8", b'{"model": "tiny-llada", "prompt": "\xff\xfe"}', JSON, 400, "not valid UTF-8"),
    ("deep nesting", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400, "nested too deeply"),
    ("malformed", b'{"model": ', JSON, 400, "malformed JSON body"),
    ("text/plain", json.dumps({"model": MODEL, "prompt": "a"}).encode(), {"content-type": "text/plain"}, 415,
     "Content-Type: application/json"),
    ("no content type", json.dumps({"model": MODEL, "prompt": "a"}).encode(), {}, 415, "no Content-Type"),
    ("3 MB body", json.dumps({"model": MODEL, "prompt": "a" * 3_000_000}).encode(), JSON, 413, "exceeds"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_bodies(tiny_server, name, body, headers, status, needle):
    r = httpx.post(tiny_server.base + "/v1/completions", content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(tiny_server.base + "/health").status_code == 200


def test_a_request_that_can_never_fit_the_queue_is_400(tiny_server):
    r = httpx.post(tiny_server.base + "/v1/completions", json={"model": MODEL, "prompt": ["a"] * 300},
                   timeout=30)
    assert r.status_code == 400 and "queues at most 256" in r.json()["error"]["message"]
    r = httpx.post(tiny_server.base + "/v1/completions", json={"model": MODEL, "prompt": "a", "n": 100,
                                                               "stream": True, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200



def test_tokenizing_a_large_prompt_does_not_block_the_server(tiny_server):
    """A 1.9 MB prompt (under the 2 MiB body limit) takes seconds to tokenize; /health keeps answering
    meanwhile (on the event loop the longest gap between answers would be the whole tokenization)."""
    import threading
    result = {}

    def big():
        t0 = time.time()
        r = httpx.post(tiny_server.base + "/v1/completions",
                       json={"model": MODEL, "prompt": "ab c" * 475_000}, timeout=120)
        result["status"], result["message"] = r.status_code, r.json()["error"]["message"]
        result["seconds"] = time.time() - t0

    t = threading.Thread(target=big)
    answered = [time.time()]
    t.start()
    while t.is_alive():
        assert httpx.get(tiny_server.base + "/health", timeout=30).status_code == 200
        answered.append(time.time())
        time.sleep(0.02)
    assert result["status"] == 400 and "exceeds the maximum sequence length" in result["message"]
    if result["seconds"] < 1.0:
        pytest.skip("tokenizing was too fast here to tell")
    gap = max(b - a for a, b in zip(answered, answered[1:]))
    assert gap < 0.5 * result["seconds"], (gap, result["seconds"])
