"""Stopping `dlc serve`: SIGTERM drains while still answering (/health 503, new requests 503), a stream still
running at the drain limit ends with an error event, SIGINT stops at once without tracebacks; a busy port
fails before the banner; the console prints a throughput line under load."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

LONG = {"model": "tiny-llada", "prompt": "drain me", "stream": True, "gen_length": 480, "block_length": 8,
        "steps": 480, "kv_cache": "none"}        # several seconds on a 2-core CPU


@pytest.fixture
def server(server_process, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("drain_timeout_s: 1.5\nlog_interval_s: 0.3\nmax_seq_len: 512\n")
    srv = server_process("tiny-llada", "--config", str(cfg))
    yield srv
    srv.stop()


def _stream_in_background(srv) -> tuple[threading.Thread, list]:
    lines: list[str] = []

    def run():
        try:
            with httpx.stream("POST", srv.base + "/v1/completions", json=LONG, timeout=60) as r:
                lines.extend(ln for ln in r.iter_lines() if ln)
        except httpx.HTTPError as e:
            lines.append(f"transport error: {e!r}")

    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 10
    while srv.metrics()["dlc_running_requests"] < 1 and time.time() < deadline:
        time.sleep(0.05)
    return t, lines


def _error_event(lines: list[str]) -> dict:
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return json.loads(lines[-2][6:])["error"]


def test_sigterm_drains_while_answering_then_ends_streams_with_an_error(server):
    t, lines = _stream_in_background(server)
    time.sleep(0.4)                                   # long enough for a throughput line
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    h = httpx.get(server.base + "/health", timeout=5)
    assert h.status_code == 503 and h.json()["error"]["code"] == "shutting_down"
    r = httpx.post(server.base + "/v1/completions", json={"model": "tiny-llada", "prompt": "late"}, timeout=5)
    assert r.status_code == 503
    t.join(30)
    assert "drain limit" in _error_event(lines)["message"]
    assert server.proc.wait(30) == 0
    out = server.output()
    assert "Traceback" not in out and "drained and stopped" in out
    assert "throughput" in out and "tokens/s; running 1, waiting 0 requests" in out


def test_sigint_stops_promptly_and_cleanly(server):
    t, lines = _stream_in_background(server)
    t0 = time.time()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(15) == 0
    assert time.time() - t0 < 5
    t.join(10)
    assert "shutting down" in _error_event(lines)["message"]
    out = server.output()
    assert "Traceback" not in out and "KeyboardInterrupt" not in out


def test_busy_port_fails_before_the_banner():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "dlc.cli", "serve", "tiny-llada", "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "dlc serve: tiny-llada on" not in out.stderr
    assert "Traceback" not in out.stderr


class _BusyEngine:
    """An engine whose step never returns (a failed tensor-parallel group's collective that waits for its
    timeout): it always has work."""
    class scheduler:
        num_running, num_waiting = 1, 0

    def has_work(self) -> bool:
        return True

    def fail_all(self, message: str) -> None:
        self.failed = message


@pytest.mark.parametrize("force", [False, True])
def test_a_failed_group_stops_without_waiting_for_a_stuck_request(force):
    """`_stop_on_failure` (a dead rank) must not leave uvicorn waiting for the in-flight request's response
    until the graceful-shutdown timeout (drain_timeout_s, 60 s): after its 2 s it forces the exit."""
    import uvicorn

    from dlc.runtime.server_cli import DrainingServer, _stop_on_failure

    class Srv:
        draining = False
    engine = _BusyEngine()
    server = DrainingServer(uvicorn.Config(lambda *a: None), Srv(), engine, 60.0)
    if force:
        _stop_on_failure(server, engine, "rank 1 died")
        assert server.srv.draining and engine.failed == "rank 1 died"
    else:                                   # the drain path (SIGTERM's limit) keeps uvicorn's graceful wait
        threading.Thread(target=server._stop_when_idle, args=(0.3,), daemon=True).start()
    deadline = time.monotonic() + 10
    while not server.should_exit and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.should_exit
    assert server.force_exit is force
