"""``dlc compile`` and ``dlc inspect`` (registered by dlc/cli.py)."""
from __future__ import annotations

import json
import logging

import click


@click.command("compile")
@click.argument("model")
@click.option("--target", required=True, help="rtx4090, l40s, a100-40g, a100-80g, h100, h200 or cpu")
@click.option("-o", "--output", "out_dir", default=None, help="engine directory to write")
@click.option("--backend", default="aoti", show_default=True,
              type=click.Choice(["aoti", "onnx", "tensorrt", "export"]))
@click.option("--weights", default=None, help="local checkpoint directory")
@click.option("--dtype", default=None, type=click.Choice(["bf16", "fp16", "fp32"]),
              help="default: fp32 for cpu, bf16 for GPU targets")
@click.option("--max-batch-size", default=None, type=int, help="default: the most that fits the target")
@click.option("--max-seq-len", default=None, type=int, help="default: the model's maximum")
@click.option("--block-length", default=None, type=int,
              help="the block the plan sizes the logit chunk for (default 32; block-diffusion models: their "
                   "own, and given, the engine's default block length)")
@click.option("--passes", default=None, help="comma-separated pass list (default: the required passes, plus "
                                              "sparsify_heads with --sparse-retention)")
@click.option("--sparse-retention", default=None, type=float,
              help="head-sparse attention: fraction kept per head")
@click.option("--logprobs", default=0, show_default=True, type=int, help="top-k logprobs per decoded row")
@click.option("--decode-extras", is_flag=True, help="the phase programs also decode what the "
              "parallel rules and logprobs need (entropy, token logprob, credit decoding), take iteration "
              "smoothing's soft inputs and return the decoded hidden rows (smoothing, T > 0 top-k / top-p / "
              "min-p; the GPU kernel lowering: only these two, the runner decodes the rest from the rows); "
              "not TensorRT")
@click.option("--moe-impl", default="auto", show_default=True,
              type=click.Choice(["auto", "fused", "stacked"]),
              help="MoE models: the expert forward the programs trace; auto = fused (grouped GEMMs, the "
                   "routed FLOPs only) for export / AOTI bf16 engines on sm90 / sm100 targets, stacked "
                   "(every expert on every token, static) elsewhere")
@click.option("--dump-graph-after", default=None, help="print the graph after this pass")
@click.option("--tensor-parallel-size", "--tp", "tensor_parallel", default=1, show_default=True,
              type=click.IntRange(min=1), help="plan one GPU of a tensor (+ expert) parallel layout "
              "with --dry-run; building per-rank engines is a later step (dlc serve / generate "
              "--tensor-parallel-size run it)")
@click.option("--dry-run", is_flag=True,
              help="plan on the meta device (no weights) and print what would be written")
@click.option("--json", "as_json", is_flag=True, help="print the manifest / plan as JSON at the end")
@click.option("-v", "--verbose", is_flag=True, help="log every pass's rewrite count")
@click.option("--force", is_flag=True, help="write into a non-empty directory that is not a dlc engine")
@click.option("--prepare-only", is_flag=True, help="where the backend cannot be built here (AOTI / "
              "TensorRT for another GPU, TensorRT missing): write the portable ONNX half and the commands "
              "that finish it")
def compile_command(model, target, out_dir, backend, weights, dtype, max_batch_size, max_seq_len,
                    block_length, passes, sparse_retention, logprobs, decode_extras, dump_graph_after,
                    dry_run, as_json, verbose, force, prepare_only, tensor_parallel, moe_impl):
    """Compile MODEL (preset or checkpoint dir) for TARGET into an engine directory."""
    from .backends import BackendUnavailable
    from .build import compile_model

    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    names = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
    try:
        res = compile_model(model, target, out_dir, backend=backend, weights=weights, dtype=dtype,
                            max_batch_size=max_batch_size, max_seq_len=max_seq_len, block_length=block_length,
                            passes=names, sparse_retention=sparse_retention,
                            dump_graph_after=dump_graph_after, dry_run=dry_run, logprobs=logprobs,
                            echo=click.echo, force=force, prepare_only=prepare_only,
                            decode_extras=decode_extras, tensor_parallel=tensor_parallel,
                            moe_impl=moe_impl)
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(res, default=str))


@click.command("inspect")
@click.argument("engine_dir")
@click.option("--json", "as_json", is_flag=True,
              help="the manifest with its 'status' (ok / REFUSED) and 'reason'")
@click.option("--verify", is_flag=True, help="hash every artifact again (default: a file unchanged "
                                             "since it was last verified here is trusted)")
def inspect_command(engine_dir, as_json, verify):
    """Summarise an engine directory's dlc_engine.json and check that it opens: versions, settings hash, every
    artifact's size and sha256. Exits 1 when the engine would be refused."""
    from dlc.manifest import EngineError, read_manifest, summary_lines, validate_manifest

    try:
        m = read_manifest(engine_dir)
    except EngineError as e:
        if as_json:
            click.echo(json.dumps({"status": "REFUSED", "reason": str(e)}))
            raise SystemExit(1)
        raise click.ClickException(str(e)) from None
    try:
        validate_manifest(engine_dir, m, verify="full" if verify else "cached")
        status, reason = "ok", None
    except EngineError as e:
        status, reason = "REFUSED", str(e)
    if as_json:
        click.echo(json.dumps({**m, "status": status, "reason": reason}, indent=2))
    else:
        for line in summary_lines(m):
            click.echo(line)
        click.echo(f"status      {status}" + (f": {reason}" if reason else ""))
    if status != "ok":
        raise SystemExit(1)
