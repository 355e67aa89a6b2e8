"""The one decoding core: every rule of diffusion decoding, for one sequence at a time.

A ``DecodeState`` is one sequence's token state and where it is in its block / step schedule.
Its two moves are
the only implementation of the rules; ``generate()`` (offline batches) and the serving engine both drive them:

* ``advance(width)`` moves to the next step that needs a forward: it starts blocks (``width`` wide: the
  request's ``block_length``, or an elastic chunk), skips steps the schedule leaves empty, closes finished
  blocks (stop ids, stuck rows), and sets ``phase`` to the forward the step needs (``full`` without a cache,
  ``refresh`` at a block start or every ``refresh_every`` steps, ``reuse`` otherwise; None once done).
  It returns
  the generated tokens finalised on the way (a block's tokens are final once it closes).
* ``apply(x0, conf)`` takes the forward's candidates for the block and unmasks what the rule selects;
  ``apply_batch(states, x0, conf, out)`` does it for every state of one runner call at once (the rules
  select over [B, K] rows, so a step's host cost does not grow by a rule's selection per state).

Layout: the token state is [L] on the host, laid out from column 0 (prompt at [0, P), then gen_length masks);
positions are ``arange(L)``. Batches right-pad rows to the longest and mask the padding keys, so a row decodes
the same alone or in any batch.

Rules (LLaDA's ``generate.py`` and Fast-dLLM; REFERENCE.md section 2):

* steps: ``steps // num_blocks`` per block of ``block_length``; an elastic chunk of width w gets
  ``max(1, round(w * steps / gen_length))``; masks split evenly over a block's steps, remainder first;
* ``low_confidence`` / ``schedule``: the top-n masked positions by confidence (n from the schedule);
  ``threshold``: every masked position with confidence >= threshold, at least the best; ``factor``: the
  longest prefix of the sorted confidences with conf_n >= 1 - factor / (n + 1), at least the best.
  Threshold and factor
  never accept a prediction equal to the mask id (dInfer); a row whose every masked position predicts it is
  stuck and its block ends (at T = 0 it would repeat forever);
* the field's parallel decoders (checked against dInfer's public ``parallel_strategy.py`` /
  ``generate_uniform.py`` at fce4e32 and the EB-sampler paper, arXiv 2505.24857): ``hierarchical``
  (``low_threshold``: each contiguous run's best above it, plus all above ``threshold``, at least one),
  ``entropy_bound`` (ascending entropy, the largest prefix with sum H - max H <= gamma), ``credit`` (a
  per-block credit on each position's top-1 ids, decayed 0.8 a step, fused into the logits as 0.7 log(1 +
  credit) before any rule selects; the runner applies it, the state keeps it), ``smoothing`` (the still-masked
  block inputs take E[mask] + w softmax(l) @ W_e of the previous step, w = min(0.15 + 0.02 i, 0.3), i = the
  sequence's forwards so far). Deviations from dInfer: smoothing acts inside the current block only (dInfer's
  no-cache and Refresh forwards also smooth the masked positions after it) and without IterSmooth's threshold
  decay; hierarchical runs are split by positions that predict the mask id (no rule accepts it); credit
  selects with the request's own rule (dInfer pairs it with its threshold decoder, which also accepts
  positions within 1e-5 of the best one) and in float64;
* sampling filters ``top_k`` / ``top_p`` / ``min_p`` at T > 0 (runner side: dlc.kernels.sampling) and
  ``logprobs`` (each token's logprob and top alternatives at the step that unmasked it: ``token_logprobs``);
* ``remasking``: ``low_confidence`` scores a candidate by its softmax probability (from the runner),
  ``random`` by a uniform draw from the row's generator;
* query spans: ``prefix`` feeds the block and everything after it, ``dual`` the block (plus ``vicinity``
  columns either side, dInfer);
* with ``stop_at_eos``, at the end of a block whose text holds a stop id (the model's, plus the request's
  ``stop_token_ids``) everything after the first stop id becomes EOS, the output is cut before it, and the
  sequence is done.

Block diffusion (LLaDA2.0 / LLaDA2.1, SDAR: models whose ``ModelConfig.block_diffusion`` is set; decoders
``llada2`` and ``llada2.1``), as the references' generate loops do it (REFERENCE.md section 9, checked against
LLaDA2.0's ``modeling_llada2_moe.generate``, JetAstra/SDAR ``generate.py`` and SGLang's ``JointThreshold``):

* the canvas is prompt + gen_length rounded up to whole blocks; blocks are aligned to column 0, so decoding
  starts at block ``P // block_length`` and the prompt's tail shares the first block; the overhang past
  gen_length is decoded and dropped; attention is block-causal (``attn_block``, the runner's ``block_size``);
* ``llada2``: ``steps_per_block`` steps per block with the schedule ``num_transfer_tokens(block_length,
  min(steps_per_block, gen_length))`` (not rescaled for a first block that is part prompt; steps beyond
  block_length are clamped to it, where the reference would spend forwards on steps of count 0);
  ``threshold``: every mask whose confidence is strictly above it if at least the step's scheduled count pass,
  else the scheduled count by confidence (``BlockThresholdRule``); no threshold: that count by confidence (the
  static low-confidence schedule, ``ScheduleRule``). Predictions equal to the mask id are committed like any
  other (the references do; the position stays masked);
* ``llada2.1``: ``JointThresholdRule``: masks above ``threshold`` (at least ``tokens_per_step`` by confidence)
  plus token-to-token edits of already-decoded, non-prompt positions of the block whose prediction differs
  with confidence above ``edit_threshold``; once the block has no mask, up to ``max_post_edit_steps`` more
  steps of edits; the block ends when a step would change nothing (that forward is spent, as in the
  reference) or after block_length + max_post_edit_steps + 1 steps;
* stop: the block in which a stop id appears is the last one (always, as the references); with
  ``eos_early_stop`` decoding also ends mid-block once a stop id is committed with no mask before it;
* exact KV cache (``kv_cache="block"``): a step feeds the columns from the exact-cache frontier ``kv_upto`` to
  the block end and writes their K/V. The first step feeds [0, block end) (prefill of the prompt's complete
  blocks + the first block), the next ones feed the block; the first step of the next block feeds the
  finished block too, which writes its clean K/V in the same forward (the references spend an extra forward
  on it; block-causal attention makes the two equal) and moves ``kv_upto`` to the block start. The steps that
  feed the block alone run ahead of the host like any Reuse step (``lookahead``; not LLaDA2.1's editing).

Randomness: each sequence owns a host ``torch.Generator`` seeded with its ``seed``. A step at T > 0 draws one
sampling seed (``draw_seed``; the runner's Gumbel noise is a counter-based hash of it, the same in every
runner), and random remasking draws the block's confidences in ``apply``. So a sequence's tokens do not depend
on its batch, and at each block start the state snapshots (tokens, generator) so that a preempted request
restarts its block (``restart_block``) with identical output."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .step_output import to_device

KV_MODES = ("none", "prefix", "dual", "block")
DECODERS_BY_NAME = ("llada", "llada2", "llada2.1")      # GenerationConfig.decoder (None: the model's own)
BLOCK_DECODERS = ("llada2", "llada2.1")
# LLaDA2.1's decoding modes (model card, SGLang docs): (threshold, edit_threshold)
LLADA21_MODES = {"quality": (0.7, 0.5), "speed": (0.5, 0.0)}
DECODER_ALIASES = {"llada2.1-quality": "quality", "llada2.1-speed": "speed"}   # CLI / request spellings


def resolve_decoder(fields: dict) -> dict:
    """Request / CLI fields with LLaDA2.1's mode spelled out: ``decoder`` llada2.1-speed / llada2.1-quality
    (plain llada2.1: quality) becomes llada2.1 with that mode's threshold and edit_threshold where the fields
    give none. Other fields pass through."""
    dec = fields.get("decoder")
    if dec not in DECODER_ALIASES and dec != "llada2.1":
        return fields
    thr, edit = LLADA21_MODES[DECODER_ALIASES.get(dec, "quality")]
    out = dict(fields, decoder="llada2.1")
    if out.get("threshold") is None:
        out["threshold"] = thr
    if out.get("edit_threshold") is None:
        out["edit_threshold"] = edit
    return out
REMASKING = ("low_confidence", "random")
PHASES = ("full", "refresh", "reuse")
MAX_SEED = 2 ** 63 - 1
MAX_LOGPROBS = 20                       # top alternatives per token (OpenAI's top_logprobs limit)
CREDIT_ALPHA, CREDIT_DECAY = 0.7, 0.8   # dInfer's credit_alpha, decay_beta (gamma: kernels/sampling.py)
SMOOTH_W0, SMOOTH_DW, SMOOTH_W, SMOOTH_TAU = 0.15, 0.02, 0.3, 1.0   # dInfer's IterationSmooth / H2Embed
SMOOTH_TOP_K_MAX = 64         # smoothing_top_k: at most this many tokens per position (truncated smoothing)
SEED_RANGE = 2 ** 62                    # sampling seeds drawn per step are in [0, SEED_RANGE)


# ------------------------------------------------------------------------------------------------ the config
class FieldError(ValueError):
    """A value that can never be served; ``field`` names it (the server answers 400 with it as ``param``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _int_field(name: str, v, lo: int, hi: int | None = None) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise FieldError(name, f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise FieldError(name, f"{name} must be {rng}, got {v}")


def _float_field(name: str, v, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FieldError(name, f"{name} must be a finite number, got {v!r}")
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        if lo is None:
            rng = f"<= {hi:g}"
        elif hi is None:
            rng = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise FieldError(name, f"{name} must be {rng}, got {v}")


@dataclass
class GenerationConfig:
    """How one sequence is decoded. Validates itself: every error names the field and the allowed range."""
    gen_length: int = 128
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    threshold: float | None = None
    factor: float | None = None
    cfg_scale: float = 0.0
    kv_cache: str = "none"
    refresh_every: int = 0
    vicinity: int = 0
    stop_at_eos: bool = False
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()     # the request's stop ids beside the model's (with stop_at_eos)
    # hierarchical decoding (with ``threshold`` as the high threshold)
    low_threshold: float | None = None
    entropy_bound: float | None = None       # entropy-bounded decoding (EB-sampler's gamma)
    credit: bool = False                     # credit decoding (dInfer: alpha 0.7, gamma 0.2, decay 0.8)
    # iteration smoothing (dInfer: w 0.15 + 0.02 i, at most 0.3; tau 1)
    smoothing: bool = False
    # opt-in truncated smoothing: the soft embedding over each position's k most likely tokens (renormalised)
    smoothing_top_k: int | None = None
    top_k: int = 0                           # sampling filters at T > 0 (0 / 1.0 / 0.0: off)
    top_p: float = 1.0
    min_p: float = 0.0
    logprobs: int | None = None              # record each token's logprob and this many alternatives
    decoder: str | None = None          # llada | llada2 | llada2.1; None: the model's (block models: llada2;
                                        # until resolved, validated as llada unless a block-only field is set)
    steps_per_block: int | None = None  # block decoders: denoising steps per block (LLaDA2's ``steps``)
    eos_early_stop: bool = False        # block decoders: stop mid-block once a stop id is committed
    edit_threshold: float | None = None   # llada2.1: token-to-token edit threshold (None: quality mode's 0.5)
    max_post_edit_steps: int = 16       # llada2.1: edit steps after a block's last mask
    tokens_per_step: int = 1            # llada2.1: masks committed per step at least

    def __post_init__(self):
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def block_decoding(self) -> bool:
        return self.decoder in BLOCK_DECODERS

    def for_model(self, model_config) -> "GenerationConfig":
        """This config with ``decoder`` resolved for the model (block-diffusion models: llada2; others:
        llada), validated again; refuses a decoder the model cannot run (FieldError on ``decoder``)."""
        block = bool(getattr(model_config, "block_diffusion", False))
        dec = self.decoder or ("llada2" if block else "llada")
        if block != (dec in BLOCK_DECODERS):
            kind = "a block-diffusion" if block else "a full-attention"
            ok = BLOCK_DECODERS if block else ("llada",)
            raise FieldError("decoder", f"decoder {dec!r} cannot run {kind} model ({model_config.family}); "
                                        f"use one of {ok}")
        return self if dec == self.decoder else dataclasses.replace(self, decoder=dec)

    def validate(self) -> None:
        if isinstance(self.stop_token_ids, list):
            self.stop_token_ids = tuple(self.stop_token_ids)
        if not isinstance(self.stop_token_ids, tuple):
            raise FieldError("stop_token_ids", f"stop_token_ids must be a list of token ids, "
                                               f"got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            _int_field("stop_token_ids", t, 0)
        if self.decoder is not None and self.decoder not in DECODERS_BY_NAME:
            raise FieldError("decoder", f"decoder must be one of {DECODERS_BY_NAME}, got {self.decoder!r}")
        block_only = (self.kv_cache == "block" or self.steps_per_block is not None
                      or self.edit_threshold is not None or self.eos_early_stop)
        if self.block_decoding or (self.decoder is None and block_only):
            self._validate_block()               # decoder None: for_model resolves it and validates again
            return
        if block_only:
            field = next(f for f, v in (("kv_cache", self.kv_cache == "block"),
                                        ("steps_per_block", self.steps_per_block is not None),
                                        ("edit_threshold", self.edit_threshold is not None),
                                        ("eos_early_stop", True)) if v)
            raise FieldError(field, f"{field} {getattr(self, field)!r} applies to block-diffusion decoding "
                                    f"(decoder llada2 / llada2.1) only")
        _int_field("gen_length", self.gen_length, 1)
        _int_field("block_length", self.block_length, 1, self.gen_length)
        if self.gen_length % self.block_length:
            raise FieldError("block_length", f"gen_length {self.gen_length} "
                                             f"must be a multiple of block_length "
                                             f"{self.block_length}")
        _int_field("steps", self.steps, 1, self.gen_length)
        if self.steps % self.num_blocks:
            raise FieldError("steps", f"steps {self.steps} "
                                      f"must be a positive multiple of the number of blocks "
                                      f"({self.num_blocks} = gen_length / block_length)")
        _float_field("temperature", self.temperature, 0.0)
        if self.remasking not in REMASKING:
            raise FieldError("remasking", f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.kv_cache not in KV_MODES:
            raise FieldError("kv_cache", f"kv_cache must be one of {KV_MODES}, got {self.kv_cache!r}")
        _float_field("cfg_scale", self.cfg_scale, 0.0)
        _int_field("refresh_every", self.refresh_every, 0, self.gen_length)
        _int_field("vicinity", self.vicinity, 0, self.gen_length)
        _int_field("seed", self.seed, 0, MAX_SEED)
        _int_field("top_k", self.top_k, 0)
        _float_field("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _float_field("min_p", self.min_p, 0.0, 1.0)
        if self.logprobs is not None:
            _int_field("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        for name in ("credit", "smoothing"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.smoothing and self.cfg_scale > 0:
            raise FieldError("smoothing", "iteration smoothing does not combine with cfg_scale > 0")
        if self.smoothing_top_k is not None:
            _int_field("smoothing_top_k", self.smoothing_top_k, 1, SMOOTH_TOP_K_MAX)
            if not self.smoothing:
                raise FieldError("smoothing_top_k", "smoothing_top_k applies to iteration smoothing: set "
                                                    "smoothing true")
        # validates threshold / factor / low_threshold / entropy_bound
        self.rule()

    def rule(self):
        return make_rule(self.threshold, self.factor, self.low_threshold, self.entropy_bound, self)

    def filters(self) -> tuple[int, float, float] | None:
        """(top_k, top_p, min_p), or None when every filter is off (or at T = 0, where none changes a
        token)."""
        if self.temperature == 0 or (self.top_k == 0 and self.top_p == 1.0 and self.min_p == 0.0):
            return None
        return self.top_k, self.top_p, self.min_p

    def _validate_block(self) -> None:
        """Block decoders: gen_length need not fill whole blocks (the canvas is rounded up), ``steps`` is
        unused (``steps_per_block``), caches are none or the exact block cache."""
        _int_field("gen_length", self.gen_length, 1)
        _int_field("block_length", self.block_length, 1)
        if self.steps_per_block is not None:
            _int_field("steps_per_block", self.steps_per_block, 1)
        _float_field("temperature", self.temperature, 0.0)
        if self.kv_cache not in ("none", "block"):
            raise FieldError("kv_cache", f"kv_cache must be 'none' or 'block' (exact block cache) for "
                                         f"block-diffusion decoding, got {self.kv_cache!r}")
        for name, bad in (("factor", self.factor is not None), ("cfg_scale", self.cfg_scale > 0),
                          ("remasking", self.remasking != "low_confidence"), ("vicinity", self.vicinity != 0),
                          ("refresh_every", self.refresh_every != 0)):
            if bad:
                raise FieldError(name, f"{name} is not supported by block-diffusion decoding "
                                       f"(decoder {self.decoder})")
        if self.threshold is not None:
            _float_field("threshold", self.threshold, 0.0, 1.0)
        if self.edit_threshold is not None:
            _float_field("edit_threshold", self.edit_threshold, 0.0, 1.0)
        _int_field("max_post_edit_steps", self.max_post_edit_steps, 0, 1 << 16)
        _int_field("tokens_per_step", self.tokens_per_step, 1, self.block_length)
        _int_field("seed", self.seed, 0, MAX_SEED)
        if self.decoder != "llada2.1" and self.edit_threshold is not None:
            raise FieldError("edit_threshold", "edit_threshold applies to decoder llada2.1 (token editing)")
        for name in ("credit", "smoothing"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.decoder is not None:         # the rule's own fields (low_threshold, entropy_bound)
            self.rule()


# ------------------------------------------------------------------------------------------------ the rules
def _topk_mask(conf: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-k[b] positions per row (k varies per row): [B, K] bool."""
    order = conf.argsort(dim=-1, descending=True, stable=True)              # [B, K]
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(conf.shape[-1], device=conf.device).expand_as(order))
    return ranks < k[:, None]


def _best_one(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Each row's most confident position (the first of equal ones, as ``_topk_mask(conf, 1)``) where the row
    has a masked position: [B, K] bool, one argmax and one scatter (the rules' "at least one")."""
    best = torch.zeros_like(masked)
    return best.scatter_(1, conf.argmax(-1, keepdim=True), masked.any(-1, keepdim=True))


class ScheduleRule:
    """LLaDA's reference: the top ``n_sched`` masked positions by confidence (torch.topk, as the reference, so
    ties break the same way)."""
    name = "schedule"
    fixed_steps = True

    def select(self, conf, masked, n_sched):
        """One torch.topk per distinct count over the rows that have it (a batch's rows mostly share one)."""
        sel = torch.zeros_like(masked)
        ns = n_sched.tolist()
        counts = set(ns)
        for k in counts:
            if k <= 0:
                continue
            if len(counts) == 1:                                             # the usual case: every row
                sel.scatter_(1, torch.topk(conf, k=k, dim=-1).indices, True)
            else:
                rows = torch.tensor([j for j, n in enumerate(ns) if n == k], dtype=torch.long)   # [b_k]
                sel[rows[:, None], torch.topk(conf[rows], k=k, dim=-1).indices] = True
        return sel & masked

    def select_batched(self, conf, masked, n_sched):
        """``select`` without host syncs (``n_sched`` a device tensor): the commit a runner makes on the
        device when it runs steps ahead of the host (``commit_ahead``). Ties may break unlike torch.topk; the
        host checks every such commit against ``select`` (``DecodeState.apply``'s result) and drops what
        follows a disagreement."""
        return _topk_mask(conf, n_sched) & masked

    def select_ahead(self, conf, masked, n_sched):
        """The device's selection of a step run ahead (``AheadCommit``): ``select_batched``."""
        return self.select_batched(conf, masked, n_sched)


def commit_ahead(blk: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor, n_now: torch.Tensor,
                 mask_id: int) -> torch.Tensor:
    """One fixed-schedule step on the device: blk [B, K] tokens, x0 [B, K] candidates, conf [B, K], n_now [B]
    -> the block after unmasking the n_now most confident masked positions (``DecodeState.lookahead``)."""
    masked = blk == mask_id
    conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    return torch.where(ScheduleRule.select_batched(None, conf, masked, n_now), x0, blk)


class ThresholdRule:
    """Fast-dLLM: every masked position with confidence >= threshold, at least the best one."""
    name = "threshold"
    fixed_steps = False

    def __init__(self, threshold: float):
        _float_field("threshold", threshold, 0.0, 1.0, lo_open=True)
        self.threshold = threshold

    def select(self, conf, masked, n_sched):
        return ((conf >= self.threshold) | _best_one(conf, masked)) & masked


class FactorRule:
    """Fast-dLLM's parallel factor: sort descending, accept the longest prefix whose n-th confidence (n >= 2)
    satisfies conf_n >= 1 - factor / (n + 1); the best one always."""
    name = "factor"
    fixed_steps = False

    def __init__(self, factor: float):
        _float_field("factor", factor, 0.0, lo_open=True)
        self.factor = factor

    def select(self, conf, masked, n_sched):
        srt = conf.sort(dim=-1, descending=True).values                    # [B, K]
        n = torch.arange(1, conf.shape[-1] + 1, device=conf.device, dtype=torch.float64)
        ok = srt >= 1 - self.factor / (n + 1)
        ok[:, 0] = True
        count = ok.long().cumprod(-1).sum(-1)                               # longest accepted prefix
        count = torch.minimum(count, masked.sum(-1))
        return _topk_mask(conf, count) & masked


class BlockThresholdRule:
    """LLaDA2.0's (and SDAR's ``low_confidence_dynamic``) rule: every mask whose confidence is strictly above
    the threshold when at least the step's scheduled count pass, else the scheduled count by confidence
    (torch.topk over the block, as the references)."""
    name = "block_threshold"
    fixed_steps = True

    def __init__(self, threshold: float):
        _float_field("threshold", threshold, 0.0, 1.0)
        self.threshold = threshold

    def select(self, conf, masked, n_sched):
        high = (conf > self.threshold) & masked
        sel = torch.zeros_like(masked)
        for j in range(conf.shape[0]):
            k = min(int(n_sched[j]), int(masked[j].sum()))
            if int(high[j].sum()) >= int(n_sched[j]):
                sel[j] = high[j]
            elif k > 0:
                sel[j, torch.topk(conf[j], k=k).indices] = True
        return sel & masked

    def select_ahead(self, conf, masked, n_sched):
        """``select`` with no host read (``n_sched`` [B] on the device: the device's commit of a step run
        ahead, ``AheadCommit``): every row at once, the threshold's passes where at least the scheduled count
        pass, else the scheduled count (at most the masks left) by a stable descending sort (``_topk_mask``).
        Equal confidences may break unlike the host's torch.topk; the core checks every device commit and
        drops the steps after one that differs, so a rare tie costs time, not tokens."""
        high = (conf > self.threshold) & masked                                     # [B, K]
        top = _topk_mask(conf, torch.minimum(n_sched, masked.sum(-1)))              # [B, K]
        return torch.where((high.sum(-1) >= n_sched)[:, None], high, top) & masked


class JointThresholdRule:
    """LLaDA2.1's joint threshold (mask-to-token + token-to-token editing); applied by ``DecodeState`` with
    ``edit_step`` (it needs the block's current tokens and which columns are prompt)."""
    name = "joint_threshold"
    fixed_steps = False
    edits = True

    def __init__(self, threshold: float, edit_threshold: float, min_tokens: int):
        self.threshold, self.edit_threshold, self.min_tokens = threshold, edit_threshold, min_tokens

    def edit_step(self, x0, conf, blk, editable, mask_id):
        """x0, conf, blk, editable [K] -> (masks to commit [K], edits [K])."""
        masked = blk == mask_id
        m2t = torch.zeros_like(masked)
        if bool(masked.any()):
            c = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            m2t = c > self.threshold
            if int(m2t.sum()) < self.min_tokens:
                m2t[torch.topk(c, k=min(self.min_tokens, int(masked.sum()))).indices] = True
        edit = editable & ~masked & (conf > self.edit_threshold) & (x0 != blk)
        return m2t, edit


class HierarchicalRule:
    """dInfer's hierarchical decoding (``HierarchyDecoder``, python/dinfer/decoding/parallel_strategy.py at
    fce4e32): split the candidates into contiguous runs; in each run accept its most confident position(s) if
    above ``low_threshold`` (strictly), plus every candidate above ``threshold`` (strictly; None: none), plus
    the block's best. A position predicting the mask id is no candidate, so it ends a run (dInfer's runs are
    the masked region; it has no mask-id exclusion). dInfer's defaults: threshold 0.9, low_threshold 0.4
    (its benchmarks: 0.3)."""
    name = "hierarchical"
    fixed_steps = False
    needs_entropy = False

    def __init__(self, low_threshold: float, threshold: float | None = None):
        _float_field("low_threshold", low_threshold, 0.0, 1.0)
        if threshold is not None:
            _float_field("threshold", threshold, 0.0, 1.0, lo_open=True)
            if low_threshold > threshold:
                raise FieldError("low_threshold", f"low_threshold {low_threshold} must be <= threshold "
                                                  f"{threshold}")
        self.low, self.high = low_threshold, threshold

    def select(self, conf, masked, n_sched):
        """All rows at once (tensor ops over [B, K], no loop per row or per run). A run's id is the count of
        non-candidates up to it (one cumsum: a run's columns share it, runs differ); a non-candidate shares
        the id of the run after it, harmlessly: its confidence is -inf (``unmask_step``), below the run's max
        and never above a threshold. Each run's max by one scatter, the block's best by one argmax; every
        selected column is a candidate already (no final mask)."""
        run = (~masked).cumsum(-1)                                         # [B, K] run id in [0, K]
        run_max = conf.new_full((conf.shape[0], conf.shape[1] + 1), float("-inf"))            # [B, K + 1]
        run_max.scatter_reduce_(1, run, conf, reduce="amax")
        sel = (conf == run_max.gather(1, run)) & (conf > self.low)
        if self.high is not None:
            sel |= conf > self.high
        return sel | _best_one(conf, masked)


class EntropyBoundRule:
    """EB-sampler (Ben-Hamu et al. 2025, arXiv 2505.24857, "Accelerated Sampling from Masked Diffusion Models
    via Entropy Bounded Unmasking"; as in diffusers' EntropyBoundScheduler): sort the candidates by the
    entropy of their predicted distribution (ascending) and accept the largest prefix U with
    sum_{U} H - max_{U} H <= gamma (``entropy_bound``); a single position always passes (at least one)."""
    name = "entropy_bound"
    fixed_steps = False
    needs_entropy = True

    def __init__(self, gamma: float):
        _float_field("entropy_bound", gamma, 0.0)
        self.gamma = gamma

    def select(self, conf, masked, n_sched, entropy):
        """All rows at once: one stable sort of the candidates' entropies, the accepted prefix of each sorted
        row scattered back through the sort's own order (no second sort, no rank tensor: a step's host cost
        is a dozen [B, K] ops, like the threshold rules')."""
        ent = torch.where(masked, entropy, torch.full_like(entropy, float("inf")))
        srt, order = ent.sort(dim=-1, stable=True)                          # [B, K] ascending, ties by column
        live = srt < float("inf")                                           # [B, K] the sorted candidates
        fin = torch.where(live, srt, torch.zeros_like(srt))
        ok = (fin.cumsum(-1) - fin <= self.gamma) & live                    # sum - max of each prefix
        keep = ok.cumprod(-1).bool()                                        # the largest such prefix
        return torch.zeros_like(masked).scatter_(1, order, keep)

for _r in (ScheduleRule, ThresholdRule, FactorRule, BlockThresholdRule, JointThresholdRule):
    _r.needs_entropy = False
# rules whose selection the device runs ahead of the host (``AheadCommit``): their ``select`` reads nothing
# back to the host (compares, argmax, sorts, a cumsum / cumprod, scatters), so the device selects with the
# host's float values and ties; the schedule's device selection is its ``select_batched`` (``select_ahead``),
# the block threshold's its batched ``select_ahead`` (its ``select`` reads counts per row on the host).
# A GPU's cumsum may round entropy-bound's prefix sum unlike the host's in the last bit; where that flips a
# prefix at the bound, the host's check of the device's block drops the steps after it (they run again).
# LLaDA2.1's token editing (JointThresholdRule) applies state by state on the host: synchronous
for _r in (ScheduleRule, ThresholdRule, FactorRule, HierarchicalRule, EntropyBoundRule, BlockThresholdRule):
    _r.runs_ahead = True
JointThresholdRule.runs_ahead = False
# fixed-schedule rules whose block may empty before the schedule ends (the block threshold commits every pass
# above it): a run ahead of them launches within ``DecodeState.ahead_horizon``, as variable-count rules do
for _r in (ScheduleRule, ThresholdRule, FactorRule, HierarchicalRule, EntropyBoundRule, JointThresholdRule):
    _r.ends_early = False
BlockThresholdRule.ends_early = True

DECODERS = {"schedule": ScheduleRule, "low_confidence": ScheduleRule, "threshold": ThresholdRule,
            "factor": FactorRule, "hierarchical": HierarchicalRule, "entropy_bound": EntropyBoundRule}


def make_rule(threshold: float | None = None, factor: float | None = None, low_threshold: float | None = None,
              entropy_bound: float | None = None, gen: "GenerationConfig | None" = None):
    """The rule of a config: LLaDA's (schedule / threshold / factor / hierarchical / entropy-bounded) or, for
    a block decoder in ``gen``, LLaDA2's (block threshold / schedule) or LLaDA2.1's (joint threshold)."""
    if gen is not None and gen.decoder == "llada2.1":
        for name in ("low_threshold", "entropy_bound"):
            if getattr(gen, name) is not None:
                raise FieldError(name, f"{name} does not combine with decoder llada2.1 (token editing "
                                       f"decodes with its own joint threshold); use decoder llada2")
        q_thr, q_edit = LLADA21_MODES["quality"]
        return JointThresholdRule(q_thr if gen.threshold is None else gen.threshold,
                                  q_edit if gen.edit_threshold is None else gen.edit_threshold,
                                  gen.tokens_per_step)
    if gen is not None and gen.decoder == "llada2":
        # the field's parallel decoders run over LLaDA2's blocks too (dInfer decodes LLaDA2 with them): an
        # entropy bound replaces the threshold rule (the family's default threshold is not used with it), a
        # low threshold makes the threshold hierarchical decoding's high cut
        if entropy_bound is not None:
            return EntropyBoundRule(entropy_bound)
        if low_threshold is not None:
            return HierarchicalRule(low_threshold, threshold)
        return ScheduleRule() if gen.threshold is None else BlockThresholdRule(gen.threshold)
    if threshold is not None and factor is not None:
        raise FieldError("factor", "choose either threshold or factor decoding, not both")
    if entropy_bound is not None:
        for name, v in (("threshold", threshold), ("factor", factor), ("low_threshold", low_threshold)):
            if v is not None:
                raise FieldError("entropy_bound", f"entropy_bound decoding does not combine with {name}")
        return EntropyBoundRule(entropy_bound)
    if low_threshold is not None:
        if factor is not None:
            raise FieldError("low_threshold",
                             "hierarchical decoding (low_threshold) does not combine with factor")
        return HierarchicalRule(low_threshold, threshold)
    if threshold is not None:
        return ThresholdRule(threshold)
    if factor is not None:
        return FactorRule(factor)
    return ScheduleRule()


def unmask_step(rule, x0: torch.Tensor, conf: torch.Tensor, masked: torch.Tensor, n_now, mask_id: int,
                entropy: torch.Tensor | None = None, ahead: bool = False):
    """One step on blocks: which positions to unmask, and which rows cannot progress.

    x0 [B, K] candidates, conf [B, K] float64 confidences, masked [B, K], n_now [B] the schedule's count,
    entropy [B, K] (rules with ``needs_entropy``). Returns (select [B, K], stuck [B]). ``ahead``: the rule's
    ``select_ahead`` where it has one (the schedule's), else its ``select`` (on the device, no host read:
    ``AheadCommit``)."""
    cand = masked if rule.fixed_steps else masked & (x0 != mask_id)
    conf = torch.where(cand, conf, torch.full_like(conf, float("-inf")))
    stuck = masked.any(-1) & ~cand.any(-1)
    select = getattr(rule, "select_ahead", rule.select) if ahead else rule.select
    if rule.needs_entropy:
        if entropy is None:
            raise ValueError(f"the {rule.name} rule needs the entropy of each position")
        return select(conf, cand, n_now, entropy), stuck
    return select(conf, cand, n_now), stuck


def num_transfer_tokens(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's schedule: masks split evenly over steps, remainder to the first steps. [B] -> [B, steps]."""
    base = masked_count // steps
    rem = masked_count % steps
    sched = base[:, None].expand(-1, steps).clone()
    sched += (torch.arange(steps, device=masked_count.device)[None] < rem[:, None]).long()
    return sched


def _next_seed(generator: torch.Generator) -> int:
    """One step's sampling seed: the generator's next draw in [0, SEED_RANGE)."""
    return int(torch.randint(0, SEED_RANGE, (1,), generator=generator))


# ------------------------------------------------------------------------------------------------ the state
@dataclass(eq=False)          # identity: states hold tensors
class DecodeState:
    """One sequence's decoding state. Build it with ``DecodeState.new``; drive it with advance / apply."""
    gen: GenerationConfig
    prompt_len: int
    x: torch.Tensor                          # [L] int64 token state on the host
    mask_id: int
    eos_id: int
    stop_ids: tuple[int, ...]
    rule: object
    generator: torch.Generator | None        # host generator (T > 0 or random remasking),
                                             # seeded with gen.seed
    done: int = 0                            # generated columns whose block is closed
    bs: int | None = None                    # current block [bs, be) (absolute columns); None between blocks
    be: int = 0
    sched: torch.Tensor | None = None        # [steps_in_block] tokens to unmask per step (fixed-step rules)
    step: int = 0
    stuck: bool = False                      # the last step could only predict the mask id
    has_cache: bool = False                  # the KV slot holds this block's Refresh
    phase: str | None = None                 # the next forward: full / refresh / reuse; None once done
    n_now: int = 0                           # schedule's count for the next step
    stopped: bool = False                    # a stop id was finalised
    started: bool = False                    # advance() has run once
    snapshot: tuple | None = None            # (x, generator state) at the current block start
    emitted: int = 0                         # generated columns already returned as final
    streamed: torch.Tensor | None = None     # a restarted block's tokens returned before (kept at its end)
    forwards: int = 0                        # forwards this sequence took part in
    # credit decoding: (ids [K, M], vals [K, M]) of the block so far, as the next step sends it (decayed)
    credit: tuple | None = None
    # smoothing: [K, d] soft embedding of the block from the last step
    soft: torch.Tensor | None = None
    soft_w: float = 0.0                      # ... and its weight
    iters: int = 0                           # forwards applied, restored by restart_block (smoothing weight)
    iters0: int = 0                          # ... at the current block start
    token_logprobs: list | None = None       # logprobs: per generated column (logprob, ids, logprobs) or None
    # block-causal attention with blocks of this size (0: bidirectional)
    attn_block: int = 0
    kv_upto: int = 0                         # block cache: K/V of columns [0, kv_upto) are exact in the slot
    # block decoders: the current block is finished (edits, early stop)
    settled: bool = False
    post_edits: int = 0                      # llada2.1: steps of the current block that found no mask

    @classmethod
    def new(cls, prompt: list[int], gen: GenerationConfig, model_config,
            seed: int | None = None) -> "DecodeState":
        """``seed`` overrides ``gen.seed`` (generate() gives row i of a batch gen.seed + i). Block-diffusion
        models decode with a block decoder (``gen.for_model``) over a canvas rounded up to whole blocks."""
        mc = model_config
        gen = gen.for_model(mc)
        L = len(prompt) + gen.gen_length
        if gen.block_decoding:
            L = -(-L // gen.block_length) * gen.block_length
        x = torch.full((L,), mc.mask_id, dtype=torch.long)
        x[:len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        g = None
        if gen.temperature > 0 or gen.remasking == "random":
            g = torch.Generator().manual_seed(gen.seed if seed is None else seed % (MAX_SEED + 1))
        stops = tuple(mc.stop_ids) + tuple(t for t in gen.stop_token_ids if t not in mc.stop_ids)
        st = cls(gen, len(prompt), x, mc.mask_id, mc.eos_id, stops, gen.rule(), g,
                 attn_block=gen.block_length if gen.block_decoding else 0)
        if gen.logprobs is not None:
            st.token_logprobs = [None] * gen.gen_length
        return st

    def needs(self) -> dict:
        """The decoding extras this sequence's next step needs from the runner (``step.make_batch``)."""
        g, K = self.gen, self.be - self.bs
        credit = None
        if g.credit:
            credit = (*self._credit_prior(K), CREDIT_ALPHA)
        # smoothing: (temperature, top k or 0: the whole vocabulary) of the soft output the step returns; its
        # soft inputs for the call's rows at once: ``smoothing_delta``
        return {"entropy": self.rule.needs_entropy, "logprobs": g.logprobs, "filters": g.filters(),
                "credit": credit, "soft": (SMOOTH_TAU, g.smoothing_top_k or 0) if g.smoothing else None}

    # -- geometry --------------------------------------------------------------------------------------------
    @property
    def P(self) -> int:
        return self.prompt_len

    @property
    def L(self) -> int:
        return self.x.shape[0]

    @property
    def finished(self) -> bool:
        return self.started and self.phase is None

    def q_span(self) -> tuple[int, int]:
        """Fed columns of a Reuse step (block cache: from the exact-cache frontier to the block end)."""
        if self.gen.kv_cache == "block":
            return self.kv_upto, self.be
        if self.gen.kv_cache == "prefix":
            return self.bs, self.L
        v = self.gen.vicinity
        return max(0, self.bs - v), min(self.L, self.be + v)

    def cost(self) -> int:
        """Tokens the next forward feeds: the sequence for full / refresh, the query span for reuse."""
        if self.phase == "reuse":
            qa, qb = self.q_span()
            return qb - qa
        return self.L

    def group_key(self) -> tuple:
        """States with equal keys run in one runner call (one decoded width, one fed width, one sampling)."""
        fed = 0
        if self.phase == "reuse":
            qa, qb = self.q_span()
            fed = qb - qa
        return (self.phase, self.be - self.bs, fed, self.gen.temperature, self.gen.cfg_scale, self.attn_block,
                self.gen.smoothing_top_k)

    def cache_rows(self) -> int:
        """KV pool rows the sequence needs: none without a cache,
        two with guidance (the unconditional rows)."""
        if self.gen.kv_cache == "none":
            return 0
        return 2 if self.gen.cfg_scale > 0 else 1

    # -- randomness ------------------------------------------------------------------------------------------
    def draw_seed(self) -> int:
        """This step's sampling seed (T > 0): the runner's Gumbel noise is a hash of it."""
        if self.generator is None:
            return 0
        return _next_seed(self.generator)

    def peek_seeds(self, n: int) -> list[int]:
        """The seeds of this state's next ``n`` sampled steps (T > 0), drawn from a copy of its generator: the
        state's own is untouched. Steps run ahead on the device sample with them; the host draws each
        (``draw_seed``) as it applies that step, so a dropped step that runs again draws its own seed again
        and every path samples a step with the same seed."""
        if self.generator is None or self.gen.temperature == 0:
            return [0] * n
        g = torch.Generator().set_state(self.generator.get_state())
        return [_next_seed(g) for _ in range(n)]

    # -- the two moves ---------------------------------------------------------------------------------------
    def advance(self, width: int) -> list[int]:
        """Move to the next step that needs a forward; returns the tokens finalised on the way. ``width``: the
        width of a block started here. Sets ``phase`` (None once the sequence is done)."""
        self.started = True
        out: list[int] = []
        g = self.gen
        while True:
            if self.bs is None:
                if self.stopped or self.done >= self.L - self.P:
                    self.phase = None
                    return out
                self._start_block(g.block_length if self.attn_block else width)
            masked = self._masked()
            if self.settled or (not bool(masked.any()) and not getattr(self.rule, "edits", False)):
                out += self._end_block()
                continue
            if getattr(self.rule, "edits", False):   # LLaDA2.1: runs until a step changes nothing
                n_now = int(masked.sum())
            elif self.rule.fixed_steps:
                if self.step >= self.sched.shape[0]:
                    out += self._end_block()
                    continue
                n_now = int(self.sched[self.step])
                if n_now == 0:                       # nothing to unmask: the forward would change nothing
                    self.step += 1
                    continue
            else:
                if self.stuck:                       # every masked position predicts the mask id
                    self.stuck = False
                    out += self._end_block()
                    continue
                n_now = int(masked.sum())
            self.n_now = n_now
            if g.kv_cache == "none":
                self.phase = "full"
            elif g.kv_cache == "block":              # exact block cache: every step feeds [kv_upto, be)
                self.phase = "reuse"
            elif not self.has_cache or (g.refresh_every and self.step % g.refresh_every == 0):
                self.phase = "refresh"
            else:
                self.phase = "reuse"
            return out

    def lookahead(self, cap: int) -> list[int]:
        """The counts of the next forwards (this one first) while up to ``cap`` of them are Reuse steps whose
        only input from the host would be the previous step's commit: a rule the device selects with
        (``runs_ahead``: low-confidence, threshold, factor, hierarchical, entropy-bound; credit too, which
        the device carries across the steps: ``AheadCommit``), no guidance. A runner may
        run them back to back, committing on the device (``AheadCommit`` / ``commit_ahead``); the host then
        applies each step's outputs in order and checks the device's block after each commit against its
        own (``fed_ahead``). [] when the next step is not one.

        Fixed schedule: the schedule's counts. A variable-count rule does not know its steps in advance: its
        entries are 0 (no count) and there are as many as the block has masks left (an exact upper bound:
        every step unmasks one at least, or the block ends stuck); ``ahead_horizon`` bounds the steps in
        flight. ``logprobs`` (per-step outputs, landed with each step and recorded as the host applies it)
        and iteration smoothing (the device builds the next step's soft input from this step's soft
        embedding: ``AheadCommit.carry_smoothing``) run ahead too, and sampling (T > 0: each step's seed is
        the generator's next draw, known in advance: ``peek_seeds``; the filters stay the request's).

        Block decoders (LLaDA2.0, SDAR: the block threshold, the schedule, the field's parallel rules) with
        the exact block cache, once a step feeds the block alone (``kv_upto`` == bs: every step of a block
        after its first): the schedule's counts, though the threshold may empty the block before they run out
        (``ahead_horizon`` bounds the steps in flight); with ``eos_early_stop`` a stop committed mid-run
        settles the block, and the core drops the later steps (they no longer match its state). Stay
        synchronous: random remasking (the host's draws select), LLaDA2.1's token editing, a block's first
        step (two blocks fed)."""
        g = self.gen
        one_block = g.kv_cache == "block" and self.kv_upto == self.bs          # fed: the block alone
        if (cap < 2 or self.phase != "reuse" or not getattr(self.rule, "runs_ahead", False)
                or g.remasking != "low_confidence"
                or not (g.kv_cache in ("dual", "prefix") or one_block) or g.cfg_scale > 0):
            return []
        fixed = self.rule.fixed_steps
        left = 0 if fixed else self.masks_left()
        counts, s = [], self.step
        while len(counts) < cap and (len(counts) < left if not fixed else
                                     s < self.sched.shape[0] and int(self.sched[s]) > 0):
            if s != self.step and g.refresh_every and s % g.refresh_every == 0:
                break                                # that step refreshes the cache
            counts.append(int(self.sched[s]) if fixed else 0)
            s += 1
        return counts

    def masks_left(self) -> int:
        """Masked positions left in the current block (0 outside a block)."""
        return 0 if self.bs is None else int(self._masked().sum())

    def close_block(self) -> None:
        """The next ``advance`` ends the current block whatever its tokens: a copy predicting the state after
        steps whose tokens are on the device only (runtime/boundary.py)."""
        self.settled = True

    def fed_ahead(self, count: int) -> bool:
        """Whether the state's next step is a Reuse step that ``lookahead`` gave ``count`` (the engine also
        checks the block the device fed it)."""
        return self.phase == "reuse" and (self.n_now == count if self.rule.fixed_steps else count == 0)

    def ahead_bounded(self) -> bool:
        """Whether the block may end before this state's ``lookahead`` counts run out: variable-count rules,
        and the block threshold (it commits every pass above it, so the block may empty before its schedule
        ends). A run ahead over such rows launches within ``ahead_horizon`` (the engine's ``bounded``)."""
        return not self.rule.fixed_steps or self.rule.ends_early

    def ahead_horizon(self) -> int:
        """The most steps from this one on worth launching ahead: unbounded for the plain fixed schedule (its
        ``lookahead`` counts are exact); for a rule whose block may end early (``ahead_bounded``), the steps
        the block's masks last at its tokens per step so far (ceil(masks left x steps / tokens unmasked), at
        least 1; the masks left when nothing is known yet), so that few steps launch after the block
        completes (those commit nothing on the device and the host drops them)."""
        if not self.ahead_bounded() or self.bs is None:
            return 1 << 30
        left = self.masks_left()
        done = self._masks_at_block_start() - left
        if self.step == 0 or done <= 0:
            return max(1, left)
        return max(1, -(-left * self.step // done))

    def _masks_at_block_start(self) -> int:
        """The current block's masks when it started: LLaDA's schedule splits exactly those; a block
        decoder's schedule splits the whole block (part prompt in a first block), so its snapshot counts."""
        if self.attn_block:
            return int((self.snapshot[0][self.bs:self.be] == self.mask_id).sum())
        return int(self.sched.sum())

    def apply(self, x0: torch.Tensor, conf: torch.Tensor, out=None) -> None:
        """x0 [K] candidate tokens and conf [K] float64 confidences of the current block (host tensors):
        unmask the rule's selection. ``out``: the row's ``StepOutput`` with the extras ``needs`` asked for.
        ``apply_batch`` of this one state (raises its error)."""
        row = None if out is None else out.map(lambda t: t[None])              # a batch of one row
        err = apply_batch([self], x0[None], conf[None], row)[0]
        if err is not None:
            raise err

    def _commit(self, new: torch.Tensor, stuck: bool, sel: torch.Tensor, x0: torch.Tensor) -> None:
        """The state's part of ``apply_batch``: its block's new tokens [K], its counters, early stop."""
        if self.gen.kv_cache == "block":
            self.kv_upto = self.bs                   # the fed columns before the block were final: exact K/V
        self.x[self.bs:self.be] = new
        self.stuck = stuck
        if self.phase == "refresh":
            self.has_cache = True
        self.step += 1
        self.forwards += 1
        self.iters += 1
        if self.gen.eos_early_stop and bool(torch.isin(x0[sel], self._stops()).any()):
            self._check_early_stop()

    def _credit_prior(self, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's credit as this step sends it: (ids [K, M], vals [K, M], decayed once since the step
        that added them: ``_credit_rows`` stores it so, batched, and this returns it without an op)."""
        if self.credit is None:
            return torch.zeros(K, 0, dtype=torch.long), torch.zeros(K, 0, dtype=torch.float64)
        return self.credit

    def _record_extras(self, j: int, out, sel_rows: dict, credit: dict) -> None:
        """Credit / smoothing state for the next step (row ``j`` of ``out``; ``credit``: the rows' new credit,
        ``_extras_rows``), logprobs of the tokens unmasked now (``sel_rows``: this row's selected columns with
        their logprob / alternatives)."""
        g = self.gen
        if j in credit:
            self.credit = credit[j]
        if g.smoothing and out.soft is not None:
            self.soft = out.soft[j]                  # a view of the step's host output (never written)
            self.soft_w = min(SMOOTH_W0 + SMOOTH_DW * self.iters, SMOOTH_W)
        if self.token_logprobs is not None:
            k, n = g.logprobs, len(self.token_logprobs)
            for col, lp, ids, lps in sel_rows.get(j, ()):
                i = self.bs - self.P + col
                if i < n:                            # block canvases: the overhang past gen_length is dropped
                    self.token_logprobs[i] = (lp, ids[:k], lps[:k]) if k else (lp, [], [])

    def _masked(self) -> torch.Tensor:
        """[K] bool: the current block's positions still masked."""
        return self.x[self.bs:self.be] == self.mask_id

    def _stops(self) -> torch.Tensor:
        return torch.tensor(self.stop_ids, dtype=torch.long)

    def _check_early_stop(self) -> None:
        """LLaDA2's eos_early_stop: a committed stop id with no mask between the prompt and the first stop id
        ends decoding now (the block closes; _end_block cuts the output there)."""
        hit = torch.isin(self.x[self.P:], self._stops()).nonzero()
        if hit.numel() and not bool((self.x[self.P:self.P + int(hit[0])] == self.mask_id).any()):
            self.settled = True

    def _edit_step(self, x0: torch.Tensor, conf: torch.Tensor) -> None:
        """``apply`` for LLaDA2.1's token editing."""
        if self.gen.kv_cache == "block":
            self.kv_upto = self.bs                   # the fed columns before the block were final: exact K/V
        self._apply_edits(x0, conf)

    def _apply_edits(self, x0: torch.Tensor, conf: torch.Tensor) -> None:
        """LLaDA2.1's step (SGLang's JointThreshold): commit masks, edit decoded non-prompt tokens; the block
        settles when no mask is left for more than max_post_edit_steps steps, when a step changes nothing, or
        after block_length + max_post_edit_steps + 1 steps (SGLang's cap)."""
        self.forwards += 1
        self.step += 1
        blk = self.x[self.bs:self.be]
        masked = blk == self.mask_id
        if not bool(masked.any()):
            self.post_edits += 1
            if self.post_edits > self.gen.max_post_edit_steps:
                self.settled = True
                return
        editable = torch.arange(self.bs, self.be) >= self.P
        m2t, edit = self.rule.edit_step(x0, conf, blk, editable, self.mask_id)
        sel = m2t | edit
        if not bool(sel.any()):
            self.settled = True
            return
        self.x[self.bs:self.be] = torch.where(sel, x0, blk)
        if self.step >= (self.be - self.bs) + self.gen.max_post_edit_steps + 1:
            self.settled = True
        if self.gen.eos_early_stop and bool(torch.isin(x0[sel], self._stops()).any()):
            self._check_early_stop()

    def restart_block(self) -> None:
        """Preemption by recompute: the cache is gone; rewind to the current block's start (same output)."""
        if self.snapshot is not None and self.bs is not None:
            x, gstate = self.snapshot
            a, b = self.P + self.done, self.P + self.emitted          # this block's tokens returned so far
            kept = self.x[a:a] if self.streamed is None else self.streamed
            if b > a + kept.numel():
                self.streamed = torch.cat([kept, self.x[a + kept.numel():b]])
            self.x.copy_(x)
            if gstate is not None:
                self.generator.set_state(gstate)
            self.step, self.stuck = 0, False
            self.credit, self.soft, self.iters = None, None, self.iters0
            self.settled, self.post_edits = False, 0
        self.has_cache = False
        self.kv_upto = 0                             # the slot's K/V are gone: the next step prefills again

    # -- blocks ----------------------------------------------------------------------------------------------
    def _start_block(self, width: int) -> None:
        g = self.gen
        self.bs = self.P + self.done
        if self.attn_block and not self.done:       # blocks aligned to column 0: the prompt's tail shares one
            self.bs = self.P // self.attn_block * self.attn_block
        self.be = min(self.L, self.bs + width)
        w = self.be - self.bs
        self.settled, self.post_edits = False, 0
        self.credit, self.soft, self.iters0 = None, None, self.iters   # the rules' state is per block
        # LLaDA2: the schedule of a whole block, whatever is masked
        if self.attn_block:
            n = min(g.steps_per_block or g.block_length, g.block_length, g.gen_length)
            self.sched = num_transfer_tokens(torch.tensor([g.block_length]), n)[0]
            self.step, self.stuck = 0, False
            self.snapshot = (self.x.clone(), None if self.generator is None else self.generator.get_state())
            return
        if w == g.block_length:
            n_steps = g.steps // g.num_blocks
        else:                                        # elastic chunk: steps in proportion to its width
            n_steps = max(1, round(w * g.steps / g.gen_length))
        masked = self._masked().sum()[None]
        self.sched = num_transfer_tokens(masked, n_steps)[0]
        self.step, self.has_cache, self.stuck = 0, False, False
        self.snapshot = (self.x.clone(), None if self.generator is None else self.generator.get_state())

    def final_prefix(self) -> list[int]:
        """Generated tokens final before their block ends (the engine streams them at once): the current
        block's committed tokens from the first one not yet returned up to the first still masked. A committed
        token never changes, except under LLaDA2.1's editing (its blocks return at their end). A stop id ends
        the run as ``_end_block`` cuts: the stop and what follows return (cut) when the block ends. A
        preempted block recomputes its tokens (``restart_block``): the same ones, but where batch variance
        makes them differ, its end keeps the ones returned (``streamed``), so later blocks read them."""
        if self.bs is None or getattr(self.rule, "edits", False):
            return []
        start, end = self.P + self.emitted, min(self.be, self.P + self.gen.gen_length)
        if start >= end or int(self.x[start]) == self.mask_id:          # the usual case: one look
            return []
        seg = self.x[start:end]
        masked = (seg == self.mask_id).nonzero()
        new = self._cut_at_stop(seg[:int(masked[0]) if masked.numel() else seg.numel()].tolist())
        self.emitted += len(new)
        return new

    def _cut_at_stop(self, new: list[int]) -> list[int]:
        """``new`` (generated tokens) before its first stop id, where stops apply (``stop_at_eos``, block
        decoders, whose references always stop)."""
        if self.gen.stop_at_eos or self.attn_block:
            for j, t in enumerate(new):
                if t in self.stop_ids:
                    return new[:j]
        return new

    def _end_block(self) -> list[int]:
        """Close the current block; returns the generated tokens it finalised
        (cut before the first stop id)."""
        # references always stop
        P, be, stop = self.P, self.be, self.gen.stop_at_eos or bool(self.attn_block)
        if self.streamed is not None:        # a restarted block keeps what it returned (the recompute is the
            a = P + self.done                # same but for batch variance: the stream and x never part)
            self.x[a:a + self.streamed.numel()] = self.streamed
            self.streamed = None
        if stop:
            hit = torch.isin(self.x[P:be], torch.tensor(self.stop_ids, dtype=torch.long)).nonzero()
            if hit.numel():
                self.x[P + int(hit[0]) + 1:] = self.eos_id
                self.stopped = True
        self.done = be - P
        self.bs, self.has_cache = None, False
        end = min(be, P + self.gen.gen_length)        # block canvases: the overhang is dropped
        new = self.x[P + self.emitted:end].tolist()
        self.emitted = end - P
        return self._cut_at_stop(new)



# ------------------------------------------------------------------------------------ many states at once
def smoothing_delta(states: list, device) -> torch.Tensor | None:
    """Iteration smoothing's input for one runner call (``StepBatch.embed_delta``): [B, K, d], per row
    ``w * soft`` (the state's soft embedding of its last step and its weight) on the block columns still
    masked, 0 elsewhere and on rows without a soft embedding; None when no row has one. Batched: the soft
    embeddings (on the runner's device: ``StepOutput.to_host`` keeps them there) stack once and one [B, K]
    host scale (w where still masked, from one stack of the blocks: no op per state) crosses to the device,
    so a step's cost does not grow by a few device ops and a host-to-device copy per state."""
    have = [s.soft is not None and s.gen.smoothing for s in states]
    if not any(have):
        return None
    soft0 = next(s.soft for s, h in zip(states, have) if h)                      # [K, d]
    zero = torch.zeros_like(soft0)
    # w as float32 first (as ``bool * w`` computes it), then the soft dtype: the same rounding as per row
    w = torch.tensor([s.soft_w if h else 0.0 for s, h in zip(states, have)]).to(soft0.dtype)      # [B]
    blk = torch.stack([s.x[s.bs:s.be] for s in states])                          # [B, K] host tokens
    scale = (blk == states[0].mask_id) * w[:, None]                              # [B, K] on the host
    soft = torch.stack([s.soft if h else zero for s, h in zip(states, have)])      # [B, K, d]
    return soft * to_device(scale, soft.device)[..., None]            # pinned, asynchronous on a GPU


def _rule_key(rule) -> tuple:
    """States whose rules have equal keys select in one call of the rule over their stacked rows."""
    return (type(rule), tuple(sorted(vars(rule).items())))


def apply_batch(states: list, x0: torch.Tensor, conf: torch.Tensor, out=None) -> list:
    """``DecodeState.apply`` for the B states of one runner call at once: x0 / conf [B, K] (host), ``out`` the
    call's host ``StepOutput`` (row b is state b's). The rules' selection runs once per distinct rule over the
    stacked [b, K] blocks (every rule's ``select`` is batched: sorts, cumsums, masks over rows), the extras'
    bookkeeping (credit's update, logprobs) over [B, K] too, so the host cost of a step grows by a few tensor
    ops per state, not by a rule's whole selection. Same result as one ``apply`` per state. Returns one entry
    per state: None, or the exception that state raised (its bad data fails it alone; nothing of the other
    states depends on it). LLaDA2.1's token editing (``edits``) applies state by state."""
    B = len(states)
    errors: list = [None] * B
    idx = []
    for i, s in enumerate(states):
        K = s.be - s.bs if s.bs is not None else -1
        if tuple(x0.shape[1:]) != (K,) or tuple(conf.shape[1:]) != (K,):
            errors[i] = ValueError(f"apply: expected candidates for the {K} block columns, got x0 "
                                   f"{tuple(x0.shape[1:])} conf {tuple(conf.shape[1:])}")
        elif getattr(s.rule, "edits", False):
            errors[i] = _guarded(lambda s=s, i=i: s._edit_step(x0[i], conf[i]))
        else:
            idx.append(i)
    if not idx:
        return errors
    S = [states[i] for i in idx]
    if len(idx) < B:
        x0, conf = x0[idx], conf[idx]
        out = None if out is None else out.take(idx)
    rand = [j for j, s in enumerate(S) if s.gen.remasking == "random"]
    if rand:                                   # random remasking: each state's own generator draws
        conf = conf.clone()
        for j in rand:
            conf[j] = torch.rand(conf.shape[1], dtype=torch.float64, generator=S[j].generator)
    blk = torch.stack([s.x[s.bs:s.be] for s in S])                               # [b, K]
    masked = blk == S[0].mask_id
    sel, stuck = _select_rows(S, x0, conf, masked, None if out is None else out.entropy)
    new = torch.where(sel, x0, blk)                                              # [b, K]
    credit = sel_rows = None
    if out is not None:
        credit, sel_rows = _extras_rows(S, out, masked, sel)
    stuck_l = stuck.tolist()
    for j, s in enumerate(S):
        def commit(j=j, s=s):
            if out is not None:
                s._record_extras(j, out, sel_rows, credit)
            s._commit(new[j], stuck_l[j], sel[j], x0[j])
        errors[idx[j]] = _guarded(commit)
    return errors


class AheadCommit:
    """The decoding core's commit of a step run ahead, on the device: what ``apply_batch`` would select for
    the run's rows, with no host read, so that the runner's next launch reads it (runners/ahead.py). Built on
    the host from the run's states (``ahead_commit``): the rows grouped by rule as ``_select_rows`` groups
    them (each group's rows an index on the device), selecting with each rule's ``select_ahead`` over the
    step's float64 confidences (and entropy), the same values and ties as the host's ``select``. The host
    still checks the device's block after each commit (``fed_ahead`` and the engine's block check).

    Credit: ``carry_credit`` moves each credit row's credit to the next step in the runner's static credit
    inputs, in place, with ``_credit_rows``' float64 ops in its order (the prior decayed, this step's raw
    top-1 id with p1 ** gamma where still masked, decayed, written in the row's next column: the layout the
    graph runner stages from the host's credit), so the host keeps its own and they agree. ``reads``: the
    step's extras the commit and the host's apply need (copied back with each step; logprobs: the token's
    logprob and alternatives, which the host records as it applies the step).

    Smoothing: ``carry_smoothing`` writes the next step's soft input (``smoothing_delta``'s values: w x the
    step's soft embedding where still masked after the commit, w from the row's forwards so far as
    ``_record_extras`` computes it) into the runner's static embedding delta, with the host's ops in its
    order and dtypes, so a run's steps are fed what the synchronous path feeds them. ``keeps``: extras that
    stay on the device with each step (the soft embedding: the host's state keeps it, as ``to_host`` does,
    for the step that follows the run)."""

    def __init__(self, groups: list, mask_id: int, entropy: bool, credit_at: torch.Tensor | None,
                 credit_on: torch.Tensor | None, logprobs: bool = False,
                 smooth_on: torch.Tensor | None = None, smooth_it: torch.Tensor | None = None,
                 rules: list | None = None):
        self.groups, self.mask_id, self.entropy = groups, mask_id, entropy
        self.rules, self.logprobs = rules, logprobs                  # per row (host): what a peer rebuilds
        self.credit_at, self.credit_on = credit_at, credit_on        # [B] next column, [B] bool (device)
        self.smooth_on, self.smooth_it = smooth_on, smooth_it        # [B] bool, [B] forwards applied (device)
        self.reads = ((("entropy",) if entropy else ())
                      + (("top1_ids", "top1_prob") if credit_on is not None else ())
                      + (("logprob", "topk_ids", "topk_logprobs") if logprobs else ()))
        self.keeps = ("soft",) if smooth_on is not None else ()

    def step(self, blk: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor, n_now: torch.Tensor,
             extras: dict | None = None) -> torch.Tensor:
        """blk / x0 / conf [B, K], n_now [B] (the schedule's counts; 0 for variable-count rules), ``extras``
        the step's (entropy [B, K]) -> the block after the step's commit [B, K]."""
        masked = blk == self.mask_id
        conf = conf.to(torch.float64)
        ent = extras["entropy"].to(torch.float64) if self.entropy else None
        if len(self.groups) == 1:
            sel = unmask_step(self.groups[0][0], x0, conf, masked, n_now, self.mask_id, ent, ahead=True)[0]
        else:
            sel = torch.zeros_like(masked)
            for rule, rows in self.groups:                              # rows: [b] on the device
                sel[rows] = unmask_step(rule, x0[rows], conf[rows], masked[rows], n_now[rows], self.mask_id,
                                        None if ent is None else ent[rows], ahead=True)[0]
        return torch.where(sel, x0, blk)

    def carry_credit(self, credit: tuple, blk: torch.Tensor, extras: dict) -> None:
        """After the step fed ``blk`` [B, K]: credit (ids, vals [bb, K, M], alpha [bb]: the runner's static
        inputs) for the next step, in place. Rows without credit keep zeros (the host sends them none)."""
        if self.credit_on is None:
            return
        from dlc.kernels.sampling import CREDIT_GAMMA
        ids, vals = credit[0], credit[1]
        B, K = blk.shape
        add = extras["top1_prob"][:B].to(torch.float64).pow(CREDIT_GAMMA).mul_(blk == self.mask_id)   # [B, K]
        vals[:B].mul_(CREDIT_DECAY)                                     # the prior, decayed once more
        on = self.credit_on[:, None]
        at = self.credit_at.clamp(max=ids.shape[-1] - 1)[:, None, None].expand(B, K, 1)   # [B, K, 1]
        ids[:B].scatter_(2, at, torch.where(on, extras["top1_ids"][:B], 0)[..., None])
        vals[:B].scatter_(2, at, torch.where(on, add.mul_(CREDIT_DECAY), 0.0)[..., None])
        self.credit_at += 1

    def carry_smoothing(self, embed: tuple, new: torch.Tensor, soft: torch.Tensor) -> None:
        """After the step's commit ``new`` [B, K]: the next step's soft input, in place in the runner's static
        embedding delta ``embed`` = (buf [bb, T, d], cols [B, K]: the decoded columns' index in buf), from
        the step's soft embedding ``soft`` [>= B, K, d]. The host's ops (``_record_extras``' weight, then
        ``smoothing_delta`` and the runner's ``embed_add``): w = min(W0 + DW x forwards, W) in float64, as
        float32, in soft's dtype; x (still masked); x soft; in the model's dtype. Rows without smoothing:
        0."""
        if self.smooth_on is None:
            return
        buf, cols = embed
        B = new.shape[0]
        w = self.smooth_it.to(torch.float64).mul(SMOOTH_DW).add(SMOOTH_W0).clamp(max=SMOOTH_W)    # [B]
        w = w.to(torch.float32).to(soft.dtype)
        scale = (new == self.mask_id) * w[:, None]                                                # [B, K]
        delta = torch.where(self.smooth_on[:, None, None], soft[:B] * scale[..., None], 0.0)      # [B, K, d]
        buf[:B].scatter_(1, cols[..., None].expand(-1, -1, buf.shape[-1]), delta.to(buf.dtype))
        self.smooth_it += 1


def ahead_commit(states: list, device) -> AheadCommit | None:
    """The device's commit of a run ahead over these states (their ``lookahead`` is not empty); None where
    every row is the plain low-confidence schedule with no extras (the runners' own ``commit_ahead``)."""
    plain = all(type(s.rule) is ScheduleRule and not s.gen.credit and s.gen.logprobs is None
                and not s.gen.smoothing for s in states)
    if plain:
        return None
    at = on = None
    if any(s.gen.credit for s in states):
        at = torch.tensor([0 if s.credit is None else s.credit[0].shape[1] for s in states], device=device)
        on = torch.tensor([bool(s.gen.credit) for s in states], device=device)
    s_on = s_it = None
    if any(s.gen.smoothing for s in states):
        s_on = torch.tensor([bool(s.gen.smoothing) for s in states], device=device)
        s_it = torch.tensor([s.iters for s in states], device=device)
    return rules_commit([s.rule for s in states], states[0].mask_id, device,
                        any(s.gen.logprobs is not None for s in states), (at, on), (s_on, s_it))


def rules_commit(rules: list, mask_id: int, device, logprobs: bool = False, credit: tuple = (None, None),
                 smoothing: tuple = (None, None)) -> AheadCommit:
    """The ``AheadCommit`` of rows selecting with ``rules`` (row j: rules[j]), grouped as ``_select_rows``
    groups them; ``credit`` (next column, on) and ``smoothing`` (on, forwards) [B] device tensors or Nones.
    ``ahead_commit`` builds it from states; a tensor-parallel worker from the rules rank 0 sends
    (runtime/distributed/ahead_rules.py), so every rank commits alike."""
    by_rule: dict[tuple, list[int]] = {}
    for j, r in enumerate(rules):
        by_rule.setdefault(_rule_key(r), []).append(j)
    groups = [(rules[js[0]], None if len(by_rule) == 1 else torch.tensor(js, device=device))
              for js in by_rule.values()]
    return AheadCommit(groups, mask_id, any(r.needs_entropy for r in rules), *credit, logprobs, *smoothing,
                       rules=list(rules))


def _guarded(fn):
    """Run one state's part; its exception (returned) fails that state only."""
    try:
        fn()
    except Exception as e:             # noqa: BLE001 - reported per state
        return e
    return None


def _select_rows(S: list, x0, conf, masked, entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct rule's ``unmask_step`` over its states' rows -> (select [b, K], stuck [b])."""
    n = torch.tensor([s.n_now for s in S], dtype=torch.long)
    groups: dict[tuple, list[int]] = {}
    for j, s in enumerate(S):
        groups.setdefault(_rule_key(s.rule), []).append(j)
    if len(groups) == 1:
        return unmask_step(S[0].rule, x0, conf, masked, n, S[0].mask_id, entropy)
    sel, stuck = torch.zeros_like(masked), torch.zeros(len(S), dtype=torch.bool)
    for rows in groups.values():
        r = torch.tensor(rows, dtype=torch.long)
        sel[r], stuck[r] = unmask_step(S[rows[0]].rule, x0[r], conf[r], masked[r], n[r], S[rows[0]].mask_id,
                                       None if entropy is None else entropy[r])
    return sel, stuck


def _extras_rows(S: list, out, masked: torch.Tensor, sel: torch.Tensor):
    """Batched parts of the extras' bookkeeping: each credit row's new credit (``_credit_rows``) and, per
    row, the selected columns with their logprob and alternatives (one host read for all)."""
    credit = _credit_rows(S, out, masked)
    sel_rows: dict[int, list] = {}
    if out.logprob is not None and any(s.token_logprobs is not None for s in S):
        at = sel.nonzero()                                                       # [n, 2] (row, column)
        r, c = at.unbind(1)                                     # one nonzero for every field's gather
        pos = at.tolist()
        lp = out.logprob[r, c].tolist()
        ids = out.topk_ids[r, c].tolist() if out.topk_ids is not None else [[]] * len(pos)
        lps = out.topk_logprobs[r, c].tolist() if out.topk_logprobs is not None else [[]] * len(pos)
        for (j, col), a, b, c in zip(pos, lp, ids, lps):
            sel_rows.setdefault(j, []).append((col, a, b, c))
    return credit, sel_rows


def _credit_rows(S: list, out, masked: torch.Tensor) -> dict:
    """Credit decoding's update for the rows whose state has it: {row: (ids [K, M + 1], vals [K, M + 1])},
    the prior as the step sent it plus this step's raw top-1 id with p1 ** gamma where still masked (0
    elsewhere), all decayed once for the next step (as it will send them). States with equal M update as
    one stacked tensor: a few ops per group, none per state."""
    rows = [j for j, s in enumerate(S) if s.gen.credit]
    if out.top1_ids is None or not rows:
        return {}
    from dlc.kernels.sampling import CREDIT_GAMMA
    p = out.top1_prob.to(torch.float64)
    add = p.pow(CREDIT_GAMMA).mul_(masked)                        # [b, K] p1 ** gamma where masked, else 0
    by_m: dict[int, list[int]] = {}
    for j in rows:
        by_m.setdefault(0 if S[j].credit is None else S[j].credit[0].shape[1], []).append(j)
    new = {}
    for js in by_m.values():
        top1, a = out.top1_ids, add
        if len(js) < len(S):                          # the usual call (every row, one width) takes no index
            ix = torch.tensor(js, dtype=torch.long)
            top1, a = top1[ix], a[ix]
        if S[js[0]].credit is not None and S[js[0]].credit[0].shape[1]:          # the prior as it was sent
            # [n, K, M + 1]
            ids = torch.cat([torch.stack([S[j].credit[0] for j in js]), top1[..., None]], -1)
            vals = torch.cat([torch.stack([S[j].credit[1] for j in js]), a[..., None]], -1)
        else:                                         # a block's first credit: just this step's column
            ids, vals = top1[..., None].clone(), a[..., None].clone()
        vals.mul_(CREDIT_DECAY)
        new.update(zip(js, zip(ids.unbind(0), vals.unbind(0))))
    return new
