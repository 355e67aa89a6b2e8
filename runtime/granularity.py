"""Decoding granularity: the width of each next block a request starts.

``fixed`` (default): every block is the request's ``block_length``, decoding exactly as ``generate``.

``elastic`` (Optimus): the width (a chunk) is a runtime control variable picked from the load. At warm-up the
engine times forwards at growing token counts and records the *saturation point* N*: the largest token count
whose step time is still within ``FLAT_TOL`` of the smallest one (below it the device has idle compute).
The controller then gives each of the n running requests the largest allowed chunk with n * chunk <= N*:
large chunks (more parallel unmasking per forward) at low load, small ones at high load. The loop is closed
on measured step times: an iteration of T tokens slower than flat lowers N* towards T, one that stays flat
above N* raises it. Chunked decoding changes the token schedule, so elastic mode is opt-in."""
from __future__ import annotations

import time

import torch

FLAT_TOL = 0.5          # "flat": within 50 % of the smallest step time
ADAPT = 0.25            # closed-loop step towards an observed (tokens, time) point


class Granularity:
    def __init__(self, mode: str = "fixed", chunk_sizes=(4, 8, 16, 32, 64)):
        self.mode, self.chunk_sizes = mode, tuple(sorted(chunk_sizes))
        self.saturation: float | None = None       # N*, tokens per iteration
        self.flat_time: float | None = None
        self.last_chunk: int = 0

    def width(self, req, n_running: int) -> int:
        if self.mode == "fixed" or self.saturation is None:
            self.last_chunk = req.gen.block_length
            return req.gen.block_length
        n = max(1, n_running)
        fit = [c for c in self.chunk_sizes if n * c <= self.saturation]
        self.last_chunk = fit[-1] if fit else self.chunk_sizes[0]
        return self.last_chunk

    def observe(self, tokens: int, seconds: float) -> None:
        """Closed loop: move N* towards the measured knee."""
        if self.mode == "fixed" or self.saturation is None or tokens <= 0:
            return
        flat = seconds <= self.flat_time * (1 + FLAT_TOL)
        if not flat and tokens < self.saturation:
            self.saturation += ADAPT * (tokens - self.saturation)
        elif flat and tokens > self.saturation:
            self.saturation += ADAPT * (tokens - self.saturation)
        self.saturation = max(float(self.chunk_sizes[0]), self.saturation)

    def calibrate(self, timings: list[tuple[int, float]]) -> None:
        """timings: (tokens, seconds) at growing token counts -> saturation point."""
        self.flat_time = min(t for _, t in timings)
        flat = [n for n, t in timings if t <= self.flat_time * (1 + FLAT_TOL)]
        self.saturation = float(max(flat))


def measure_step_times(runner, sizes: list[int], repeats: int = 3) -> list[tuple[int, float]]:
    """Median time of a full forward over ``n`` tokens (one row), for each n in sizes."""
    from .decoding import DecodeState, GenerationConfig
    from .step import make_batch

    mc, dev = runner.config, runner.device
    gen = GenerationConfig(gen_length=1, block_length=1, steps=1)
    out = []
    for n in sizes:
        state = DecodeState.new([0] * max(1, n - 1), gen, mc)
        state.advance(1)                                                     # phase "full"
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            runner.full(make_batch(runner, [state]))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out.append((n, sorted(times[1:])[len(times[1:]) // 2]))
    return out
