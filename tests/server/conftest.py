"""Real `dlc serve` processes on 127.0.0.1 (always torn down)."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from server_helpers import MODEL
from dlc.runtime.session import open_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: str, *args: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "dlc.cli", "serve", model, "--port", str(self.port), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     text=True)
        # the console, read as it comes (a full pipe would block the server)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                        daemon=True)
        self._reader.start()
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dlc serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("dlc serve did not become healthy in 90 s")

    def output(self, timeout: float = 10) -> str:
        """Everything the server printed (complete once the process has exited)."""
        if self.proc.poll() is not None:
            self._reader.join(timeout)
        return "".join(self.lines)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.base + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGTERM, timeout=30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="session")
def tiny_server():
    srv = ServerProcess("tiny-llada", "--max-seq-len", "128", "--gen-length", "16", "--block-length", "8",
                        "--steps", "8", "--kv-cache", "dual", "--max-num-tokens", "1024")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def server_process():
    """The ServerProcess class, for tests that start a server with their own options."""
    return ServerProcess


@pytest.fixture(scope="module")
def client(tiny_server):
    """The official openai client on tiny_server (modules with their own server define their own)."""
    return openai.OpenAI(base_url=tiny_server.base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def session():
    """tiny_server's model, opened in-process: the offline reference."""
    return open_model(MODEL, progress=False)
