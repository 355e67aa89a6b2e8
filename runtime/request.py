"""A serving request: its identity, lifecycle and output around one ``DecodeState`` (runtime/decoding.py).

Every decoding rule lives in the state; this class only adds what serving needs: id, arrival, status, the KV
pool slots it holds while running, the output cap, timings, output and its callback, and the error that ended
it. The engine alone advances and applies the state; the scheduler only reads ``state.phase`` / ``cost()``."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from .decoding import DecodeState

WAITING, RUNNING, FINISHED, CANCELLED = "waiting", "running", "finished", "cancelled"
_ids = itertools.count()


@dataclass(eq=False)          # identity: states hold tensors
class Request:
    state: DecodeState
    max_tokens: int | None = None            # output cap (finish_reason "length")
    rid: str = ""
    arrival: float = field(default_factory=time.monotonic)
    status: str = WAITING
    slots: tuple[int, ...] = ()              # KV pool rows while running (1, 2 with guidance,
                                             # none without cache)
    seq: int = field(default_factory=lambda: next(_ids))
    waited: int = 0                          # iterations spent ready but not scheduled (ageing)
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None         # "stop", "length" or "error"
    error: str | None = None                 # what failed, when finish_reason is "error"
    output_ids: list[int] = field(default_factory=list)
    on_output: object = None                 # callback(req, new_ids: list[int], finished: bool)
    # StopStrings (runtime/stops.py) when the request has stop strings
    stop: object = None
    stop_text: str | None = None             # the output text before the stop string that ended the request
    on_step: object = None                   # opt-in callback(req, block_start, positions, tokens) per step

    def __post_init__(self):
        if not self.rid:
            self.rid = f"req-{self.seq}"

    @property
    def prompt(self) -> list[int]:
        return self.state.x[:self.state.P].tolist()

    @property
    def gen(self):
        return self.state.gen

    @property
    def P(self) -> int:
        return self.state.P

    @property
    def L(self) -> int:
        return self.state.L

    @property
    def phase(self) -> str | None:
        return self.state.phase

    @property
    def forwards(self) -> int:
        return self.state.forwards

    @property
    def finished(self) -> bool:
        return self.status in (FINISHED, CANCELLED)

    def cost(self) -> int:
        """Tokens the next forward feeds (a request not started yet begins with a Refresh / full forward)."""
        return self.state.cost() if self.state.started else self.state.L
