"""A checkpoint directory without a chat template, --api-key, a tiny queue (429) and SIGTERM draining."""
import signal
import threading
import time

import httpx
import openai
import pytest

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dlc.models.loading import load_model, save_checkpoint
    lm = load_model("tiny-llada")
    lm.tokenizer.chat_template = None
    path = tmp_path_factory.mktemp("notemplate")
    save_checkpoint(lm.model, path, tokenizer=lm.tokenizer)
    (path / "generation_config.json").write_text('{"gen_length": 8, "block_length": 8, "steps": 4}')
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory, server_process):
    cfg = tmp_path_factory.mktemp("cfg") / "serve.yaml"
    cfg.write_text(f"api_key: {KEY}\nmax_queue: 1\nmax_batch_size: 1\nmax_seq_len: "
                   "160\nserved_model_name: tiny\n")
    srv = server_process(str(ckpt), "--config", str(cfg))
    yield srv
    srv.stop()


def test_api_key_enforced(server):
    bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.post(server.base + "/v1/completions",
                      json={"model": "tiny", "prompt": "a"}).status_code == 401
    good = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["tiny"]
    r = good.completions.create(model="tiny", prompt="a")
    assert r.usage.completion_tokens <= 8                      # gen_length from generation_config.json


def test_chat_without_template_is_400(server):
    c = openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"]


def test_full_queue_is_429(server):
    body = {"model": "tiny", "prompt": "long long", "gen_length": 128, "block_length": 8,
            "steps": 128}  # no EOS
    headers = {"authorization": f"Bearer {KEY}"}
    codes, retry_after = [], []

    def call():
        r = httpx.post(server.base + "/v1/completions", json=body, headers=headers, timeout=60)
        codes.append(r.status_code)
        if r.status_code == 429:
            retry_after.append(r.headers.get("retry-after"))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
    assert retry_after and all(v == "1" for v in retry_after)
    assert httpx.get(server.base + "/health").status_code == 200


def test_sigterm_drains_in_flight(server):
    """Runs last in this module: SIGTERM lets the in-flight request finish, then the process exits cleanly."""
    body = {"model": "tiny", "prompt": "drain", "gen_length": 128, "block_length": 8, "steps": 128}
    result = {}

    def call():
        r = httpx.post(server.base + "/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                       timeout=60)
        result["status"], result["body"] = r.status_code, r.json()

    t = threading.Thread(target=call)
    t.start()
    deadline = time.time() + 10
    while server.metrics()["dlc_running_requests"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["status"] == 200 and result["body"]["choices"][0]["finish_reason"] in ("stop", "length")
    assert server.proc.wait(30) == 0
