"""`dlc serve ENGINE_DIR` of an export engine built with `--decode-extras` (of the tiny-llada preset: random
weights, where sampling filters and smoothing do change the output) through the official openai client:
seeded top_k / top_p / min_p at T > 0 and iteration smoothing return exactly what generate() gives on the
eager model, and each of them changes the answer."""
import openai
import pytest

from server_helpers import MODEL, reference

PROMPT = "Hello there"


@pytest.fixture(scope="module")
def engine_server(server_process, tmp_path_factory):
    from dlc.compiler.build import compile_model
    out = tmp_path_factory.mktemp("served-extras") / "tiny-llada-export"
    compile_model(MODEL, "cpu", str(out), backend="export", max_seq_len=128, max_batch_size=8, block_length=8,
                  echo=lambda *a, **k: None, decode_extras=True)
    srv = server_process(str(out), "--served-model-name", "tiny-engine", "--gen-length", "16",
                         "--block-length", "8", "--steps", "8", "--kv-cache", "dual")    # server_helpers.GEN
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(engine_server):
    return openai.OpenAI(base_url=engine_server.base + "/v1", api_key="x", max_retries=0, timeout=120)


def _ids(client, **kw):
    top_p = kw.pop("top_p", openai.NOT_GIVEN)
    temperature = kw.pop("temperature", openai.NOT_GIVEN)
    r = client.completions.create(model="tiny-engine", prompt=PROMPT, temperature=temperature, seed=7,
                                  top_p=top_p, extra_body=kw)
    c = r.choices[0]
    return c.token_ids if hasattr(c, "token_ids") else c.model_extra["token_ids"]


def test_filters_at_temperature_sample_as_the_eager_model(client, session):
    plain = _ids(client, temperature=1.5)
    assert plain == reference(session, PROMPT, temperature=1.5, seed=7)
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3)):
        got = _ids(client, temperature=1.5, **kw)
        assert got == reference(session, PROMPT, temperature=1.5, seed=7, **kw), kw
        assert got != plain, kw                                     # the filter really acted


def test_smoothing_decodes_as_the_eager_model(client, session):
    got = _ids(client, threshold=0.3, smoothing=True)
    assert got == reference(session, PROMPT, threshold=0.3, smoothing=True, seed=7)
    assert got != _ids(client, threshold=0.3)                       # the soft inputs really entered
