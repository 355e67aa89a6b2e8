"""``dlc eval``: accuracy / tokens-per-forward / seconds of a model on the held-out dlc-tiny tasks."""
from __future__ import annotations

import dataclasses
import json
import tempfile

import click

from dlc.block_options import block_diffusion_options, block_fields
from dlc.runtime.config import TP_ALL_REDUCE


def open_for_eval(model: str, dtype: str, device: str, sparse_retention: float | None, block_length: int,
                  kv_cache: str = "dual", workdir: str | None = None, tensor_parallel_size: int = 1,
                  tp_all_reduce: str = "nccl"):
    """open_model, plus head-sparse attention when asked: that only exists in compiled engines, so an eager
    model is compiled (``export`` backend, into ``workdir``) with ``--sparse-retention``; an engine must
    already have been compiled with that retention."""
    from dlc.runtime.session import open_model

    if sparse_retention is None:
        return open_model(model, dtype=dtype, device=device, progress=False,
                          tensor_parallel_size=tensor_parallel_size, tp_all_reduce=tp_all_reduce)
    if tensor_parallel_size != 1:
        raise ValueError("--sparse-retention runs a compiled engine on one device; use "
                         "--tensor-parallel-size 1")
    if not 0 < sparse_retention <= 1:
        raise ValueError(f"--sparse-retention must be in (0, 1], got {sparse_retention}")
    if kv_cache == "none":
        raise ValueError("--sparse-retention acts on cached Reuse steps: use it with --kv-cache "
                         "prefix or dual")
    session = open_model(model, dtype=dtype, device=device, progress=False)
    if session.kind != "eager":
        have = getattr(session.runner, "sparse_retention", None)
        if have != sparse_retention:
            raise ValueError(f"{model} was compiled with sparse retention {have}; recompile it with "
                             f"`dlc compile ... --sparse-retention {sparse_retention}` to evaluate that")
        return session
    try:
        from dlc.compiler.build import compile_model
        from dlc.runtime.session import open_model as reopen
    except ImportError as e:
        raise ValueError(f"--sparse-retention needs the compiler's head-sparse attention pass "
                         f"(dlc.compiler / dlc.passes.sparsify_heads), which is not available: {e}") from None
    out = workdir or tempfile.mkdtemp(prefix="dlc-eval-sparse-")
    try:
        compile_model(model, "cpu" if device == "cpu" else "h200", out, backend="export", dtype=None,
                      block_length=block_length, sparse_retention=sparse_retention, echo=lambda *a, **k: None)
    except RuntimeError as e:            # e.g. BackendUnavailable: say which step failed
        raise ValueError(f"compiling {model} with --sparse-retention {sparse_retention} "
                         f"failed: {e}") from None
    return reopen(out, device=device)


@click.command("eval")
@click.argument("model")
@click.option("--n", default=200, show_default=True, type=int, help="held-out examples")
@click.option("--decoder", default="low_confidence", show_default=True,
              type=click.Choice(["low_confidence", "threshold", "factor", "hierarchical", "entropy_bound",
                                 "credit", "smoothing", "llada2", "llada2.1", "llada2.1-speed",
                                 "llada2.1-quality"]),
              help="LLaDA's rules, the parallel decoders, or a block-diffusion model's (llada2: "
                   "threshold with the schedule's minimum; llada2.1: token editing)")
@click.option("--threshold", default=None, type=float,
              help="for --decoder threshold / hierarchical / credit / smoothing (default 0.9) and the block "
                   "decoders (default: the family's / mode's)")
@click.option("--factor", default=1.0, show_default=True, type=float, help="for --decoder factor")
@click.option("--low-threshold", default=0.3, show_default=True, type=float,
              help="for --decoder hierarchical")
@click.option("--entropy-bound", default=0.1, show_default=True, type=float,
              help="for --decoder entropy_bound")
@click.option("--kv-cache", default="none", show_default=True,
              type=click.Choice(["none", "prefix", "dual", "block"]))
@click.option("--vicinity", default=0, show_default=True, type=int,
              help="dual cache: positions refreshed each side")
@click.option("--refresh-every", default=0, show_default=True, type=int, help="also refresh every N steps")
@click.option("--sparse-retention", default=None, type=float,
              help="head-sparse attention: fraction kept per head")
@click.option("--gen-length", default=None, type=int, help="default: the model's generation_config.json")
@click.option("--block-length", default=None, type=int)
@click.option("--steps", default=None, type=int)
@block_diffusion_options
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available)")
@click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", default=1, show_default=True,
              type=int, help="shard the model over this many GPUs (CPU: processes)")
@click.option("--tp-all-reduce", "tp_all_reduce", default="nccl", show_default=True,
              type=click.Choice(TP_ALL_REDUCE),
              help="the ranks' all-reduce: symmetric memory's one-shot (symm: CUDA only) or NCCL; auto: "
                   "one-shot for small messages on CUDA, else NCCL / gloo")
@click.option("--cuda-graphs/--no-cuda-graphs", default=None,
              help="run the model as dlc generate / serve do: Reuse steps as CUDA graphs [off: the eager "
                   "runner, unless this or --compile is given; then dlc generate's defaults]")
@click.option("--compile/--no-compile", "compile_blocks", default=None,
              help="torch.compile each block of the CUDA-graph runner (every rank with "
                   "--tensor-parallel-size) [with the graphs: on on CUDA]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def eval_command(model, n, decoder, threshold, factor, low_threshold, entropy_bound, kv_cache, vicinity,
                 refresh_every, sparse_retention, gen_length, block_length, steps, steps_per_block,
                 eos_early_stop, edit_threshold, max_post_edit_steps, tokens_per_step, batch_size, dtype,
                 device, tensor_parallel_size, tp_all_reduce, cuda_graphs, compile_blocks, as_json):
    """Evaluate MODEL (preset, checkpoint dir or engine dir) on the held-out dlc-tiny tasks."""
    import torch

    from dlc.models.loading import resolve_checkpoint_dir
    from dlc.runtime.distributed import RankFailure

    from .evaluate import evaluate, generation_defaults, make_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        path = resolve_checkpoint_dir(model) if not _is_dir(model) else model
        gd = generation_defaults(path) if path is not None else generation_defaults("")
        gen_length = gen_length or gd["gen_length"]
        block_length = block_length or gd["block_length"]
        steps = steps or (gd["steps"] if gen_length == gd["gen_length"] else gen_length)
        with tempfile.TemporaryDirectory(prefix="dlc-eval-") as workdir:
            session = open_for_eval(model, dtype, device, sparse_retention, block_length, kv_cache, workdir,
                                    tensor_parallel_size, tp_all_reduce)
            if cuda_graphs is not None or compile_blocks is not None:
                from dlc.runtime.engine import graph_runner_for
                session = dataclasses.replace(session, runner=graph_runner_for(session.runner, cuda_graphs,
                                                                               compile_blocks))
            if decoder.startswith("llada2"):
                fields = block_fields(session.config, decoder, threshold, steps_per_block, eos_early_stop,
                                      edit_threshold, max_post_edit_steps, tokens_per_step)
                cfg = make_config("block", kv_cache=kv_cache, gen_length=gen_length,
                                  block_length=block_length, steps=steps, block=fields)
            else:
                cfg = make_config(decoder, 0.9 if threshold is None else threshold, factor, kv_cache,
                                  vicinity, refresh_every, gen_length, block_length, steps,
                                  low_threshold=low_threshold, entropy_bound=entropy_bound)
            res = evaluate(session, cfg, n=n, batch_size=batch_size)
    except (ValueError, FileNotFoundError, RankFailure) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{session.source} ({session.kind}): decoder {decoder}, kv {kv_cache}, n {res.n}")
    click.echo(f"accuracy {res.accuracy:.4f}  tpf {res.tpf:.3f}  seconds {res.seconds:.2f}  "
               + "  ".join(f"{k} {v:.3f}" for k, v in res.per_task.items()))
    if as_json:
        click.echo(json.dumps(res.summary() | {"model": model, "source": session.source,
                                               "engine": session.kind, "decoder": decoder,
                                               "kv_cache": kv_cache, "sparse_retention": sparse_retention,
                                               "cuda_graphs": bool(getattr(session.runner, "graphed", False)),
                                               "compiled": bool(getattr(session.runner, "compiled", False))}))


def _is_dir(model: str) -> bool:
    from pathlib import Path
    return Path(model).expanduser().is_dir()
