"""`dlc serve ENGINE_DIR` of a block-diffusion engine (dlc-tiny-bd compiled with the export backend) through
the official openai client: concurrent chat and completion requests with different block decoders (llada2
threshold and exact, LLaDA2.1 editing, no cache) answer what the eager checkpoint answers alone, streaming
gives the same text, the engine's generation defaults apply, and what an engine cannot decode is a 400 naming
the field while the server stays up."""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dlc.runtime.decoding import resolve_decoder
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import decode_tokens, encode_prompt, open_model
from dlc.tiny.tasks import eval_set

NAME = "tiny-bd-engine"
DEFAULTS = {"gen_length": 8, "block_length": 4, "steps_per_block": 4, "threshold": 0.9, "kv_cache": "block",
            "decoder": "llada2"}                        # dlc-tiny-bd's generation_config.json
EXTRAS = [{}, {"threshold": 1.0}, {"decoder": "llada2.1", "edit_threshold": 0.5},
          {"kv_cache": "none", "threshold": 0.5}]


@pytest.fixture(scope="module")
def engine_dir(shared_engine):
    """The export engine tests/compiler/test_block_engines.py checks against eager: one build per run."""
    return shared_engine("dlc-tiny-bd", "export", max_seq_len=64, max_batch_size=8)


@pytest.fixture(scope="module")
def server(server_process, engine_dir):
    srv = server_process(str(engine_dir), "--served-model-name", NAME)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def eager():
    return open_model("dlc-tiny-bd", device="cpu", dtype="fp32", progress=False)


def _want(eager, prompt, chat, extra):
    fields = resolve_decoder({**DEFAULTS, **extra})
    ids = generate(eager.runner, [encode_prompt(eager, prompt, chat)],
                   GenerationConfig(**fields, stop_at_eos=True)).token_ids[0]
    return decode_tokens(eager, ids)


def _chat(client, prompt, extra):
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}],
                                       extra_body=extra)
    return r.choices[0].message.content


def test_concurrent_block_requests_answer_as_eager(client, eager):
    prompts = [p for p, _ in eval_set(6)]
    jobs = [(prompts[i % 6], EXTRAS[i % len(EXTRAS)]) for i in range(8)]
    with ThreadPoolExecutor(len(jobs)) as ex:
        answers = list(ex.map(lambda j: _chat(client, *j), jobs))
    for (prompt, extra), text in zip(jobs, answers):
        assert text == _want(eager, prompt, True, extra), (prompt, extra)
    assert len(set(answers)) > 3                                   # different prompts, different answers


def test_completion_streams_the_same_text(client, eager):
    prompt = eval_set(1)[0][0]
    r = client.completions.create(model=NAME, prompt=prompt, extra_body={"threshold": 1.0})
    assert r.choices[0].text == _want(eager, prompt, False, {"threshold": 1.0})
    chunks = list(client.completions.create(model=NAME, prompt=prompt, stream=True,
                                            extra_body={"threshold": 1.0}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text


@pytest.mark.parametrize("extra,param", [({"temperature": 0.5, "top_k": 3}, "top_k"),
                                        ({"kv_cache": "dual"}, "kv_cache")])
def test_undecodable_requests_are_400_naming_the_field(client, eager, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt="1+2", extra_body=extra)
    assert e.value.body["param"] == param
    assert _chat(client, "1+2", {}) == _want(eager, "1+2", True, {})       # the server stays up
