"""``dlc serve MODEL_OR_ENGINE_DIR``: every option is a ServeConfig field of the same name (and a YAML
key)."""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import click

from .config import GRANULARITY, MIX_ITERATIONS, POLICIES, TP_ALL_REDUCE, ServeConfig
from .startup import freeze_heap, startup_lines

log = logging.getLogger("dlc.serve")


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
        click.option("--max-seq-len", default=None, type=int,
                     help="longest prompt + generation [the model's]"),
        click.option("--kv-cache-mb", default=None, type=float,
                     help="KV slot pool budget [CUDA: from --gpu-memory-utilization; CPU: 512]"),
        click.option("--gpu-memory-utilization", default=None, type=float,
                     help="CUDA: share of the device's memory the server fills (weights, activations, "
                          "and the KV pool takes the rest) [0.9]"),
        click.option("--policy", default=None, type=click.Choice(POLICIES), help="scheduler [phase]"),
        click.option("--granularity", default=None, type=click.Choice(GRANULARITY),
                     help="block size [fixed]"),
        click.option("--refresh-share", default=None, type=float, help="Refresh share of the budget [0.5]"),
        click.option("--ttft-defer-iters", default=None, type=int,
                     help="phase: later blocks' Refresh waits up to N iterations while a first block "
                          "runs [0]"),
        click.option("--gen-length", default=None, type=int, help="default gen_length [model dir, else 128]"),
        click.option("--block-length", default=None, type=int),
        click.option("--steps", default=None, type=int),
        click.option("--threshold", default=None, type=float),
        click.option("--remasking", default=None, type=click.Choice(["low_confidence", "random"])),
        click.option("--kv-cache", default=None, type=click.Choice(["none", "prefix", "dual", "block"])),
        click.option("--seed", default=None, type=int),
        click.option("--drain-timeout-s", default=None, type=float,
                     help="SIGTERM: in-flight requests get this long, then end with an error [60]"),
        click.option("--max-request-bytes", default=None, type=int,
                     help="larger bodies get HTTP 413 [2 MiB]"),
        click.option("--log-interval-s", default=None, type=float,
                     help="throughput / queue console line period while busy; 0: off [5]"),
        click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                     help="Reuse steps as CUDA graphs at bucketed batch sizes [on with CUDA and an "
                          "eager model]"),
        click.option("--graph-decode", default=None, type=click.Choice(["fused", "exact"]),
                     help="decoding inside the graphs, and an engine's rows decoded at T = 0 [fused on "
                          "GPU: Triton selected-row logits; exact: float64]"),
        click.option("--compile/--no-compile", default=None,
                     help="torch.compile each block of the CUDA-graph runner, or an export engine's "
                          "phase programs (Inductor at load) [on on CUDA]"),
        click.option("--mix-iterations", default=None, type=click.Choice(MIX_ITERATIONS),
                     help="a mixed iteration (Refresh beside Reuse rows) on the CUDA-graph runner: two "
                          "calls, one eager ragged forward, one packed forward through the compiled "
                          "blocks, or that forward captured as a CUDA graph per token bucket (varlen "
                          "attention) [two with CUDA graphs, else eager]"),
        click.option("--lookahead-steps", default=None, type=int,
                     help="fixed-schedule Reuse steps kept in flight on the device (a sliding window over "
                          "the block) while nothing waits; 1: off [16]"),
        click.option("--lookahead-max-ms", default=None, type=float,
                     help="the steps in flight last at most about this long (from the measured step time "
                          "of its batch size), so an arrival waits that long at most; 0: no bound [100]"),
        click.option("--sparse-retention", default=None, type=float,
                     help="head-sparse Reuse (eager models): each KV head attends over the block and this "
                          "share of the other cached keys, chosen at Refresh [off: dense]"),
        click.option("--compile-cache/--no-compile-cache", default=None,
                     help="an export engine compiled at load writes Inductor's code into its directory "
                          "(compile_cache/, per GPU and torch version) and loads it at the next open [on]"),
        click.option("--batch-invariant/--no-batch-invariant", default=None,
                     help="a request's output does not depend on what else runs (fixed GEMM, attention and "
                          "logits splits on CUDA; slower, no --compile) [off]"),
        click.option("--tensor-parallel-size", "--tp", "tensor_parallel_size", default=None, type=int,
                     help="shard the model over this many GPUs (CPU: processes); starts the ranks "
                          "itself [1]"),
        click.option("--tp-all-reduce", "tp_all_reduce", default=None,
                     type=click.Choice(TP_ALL_REDUCE),
                     help="the ranks' all-reduce: symmetric memory (symm: CUDA only; one-shot, the copy "
                          "engines for 4-64 MiB at TP=2) or NCCL; auto: symmetric memory where it beats "
                          "NCCL, else NCCL / gloo [nccl]"),
        click.option("--tp-overlap-tokens", "tp_overlap_tokens", default=None, type=int,
                     help="tensor parallel: a step feeding at least this many tokens runs as two halves "
                          "whose all-reduces overlap the other half's compute (0: off) "
                          "[dlc.models.overlap.MIN_TOKENS: 0, off: 0.96x on 2 x H200]"),
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
        freeze_heap()                    # serving's collections never walk the startup heap
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    try:
        import uvicorn

        from .server import build_app
    except ImportError as e:
        raise click.ClickException(f"dlc serve needs the serve extras (pip install 'dlc[serve]'): "
                                   f"{e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    name = cfg.served_model_name or model
    app = build_app(engine, name, cfg.api_key)
    sock = bind_socket(cfg.host, cfg.port)          # bind first: a busy port fails before any banner
    host, port = sock.getsockname()[:2]
    server = DrainingServer(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=max(1, int(cfg.drain_timeout_s))),
                            app.state.server, engine, cfg.drain_timeout_s)
    for line in startup_lines(engine):
        click.echo(line, err=True)
    click.echo(f"dlc serve: {name} on http://{host}:{port} (policy {cfg.policy}, granularity "
               f"{cfg.granularity})", err=True)
    # uvicorn re-raises the signals it caught once it has stopped: make that a clean exit (no
    # KeyboardInterrupt).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # tensor parallel: a dead rank stops the server
    if hasattr(engine.runner, "add_failure_callback"):
        engine.runner.add_failure_callback(lambda msg: _stop_on_failure(server, engine, msg))
    server.run(sockets=[sock])
    failure = getattr(engine.runner, "failure", None)
    if failure:
        raise click.ClickException(f"stopped: {failure}")
    click.echo("dlc serve: drained and stopped" if not server.forced else "dlc serve: stopped", err=True)


def _stop_on_failure(server, engine, message: str) -> None:
    """A tensor-parallel rank died: every request ends with the error, /health answers 503, the server exits
    (non-zero, the message on stderr) instead of hanging on a group that can no longer compute."""
    log.error("%s; stopping the server", message)
    server.srv.draining = True
    server.forced = True
    engine.fail_all(message)
    threading.Thread(target=server._stop_when_idle, args=(2.0, True), daemon=True).start()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def _draining_server():
    import uvicorn

    class _DrainingServer(uvicorn.Server):
        """SIGTERM drains while still listening (/health and new requests answer 503), then stops; requests
        still running at the drain limit end with an error (a stream gets an error event). SIGINT, or a second
        signal, ends every request with an error at once and stops promptly."""

        def __init__(self, config, srv, engine, drain_s: float):
            super().__init__(config)
            self.srv, self.engine, self.drain_s = srv, engine, drain_s
            self.forced, self._draining = False, False

        def handle_exit(self, sig, frame):
            self.srv.draining = True
            if sig == signal.SIGINT or self._draining:
                self.forced = True
                self.engine.fail_all("the server is shutting down")
                threading.Thread(target=self._stop_when_idle, args=(2.0,), daemon=True).start()
                if self.should_exit:
                    self.force_exit = True
                return
            self._draining = True
            log.info("draining: finishing %s in-flight requests (at most %.0f s)", self._in_flight(),
                     self.drain_s)
            threading.Thread(target=self._drain, daemon=True).start()

        def _in_flight(self) -> int:
            s = self.engine.scheduler
            return s.num_running + s.num_waiting

        def _drain(self):
            if not self._wait_idle(self.drain_s):
                log.warning("drain limit reached: ending %d requests with an error", self._in_flight())
                self.engine.fail_all("the server is shutting down (drain limit reached)")
            self._stop_when_idle(2.0)

        def _stop_when_idle(self, timeout: float, force: bool = False):
            """Stop once the engine is idle or after ``timeout``; ``force``: a request still running then is
            not waited for (its connection closes): a failed tensor-parallel group's step may sit in a
            collective until DLC_TP_TIMEOUT_S, and the server must exit now, not after it."""
            idle = self._wait_idle(timeout)
            time.sleep(0.1)                     # let the last events reach their clients
            if force and not idle:
                log.error("%d requests still running after %.0f s: closing their connections",
                          self._in_flight(), timeout)
                self.force_exit = True
            self.should_exit = True

        def _wait_idle(self, timeout: float) -> bool:
            deadline = time.monotonic() + timeout
            while self.engine.has_work():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)
            return True

    return _DrainingServer


def DrainingServer(config, srv, engine, drain_s):         # noqa: N802 - builds the uvicorn subclass lazily
    return _draining_server()(config, srv, engine, drain_s)
