"""`dlc serve --batch-invariant` through the official openai client: each probe completion alone, then the
same probes sent at once among background requests of other lengths and temperatures: the same tokens, at
T = 0 and at seeded T = 0.8. (On CPU the mode's kernels are CUDA-only, so this checks the served path with
the flag on; the GPU tests check the kernels.)"""
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from server_helpers import MODEL

PROMPTS = ["Hello there", "The capital of France", "1 2 3 4", "a b c d e f g", "Once upon", "zz top"]


@pytest.fixture(scope="module")
def invariant_client(server_process):
    srv = server_process(MODEL, "--batch-invariant", "--max-seq-len", "128", "--gen-length", "16",
                         "--block-length", "8", "--steps", "16", "--kv-cache", "dual", "--max-num-tokens",
                         "1024")
    yield srv, openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    srv.stop()


def _ids(r) -> list[int]:
    c = r.choices[0]
    return c.token_ids if hasattr(c, "token_ids") else c.model_extra["token_ids"]


def _probe(client, i: int) -> list[int]:
    temp = 0.0 if i % 2 == 0 else 0.8
    return _ids(client.completions.create(model=MODEL, prompt=PROMPTS[i], temperature=temp, seed=100 + i))


def _background(client, i: int) -> None:
    client.completions.create(model=MODEL, prompt="noise " * (1 + i % 5), temperature=0.8 * (i % 2),
                              extra_body={"gen_length": 8 * (1 + i % 3), "steps": 8 * (1 + i % 3)})


def test_served_outputs_do_not_depend_on_concurrent_requests(invariant_client):
    srv, invariant_client = invariant_client
    alone = [_probe(invariant_client, i) for i in range(len(PROMPTS))]
    assert len({tuple(a) for a in alone}) >= len(PROMPTS) - 1                    # outputs vary by prompt
    with ThreadPoolExecutor(16) as pool:
        bg = [pool.submit(_background, invariant_client, i) for i in range(10)]
        together = [pool.submit(_probe, invariant_client, i) for i in range(len(PROMPTS))]
        bg += [pool.submit(_background, invariant_client, 10 + i) for i in range(10)]
        for f in bg:
            f.result()
        assert [f.result() for f in together] == alone
    m = srv.metrics()
    assert m["dlc_phase_mixed_iterations_total"] > 0                         # Refresh beside Reuse rows,
    assert m["dlc_mixed_iterations_total"] == 0                              # as separate calls in the mode
