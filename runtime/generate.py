"""The reference diffusion decoding loop (eager PyTorch, batch >= 1 with different prompt lengths).

Semantics follow LLaDA's ``generate.py``: the sequence is prompt + gen_length masks; generation walks blocks of
block_length; ``steps`` are split evenly across blocks and each block's masks evenly across its steps
(remainder first); each step decodes the block's masked positions and unmasks those its rule selects
(runtime/decoders.py). Batched prompts are left-padded: pads are excluded from attention by a key mask and
positions count real tokens only, so a row decodes the same alone or in a batch.

KV modes (Fast-dLLM): ``none`` runs a full forward per step; ``prefix`` and ``dual`` run a Refresh forward at
each block start (it also decodes that step) and Reuse forwards after it: ``prefix`` feeds the block and
everything after it over the cached prefix, ``dual`` feeds only the block (plus ``vicinity`` positions either
side, dInfer) and writes the block's new K/V in place. ``refresh_every=N`` refreshes every N steps as well
(N=1 makes every step a Refresh: identical to ``none``).

With ``stop_at_eos`` a row is finished once a stop token is final: at the end of a block whose decoded text
holds a stop id, everything after the first one becomes EOS and the row leaves the batch."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .decoders import make_rule, num_transfer_tokens, unmask_step
from .model_runner import as_runner
from .sampling import REMASKING, Sampling

KV_MODES = ("none", "prefix", "dual")


@dataclass
class GenerationConfig:
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

    def __post_init__(self):
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    def validate(self) -> None:
        if self.gen_length <= 0 or self.block_length <= 0:
            raise ValueError(f"gen_length ({self.gen_length}) and block_length ({self.block_length}) must be > 0")
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length {self.gen_length} must be a multiple of block_length {self.block_length}")
        if self.steps <= 0 or self.steps % self.num_blocks:
            raise ValueError(f"steps {self.steps} must be a positive multiple of the number of blocks "
                             f"({self.num_blocks} = gen_length / block_length)")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {REMASKING}, got {self.remasking!r}")
        if self.kv_cache not in KV_MODES:
            raise ValueError(f"kv_cache must be one of {KV_MODES}, got {self.kv_cache!r}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.refresh_every < 0 or self.vicinity < 0:
            raise ValueError("refresh_every and vicinity must be >= 0")
        make_rule(self.threshold, self.factor)   # validates threshold / factor


@dataclass
class GenerationResult:
    token_ids: list[list[int]]          # generated ids per prompt (cut at the first stop id with stop_at_eos)
    sequences: torch.Tensor             # [B, P + gen_length] final token state, left-padded
    nfe: int                            # forward passes of the batch
    seconds: float
    steps_per_row: list[int] = field(default_factory=list)   # forward passes each row took part in

    @property
    def tokens_per_forward(self) -> float:
        gen = sum(len(t) for t in self.token_ids)
        return gen / max(1, sum(self.steps_per_row))


def pad_prompts(prompts: list[list[int]], gen_length: int, mask_id: int, pad_id: int, device):
    """Left-pad prompts and append masks: ids, position ids, key mask [B, L] and the prompt length P."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    L = P + gen_length
    ids = torch.full((len(prompts), L), mask_id, dtype=torch.long)
    key_mask = torch.ones(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, :P - len(p)] = pad_id
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        key_mask[i, :P - len(p)] = False
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), pos.to(device), key_mask.to(device), P


def generate(model, prompts: list[list[int]], cfg: GenerationConfig) -> GenerationResult:
    runner = as_runner(model)
    mc = runner.config
    if any(t == mc.mask_id for p in prompts for t in p):
        raise ValueError(f"a prompt contains the mask token id {mc.mask_id}")
    t0 = time.perf_counter()
    x, pos, key_mask, P = pad_prompts(prompts, cfg.gen_length, mc.mask_id, mc.pad_id, runner.device)
    if P + cfg.gen_length > mc.max_seq_len:
        raise ValueError(f"prompt ({P}) + gen_length ({cfg.gen_length}) exceeds the model's max sequence "
                         f"length {mc.max_seq_len}")
    prompt_mask = key_mask.clone()
    prompt_mask[:, P:] = False
    rule = make_rule(cfg.threshold, cfg.factor)
    gen = torch.Generator(device=x.device).manual_seed(cfg.seed)
    samp = Sampling(cfg.temperature, cfg.remasking, cfg.cfg_scale, gen)
    steps_per_block = cfg.steps // cfg.num_blocks
    active = torch.arange(len(prompts), device=x.device)
    row_steps = torch.zeros(len(prompts), dtype=torch.long)
    nfe = 0
    for blk in range(cfg.num_blocks):
        if active.numel() == 0:
            break
        bs, be = P + blk * cfg.block_length, P + (blk + 1) * cfg.block_length
        xa, pa, ka, pma = x[active], pos[active], key_mask[active], prompt_mask[active]
        sched = num_transfer_tokens((xa[:, bs:be] == mc.mask_id).sum(-1), steps_per_block)
        nfe += _decode_block(runner, rule, cfg, samp, xa, pa, ka, pma, bs, be, sched, row_steps, active)
        x[active] = xa
        if cfg.stop_at_eos:
            active = _finish_stopped(x, active, P, be, mc.stop_ids, mc.eos_id)
    token_ids = [_cut(x[i, P:].tolist(), mc.stop_ids if cfg.stop_at_eos else ()) for i in range(len(prompts))]
    return GenerationResult(token_ids, x, nfe, time.perf_counter() - t0, row_steps.tolist())


def _decode_block(runner, rule, cfg, samp, x, pos, key_mask, prompt_mask, bs, be, sched, row_steps, active):
    """Decode one block in place in x [b, L]; returns the number of forward passes."""
    mask_id = runner.config.mask_id
    L = x.shape[1]
    cache, nfe, step = None, 0, 0
    while True:
        masked = x[:, bs:be] == mask_id                                    # [b, K]
        if not masked.any():
            break
        if rule.fixed_steps:
            if step >= sched.shape[1]:
                break
            n_now = sched[:, step]
            if not bool((n_now > 0).any()):   # nothing to unmask at this step: the forward would change nothing
                step += 1
                continue
        else:
            n_now = masked.sum(-1)
        refresh = cache is None or (cfg.refresh_every and step % cfg.refresh_every == 0)
        if cfg.kv_cache == "none":
            x0, conf = runner.full(x, pos, key_mask, (bs, be), samp, prompt_mask)
        elif refresh:
            x0, conf, cache = runner.refresh(x, pos, key_mask, (bs, be), samp, prompt_mask)
        else:
            q = (bs, L) if cfg.kv_cache == "prefix" else (max(0, bs - cfg.vicinity), min(L, be + cfg.vicinity))
            x0, conf = runner.reuse(cache, x, pos, key_mask, q, (bs, be), samp, prompt_mask)
        nfe += 1
        row_steps[active.cpu()] += masked.any(-1).cpu().long()
        sel, stuck = unmask_step(rule, x0, conf, masked, n_now, mask_id)
        x[:, bs:be] = torch.where(sel, x0, x[:, bs:be])
        step += 1
        if bool(stuck.any()) and not bool((x[:, bs:be] == mask_id)[~stuck].any()):
            break                          # the rows left can only predict the mask id: end the block
    return nfe


def _finish_stopped(x, active, P, be, stop_ids, eos_id):
    keep = []
    stops = torch.tensor(stop_ids, device=x.device)
    for i in active.tolist():
        hit = torch.isin(x[i, P:be], stops).nonzero()
        if hit.numel():
            x[i, P + int(hit[0]) + 1:] = eos_id
        else:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long, device=x.device)


def _cut(ids: list[int], stop_ids) -> list[int]:
    for j, t in enumerate(ids):
        if t in stop_ids:
            return ids[:j]
    return ids
