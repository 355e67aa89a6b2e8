"""`dlc serve` of a block-diffusion model (tiny LLaDA2): OpenAI completions and chat through the official
client, block-diffusion request fields, streaming, and a 400 naming a bad field; answers equal generate()."""
import openai
import pytest

from dlc.runtime.decoding import resolve_decoder
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import decode_tokens, encode_prompt, open_model

MODEL = "tiny-llada2"


@pytest.fixture(scope="module")
def server(server_process):
    srv = server_process(MODEL, "--max-seq-len", "96", "--gen-length", "12", "--max-num-tokens", "1024")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def session():
    return open_model(MODEL, progress=False)


def _want(session, prompt, chat, **fields):
    ids = encode_prompt(session, prompt, chat)
    fields = resolve_decoder({"gen_length": 12, "block_length": 32, "steps_per_block": 32, "threshold": 0.95,
                              "kv_cache": "block", **fields})
    return decode_tokens(session,
                         generate(session.runner, [ids], GenerationConfig(**fields, stop_at_eos=True))
                         .token_ids[0])


@pytest.mark.parametrize("extra", [{}, {"block_length": 4, "steps_per_block": 2, "threshold": 0.1},
                                   {"decoder": "llada2.1-speed", "block_length": 4},
                                   {"decoder": "llada2.1", "block_length": 8, "edit_threshold": 0.2,
                                    "max_post_edit_steps": 2, "kv_cache": "none", "eos_early_stop": True}])
def test_completions_match_generate(server, session, extra):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="x")
    r = client.completions.create(model=MODEL, prompt="hello block", extra_body=extra)
    assert r.choices[0].text == _want(session, "hello block", False, **extra)
    chunks = list(client.completions.create(model=MODEL, prompt="hello block", stream=True, extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


def test_chat_matches_generate(server, session):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="x")
    extra = {"block_length": 4, "threshold": 0.2}
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       extra_body=extra)
    assert r.choices[0].message.content == _want(session, "hi", True, **extra)


@pytest.mark.parametrize("extra,param",
                         [({"kv_cache": "dual"}, "kv_cache"), ({"decoder": "llada"}, "decoder"),
                                         ({"steps_per_block": 0}, "steps_per_block")])
def test_bad_block_fields_are_400_naming_the_field(server, extra, param):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", extra_body=extra)
    assert param in str(e.value)
