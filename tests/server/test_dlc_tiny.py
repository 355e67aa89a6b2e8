"""`dlc serve dlc-tiny` (the bundled trained model): real answers through the OpenAI client, concurrently,
each identical to generate() alone (KV modes mixed in one batch), streamed text equal to the non-streamed."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import decode_tokens, encode_prompt, open_model
from dlc.tiny.tasks import eval_set, score

N = 18


@pytest.fixture(scope="module")
def server(server_process):
    srv = server_process("dlc-tiny")       # gen_length / block_length / steps from its generation_config.json
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.slow
def test_concurrent_chat_answers_equal_generate(client):
    pairs = eval_set(N)
    kvs = [("none", "prefix", "dual")[i % 3] for i in range(N)]

    def ask(i):
        r = client.chat.completions.create(model="dlc-tiny",
                                           messages=[{"role": "user", "content": pairs[i][0]}],
                                           extra_body={"kv_cache": kvs[i]})
        return r.choices[0].message.content

    with ThreadPoolExecutor(N) as ex:
        answers = list(ex.map(ask, range(N)))
    s = open_model("dlc-tiny", progress=False)
    alone = []
    for (p, _), kv in zip(pairs, kvs):
        cfg = GenerationConfig(gen_length=8, block_length=4, steps=8, kv_cache=kv, stop_at_eos=True)
        alone.append(decode_tokens(s, generate(s.runner, [encode_prompt(s, p, True)], cfg).token_ids[0]))
    assert answers == alone
    assert score([p for p, _ in pairs], answers) >= 0.9


def test_stream_equals_non_stream(client):
    msgs = [{"role": "user", "content": "sort fjhhghc"}]
    full = client.chat.completions.create(model="dlc-tiny", messages=msgs).choices[0].message.content
    chunks = list(client.chat.completions.create(model="dlc-tiny", messages=msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full == "cfghhhj"


def test_stop_string_across_blocks_is_held_back(client):
    """'cfgh' + 'hhj' (blocks of 4): stop 'hh' starts in the first block; the first delta must hold the
    'h'."""
    msgs = [{"role": "user", "content": "sort fjhhghc"}]
    chunks = list(client.chat.completions.create(model="dlc-tiny", messages=msgs, stream=True, stop="hh"))
    pieces = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(pieces) == "cfg" and chunks[-1].choices[0].finish_reason == "stop"
    full = client.chat.completions.create(model="dlc-tiny", messages=msgs, stop=["hh", "zz"])
    assert full.choices[0].message.content == "cfg" and full.choices[0].finish_reason == "stop"

