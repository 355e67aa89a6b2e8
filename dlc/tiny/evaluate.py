"""Score a model (eager checkpoint or compiled engine) on the held-out dlc-tiny tasks.

``evaluate`` runs the held-out set batched through the reference decoding loop (dlc.runtime.generate) with any
decoder / KV mode, checks every completion and reports accuracy, tokens per forward (TPF: answer tokens over
the forward passes each row took part in) and wall seconds. The quality gates (tests/tiny), ``dlc eval`` and
``python -m dlc.tiny.quality_table`` all go through it."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import Session, decode_tokens, encode_prompt

from . import tasks

# Generation defaults of dlc-tiny (also written to its generation_config.json by dlc.tiny.train).
GEN_LENGTH, BLOCK_LENGTH = 8, 4
DECODERS = ("low_confidence", "threshold", "factor", "hierarchical", "entropy_bound", "credit", "smoothing")
LOW_THRESHOLD = 0.3          # hierarchical: dInfer's benchmark default (with threshold 0.9)
ENTROPY_BOUND = 0.1          # entropy_bound: diffusers' EntropyBoundScheduler default gamma


@dataclass
class EvalResult:
    accuracy: float
    tpf: float
    n: int
    seconds: float
    per_task: dict = field(default_factory=dict)
    completions: list = field(default_factory=list)     # (prompt, completion, correct) per example

    def summary(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "tpf": round(self.tpf, 3), "n": self.n,
                "seconds": round(self.seconds, 3),
                "per_task": {k: round(v, 4) for k, v in self.per_task.items()}}


def generation_defaults(source: str | Path) -> dict:
    """gen_length / block_length / steps from the model directory's generation_config.json, else
    dlc-tiny's."""
    d = {"gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "steps": GEN_LENGTH}
    p = Path(source) / "generation_config.json"
    if p.is_file():
        try:
            saved = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON: {e}") from None
        d.update({k: int(saved[k]) for k in d if k in saved})
    return d


def make_config(decoder: str = "low_confidence", threshold: float = 0.9, factor: float = 1.0,
                kv_cache: str = "none", vicinity: int = 0, refresh_every: int = 0,
                gen_length: int = GEN_LENGTH, block_length: int = BLOCK_LENGTH, steps: int | None = None,
                low_threshold: float = LOW_THRESHOLD, entropy_bound: float = ENTROPY_BOUND,
                block: dict | None = None) -> GenerationConfig:
    """Decoder name + its parameter -> GenerationConfig (stop at EOS, greedy). hierarchical, credit and
    smoothing use ``threshold`` as dInfer does (the high threshold; credit / smoothing on threshold decoding).
    ``decoder="block"``: a block-diffusion decoder whose fields (decoder, threshold, steps_per_block, ...) are
    ``block``."""
    if decoder == "block":
        return GenerationConfig(gen_length=gen_length, block_length=block_length, kv_cache=kv_cache,
                                stop_at_eos=True, **(block or {}))
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    thr = decoder in ("threshold", "hierarchical", "credit", "smoothing")
    return GenerationConfig(gen_length=gen_length, block_length=block_length, steps=steps or gen_length,
                            threshold=threshold if thr else None,
                            factor=factor if decoder == "factor" else None, kv_cache=kv_cache,
                            vicinity=vicinity, refresh_every=refresh_every, stop_at_eos=True,
                            low_threshold=low_threshold if decoder == "hierarchical" else None,
                            entropy_bound=entropy_bound if decoder == "entropy_bound" else None,
                            credit=decoder == "credit", smoothing=decoder == "smoothing")


def evaluate(session: Session, cfg: GenerationConfig, n: int = 200, batch_size: int = 64,
             seed: int = 1234) -> EvalResult:
    """Generate for the first n held-out prompts, batch_size at a time, and score the completions."""
    if n <= 0 or batch_size <= 0:
        raise ValueError(f"n ({n}) and batch_size ({batch_size}) must be > 0")
    pairs = tasks.eval_set(n, seed)
    ids = [encode_prompt(session, p) for p, _ in pairs]
    outs, tokens, row_steps = [], 0, 0
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        res = generate(session.runner, ids[i:i + batch_size], cfg)
        outs += [decode_tokens(session, t) for t in res.token_ids]
        tokens += sum(len(t) for t in res.token_ids)
        row_steps += sum(res.steps_per_row)
    seconds = time.perf_counter() - t0
    return _score(pairs, outs, tokens / max(1, row_steps), seconds)


def _score(pairs, outs, tpf, seconds) -> EvalResult:
    done = [(p, o, tasks.check(p, o)) for (p, _), o in zip(pairs, outs)]
    per: dict[str, list[bool]] = {}
    for p, _, ok in done:
        per.setdefault(tasks.task_of(p).name, []).append(ok)
    return EvalResult(accuracy=sum(ok for *_, ok in done) / len(done), tpf=tpf, n=len(done), seconds=seconds,
                      per_task={k: sum(v) / len(v) for k, v in per.items()}, completions=done)
