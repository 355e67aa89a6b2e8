"""Sampling controls and logprobs through `dlc serve` (the official openai client): top_k / top_p / min_p with
a seed reproduce generate(), logprobs (completions: integer k; chat: logprobs + top_logprobs) streamed and
not, the parallel decoders as request fields, and bad values answered 400 naming the field."""
import math

import httpx
import openai
import pytest

from server_helpers import MODEL, reference



def test_filters_with_a_seed_reproduce_generate(client, session):
    outs = set()
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=5, top_p=0.9, min_p=0.1), dict()):
        extra = {k: v for k, v in kw.items() if k != "top_p"}
        r = client.completions.create(model=MODEL, prompt="Hello there", temperature=1.5, seed=7,
                                      top_p=kw.get("top_p", openai.NOT_GIVEN), extra_body=extra)
        ids = (r.choices[0].token_ids if hasattr(r.choices[0], "token_ids")
               else r.choices[0].model_extra["token_ids"])
        assert ids == reference(session, "Hello there", temperature=1.5, seed=7, **kw), kw
        outs.add(tuple(ids))
    assert len(outs) > 2                                            # the filters change the samples


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Hello there", logprobs=3)
    lp = r.choices[0].logprobs
    n = len(lp.tokens)
    assert n == len(r.choices[0].model_extra["token_ids"]) > 0
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert v <= 0 and 1 <= len(top) <= 3
        assert math.isclose(max(top.values()), v, rel_tol=1e-6)    # T = 0: the token is its step's top-1
    plain = client.completions.create(model=MODEL, prompt="Hello there")
    assert plain.choices[0].logprobs is None and plain.choices[0].text == r.choices[0].text


def test_chat_logprobs_streamed_and_not(client):
    msgs = [{"role": "user", "content": "hi"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=2)
    content = full.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert len({round(c.logprob, 5) for c in content}) > 1
    streamed = []
    for ch in client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=2,
                                             stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
    assert [(c.token, round(c.logprob, 9)) for c in streamed] == [(c.token, round(c.logprob, 9))
                                                                  for c in content]
    nolp = client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True)
    assert all(c.top_logprobs == [] for c in nolp.choices[0].logprobs.content)


@pytest.mark.parametrize("extra", [dict(threshold=0.9, low_threshold=0.3), dict(entropy_bound=1.0),
                                   dict(threshold=0.9, credit=True), dict(threshold=0.9, smoothing=True),
                                   dict(threshold=0.9, smoothing=True, smoothing_top_k=4)])
def test_parallel_decoders_as_request_fields(client, session, extra):
    r = client.completions.create(model=MODEL, prompt="abc", extra_body=extra)
    assert r.choices[0].model_extra["token_ids"] == reference(session, "abc", **extra)


BAD = [({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
       ({"min_p": 1.5}, "min_p"), ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"),
       ({"low_threshold": 1.5}, "low_threshold"), ({"entropy_bound": -1}, "entropy_bound"),
       ({"low_threshold": 0.95, "threshold": 0.9}, "low_threshold"),
       ({"entropy_bound": 1.0, "factor": 1.0}, "entropy_bound"), ({"credit": "yes"}, "credit"),
       ({"smoothing_top_k": 4}, "smoothing_top_k"),
       ({"smoothing": True, "smoothing_top_k": 0}, "smoothing_top_k")]


@pytest.mark.parametrize("body,field", BAD, ids=[str(b) for b, _ in BAD])
def test_bad_sampling_fields_are_400(tiny_server, body, field):
    r = httpx.post(tiny_server.base + "/v1/completions", json={"model": MODEL, "prompt": "a", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in (err["param"] or "") and field in err["message"], err


def test_chat_top_logprobs_needs_logprobs(tiny_server):
    r = httpx.post(tiny_server.base + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
