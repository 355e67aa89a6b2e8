"""`dlc serve dlc-tiny` (the bundled trained model): real answers through the OpenAI client, concurrently,
each identical to generate() alone, streamed text equal to the non-streamed text, in every KV mode."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import decode_tokens, encode_prompt, open_model
from dlc.tiny.tasks import eval_set, score

N = 24


@pytest.fixture(scope="module")
def server(server_process):
    srv = server_process("dlc-tiny")       # gen_length / block_length / steps from its generation_config.json
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=60)


@pytest.mark.parametrize("kv", ["none", "dual"])
def test_concurrent_chat_answers_equal_generate(client, kv):
    pairs = eval_set(N)

    def ask(prompt):
        r = client.chat.completions.create(model="dlc-tiny", messages=[{"role": "user", "content": prompt}],
                                           extra_body={"kv_cache": kv})
        return r.choices[0].message.content

    with ThreadPoolExecutor(N) as ex:
        answers = list(ex.map(ask, [p for p, _ in pairs]))
    s = open_model("dlc-tiny", progress=False)
    cfg = GenerationConfig(gen_length=8, block_length=4, steps=8, kv_cache=kv, stop_at_eos=True)
    alone = [decode_tokens(s, generate(s.runner, [encode_prompt(s, p, True)], cfg).token_ids[0]) for p, _ in pairs]
    assert answers == alone
    assert score([p for p, _ in pairs], answers) >= 0.9


def test_stream_equals_non_stream(client):
    msgs = [{"role": "user", "content": "sort fjhhghc"}]
    full = client.chat.completions.create(model="dlc-tiny", messages=msgs).choices[0].message.content
    chunks = list(client.chat.completions.create(model="dlc-tiny", messages=msgs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full == "cfghhhj"
