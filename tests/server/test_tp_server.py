"""`dlc serve --tensor-parallel-size 2` on CPU (gloo): the official openai client gets the tokens one process
generates (tiny Dream: GQA, shifted logits; no cache, prefix and dual; T = 0 and seeded T > 0), and a killed
worker makes the server fail the request and exit with a one-line error naming the rank, instead of
hanging."""
import re
import signal
import subprocess
import sys
import time

import openai
import pytest

from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import encode_prompt, open_model

MODEL = "tiny-dream"
GEN = dict(gen_length=16, block_length=8, steps=8)
ARGS = ("--tensor-parallel-size", "2", "--max-seq-len", "128", "--gen-length", "16", "--block-length", "8",
        "--steps", "8", "--kv-cache", "dual", "--dtype", "fp32")


@pytest.fixture(scope="module")
def tp_server(server_process):
    srv = server_process(MODEL, *ARGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tp_client(tp_server):
    return openai.OpenAI(base_url=tp_server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


def reference(session, prompt: str, **params) -> list[int]:
    ids = encode_prompt(session, prompt, False)
    return generate(session.runner, [ids],
                    GenerationConfig(**{**GEN, **params}, stop_at_eos=True)).token_ids[0]


@pytest.mark.parametrize("kv", ["none", "prefix", "dual"])
def test_tp_server_matches_one_process(tp_client, kv):
    one = open_model(MODEL, dtype="fp32", progress=False)
    seen = []
    for prompt, temperature in (("tensor parallel", 0.0), ("two ranks", 0.8)):
        r = tp_client.completions.create(model=MODEL, prompt=prompt, temperature=temperature, seed=5,
                                         extra_body={"kv_cache": kv})
        want = reference(one, prompt, kv_cache=kv, temperature=temperature, seed=5)
        assert r.choices[0].model_extra["token_ids"] == want
        seen.append(want)
    assert seen[0] != seen[1] and len(set(seen[0])) > 2          # decisive model: outputs vary


def test_killed_worker_stops_the_server(server_process):
    srv = server_process("tiny-llada", "--tensor-parallel-size", "2", "--max-seq-len", "64", "--gen-length",
                         "8", "--block-length", "8", "--steps", "4")
    try:
        pid = int(re.search(r"rank 1 pid (\d+)", srv.output()).group(1))
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert client.completions.create(model="tiny-llada",
                                         prompt="alive").choices[0].model_extra["token_ids"]
        subprocess.run(["kill", "-9", str(pid)], check=True)
        t0 = time.monotonic()
        with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
            client.completions.create(model="tiny-llada", prompt="after the kill")
        code = srv.proc.wait(30)                                # exits by itself, no signal sent
        assert time.monotonic() - t0 < 30
        out = srv.output()
        assert code != 0
        assert f"rank 1 (pid {pid}) died" in out and "Error: stopped" in out
        assert "Traceback" not in out
    finally:
        srv.stop(signal.SIGKILL if srv.proc.poll() is None else signal.SIGTERM)


@pytest.mark.slow
def test_hung_worker_fails_the_group_after_the_timeout(server_process, monkeypatch):
    """A worker that stops answering (SIGSTOP: alive, silent) fails the collective at DLC_TP_TIMEOUT_S."""
    monkeypatch.setenv("DLC_TP_TIMEOUT_S", "5")
    srv = server_process("tiny-llada", "--tensor-parallel-size", "2", "--max-seq-len", "64", "--gen-length",
                         "8", "--block-length", "8", "--steps", "4")
    pid = int(re.search(r"rank 1 pid (\d+)", srv.output()).group(1))
    try:
        client = openai.OpenAI(base_url=srv.base + "/v1", api_key="unused", max_retries=0, timeout=60)
        subprocess.run(["kill", "-STOP", str(pid)], check=True)
        t0 = time.monotonic()
        with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
            client.completions.create(model="tiny-llada", prompt="anyone there")
        assert srv.proc.wait(30) != 0 and time.monotonic() - t0 < 30
        assert "group of 2 ranks is down" in srv.output()
    finally:
        subprocess.run(["kill", "-9", str(pid)])
        srv.stop(signal.SIGKILL if srv.proc.poll() is None else signal.SIGTERM)


def test_tensor_parallel_size_is_validated():
    from dlc.runtime.config import ServeConfig
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        ServeConfig(tensor_parallel_size=0)
    assert ServeConfig(tensor_parallel_size=2, compile=True).compile     # compiled ranks: test_tp_compile.py
    assert ServeConfig.from_dict({"model": "tiny-llada", "tensor_parallel_size": 2}).tensor_parallel_size == 2
    r = subprocess.run([sys.executable, "-m", "dlc.cli", "serve", "tiny-llada", "--tp", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "tensor_parallel_size 3" in r.stderr and "Traceback" not in r.stderr
