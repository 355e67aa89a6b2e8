"""Serving workloads and the HTTP driver behind `dlc bench serve` and bench/serve_bench.py.

Arrival patterns (all seeded): ``poisson`` (exponential gaps at ``rate`` requests/s), ``burst`` (all
``num_requests`` at t = 0), ``osc`` (a Poisson process whose rate oscillates as
``rate * (1 + amplitude * sin(2 pi t / period))``, drawn by thinning). Prompt lengths are uniform in
``prompt_len``, generation lengths uniform over ``gen_lens`` (multiples of the block length). Each request
streams from ``/v1/completions`` with token-id prompts; time to first token is the first chunk carrying
tokens, latency the ``[DONE]``. The benchmark's method (warm-up, capacity, rounds, medians, targets) is
dlc.runtime.benchmark."""
from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

PATTERNS = ("poisson", "burst", "osc")


@dataclass
class Workload:
    pattern: str = "poisson"
    num_requests: int = 64
    rate: float = 8.0                      # requests per second (poisson; osc mean)
    period: float = 4.0                    # osc period, seconds
    amplitude: float = 0.9                 # osc relative amplitude in [0, 1]
    prompt_len: tuple = (8, 64)
    gen_lens: tuple = (16, 32, 64)
    block_length: int = 8
    tokens_per_step: int = 2               # steps = gen_length / tokens_per_step
    seed: int = 0
    token_ids: tuple = tuple(range(32, 127))   # prompt ids are drawn from these (prompt_token_ids(model))

    def __post_init__(self):
        if self.pattern not in PATTERNS:
            raise ValueError(f"workload pattern must be one of {PATTERNS}, got {self.pattern!r}")
        if self.num_requests <= 0 or self.rate <= 0:
            raise ValueError("num_requests and rate must be > 0")
        if not 0 <= self.amplitude <= 1:
            raise ValueError(f"amplitude must be in [0, 1], got {self.amplitude}")
        lo, hi = self.prompt_len
        if not 0 < lo <= hi:
            raise ValueError(f"prompt_len must be 0 < lo <= hi, got {self.prompt_len}")
        if not self.token_ids:
            raise ValueError("token_ids must not be empty")
        bad = [g for g in self.gen_lens if g % self.block_length or g % self.tokens_per_step]
        if bad:
            raise ValueError(f"gen_lens {bad} must be multiples of block_length {self.block_length} and "
                             f"tokens_per_step {self.tokens_per_step}")

    def arrivals(self) -> list[float]:
        rng = random.Random(self.seed)
        if self.pattern == "burst":
            return [0.0] * self.num_requests
        out, t = [], 0.0
        peak = self.rate * (1 + (self.amplitude if self.pattern == "osc" else 0))
        while len(out) < self.num_requests:
            t += rng.expovariate(peak)
            if self.pattern == "poisson" or rng.random() * peak <= self._osc_rate(t):
                out.append(t)
        return out

    def _osc_rate(self, t: float) -> float:
        return self.rate * (1 + self.amplitude * math.sin(2 * math.pi * t / self.period))

    def requests(self) -> list[dict]:
        rng = random.Random(self.seed + 1)
        out = []
        for t in self.arrivals():
            n = rng.randint(*self.prompt_len)
            g = rng.choice(self.gen_lens)
            out.append({"t": t, "prompt": [rng.choice(self.token_ids) for _ in range(n)], "gen_length": g,
                        "block_length": self.block_length, "steps": g // self.tokens_per_step})
        return out


@dataclass
class Result:
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    seconds: float = 0.0
    first_errors: dict = field(default_factory=dict)     # kind -> the first message of that kind

    def error(self, kind: str, message: str) -> None:
        self.errors += 1
        self.first_errors.setdefault(kind, message[:300])

    def summary(self) -> dict:
        return {"requests": len(self.latency), "errors": self.errors, "seconds": round(self.seconds, 3),
                "tokens_per_s": self.tokens / self.seconds if self.seconds else 0.0,
                "requests_per_s": len(self.latency) / self.seconds if self.seconds else 0.0,
                **{f"ttft_p{q}": percentile(self.ttft, q) for q in (50, 90, 99)},
                **{f"latency_p{q}": percentile(self.latency, q) for q in (50, 90, 99)}}


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def _one(client, url: str, model: str, req: dict, t0: float, res: Result, headers: dict) -> None:
    await asyncio.sleep(max(0.0, t0 + req["t"] - time.perf_counter()))
    start = time.perf_counter()
    body = {"model": model, "prompt": req["prompt"], "stream": True, "gen_length": req["gen_length"],
            "block_length": req["block_length"], "steps": req["steps"], "kv_cache": "dual"}
    first, n = None, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error(f"HTTP {r.status_code}", (await r.aread()).decode("utf-8", "replace"))
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    res.error("stream error", json.dumps(data["error"]))
                    return
                ids = data["choices"][0].get("token_ids") or []
                if ids and first is None:
                    first = time.perf_counter()
                n += len(ids)
    except Exception as e:       # noqa: BLE001 - counted and shown, the bench goes on
        res.error(type(e).__name__, str(e) or repr(e))
        return
    end = time.perf_counter()
    res.ttft.append((first or end) - start)
    res.latency.append(end - start)
    res.tokens += n


async def drive(url: str, model: str, reqs: list[dict], api_key: str | None = None) -> Result:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    res = Result()
    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(_one(client, url, model, r, t0, res, headers) for r in reqs))
        res.seconds = time.perf_counter() - t0
    return res


def start_server(model: str, port: int, args: list[str]) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "dlc.cli", "serve", model, "--port", str(port), *args]
    # a pipe nobody reads would fill up and stall a long-lived server
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"dlc serve exited with {proc.returncode}: {log.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("dlc serve did not become healthy within 120 s")


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return float("nan")


def model_config_of(model: str):
    """The ModelConfig of a preset, checkpoint or engine directory, without loading weights."""
    from pathlib import Path

    from dlc.models.loading import read_config, resolve_checkpoint_dir
    from dlc.models.presets import preset_config
    p = Path(model).expanduser()
    path = p if p.is_dir() else resolve_checkpoint_dir(model)
    return preset_config(model) if path is None else read_config(path)


def prompt_token_ids(mc) -> tuple[int, ...]:
    """Ids a bench prompt may use: printable-byte ids inside the vocabulary, never a special id (mask, eos,
    pad, stop); all other ids when the vocabulary is too small for that."""
    special = {mc.mask_id, mc.eos_id, mc.pad_id, *mc.stop_ids}
    ids = tuple(t for t in range(32, min(127, mc.vocab_size)) if t not in special)
    return ids if len(ids) >= 8 else tuple(t for t in range(mc.vocab_size) if t not in special)
