"""A serving request and its diffusion iteration manager (the per-request decoding state machine).

One request walks exactly the loop of ``dlc.runtime.generate`` for a single prompt, but one forward at a
time so the scheduler can batch any mix of requests: ``advance`` moves the state to the next step that needs a
forward (skipping steps the schedule leaves empty, closing finished blocks, stopping at EOS) and records which
phase that forward is (``full`` without a cache, ``refresh`` at a block start or every ``refresh_every`` steps,
``reuse`` otherwise); ``apply`` takes the forward's (x0, conf) and unmasks what the decoding rule selects.
Each request owns its token state (laid out from column 0: prompt, then gen_length masks) and, at T > 0, its
own seeded ``torch.Generator`` (on the model's device), so its tokens do not depend on what else is in the
batch. The token state lives on the host whatever the device: the bookkeeping after a step (which positions
to unmask, block ends, stop tokens) is a few tiny ops per request, and on a GPU each would be a kernel launch
and most a device sync; on the host a step costs one copy of the batch's tokens in and of (x0, conf) out.

Blocks: in fixed granularity every block is ``block_length`` wide with ``steps // num_blocks`` steps (exactly
``generate``). In elastic granularity the scheduler picks the width of each next block (a chunk) when it
starts; the chunk gets steps in proportion to its width (``steps / gen_length`` per token, at least one).

Preemption by recompute: at each block start the request snapshots its tokens and generator state; a
preempted request drops its cache and restarts the current block from the snapshot, so recompute changes
nothing in its output."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from .decoders import make_rule, num_transfer_tokens, unmask_step
from .generate import GenerationConfig

WAITING, RUNNING, FINISHED, CANCELLED = "waiting", "running", "finished", "cancelled"
_ids = itertools.count()


@dataclass
class Request:
    prompt: list[int]
    gen: GenerationConfig
    max_tokens: int | None = None            # output cut (finish_reason "length")
    rid: str = ""
    arrival: float = field(default_factory=time.monotonic)
    status: str = WAITING
    slot: int | None = None                  # KV pool row while running (prefix/dual caches)
    # decoding state
    x: torch.Tensor | None = None            # [L] token state
    generator: torch.Generator | None = None
    done: int = 0                            # generated columns whose block is finished
    bs: int | None = None                    # current block [bs, be) (absolute columns)
    be: int = 0
    sched: torch.Tensor | None = None        # [steps_in_block] tokens to unmask per step (fixed-step rules)
    step: int = 0
    stuck: bool = False                      # last step could only predict the mask id (threshold/factor)
    has_cache: bool = False                  # the slot holds K/V for the current block
    phase: str | None = None                 # next forward: full / refresh / reuse (None when finished)
    n_now: int = 0
    stopped: bool = False
    snapshot: tuple | None = None            # (x, generator state) at the current block start
    # accounting
    seq: int = field(default_factory=lambda: next(_ids))
    waited: int = 0                          # iterations spent ready but not scheduled (ageing)
    forwards: int = 0
    preemptions: int = 0
    emitted: int = 0                         # generated tokens already handed to the output callback
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    output_ids: list[int] = field(default_factory=list)
    on_output: object = None                 # callback(req, new_ids: list[int], finished: bool)

    def __post_init__(self):
        if not self.rid:
            self.rid = f"req-{self.seq}"
        self.rule = make_rule(self.gen.threshold, self.gen.factor)

    @property
    def P(self) -> int:
        return len(self.prompt)

    @property
    def L(self) -> int:
        return len(self.prompt) + self.gen.gen_length

    @property
    def finished(self) -> bool:
        return self.status in (FINISHED, CANCELLED)

    def cost(self) -> int:
        """Tokens the next forward feeds: the sequence for full/refresh, the query slice for reuse."""
        if self.phase == "reuse":
            qa, qb = self.q_span()
            return qb - qa
        return self.L

    def q_span(self) -> tuple[int, int]:
        if self.gen.kv_cache == "prefix":
            return self.bs, self.L
        v = self.gen.vicinity
        return max(0, self.bs - v), min(self.L, self.be + v)


def init_state(req: Request, mask_id: int, device) -> None:
    """Token state [L] on the host; the sampling generator (T > 0, random remasking) on ``device``."""
    x = torch.full((req.L,), mask_id, dtype=torch.long)
    x[:req.P] = torch.tensor(req.prompt, dtype=torch.long)
    req.x = x
    if req.gen.temperature > 0 or req.gen.remasking == "random":
        req.generator = torch.Generator(device=torch.device(device)).manual_seed(req.gen.seed)


def _start_block(req: Request, width: int, mask_id: int) -> None:
    g = req.gen
    req.bs = req.P + req.done
    req.be = min(req.L, req.bs + width)
    w = req.be - req.bs
    if w == g.block_length:
        n_steps = g.steps // g.num_blocks
    else:   # elastic chunk: steps in proportion to its width
        n_steps = max(1, round(w * g.steps / g.gen_length))
    masked = (req.x[req.bs:req.be] == mask_id).sum()[None]
    req.sched = num_transfer_tokens(masked, n_steps)[0]
    req.step, req.has_cache = 0, False
    req.snapshot = (req.x.clone(), None if req.generator is None else req.generator.get_state())


def _end_block(req: Request, stop_ids, eos_id: int) -> list[int]:
    """Close the current block; returns the generated tokens it finalized (cut at the first stop id)."""
    P, be = req.P, req.be
    if req.gen.stop_at_eos:
        hit = torch.isin(req.x[P:be], torch.tensor(stop_ids)).nonzero()
        if hit.numel():
            req.x[P + int(hit[0]) + 1:] = eos_id
            req.stopped = True
    req.done = be - P
    req.bs, req.has_cache = None, False
    new = req.x[P + req.emitted:be].tolist()
    for j, t in enumerate(new):
        if req.gen.stop_at_eos and t in stop_ids:
            new = new[:j]
            break
    req.emitted = be - P
    return new


def advance(req: Request, cfg, width: int) -> list[int]:
    """Move to the next step that needs a forward; returns tokens finalized on the way. ``cfg`` is the model
    config; ``width`` the size of a block started here. Sets ``req.phase`` (None once the request is done)."""
    out: list[int] = []
    g = req.gen
    while True:
        if req.bs is None:
            if req.stopped or req.done >= g.gen_length:
                req.phase = None
                return out
            _start_block(req, width, cfg.mask_id)
        masked = req.x[req.bs:req.be] == cfg.mask_id
        if not bool(masked.any()):
            out += _end_block(req, cfg.stop_ids, cfg.eos_id)
            continue
        if req.rule.fixed_steps:
            if req.step >= req.sched.shape[0]:
                out += _end_block(req, cfg.stop_ids, cfg.eos_id)
                continue
            n_now = int(req.sched[req.step])
            if n_now == 0:
                req.step += 1
                continue
        else:
            if req.stuck:      # every masked position predicts the mask id (decoders.unmask_step): end the block
                req.stuck = False
                out += _end_block(req, cfg.stop_ids, cfg.eos_id)
                continue
            n_now = int(masked.sum())
        req.n_now = n_now
        if g.kv_cache == "none":
            req.phase = "full"
        elif not req.has_cache or (g.refresh_every and req.step % g.refresh_every == 0):
            req.phase = "refresh"
        else:
            req.phase = "reuse"
        return out


def apply(req: Request, x0: torch.Tensor, conf: torch.Tensor, mask_id: int) -> None:
    """x0 [K] candidate tokens, conf [K] float64 confidences of the current block (host tensors, like req.x):
    unmask the selection."""
    blk = req.x[req.bs:req.be]
    masked = blk == mask_id                                                   # [K]
    n = torch.tensor([req.n_now], dtype=torch.long)
    sel, stuck = unmask_step(req.rule, x0[None], conf[None], masked[None], n, mask_id)
    req.x[req.bs:req.be] = torch.where(sel[0], x0, blk)
    req.stuck = bool(stuck[0])
    if req.phase == "refresh":
        req.has_cache = True
    req.step += 1
    req.forwards += 1


def restart_block(req: Request) -> None:
    """Preemption by recompute: drop the cache and rewind to the current block's start."""
    if req.snapshot is not None and req.bs is not None:
        x, gstate = req.snapshot
        req.x.copy_(x)
        if gstate is not None:
            req.generator.set_state(gstate)
        req.step = 0
    req.has_cache = False
