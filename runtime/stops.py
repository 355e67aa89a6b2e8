"""Stop strings: where a request's text ends, found in the detokenized output (the decoding core handles stop
token ids; a string can span tokens and blocks, so it is matched on text).

``StopStrings.find(ids)`` runs on the engine thread each time a request's output grows (once per finished
block): it decodes the output and returns the cut (the smallest token prefix whose text holds a stop string,
and the text before the first stop) or None. ``holdback(text)`` is what a stream must not send yet: the
longest suffix of ``text`` that could start a stop string, so streamed deltas never include any part of
one."""
from __future__ import annotations

from dataclasses import dataclass

MAX_STOPS = 16            # OpenAI allows 4; dlc allows more (docs/SERVING.md)
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class StopCut:
    n_tokens: int         # output tokens kept (through the token that completes the stop string)
    text: str             # the output text before the first stop string


class StopStrings:
    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tok, self.stops = tokenizer, tuple(stops)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _first(self, text: str) -> int:
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(hits) if hits else -1

    def find(self, ids: list[int]) -> StopCut | None:
        text = self.decode(ids)
        at = self._first(text)
        if at < 0:
            return None
        lo, hi = 1, len(ids)             # the smallest prefix whose text already holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            if self._first(self.decode(ids[:mid])) >= 0:
                hi = mid
            else:
                lo = mid + 1
        return StopCut(lo, text[:at])

    def holdback(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(longest, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


def check_stops(stop) -> tuple[str, ...]:
    """The request's ``stop`` field -> a tuple of strings; ValueError naming the limit."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, got {s!r:.40}")
    return stops
