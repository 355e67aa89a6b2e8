"""GPU row for block diffusion: tokens/s of dlc's path vs a plain eager loop of the same schedule, one
process.

Model: the ``llada2-mini`` preset's exact shape (16.3B parameters: 20 layers of 2048, 256 experts of 512
top-8 + 1 shared, GQA 16 / 4, partial rotary, vocab 157184) with random bf16 weights on one GPU (~33 GB;
H100 / H200).
Schedule: LLaDA2.0's ``generate`` (``decoder llada2``): prompt ``--prompt`` (all rows the same length, so the
block alignment is common), gen ``--gen``, block 32, ``--steps`` per block, threshold ``--threshold``, greedy.

* dlc: ``dlc.runtime.generate.generate`` over the eager runner with the exact block KV cache (``kv_cache
  block``: the prompt's complete blocks prefilled once, each step feeds the current block, the finished
  block's K/V written in the next block's first forward);
* eager: the reference loop written here (LLaDA2.0's ``generate`` batched): every step one forward over the
  whole window up to the current block end with the block-causal mask, no cache, logits of the block only.

Both use the same module and MoE implementation (``--moe-impl``; ``grouped`` runs each expert on its tokens).
The script prints one JSON row per batch size with both tokens/s, the ratio and whether the tokens agree
(random weights: confidences are low, so the threshold rarely fires and both follow the schedule).

    python3 bench/block_diffusion.py --batches 1,32          # then copy the rows into bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def build(dev: str, moe_impl: str):
    from dlc.models import build_model
    from dlc.models.presets import preset_config
    cfg = preset_config("llada2-mini")
    # an eos outside the sampled prompt range: random weights rarely predict it, so both paths run every block
    cfg = dataclasses.replace(cfg, stop_ids=[cfg.eos_id])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=dev).to(torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.01, generator=g)
        model.head_weight().mul_(4.0)          # peaked logits: stable argmax, as gpu_bench
    model.eval().requires_grad_(False)
    model.set_moe_impl(moe_impl)
    return model


def schedule(block: int, steps: int) -> list[int]:
    base, rem = block // steps, block % steps
    return [base + (i < rem) for i in range(steps)]


@torch.no_grad()
def eager_loop(model, prompts: torch.Tensor, gen: int, block: int, steps: int, threshold: float):
    """LLaDA2.0's generate, batched over rows of one prompt length. Returns (tokens [B, gen], forwards)."""
    from dlc.runtime.step import block_key_mask
    mask_id = model.config.mask_id
    B, P = prompts.shape
    dev = prompts.device
    nb = (P + gen + block - 1) // block
    x = torch.full((B, nb * block), mask_id, dtype=torch.long, device=dev)
    x[:, :P] = prompts
    steps = min(steps, gen)
    sched = schedule(block, steps)
    pos_all = torch.arange(nb * block, device=dev)[None].expand(B, -1)
    fwd = 0
    for b in range(P // block, nb):
        end = (b + 1) * block
        pos = pos_all[:, :end]
        keys = block_key_mask(torch.ones(B, end, dtype=torch.bool, device=dev), pos, block)
        for step in range(steps):
            active = x[:, end - block:end] == mask_id                          # [B, K]
            if not bool(active.any()):
                break
            h = model(x[:, :end], pos, keys)[:, end - block:]                  # [B, K, d]
            fwd += 1
            logits = model.logits(h).float()
            p = torch.softmax(logits, -1)
            x0 = logits.argmax(-1)
            conf = torch.where(active, p.gather(-1, x0[..., None])[..., 0], -torch.inf)
            high = conf > threshold
            n = sched[step]
            transfer = high.clone()
            for r in range(B):
                if int(high[r].sum()) < n:
                    k = min(n, int(active[r].sum()))
                    transfer[r] = False
                    if k:
                        transfer[r, torch.topk(conf[r], k).indices] = True
            blk = x[:, end - block:end]
            x[:, end - block:end] = torch.where(transfer, x0, blk)
    return x[:, P:P + gen], fwd


def dlc_path(model, prompts: torch.Tensor, gen: int, block: int, steps: int, threshold: float):
    from dlc.runtime.generate import GenerationConfig, generate
    from dlc.runtime.runners.eager import EagerRunner
    cfg = GenerationConfig(gen_length=gen, block_length=block, steps_per_block=steps, threshold=threshold,
                           kv_cache="block", decoder="llada2")
    res = generate(EagerRunner(model), prompts.cpu().tolist(), cfg)
    return res.token_ids, res.nfe


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--moe-impl", default="grouped", choices=["grouped", "stacked", "dense"])
    args = ap.parse_args()
    dev = "cuda"
    model = build(dev, args.moe_impl)
    print(json.dumps({"device": torch.cuda.get_device_name(), "params": model.config.num_parameters(),
                      "moe_impl": args.moe_impl, "prompt": args.prompt, "gen": args.gen, "block": args.block,
                      "steps": args.steps, "threshold": args.threshold}))
    for B in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(0, model.config.vocab_size - 1024, (B, args.prompt), generator=g).to(dev)
        small = min(args.gen, args.block)
        dlc_path(model, prompts, small, args.block, args.steps, args.threshold)          # warm-up
        eager_loop(model, prompts, small, args.block, args.steps, args.threshold)
        (d_tok, d_fwd), d_s = timed(lambda: dlc_path(model, prompts, args.gen, args.block, args.steps,
                                                     args.threshold))
        (e_tok, e_fwd), e_s = timed(lambda: eager_loop(model, prompts, args.gen, args.block, args.steps,
                                                       args.threshold))
        e_list = e_tok.cpu().tolist()
        n_tok = sum(len(t) for t in d_tok)
        row = {"B": B, "dlc_tok_s": round(n_tok / d_s, 1), "eager_tok_s": round(B * args.gen / e_s, 1),
               "speedup": round(e_s / d_s, 2), "dlc_s": round(d_s, 3), "eager_s": round(e_s, 3),
               "dlc_forwards": d_fwd, "eager_forwards": e_fwd,
               "tokens_equal": all(d == e[:len(d)] for d, e in zip(d_tok, e_list)),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
