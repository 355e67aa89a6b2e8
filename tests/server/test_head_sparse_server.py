"""`dlc serve --sparse-retention` through the official openai client: a real server on 127.0.0.1 whose eager
model runs head-sparse Reuse on the graph runner's static path (no capture on CPU) answers with the tokens of
generate() on the head-sparse eager runner, not the dense ones."""
import openai
import pytest

from server_helpers import GEN, MODEL
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.session import encode_prompt


@pytest.fixture(scope="module")
def sparse_server(server_process):
    srv = server_process(MODEL, "--max-seq-len", "128", "--gen-length", "16", "--block-length", "8",
                         "--steps", "8", "--kv-cache", "dual", "--max-num-tokens", "1024", "--cuda-graphs",
                         "--graph-decode", "exact", "--sparse-retention", "0.25", "--device", "cpu")
    yield srv
    srv.stop()


def test_completions_equal_the_head_sparse_eager_runner(sparse_server, session):
    client = openai.OpenAI(base_url=sparse_server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    sparse = EagerRunner(session.runner.model, sparse_retention=0.25)
    differ = 0
    for prompt in ("The quick brown fox jumps over the lazy dog and", "hello", "1 2 3 4 5 6 7 8 9 10 11 12"):
        ids = encode_prompt(session, prompt, False)
        cfg = GenerationConfig(**GEN, stop_at_eos=True)
        want = generate(sparse, [ids], cfg).token_ids[0]
        r = client.completions.create(model=MODEL, prompt=prompt)
        assert r.choices[0].model_extra["token_ids"] == want
        differ += want != generate(session.runner, [ids], cfg).token_ids[0]
    assert differ >= 1                                        # the kept quarter changes answers
    m = sparse_server.metrics()
    assert m.get('dlc_phase_tokens_total{phase="reuse"}', 0) > 0
