"""`dlc serve` runs every T = 0 rule's Reuse steps ahead (issues 18 / 15): completions with threshold,
hierarchical, entropy-bound and credit decoding, driven by the official openai client, equal generate()'s
tokens, and /metrics shows the runs the decoding core's device commit made (``dlc_lookahead_runs_total``)."""
import openai
import pytest

from server_helpers import MODEL, reference

GEN = dict(gen_length=32, block_length=16, steps=32)
RULES = [dict(threshold=0.3), dict(threshold=0.5, low_threshold=0.1), dict(entropy_bound=3.0),
         dict(threshold=0.3, credit=True)]


@pytest.fixture(scope="module")
def server(server_process):
    srv = server_process(MODEL, "--max-seq-len", "128", "--gen-length", "32", "--block-length", "16",
                         "--steps", "32", "--kv-cache", "dual", "--max-num-tokens", "1024", "--cuda-graphs",
                         "--lookahead-steps", "16", "--lookahead-max-ms", "0")
    yield srv
    srv.stop()


def test_served_rules_run_ahead_with_generates_tokens(server, session):
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    got, want = [], []
    for rule in RULES:
        for prompt in ("12+34", "the quick brown fox"):
            r = client.completions.create(model=MODEL, prompt=prompt, extra_body=rule)
            got.append(r.choices[0].model_extra["token_ids"])
            want.append(reference(session, prompt, **GEN, **rule))
    assert got == want
    assert len({tuple(g) for g in got}) > 2
    m = server.metrics()
    assert m['dlc_lookahead_runs_total{rule="rules"}'] >= len(RULES)
