"""Train dlc-tiny-bd: a tiny block-diffusion model (SDAR layout: Qwen3 with QK-norm, block-causal attention)
on the dlc-tiny synthetic tasks, for the block decoders' quality gates.

    python -m dlc.tiny.train_bd --out dlc/assets/dlc-tiny-bd --seed 0

Layout (as block decoding sees it): each row is chat(prompt) + answer + EOS padding up to the generation
length, laid out from column 0 (rows right-padded), positions ``arange``, blocks of ``BD_BLOCK`` aligned to
column 0, the attention block-causal. Objective (block-diffusion SFT): per row one block overlapping the
response is the target; its response positions are masked with probability t ~ U(0, 1) (stratified over the
batch), every earlier block stays clean (what decoding has committed there), and the block-causal mask hides
later blocks; the loss is the cross-entropy on the masked positions weighted 1/t, normalised by the target
positions. So training sees exactly the context each denoising step of ``decoder llada2`` sees.

Seeded; 2 torch threads; shares the tasks, tokenizer and learning-rate schedule of ``dlc.tiny.train``."""
from __future__ import annotations

import random
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from dlc.models import build_model
from dlc.models.config import ModelConfig
from dlc.models.loading import init_weights
from dlc.runtime.step import block_key_mask

from . import tasks
from .evaluate import GEN_LENGTH
from .tokenizer import EOS_ID, EOT_ID, MASK_ID, VOCAB_SIZE, decode_ids, encode_chat, encode_text
from .train import PAD_LENGTHS, T_MIN, TRAIN_MIX, optimizer_step
from .train import save as save_tiny

BD_BLOCK = 4                                    # SDAR's block length
BD_THRESHOLD = 0.9                              # the bundled threshold (SDAR's dynamic threshold)


def bd_config(d_model=160, n_layers=4, n_heads=4, mlp_hidden=448) -> ModelConfig:
    return ModelConfig(family="sdar", d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_heads // 2, mlp_hidden=mlp_hidden, vocab_size=VOCAB_SIZE,
                       embedding_size=VOCAB_SIZE, rope_theta=10000.0, rms_eps=1e-6, qk_norm=True,
                       max_seq_len=256, mask_id=MASK_ID, eos_id=EOS_ID, pad_id=EOS_ID,
                       stop_ids=[EOS_ID, EOT_ID], block_diffusion=True)


def make_bd_batch(pairs: list[tuple[str, str]], gen_len: int, pick: random.Random):
    """Right-padded batch from column 0: ids, positions, key mask [B, L]; target [B, L] = the response
    positions of one block per row."""
    rows = [encode_chat(p) + encode_text(a) + [EOS_ID] * (gen_len - len(a)) for p, a in pairs]
    starts = [len(encode_chat(p)) for p, _ in pairs]
    B, L = len(rows), max(len(r) for r in rows)
    ids = torch.full((B, L), EOS_ID, dtype=torch.long)
    key_mask = torch.zeros(B, L, dtype=torch.bool)
    target = torch.zeros(B, L, dtype=torch.bool)
    for i, (r, P) in enumerate(zip(rows, starts)):
        ids[i, :len(r)] = torch.tensor(r)
        key_mask[i, :len(r)] = True
        b = pick.randrange(P // BD_BLOCK, (len(r) - 1) // BD_BLOCK + 1)
        lo, hi = max(P, b * BD_BLOCK), min(len(r), (b + 1) * BD_BLOCK)
        target[i, lo:hi] = True
    pos = torch.arange(L)[None].expand(B, L)
    return ids, pos, key_mask, target


def bd_loss(model, ids, pos, key_mask, target, gen: torch.Generator, device="cpu") -> torch.Tensor:
    B = ids.shape[0]
    u = torch.rand(1, generator=gen)
    t = ((u + torch.arange(B) / B) % 1.0).clamp(min=T_MIN)                 # [B]
    masked = (torch.rand(ids.shape, generator=gen) < t[:, None]) & target   # [B, L]
    ids, pos, key_mask, masked, t, target = (x.to(device) for x in (ids, pos, key_mask, masked, t, target))
    noisy = torch.where(masked, torch.full_like(ids, MASK_ID), ids)
    h = model(noisy, pos, block_key_mask(key_mask, pos, BD_BLOCK))         # [B, L, d]
    logits = model.logits(h[masked])                                        # [M, V]
    ce = F.cross_entropy(logits.float(), ids[masked], reduction="none")
    w = (1.0 / t)[:, None].expand_as(ids)[masked]
    return (ce * w).sum() / target.sum()


def gen_config(threshold: float | None = None, kv_cache: str = "block", gen_length: int = GEN_LENGTH):
    """Exact decoding (one token per step) without threshold; the threshold rule with it."""
    from dlc.runtime.decoding import GenerationConfig
    return GenerationConfig(gen_length=gen_length, block_length=BD_BLOCK, steps_per_block=BD_BLOCK,
                            threshold=threshold, decoder="llada2", kv_cache=kv_cache, stop_at_eos=True)


@torch.no_grad()
def accuracy(model, n: int = 64, threshold: float | None = None) -> tuple[float, float]:
    """(held-out accuracy, tokens per forward) of block decoding on the first n held-out prompts."""
    from dlc.runtime.generate import generate
    was = model.training
    model.eval()
    pairs = tasks.eval_set(n)
    res = generate(model, [encode_chat(p) for p, _ in pairs], gen_config(threshold))
    model.train(was)
    return tasks.score([p for p, _ in pairs], [decode_ids(t) for t in res.token_ids]), res.tokens_per_forward


def train(out: str, seed: int = 0, steps: int = 2000, batch: int = 128, lr: float = 6e-4, warmup: int = 100,
          eval_every: int = 250, eval_n: int = 64, threads: int = 2, log=print) -> Path:
    for name, v in (("steps", steps), ("batch", batch), ("threads", threads)):
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = bd_config()
    model = build_model(cfg)
    init_weights(model, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    lens, probs = list(PAD_LENGTHS), list(PAD_LENGTHS.values())
    pick = random.Random(f"dlc-tiny-bd/{seed}")
    log(f"dlc-tiny-bd: {cfg.num_parameters() / 1e6:.2f}M parameters, {steps} steps x {batch}, seed {seed}")
    t0, avg = time.perf_counter(), None
    for step in range(steps):
        gen_len = pick.choices(lens, probs)[0]
        pairs = tasks.sample("train", batch, seed=seed * 1_000_003 + step, tasks=TRAIN_MIX)
        loss = bd_loss(model, *make_bd_batch(pairs, gen_len, pick), gen)
        avg = optimizer_step(opt, model, loss, step, steps, lr, warmup, avg)
        if (step + 1) % 50 == 0:
            log(f"step {step + 1} loss {avg:.4f} {time.perf_counter() - t0:.0f}s")
        if eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            log(f"step {step + 1} held-out accuracy ({eval_n}, exact) {accuracy(model, eval_n)[0]:.3f}")
            save(model, out)                    # a usable checkpoint at every evaluation
    model.eval()
    acc = accuracy(model, eval_n)[0]
    log(f"final held-out accuracy ({eval_n}, exact) {acc:.3f}; {time.perf_counter() - t0:.0f}s")
    return save(model, out)


def save(model, out: str) -> Path:
    return save_tiny(model, out, {"gen_length": GEN_LENGTH, "block_length": BD_BLOCK,
                                  "steps_per_block": BD_BLOCK, "threshold": BD_THRESHOLD, "decoder": "llada2",
                                  "kv_cache": "block"})


@click.command()
@click.option("--out", required=True, help="output directory (HF layout, model_type sdar)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--steps", default=2000, show_default=True, type=int)
@click.option("--batch", default=128, show_default=True, type=int)
@click.option("--lr", default=6e-4, show_default=True, type=float)
@click.option("--eval-every", default=250, show_default=True, type=int)
@click.option("--threads", default=2, show_default=True, type=int)
def main(out, seed, steps, batch, lr, eval_every, threads):
    """Train dlc-tiny-bd from scratch and save it to OUT."""
    try:
        train(out, seed, steps, batch, lr, eval_every=eval_every, threads=threads,
              log=lambda s: print(s, flush=True))
    except ValueError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
