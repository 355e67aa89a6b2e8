"""The ``dlc`` command line: generate, models, compile, serve (and eval, bench when installed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dlc.block_options import DECODER_CHOICES, block_diffusion_options, block_fields
from dlc.runtime.config import TP_ALL_REDUCE


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dlc")
def main():
    """dlc: compile and serve diffusion LLMs."""


def _fail(msg: str):
    raise click.ClickException(msg)


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--gen-length", default=None, type=int,
              help="default: the model's generation_config.json, else 128")
@click.option("--block-length", default=None, type=int,
              help="default: the model's generation_config.json, else 32")
@click.option("--steps", default=None, type=int, help="default: the model's generation_config.json, else 128")
@click.option("--temperature", default=0.0, show_default=True, type=float)
@click.option("--remasking", default="low_confidence", show_default=True,
              type=click.Choice(["low_confidence", "random"]))
@click.option("--threshold", default=None, type=float, help="Fast-dLLM threshold decoding (e.g. 0.9)")
@click.option("--factor", default=None, type=float, help="Fast-dLLM parallel-factor decoding")
@click.option("--low-threshold", default=None, type=float,
              help="hierarchical decoding (dInfer): each run's best above this, plus all above --threshold")
@click.option("--entropy-bound", default=None, type=float,
              help="entropy-bounded decoding (EB-sampler's gamma)")
@click.option("--credit", is_flag=True, help="credit decoding (dInfer: alpha 0.7, gamma 0.2, decay 0.8)")
@click.option("--smoothing", is_flag=True,
              help="iteration smoothing (dInfer: soft embeddings of masked inputs)")
@click.option("--smoothing-top-k", default=None, type=int,
              help="opt-in truncated smoothing: the soft embedding over each position's top k tokens (1-64)")
@click.option("--top-k", default=0, show_default=True, type=int, help="sampling filter at T > 0 (0: off)")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="sampling filter at T > 0 (1: off)")
@click.option("--min-p", default=0.0, show_default=True, type=float, help="sampling filter at T > 0 (0: off)")
@click.option("--logprobs", default=None, type=int,
              help="with --json: each token's logprob and this many top alternatives")
@click.option("--cfg-scale", default=0.0, show_default=True, type=float)
@click.option("--kv-cache", default=None, type=click.Choice(["none", "prefix", "dual", "block"]),
              help="default: none (block-diffusion models: block, the exact block cache)")
@click.option("--decoder", default=None, type=click.Choice(DECODER_CHOICES),
              help="decoding rule: llada (full attention) or, for block-diffusion checkpoints, "
                   "llada2 / llada2.1 (token editing; -speed / -quality pick its thresholds). "
                   "Default: the model's")
@block_diffusion_options
@click.option("--weights", default=None,
              help="local checkpoint directory (overrides the preset's HF cache lookup)")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="Reuse steps as CUDA graphs (as dlc serve) [on with CUDA and an eager model]")
@click.option("--compile/--no-compile", "compile_blocks", default=None,
              help="torch.compile each block of the CUDA-graph runner, or an export engine's phase programs "
                   "(Inductor at load) [on on CUDA]")
@click.option("--batch-invariant/--no-batch-invariant", default=False,
              help="the kernels dlc serve --batch-invariant runs (fixed GEMM, attention and logits splits on "
                   "CUDA; no --compile), so outputs match a server in that mode [off]")
@click.option("--chat/--no-chat", default=None, help="apply the chat template (default: the model's)")
@click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", default=1, show_default=True,
              type=int,
              help="shard the model over this many GPUs (CPU: processes); starts the other ranks itself")
@click.option("--tp-all-reduce", "tp_all_reduce", default="nccl", show_default=True,
              type=click.Choice(TP_ALL_REDUCE),
              help="the ranks' all-reduce: symmetric memory (symm: CUDA only; one-shot, the copy engines "
                   "for 4-64 MiB at TP=2) or NCCL; auto: symmetric memory where it beats NCCL, else NCCL / "
                   "gloo")
@click.option("--tp-overlap-tokens", "tp_overlap_tokens", default=None, type=int,
              help="tensor parallel: a step feeding at least this many tokens runs as two halves whose "
                   "all-reduces overlap the other half's compute (0: off) [dlc.models.overlap.MIN_TOKENS: "
                   "0, off: 0.96x on 2 x H200]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def generate(model, prompt, gen_length, block_length, steps, temperature, remasking, threshold, factor,
             low_threshold, entropy_bound, credit, smoothing, smoothing_top_k, top_k, top_p, min_p, logprobs,
             cfg_scale, kv_cache, decoder, steps_per_block, eos_early_stop, edit_threshold,
             max_post_edit_steps, tokens_per_step, weights, dtype, device, seed, cuda_graphs, compile_blocks,
             batch_invariant, chat, tensor_parallel_size, tp_all_reduce, tp_overlap_tokens, as_json):
    """Generate a completion for PROMPT with MODEL (preset, checkpoint dir or engine dir)."""
    import torch

    from dlc.runtime.batch_invariant import batch_invariant_mode
    from dlc.runtime.distributed import RankFailure
    from dlc.runtime.engine import graph_runner_for
    from dlc.runtime.generate import GenerationConfig
    from dlc.runtime.generate import generate as run_generate
    from dlc.runtime.session import decode_tokens, encode_prompt, open_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gd = _generation_defaults(model, weights)
    try:
        session = open_model(model, weights=weights, dtype=dtype, device=device, progress=not as_json,
                             tensor_parallel_size=tensor_parallel_size, tp_all_reduce=tp_all_reduce,
                             tp_overlap_tokens=tp_overlap_tokens)
        block = _block_defaults(session.config, model, weights)
        gen_length, block_length, steps = (gen_length or gd["gen_length"],
                                           block_length or block.get("block_length") or gd["block_length"],
                                           steps or gd["steps"])
        fields = block_fields(session.config, decoder, threshold, steps_per_block, eos_early_stop,
                              edit_threshold, max_post_edit_steps, tokens_per_step, _preset_decoder(model))
        cfg = GenerationConfig(gen_length=gen_length, block_length=block_length, steps=steps,
                               temperature=temperature, remasking=remasking, factor=factor,
                               cfg_scale=cfg_scale, kv_cache=kv_cache or block.get("kv_cache", "none"),
                               seed=seed, low_threshold=low_threshold, entropy_bound=entropy_bound,
                               credit=credit, smoothing=smoothing, smoothing_top_k=smoothing_top_k,
                               top_k=top_k, top_p=top_p, min_p=min_p,
                               logprobs=logprobs, stop_at_eos=chat is not False, **fields)
        use_chat = session.chat if chat is None else chat
        cfg.stop_at_eos = use_chat
        ids = encode_prompt(session, prompt, use_chat)
        if batch_invariant and compile_blocks:
            raise ValueError("--batch-invariant keeps --compile off (Inductor picks its own GEMM configs)")
        runner = graph_runner_for(session.runner, cuda_graphs,                    # dlc serve's defaults
                                  False if batch_invariant else compile_blocks)
        with batch_invariant_mode(batch_invariant):
            res = run_generate(runner, [ids], cfg)
    except (ValueError, FileNotFoundError, RankFailure) as e:
        _fail(str(e))
    text = decode_tokens(session, res.token_ids[0])
    if as_json:
        print(json.dumps({"text": text, "token_ids": res.token_ids[0], "nfe": res.nfe,
                          "seconds": round(res.seconds, 4),
                          "tokens_per_forward": round(res.tokens_per_forward, 3), "prompt_tokens": len(ids),
                          "model": session.source, "engine": session.kind}
                         | ({"logprobs": [None if e is None
                                          else {"logprob": e[0], "top": dict(zip(e[1], e[2]))}
                                          for e in res.logprobs[0][:len(res.token_ids[0])]]}
                            if res.logprobs else {})))
    else:
        print(text)


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--chat/--no-chat", default=None, help="apply the chat template (default: the model's)")
@click.option("--gen-length", default=None, type=int,
              help="with --cpp: masks appended (default: the model's)")
@click.option("--block-length", default=None, type=int, help="with --cpp: the first block's width")
@click.option("--cpp", is_flag=True, help="print `A B ID...`: the arguments of examples/cpp's demo "
                                          "(the prompt + gen-length mask ids, decoding the first block A..B)")
def tokenize(model, prompt, chat, gen_length, block_length, cpp):
    """Print PROMPT's token ids under MODEL's tokenizer (preset, checkpoint dir or engine dir): what the C++
    example and other non-Python callers take. An engine directory's programs are not loaded."""
    from dlc.manifest import is_engine_dir, load_manifest
    from dlc.models.config import ModelConfig
    from dlc.models.tokenizer import has_tokenizer, load_tokenizer
    from dlc.runtime.session import Session, encode_prompt, open_model

    try:
        if is_engine_dir(model):
            path = Path(model)
            m = load_manifest(path, verify="off")
            tok = load_tokenizer(path) if has_tokenizer(path) else None
            session = Session(None, tok, ModelConfig.from_dict(m["model"]), bool(m.get("chat")), str(model))
        else:
            session = open_model(model, device="cpu", progress=False)
        ids = encode_prompt(session, prompt, chat)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if not cpp:
        print(" ".join(map(str, ids)))
        return
    gd = _generation_defaults(model, None)
    gen, blk = gen_length or gd["gen_length"], block_length or gd["block_length"]
    a = len(ids)
    print(" ".join(map(str, [a, a + min(blk, gen), *ids, *[session.config.mask_id] * gen])))


def _block_defaults(model_config, model: str, weights: str | None) -> dict:
    """Block-diffusion families' own block length and cache (unless generation_config.json sets the
    length)."""
    from dlc.runtime.config import family_generation_defaults, model_generation_defaults
    fam = family_generation_defaults(model_config)
    if not fam:
        return {}
    try:
        from dlc.models.loading import resolve_checkpoint_dir
        path = resolve_checkpoint_dir(model, weights)
        saved = model_generation_defaults(str(path), model_config) if path is not None else fam
    except (ValueError, OSError):
        saved = fam
    return {"kv_cache": fam["kv_cache"], "block_length": saved.get("block_length", fam.get("block_length"))}


def _preset_decoder(model: str) -> str | None:
    from dlc.models.presets import PRESETS
    return PRESETS.get(model, {}).get("decoder")


def _generation_defaults(model: str, weights: str | None) -> dict:
    """gen_length / block_length / steps from the model directory's generation_config.json (dlc-tiny ships
    one), else LLaDA's 128 / 32 / 128. Unresolvable models fall back silently: open_model reports them."""
    d = {"gen_length": 128, "block_length": 32, "steps": 128}
    try:
        from dlc.models.loading import resolve_checkpoint_dir
        path = resolve_checkpoint_dir(model, weights)
        saved = json.loads((path / "generation_config.json").read_text()) if path is not None else {}
        d.update({k: int(saved[k]) for k in d if k in saved})
    except (ValueError, OSError, TypeError):
        pass
    return d


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--target", default=None, help="also plan each preset on this GPU (rtx4090, l40s, "
              "a100-40g, a100-80g, h100, h200): the smallest tensor / expert parallel layout that holds it "
              "(bf16, batch 1)")
@click.option("--max-seq-len", default=4096, show_default=True, type=int,
              help="with --target: the sequence the layout must hold (capped at each model's maximum)")
def models(as_json, target, max_seq_len):
    """List the model presets with their Hugging Face repo and parameter count."""
    from dlc.models.presets import PRESETS, preset_config

    rows = []
    for name in sorted(PRESETS):
        p = PRESETS[name]
        rows.append({"name": name,
                     "repo": p["repo"] or ("bundled" if p.get("path") else "random (in-process)"),
                     "parameters": preset_config(name).num_parameters() if p.get("config") else None,
                     "description": p["description"]})
    if target:
        try:
            _add_layouts(rows, target, max_seq_len)
        except ValueError as e:
            _fail(str(e))
    if as_json:
        print(json.dumps(rows))
        return
    lay = f" {'layout on ' + target:<22}" if target else ""
    click.echo(f"{'name':<16} {'repo':<42} {'params':>10}{lay}  description")
    for r in rows:
        n = r["parameters"]
        size = "?" if n is None else (f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M")
        cell = f" {r.get('layout_text', '?'):<22}" if target else ""
        click.echo(f"{r['name']:<16} {r['repo']:<42} {size:>10}{cell}  {r['description']}")


def _add_layouts(rows: list[dict], target: str, max_seq_len: int) -> None:
    """Each preset's smallest layout on TARGET (dlc.compiler.plan): 'layout', 'gpus', 'gib_per_gpu'."""
    from dlc.compiler.plan import DTYPE_BYTES, parallel_degree
    from dlc.models.presets import PRESETS, preset_config
    from dlc.targets import get_target

    tgt = get_target(target)
    for r in rows:
        if not PRESETS[r["name"]].get("config"):
            continue
        c = preset_config(r["name"])
        degree, _, tried = parallel_degree(c, tgt, DTYPE_BYTES["bf16"], min(max_seq_len, c.max_seq_len))
        best = next((lay for lay in tried if lay.gpus == degree), None)
        r.update({"layout": best.name if best else None, "gpus": degree or None,
                  "gib_per_gpu": round(best.total / (1 << 30), 2) if best else None,
                  "layout_text": f"{best.name} ({best.total / (1 << 30):.1f} GiB/GPU)" if best
                  else "> 8 GPUs"})


def _add_optional_commands() -> None:
    """Commands that live in other packages register here; a missing one is an install problem, not a
    crash."""
    import importlib

    for module, attr, name in [("dlc.compiler.cli", "compile_command", "compile"),
                               ("dlc.compiler.cli", "inspect_command", "inspect"),
                               ("dlc.runtime.server_cli", "serve_command", "serve"),
                               ("dlc.tiny.cli", "eval_command", "eval"),
                               ("dlc.bench_cli", "bench_command", "bench")]:
        try:
            cmd = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        main.add_command(cmd, name)


_add_optional_commands()

if __name__ == "__main__":
    sys.exit(main())
