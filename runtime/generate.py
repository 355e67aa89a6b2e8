"""Offline generation: a batch of prompts through the one decoding core (runtime/decoding.py).

``generate`` keeps no rules of its own: each prompt is a ``DecodeState``; every iteration groups the states by
phase (``group_states``), runs one runner call per group over a ``StepBatch`` (runtime/step.py)
and applies the
results; then every state advances. With a KV cache the rows live in a ``KVCacheManager`` slot pool sized for
the batch, exactly as in serving, so a prompt decodes the same here, alone, or inside the serving engine.

Semantics follow LLaDA's ``generate.py`` (schedule, Gumbel-max sampling, low-confidence remasking, CFG) and
Fast-dLLM's caches (prefix / dual, Refresh at each block start, Reuse after it); decoding.py lists the rules.
At T > 0 prompt i of the batch samples with seed ``cfg.seed + i`` (the first prompt as a single request with
``cfg.seed`` would)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .decoding import DecodeState, FieldError, GenerationConfig, apply_batch
from .kv_cache import KVCacheManager
from .runners.eager import EagerRunner
from .step import check_runner, group_states, is_graphed, make_batch, run_batch

__all__ = ["GenerationConfig", "GenerationResult", "generate", "as_runner", "check_prompts"]


@dataclass
class GenerationResult:
    token_ids: list[list[int]]          # generated ids per prompt (cut before the first stop id
                                        # with stop_at_eos)
    sequences: list[torch.Tensor]       # final token state per prompt: [P_i + gen_length] (host)
    nfe: int                            # runner calls (forwards of the batch)
    seconds: float
    steps_per_row: list[int] = field(default_factory=list)   # forwards each prompt took part in
    logprobs: list = field(default_factory=list)   # cfg.logprobs: per prompt, per generated column (logprob,
                                                   # top ids, their logprobs) at the step that unmasked it

    @property
    def tokens_per_forward(self) -> float:
        gen = sum(len(t) for t in self.token_ids)
        return gen / max(1, sum(self.steps_per_row))


def as_runner(model_or_runner):
    from dlc.models.common import DiffusionLM

    if isinstance(model_or_runner, DiffusionLM):
        return EagerRunner(model_or_runner)
    check_runner(model_or_runner)
    return model_or_runner


def check_prompts(prompts: list[list[int]], gen_length: int, model_config, max_seq_len: int | None = None,
                  block: int = 0):
    """Refuse prompts that cannot be served, naming the problem. ``block``: block-diffusion decoding's block
    length (its canvas is rounded up to whole blocks)."""
    mc = model_config
    limit = mc.max_seq_len if max_seq_len is None else max_seq_len
    for p in prompts:
        if len(p) == 0:
            raise FieldError("prompt", "every prompt needs at least one token (the prompt is empty)")
        if any(t == mc.mask_id for t in p):
            raise FieldError("prompt", f"the prompt contains the mask token id {mc.mask_id}")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < mc.vocab_size for t in p):
            raise FieldError("prompt", f"prompt token ids must be integers in [0, {mc.vocab_size})")
        n = len(p) + gen_length
        if block:
            n = -(-n // block) * block
        if n > limit:
            raise FieldError("prompt", f"prompt ({len(p)} tokens) + gen_length ({gen_length}) exceeds the "
                                       f"maximum sequence length {limit}")


def generate(model, prompts: list[list[int]], cfg: GenerationConfig) -> GenerationResult:
    runner = as_runner(model)
    mc = runner.config
    cfg = cfg.for_model(mc)
    check_prompts(prompts, cfg.gen_length, mc, runner.max_seq_len,
                  cfg.block_length if cfg.block_decoding else 0)
    if hasattr(runner, "check_generation"):              # what a runner cannot decode (compiled engines)
        runner.check_generation(cfg)
    t0 = time.perf_counter()
    states = [DecodeState.new(list(p), cfg, mc, seed=cfg.seed + i) for i, p in enumerate(prompts)]
    pool, slots = None, [()] * len(states)
    if cfg.kv_cache != "none":
        per = states[0].cache_rows()
        graphed = is_graphed(runner)          # CUDA-graph runners take one more slot for their padding rows
        pool = KVCacheManager(mc, max(s.L for s in states), 1 << 62, runner.dtype, runner.device,
                              max_slots=per * len(states) + graphed,
                              head_scores=runner.sparse_retention is not None)
        if graphed:
            runner.bind_pool(pool)
        slots = [pool.allocate_n(per) for _ in states]
    outputs = [s.advance(cfg.block_length) for s in states]
    nfe = 0
    while True:
        active = [i for i, s in enumerate(states) if s.phase is not None]
        if not active:
            break
        for group in group_states([states[i] for i in active], runner.max_batch_size):
            rows = [active[j] for j in group]
            batch = make_batch(runner, [states[i] for i in rows], [slots[i] for i in rows], pool)
            out = run_batch(runner, batch)
            nfe += 1
            err = next((e for e in apply_batch([states[i] for i in rows], out.x0, out.conf, out) if e), None)
            if err is not None:
                raise err
        for i in active:
            outputs[i] += states[i].advance(cfg.block_length)
    return GenerationResult(outputs, [s.x for s in states], nfe, time.perf_counter() - t0,
                            [s.forwards for s in states],
                            [s.token_logprobs for s in states] if cfg.logprobs is not None else [])
