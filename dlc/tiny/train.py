"""Train dlc-tiny: a 1.3M-parameter LLaDA on the synthetic tasks, with the masked-diffusion objective.

    python -m dlc.tiny.train --out dlc/assets/dlc-tiny --seed 0      # ~8 min on 2 idle CPU cores

Objective (LLaDA SFT): a sequence is chat(prompt) + answer + EOS padding up to the generation length; per
sample a mask ratio t ~ U(0, 1) masks each response position with probability t (the prompt is never masked);
the loss is the cross-entropy on masked positions weighted 1/t, averaged over response positions. The EOS
padding is part of the response, so the model learns where answers end. Most batches pad to the bundled
generation length (8), some to 16 (so longer generations still end in EOS).

Batches are left-padded exactly like the decoding loop pads prompts (key mask + real-token positions), so the
model sees at training time the layout it decodes with.

Head-sparse-aware batches (``--sparse-aware P``, 0.5 for the bundled model): a fraction P of the batches
trains the attention the ``sparsify_heads`` pass runs in Reuse steps. One block of the response
(``BLOCK_LENGTH`` positions, the decoded block) is picked per batch and a retention r ~
U(``SPARSE_RETENTION``); in every layer the block's queries attend only to the block plus, per head, the top
``ceil(r x (S - T))`` other positions as the pass chooses them (``sparsify_heads.head_scores`` of the block's
own queries, ``keep_columns``); the other rows attend densely, as in the Refresh that produced the cache. A
model trained only densely spreads its attention over the ~20 context positions of a prompt, and at retention
0.25 (5 kept positions per head) loses sorting (docs/QUALITY.md); trained this way it concentrates what each
head needs into the kept positions.

Seeded end to end; 2 torch threads. Random draws (tasks, mask ratios, masks, sparse blocks and retentions) all
happen on the CPU, so ``--device cuda`` sees the same data stream (its numerics differ, so its weights do not
match the CPU run's bit for bit)."""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from dlc.models import build_model
from dlc.models.config import ModelConfig
from dlc.models.common import attention_override
from dlc.models.loading import init_weights, save_checkpoint
from dlc.models.sparse_heads import head_scores, keep_columns

from . import tasks
from .evaluate import BLOCK_LENGTH, GEN_LENGTH
from .tokenizer import EOS_ID, EOT_ID, MASK_ID, VOCAB_SIZE, build_tokenizer, encode_chat, encode_text

PAD_LENGTHS = {GEN_LENGTH: 0.9, 16: 0.1}             # response lengths trained on, with their probability
T_MIN = 1e-3                                         # floor of the mask ratio (1/t stays finite)
# Round-robin task order of training batches: addition learns slowest, so it comes twice as often.
TRAIN_MIX = ["add", "sort", "add", "reverse"]
# range of retentions head-sparse-aware batches train with
SPARSE_RETENTION = (0.15, 0.5)


def tiny_config(d_model=160, n_layers=4, n_heads=4, mlp_hidden=448) -> ModelConfig:
    return ModelConfig(family="llada", d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_heads, mlp_hidden=mlp_hidden, vocab_size=VOCAB_SIZE,
                       embedding_size=VOCAB_SIZE, rope_theta=10000.0, rms_eps=1e-5, max_seq_len=256,
                       mask_id=MASK_ID, eos_id=EOS_ID, pad_id=EOS_ID, stop_ids=[EOS_ID, EOT_ID])


def make_batch(pairs: list[tuple[str, str]], gen_len: int):
    """Left-padded training batch: ids, position ids, key mask, response mask, all [B, L]."""
    prompts = [encode_chat(p) for p, _ in pairs]
    answers = [encode_text(a) + [EOS_ID] * (gen_len - len(a)) for _, a in pairs]
    P = max(len(p) for p in prompts)
    B, L = len(pairs), P + gen_len
    ids = torch.full((B, L), EOS_ID, dtype=torch.long)
    key_mask = torch.zeros(B, L, dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, P - len(p):] = torch.tensor(p + a)
        key_mask[i, P - len(p):] = True
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    resp = torch.zeros(B, L, dtype=torch.bool)
    resp[:, P:] = True
    return ids, pos, key_mask, resp


def diffusion_loss(model, ids, pos, key_mask, resp, gen: torch.Generator, device="cpu") -> torch.Tensor:
    """Masked-diffusion loss: t ~ U(0, 1) per sample (stratified over the batch), CE on masked response
    positions weighted 1/t, normalised by the number of response positions."""
    B = ids.shape[0]
    u = torch.rand(1, generator=gen)
    t = ((u + torch.arange(B) / B) % 1.0).clamp(min=T_MIN)                # [B]
    masked = (torch.rand(ids.shape, generator=gen) < t[:, None]) & resp    # [B, L]
    ids, pos, key_mask, masked, t = (x.to(device) for x in (ids, pos, key_mask, masked, t))
    noisy = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    h = model(noisy, pos, key_mask)                                        # [B, L, d]
    logits = model.logits(h[masked])                                       # [M, V]
    ce = F.cross_entropy(logits.float(), ids[masked], reduction="none")    # [M]
    w = (1.0 / t)[:, None].expand_as(ids)[masked]                          # [M]
    return (ce * w).sum() / resp.sum()


def sparse_reuse_attention(block: torch.Tensor, retention: float, n_kv: int):
    """SDPA replacement (``attention_override``) that gives the queries of ``block`` [B, T] (column indices)
    the Reuse step's head-sparse view: the block's columns plus each KV head's top columns by the pass's
    score; every other query attends densely. q [B, H, L, D], k/v [B, H, L, D] (GQA expanded), attn_mask
    [B, 1, 1, L]."""
    def attend(q, k, v, attn_mask=None):
        B, H, L, D = q.shape
        group = H // n_kv
        key_mask = attn_mask.reshape(B, L)                                          # [B, L]
        with torch.no_grad():
            s = head_scores(q, k[:, ::group], v[:, ::group], key_mask, block, group)  # [B, Hkv, L]
            keep = keep_columns(s, block, retention)                                # [B, Hkv, K]
            kept = torch.zeros(B, n_kv, L, dtype=torch.bool, device=q.device).scatter_(-1, keep, True)
            kept = kept.repeat_interleave(group, dim=1) & key_mask[:, None, :]      # [B, H, L]
            rows = torch.zeros(B, L, dtype=torch.bool, device=q.device).scatter_(1, block, True)
            # [B, H, L, L]
            mask = torch.where(rows[:, None, :, None], kept[:, :, None, :], key_mask[:, None, None, :])
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(D)                           # [B, H, L, L]
        return logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return attend


def sparse_block(resp: torch.Tensor, pick: random.Random) -> torch.Tensor:
    """One decoded block of the (shared) response span, as column indices [B, T]."""
    start = int(resp[0].nonzero()[0])
    n_blocks = int(resp[0].sum()) // BLOCK_LENGTH
    first = start + BLOCK_LENGTH * pick.randrange(n_blocks)
    return (first + torch.arange(BLOCK_LENGTH)).expand(resp.shape[0], -1)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def optimizer_step(opt, model, loss, step: int, steps: int, lr: float, warmup: int,
                   avg: float | None) -> float:
    """One AdamW step at the schedule's learning rate, gradients clipped to norm 1; returns the loss's running
    average (``avg`` None: the first step)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, steps, lr, warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()


@torch.no_grad()
def quick_accuracy(model, n: int = 64) -> float:
    """Exact decoding (one token per step, no cache) on the first n held-out prompts."""
    from dlc.runtime.generate import GenerationConfig, generate

    from .tokenizer import decode_ids

    model.eval()
    pairs = tasks.eval_set(n)
    cfg = GenerationConfig(gen_length=GEN_LENGTH, block_length=BLOCK_LENGTH, steps=GEN_LENGTH,
                           stop_at_eos=True)
    res = generate(model, [encode_chat(p) for p, _ in pairs], cfg)
    model.train()
    return tasks.score([p for p, _ in pairs], [decode_ids(t) for t in res.token_ids])


def train(out: str, seed: int = 0, steps: int = 3000, batch: int = 128, lr: float = 6e-4, warmup: int = 100,
          eval_every: int = 250, eval_n: int = 64, threads: int = 2, device: str = "cpu",
          sparse_aware: float = 0.5, log=print, **model_kw) -> Path:
    for name, v in (("steps", steps), ("batch", batch), ("threads", threads)):
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if not 0 <= sparse_aware <= 1:
        raise ValueError(f"sparse_aware must be in [0, 1], got {sparse_aware}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = tiny_config(**model_kw)
    model = build_model(cfg)
    init_weights(model, seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    lens, probs = list(PAD_LENGTHS), list(PAD_LENGTHS.values())
    pick = random.Random(f"dlc-tiny/lengths/{seed}")
    sparse_pick = random.Random(f"dlc-tiny/sparse/{seed}")
    log(f"dlc-tiny: {cfg.num_parameters() / 1e6:.2f}M parameters, {steps} steps x {batch}, seed {seed}, "
        f"head-sparse-aware batches {sparse_aware:.0%}")
    t0, avg = time.perf_counter(), None
    for step in range(steps):
        gen_len = pick.choices(lens, probs)[0]
        pairs = tasks.sample("train", batch, seed=seed * 1_000_003 + step, tasks=TRAIN_MIX)
        ids, pos, key_mask, resp = make_batch(pairs, gen_len)
        attention = contextlib.nullcontext()
        if sparse_pick.random() < sparse_aware:
            block = sparse_block(resp, sparse_pick).to(device)
            attention = attention_override(
                sparse_reuse_attention(block, sparse_pick.uniform(*SPARSE_RETENTION), cfg.n_kv_heads))
        with attention:
            loss = diffusion_loss(model, ids, pos, key_mask, resp, gen, device)
        avg = optimizer_step(opt, model, loss, step, steps, lr, warmup, avg)
        if (step + 1) % 50 == 0:
            log(f"step {step + 1} loss {avg:.4f} lr {lr_at(step, steps, lr, warmup):.2e} "
                f"{time.perf_counter() - t0:.0f}s")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            log(f"step {step + 1} held-out accuracy ({eval_n}, exact) {quick_accuracy(model, eval_n):.3f}")
    model.eval()
    acc = quick_accuracy(model, eval_n)
    log(f"final held-out accuracy ({eval_n}, exact) {acc:.3f}; {time.perf_counter() - t0:.0f}s")
    return save(model.cpu(), out)


def save(model, out: str, decoding: dict | None = None) -> Path:
    """The checkpoint in HF layout with the tokenizer, chat template and generation_config.json; ``decoding``:
    its decoding defaults (default: dlc-tiny's LLaDA schedule; train_bd passes the block decoder's)."""
    path = save_checkpoint(model, out, tokenizer=build_tokenizer(), dtype=torch.float32)
    # keep the template in tokenizer_config.json too (older readers)
    tc = path / "tokenizer_config.json"
    d = json.loads(tc.read_text())
    d["chat_template"] = build_tokenizer().chat_template
    tc.write_text(json.dumps(d, indent=2))
    gc = {**(decoding or {"gen_length": GEN_LENGTH, "block_length": BLOCK_LENGTH, "steps": GEN_LENGTH}),
          "max_new_tokens": GEN_LENGTH, "eos_token_id": [EOS_ID, EOT_ID], "pad_token_id": EOS_ID}
    (path / "generation_config.json").write_text(json.dumps(gc, indent=2))
    return path


@click.command()
@click.option("--out", required=True, help="output directory (HF layout)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=3000, show_default=True, type=int)
@click.option("--batch", default=128, show_default=True, type=int)
@click.option("--lr", default=6e-4, show_default=True, type=float)
@click.option("--d-model", default=160, show_default=True, type=int)
@click.option("--layers", default=4, show_default=True, type=int)
@click.option("--heads", default=4, show_default=True, type=int)
@click.option("--mlp", default=448, show_default=True, type=int)
@click.option("--eval-every", default=250, show_default=True, type=int)
@click.option("--eval-n", default=64, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
@click.option("--device", default="cpu", show_default=True, help="cpu reproduces the bundled checkpoint")
@click.option("--sparse-aware", default=0.5, show_default=True, type=float,
              help="fraction of batches trained with the head-sparse Reuse attention (0: dense only)")
def main(out, seed, steps, batch, lr, d_model, layers, heads, mlp, eval_every, eval_n, threads, device,
         sparse_aware):
    """Train dlc-tiny from scratch and save it to OUT."""
    try:
        train(out, seed, steps, batch, lr, eval_every=eval_every, eval_n=eval_n, threads=threads,
              device=device, sparse_aware=sparse_aware, log=lambda s: print(s, flush=True), d_model=d_model,
              n_layers=layers, n_heads=heads, mlp_hidden=mlp)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
