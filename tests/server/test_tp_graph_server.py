"""`dlc serve --tensor-parallel-size 2 --cuda-graphs` on CPU (gloo): every rank runs the graph runner's
static-buffer Reuse steps (uncaptured on CPU, the code path CUDA captures), warmed at startup on both ranks;
the official openai client gets the tokens one process generates for concurrent requests (batched together
when they meet: B=3 replays bucket 4), and the startup report names the warmed shapes."""
import concurrent.futures

import openai
import pytest

from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import encode_prompt, open_model

MODEL = "tiny-dream"
GEN = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")


@pytest.fixture(scope="module")
def srv(server_process):
    s = server_process(MODEL, "--tensor-parallel-size", "2", "--cuda-graphs", "--max-seq-len", "128",
                       "--gen-length", "16", "--block-length", "8", "--steps", "8", "--kv-cache", "dual",
                       "--dtype", "fp32", "--max-batch-size", "4")
    yield s
    s.stop()


def test_tp_graph_server_matches_one_process(srv):
    client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert "shapes warmed uncaptured" in srv.output()           # both ranks warmed every bucket
    one = open_model(MODEL, dtype="fp32", progress=False)
    prompts = [("graphs on two ranks", 0.0), ("tensor parallel", 0.8), ("padded bucket", 0.0)]

    def ask(p):
        r = client.completions.create(model=MODEL, prompt=p[0], temperature=p[1], seed=7)
        return r.choices[0].model_extra["token_ids"]
    with concurrent.futures.ThreadPoolExecutor(3) as ex:         # 3 at once
        got = list(ex.map(ask, prompts))
    want = [generate(one.runner, [encode_prompt(one, p, False)],
                     GenerationConfig(**GEN, temperature=t, seed=7, stop_at_eos=True)).token_ids[0]
            for p, t in prompts]
    assert got == want
    assert len({tuple(w) for w in want}) == 3                    # decisive model: outputs vary
