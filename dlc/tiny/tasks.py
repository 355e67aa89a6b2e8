"""Synthetic tasks with checkable answers: the training data and the held-out quality set of dlc-tiny.

Each task is a seeded prompt generator plus a solver that recomputes the answer from the prompt text alone, so
the checker needs no stored labels (``check(prompt, completion)``). Prompts look like::

    47+38          -> 85
    sort 73914     -> 13479
    rev hello      -> olleh

The held-out split is a hash partition of the prompt string: ``split_of(prompt)`` is a pure function of the
text, training draws reject every "eval" prompt and eval draws reject every "train" prompt, so no eval prompt
can ever appear in training (whatever the seeds or the number of samples)."""
from __future__ import annotations

import hashlib
import random
import re
import string
from dataclasses import dataclass

EVAL_PERCENT = 10          # share of the prompt space held out for evaluation


def _add(r: random.Random) -> str:
    return f"{r.randint(0, 99)}+{r.randint(0, 99)}"


def _sort(r: random.Random) -> str:
    alphabet = string.digits if r.random() < 0.5 else string.ascii_lowercase[:10]
    return "sort " + "".join(r.choice(alphabet) for _ in range(r.randint(3, 8)))


def _reverse(r: random.Random) -> str:
    return "rev " + "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(3, 8)))


def _solve_add(p: str) -> str:
    a, b = p.split("+")
    return str(int(a) + int(b))


def _solve_sort(p: str) -> str:
    return "".join(sorted(p.split(" ", 1)[1]))


def _solve_reverse(p: str) -> str:
    return p.split(" ", 1)[1][::-1]


@dataclass(frozen=True)
class Task:
    name: str
    make: object          # (random.Random) -> prompt
    solve: object         # (prompt) -> answer
    pattern: str          # regex a well-formed prompt matches


TASKS: dict[str, Task] = {
    "add": Task("add", _add, _solve_add, r"\d{1,2}\+\d{1,2}"),
    "sort": Task("sort", _sort, _solve_sort, r"sort [0-9a-j]{3,8}"),
    "reverse": Task("reverse", _reverse, _solve_reverse, r"rev [a-z]{3,8}"),
}
MAX_ANSWER = 8             # longest answer of any task (sort / reverse of 8 characters)


def task_of(prompt: str) -> Task:
    for t in TASKS.values():
        if re.fullmatch(t.pattern, prompt):
            return t
    raise ValueError(f"prompt {prompt!r} matches no dlc-tiny task (known: {', '.join(TASKS)})")


def solve(prompt: str) -> str:
    return task_of(prompt).solve(prompt)


def split_of(prompt: str) -> str:
    """'eval' or 'train', from a hash of the prompt text alone."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def sample(split: str, n: int, seed: int, tasks: list[str] | None = None) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of one split, tasks in round-robin order. Eval samples are distinct."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = tasks or list(TASKS)
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    r = random.Random(f"dlc-tiny/{split}/{seed}")
    out, seen = [], set()
    while len(out) < n:
        t = TASKS[names[len(out) % len(names)]]
        p = t.make(r)
        if split_of(p) != split or (split == "eval" and p in seen):
            continue
        seen.add(p)
        out.append((p, t.solve(p)))
    return out


def eval_set(n: int = 200, seed: int = 1234) -> list[tuple[str, str]]:
    """The fixed held-out set the quality gates and ``dlc eval`` use."""
    return sample("eval", n, seed)


def check(prompt: str, completion: str) -> bool:
    """True when the completion (surrounding whitespace ignored) is the task's answer."""
    return completion.strip() == solve(prompt)


def score(prompts: list[str], completions: list[str]) -> float:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return sum(check(p, c) for p, c in zip(prompts, completions)) / max(1, len(prompts))
