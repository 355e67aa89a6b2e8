"""GPU row for block diffusion: tokens/s of dlc's path vs a plain eager loop of the same schedule, one
process.

Model: the ``llada2-mini`` preset's exact shape (16.3B parameters: 20 layers of 2048, 256 experts of 512
top-8 + 1 shared, GQA 16 / 4, partial rotary, vocab 157184) with random bf16 weights on one GPU (~33 GB;
H100 / H200).
Schedule: LLaDA2.0's ``generate`` (``decoder llada2``): prompt ``--prompt`` (all rows the same length, so the
block alignment is common), gen ``--gen``, block 32, ``--steps`` per block, threshold ``--threshold``, greedy.

* dlc (``--runner graphs``, the default on a GPU): the served path, ``dlc.runtime.Engine`` over the
  CUDA-graph runner (its blocks compiled as ``dlc serve`` does by default on CUDA; ``--no-compile``: not,
  as the rows measured before compiled MoE blocks kept the packed experts) and 16
  Reuse steps run ahead (the exact block KV cache, ``kv_cache
  block``: the prompt's complete blocks prefilled once, each step feeds the current block, the finished
  block's K/V written in the next block's first forward; every step replayed, bench/block_cost.py's
  ``make_engine``); ``--runner eager`` (the default of ``--smoke``): ``dlc.runtime.generate.generate`` over
  the eager runner, the same cache;
* eager: the reference loop written here (LLaDA2.0's ``generate`` batched): every step one forward over the
  whole window up to the current block end with the block-causal mask, no cache, logits of the block only.

Both use the same module and MoE implementation (``--moe-impl``; default ``auto``, dlc's default: ``fused``
on H100 / H200 in bf16, the grouped-GEMM MoE; ``grouped`` runs each expert on its tokens from a Python loop,
``stacked`` every expert on every token). First one line per MoE implementation timing one MoE layer's
forward at ``--layer-tokens`` tokens (a Reuse step of B=1 and of B=32 by default), so the log shows where a
forward's time goes; then per batch size one JSON line per forward as it runs (path, forward, ms; flushed),
and one JSON row with both tokens/s, the ratio and whether the tokens agree (random weights: confidences are
low, so the threshold rarely fires and both follow the schedule). ``--time-limit`` stops a run cleanly
between forwards (the row says how far it got, with the mean forward time) and the closing markdown table is
printed either way. ``--smoke`` runs the whole script on the CPU on the ``tiny-llada2`` preset (tests).

    python3 bench/block_diffusion.py --batches 1,32 --gen 128     # ~ one 600 s GPU call; rows -> RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def build(dev: str, moe_impl: str, preset: str = "llada2-mini", dtype=torch.bfloat16):
    from dlc.models import build_model
    from dlc.models.presets import preset_config
    cfg = preset_config(preset)
    # an eos outside the sampled prompt range: random weights rarely predict it, so both paths run every block
    cfg = dataclasses.replace(cfg, stop_ids=[cfg.eos_id])
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to_empty(device=dev).to(dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 if preset == "llada2-mini" else 0.25, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.01, generator=g)
        model.head_weight().mul_(4.0)          # peaked logits: stable argmax, as gpu_bench
    model.eval().requires_grad_(False)
    model.set_moe_impl(moe_impl)
    return model


LAYER_TOKENS = "32,1024"      # one MoE layer timed at a Reuse step's tokens of B=1 and B=32 (block 32)


class TimeUp(Exception):
    """Raised between forwards once the run's time limit is reached."""


class ForwardClock:
    """Times every forward of the model (forward hooks, device synchronised) and prints one JSON line per
    forward; raises ``TimeUp`` before a forward that starts past the deadline."""

    def __init__(self, model, deadline: float):
        self.deadline, self.label, self.ms, self.t0 = deadline, None, [], 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def start(self, label: dict | None) -> None:
        self.label, self.ms = label, []

    def _pre(self, module, args):
        if capturing():                     # a CUDA graph's capture (the graph runner): not a timed forward
            return
        if time.perf_counter() > self.deadline:
            raise TimeUp()
        sync()
        self.t0 = time.perf_counter()

    def _post(self, module, args, out):
        if capturing():
            return
        sync()
        self.ms.append((time.perf_counter() - self.t0) * 1e3)
        if self.label is not None:
            print(json.dumps({**self.label, "fwd": len(self.ms), "ms": round(self.ms[-1], 2)}), flush=True)


def capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def dlc_path(model, prompts: torch.Tensor, gen: int, block: int, steps: int, threshold: float, engine=None):
    """dlc's tokens and forwards: ``engine`` (the served graph path) or generate() over the eager runner."""
    params = dict(gen_length=gen, block_length=block, steps_per_block=steps, threshold=threshold,
                  kv_cache="block", decoder="llada2")
    if engine is not None:
        reqs = engine.run_requests([(p, params) for p in prompts.cpu().tolist()])
        bad = [r.error for r in reqs if r.error]
        if bad:
            raise SystemExit(f"a request failed: {bad[0]}")
        return [r.output_ids for r in reqs], sum(r.state.forwards for r in reqs) // len(reqs)
    from dlc.runtime.generate import GenerationConfig, generate
    from dlc.runtime.runners.eager import EagerRunner
    res = generate(EagerRunner(model), prompts.cpu().tolist(), GenerationConfig(**params))
    return res.token_ids, res.nfe


def served_engine(model, args, B: int, dev: str):
    """``--runner graphs``: a warmed Engine for B requests (bench/block_cost.py's ``make_engine``)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from block_cost import make_engine
    ns = argparse.Namespace(prompt=args.prompt, gen=args.gen, block=args.block, device=dev,
                            compile=args.compile)
    return make_engine(model, ns, B, graphs=True, lookahead=16)


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


@torch.no_grad()
def moe_layer_times(model, n_tokens: list[int], impls: list[str], reps: int) -> None:
    """One line per (tokens, impl): one MoE layer's forward (router included), median of ``reps``."""
    from dlc.models.llada2_moe import MoEBlock
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    p = next(block.parameters())
    for n in n_tokens:
        x = torch.randn(1, n, model.config.d_model, device=p.device, dtype=p.dtype)
        for impl in impls:
            block.impl = impl
            block(x)                                                             # warm-up
            ms = []
            for _ in range(reps):
                _, s = timed(lambda: block(x))
                ms.append(s * 1e3)
            print(json.dumps({"moe_layer": impl, "tokens": n, "experts": len(block.experts),
                              "top_k": block.c.n_experts_per_tok, "ms": round(sorted(ms)[len(ms) // 2], 3)}),
                  flush=True)
    del block.impl


def run_batch(model, clock, B: int, args, dev: str) -> dict:
    g = torch.Generator().manual_seed(B)
    cfg = model.config
    hi = min(cfg.vocab_size - 1024 if cfg.vocab_size > 4096 else cfg.vocab_size, cfg.mask_id, cfg.eos_id)
    prompts = torch.randint(0, hi, (B, args.prompt), generator=g).to(dev)
    small = min(args.gen, args.block)
    row = {"B": B, "runner": args.runner}
    clock.start(None)
    eng = served_engine(model, args, B, dev) if args.runner == "graphs" else None
    dlc = lambda m, *a: dlc_path(m, *a, engine=eng)                                        # noqa: E731
    dlc(model, prompts, args.gen if eng else small, args.block, args.steps, args.threshold)  # warm-up
    eager_loop(model, prompts, small, args.block, args.steps, args.threshold)
    done = {}
    for name, fn in (("dlc", dlc), ("eager", eager_loop)):
        clock.start({"path": name, "B": B})
        try:
            done[name] = timed(lambda: fn(model, prompts, args.gen, args.block, args.steps, args.threshold))
        except TimeUp:
            row.update({f"{name}_stopped_after_forwards": len(clock.ms),
                        f"{name}_mean_forward_ms": round(sum(clock.ms) / max(1, len(clock.ms)), 2),
                        "stopped": f"--time-limit {args.time_limit:g} s"})
            break
        if clock.ms and not (name == "dlc" and eng):     # forward hooks: every forward of an eager path
            row[f"{name}_mean_forward_ms"] = round(sum(clock.ms) / len(clock.ms), 2)
        else:                         # the Engine's: graph replays call no hook; its wall time per forward
            (_, fw), secs = done[name]
            row[f"{name}_mean_forward_ms"] = round(1e3 * secs / max(1, fw), 2)
    if len(done) == 2:
        (d_tok, d_fwd), d_s = done["dlc"]
        (e_tok, e_fwd), e_s = done["eager"]
        e_list = e_tok.cpu().tolist()
        n_tok = sum(len(t) for t in d_tok)
        row.update({"dlc_tok_s": round(n_tok / d_s, 1), "eager_tok_s": round(B * args.gen / e_s, 1),
                    "speedup": round(e_s / d_s, 2), "dlc_s": round(d_s, 3), "eager_s": round(e_s, 3),
                    "dlc_forwards": d_fwd, "eager_forwards": e_fwd,
                    "tokens_equal": all(d == e[:len(d)] for d, e in zip(d_tok, e_list))})
    if torch.cuda.is_available():
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return row


PATHS = {"graphs": "served Engine, CUDA graphs, run ahead", "eager": "generate(), eager runner"}


def table(rows: list[dict]) -> str:
    """The RESULTS.md table of the rows (a stopped row shows how far it got)."""
    out = ["| B | dlc tok/s | eager tok/s | dlc / eager | dlc s | eager s | forwards (each) | ms / forward "
           "(dlc, eager) | tokens equal | peak GiB | dlc path |", "|" + "---|" * 11]
    for r in rows:
        g = r.get
        if "dlc_tok_s" in r:
            cells = [g("dlc_tok_s"), g("eager_tok_s"), f"**{g('speedup')}x**", g("dlc_s"), g("eager_s"),
                     f"{g('dlc_forwards')}, {g('eager_forwards')}"]
        else:
            done = g("dlc_stopped_after_forwards", "all")
            cells = ["-"] * 5 + [f"stopped ({g('stopped')}) after dlc {done}, "
                                 f"eager {g('eager_stopped_after_forwards', '-')}"]
        cells += [f"{g('dlc_mean_forward_ms', '-')}, {g('eager_mean_forward_ms', '-')}",
                  {True: "yes", False: "no"}.get(g("tokens_equal"), "-"), g("peak_gib", "-"),
                  PATHS.get(g("runner"), "-")]
        out.append("| " + " | ".join(str(c) for c in [r["B"]] + cells) + " |")
    return "\n".join(out)


def main():
    from dlc.models.llada_moe import MOE_IMPLS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,32; --smoke: 1,2)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--moe-impl", default="auto", choices=sorted(MOE_IMPLS),
                    help="MoE implementation of both paths (auto: fused on H100 / H200 in bf16)")
    ap.add_argument("--layer-tokens", default=LAYER_TOKENS,
                    help="token counts of the one-MoE-layer timing lines ('' skips them)")
    ap.add_argument("--layer-impls", default="fused,grouped,stacked")
    ap.add_argument("--time-limit", type=float, default=540.0,
                    help="seconds after start: no forward starts later; the table is printed anyway")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny-llada2 preset, small shapes (tests)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="--runner graphs: compile the graph runner's blocks (default: dlc serve's, on on "
                         "CUDA)")
    ap.add_argument("--runner", choices=("graphs", "eager"), default=None,
                    help="dlc's path: the served Engine on the CUDA-graph runner (default on a GPU) or "
                         "generate() over the eager runner (default with --smoke)")
    args = ap.parse_args()
    args.runner = args.runner or ("eager" if args.smoke else "graphs")
    t_start = time.perf_counter()
    if args.smoke:
        dev, preset, dtype = "cpu", "tiny-llada2", torch.float32
        args.prompt, args.gen, args.block, args.steps = min(args.prompt, 12), min(args.gen, 16), 8, 4
        args.batches = args.batches or "1,2"
        args.layer_tokens = "8,64" if args.layer_tokens == LAYER_TOKENS else args.layer_tokens
        torch.set_num_threads(1)                # tiny shapes: threads only wait on each other
    else:
        dev, preset, dtype = "cuda", "llada2-mini", torch.bfloat16
        args.batches = args.batches or "1,32"
    model = build(dev, args.moe_impl, preset, dtype)
    clock = ForwardClock(model, t_start + args.time_limit)
    device = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(json.dumps({"device": device, "model": preset, "params": model.config.num_parameters(),
                      "moe_impl": args.moe_impl, "prompt": args.prompt, "gen": args.gen, "block": args.block,
                      "steps": args.steps, "threshold": args.threshold, "runner": args.runner, "build_s":
                      round(time.perf_counter() - t_start, 1)}), flush=True)
    if args.layer_tokens:
        moe_layer_times(model, [int(n) for n in args.layer_tokens.split(",")], args.layer_impls.split(","),
                        reps=3 if args.smoke else 10)
    rows = []
    for B in [int(b) for b in args.batches.split(",")]:
        try:
            rows.append(run_batch(model, clock, B, args, dev))
        except TimeUp:                                  # before or during the warm-up
            rows.append({"B": B, "stopped": f"--time-limit {args.time_limit:g} s",
                         "dlc_stopped_after_forwards": 0})
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
