"""``dlc serve MODEL_OR_ENGINE_DIR``: every option is a ServeConfig field of the same name (and a YAML key)."""
from __future__ import annotations

import signal

import click

from .config import GRANULARITY, POLICIES, ServeConfig


def _options(f):
    opts = [
        click.option("--host", default=None, help="bind address [127.0.0.1]"),
        click.option("--port", default=None, type=int, help="port [8000]"),
        click.option("--max-batch-size", default=None, type=int, help="most requests per iteration [64]"),
        click.option("--max-num-tokens", default=None, type=int, help="token budget per iteration [8192]"),
        click.option("--max-queue", default=None, type=int, help="waiting requests before HTTP 429 [256]"),
        click.option("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1"),
        click.option("--served-model-name", default=None, help="model id clients send [the MODEL argument]"),
        click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="YAML file with any of these options (flags override it)"),
        click.option("--device", default=None, help="cpu or cuda [cuda when available]"),
        click.option("--dtype", default=None, type=click.Choice(["auto", "fp32", "bf16", "fp16"])),
        click.option("--max-seq-len", default=None, type=int, help="longest prompt + generation [the model's]"),
        click.option("--kv-cache-mb", default=None, type=float, help="memory budget of the KV slot pool [512]"),
        click.option("--policy", default=None, type=click.Choice(POLICIES), help="scheduler [phase]"),
        click.option("--granularity", default=None, type=click.Choice(GRANULARITY), help="block size [fixed]"),
        click.option("--refresh-share", default=None, type=float, help="Refresh share of the budget [0.5]"),
        click.option("--gen-length", default=None, type=int, help="default gen_length [model dir, else 128]"),
        click.option("--block-length", default=None, type=int),
        click.option("--steps", default=None, type=int),
        click.option("--threshold", default=None, type=float),
        click.option("--remasking", default=None, type=click.Choice(["low_confidence", "random"])),
        click.option("--kv-cache", default=None, type=click.Choice(["none", "prefix", "dual", "block"])),
        click.option("--seed", default=None, type=int),
        click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                     help="Reuse steps as CUDA graphs at bucketed batch sizes [on with CUDA and an eager model]"),
        click.option("--graph-decode", default=None, type=click.Choice(["fused", "exact"]),
                     help="decoding inside the graphs [fused on GPU: Triton selected-row logits]"),
        click.option("--compile/--no-compile", default=None, help="torch.compile each block (graph runner)"),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def build_config(model: str, config_path: str | None, **options) -> ServeConfig:
    options = {k: v for k, v in options.items() if v is not None}
    if config_path:
        return ServeConfig.from_yaml(config_path, model=model, **options)
    return ServeConfig(model=model, **options)


@click.command("serve")
@click.argument("model")
@_options
def serve_command(model, config_path, **options):
    """Serve MODEL (preset, checkpoint dir or compiled engine dir) over an OpenAI-compatible HTTP API."""
    try:
        cfg = build_config(model, config_path, **options)
        from .engine import Engine
        engine = Engine.from_config(cfg)
        engine.warmup()
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    try:
        import uvicorn

        from .server import build_app
    except ImportError as e:
        raise click.ClickException(f"dlc serve needs the serve extras (pip install 'dlc[serve]'): {e}") from None
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    name = cfg.served_model_name or model
    app = build_app(engine, name, cfg.api_key)
    click.echo(f"dlc serve: {name} on http://{cfg.host}:{cfg.port} ({engine.kv.n_slots} KV slots of "
               f"{engine.max_seq} tokens, policy {cfg.policy}, granularity {cfg.granularity})", err=True)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=int(cfg.drain_timeout_s)))
    # uvicorn drains on SIGTERM, then re-raises the signal under the handler it found: make that a clean exit.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    click.echo("dlc serve: drained and stopped", err=True)
