"""``dlc bench``: benchmarks that print ratios against a baseline run in the same process."""
from __future__ import annotations

import json

import click

from dlc.runtime.benchmark import WORKLOADS


@click.group("bench")
def bench_command():
    """Benchmarks (serving: the phase-multiplexed batcher vs static and continuous FCFS)."""


def _check_extras() -> None:
    """Before any work: the bench's HTTP client and the servers it starts need the bench extras."""
    missing = []
    for mod in ("httpx", "fastapi", "uvicorn", "pydantic"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise click.ClickException(f"dlc bench serve needs {', '.join(missing)}: pip install 'dlc[bench]'")


def _pair(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


@bench_command.command("serve")
@click.argument("model", default="tiny-llada")
@click.option("--driver", default="http", show_default=True, type=click.Choice(["http", "engine"]),
              help="http: one `dlc serve` per policy, streaming clients; engine: one in-process Engine "
                   "(no web stack needed: the GPU machine)")
@click.option("--workloads", default=",".join(WORKLOADS), show_default=True,
              help="some of burst, poisson-50, poisson-80, poisson-95, osc (rates: from the capacity)")
@click.option("--policies", default="fcfs,fcfs-continuous,phase", show_default=True,
              help="scheduler policies (http driver: POLICY:elastic for elastic granularity)")
@click.option("--num-requests", default=24, show_default=True, type=int, help="requests per run")
@click.option("--prompt-len", default="8:64", show_default=True, help="uniform range LO:HI of prompt tokens")
@click.option("--gen-lens", default="16,32,64", show_default=True, help="generation lengths to draw from")
@click.option("--block-length", default=8, show_default=True, type=int)
@click.option("--tokens-per-step", default=2, show_default=True, type=int)
@click.option("--rounds", default=3, show_default=True, type=int, help="timed rounds (medians and min-max)")
@click.option("--warmup", default="all", show_default=True, type=click.Choice(["all", "burst"]),
              help="all: every workload once untimed per policy; burst: one burst of the mix per policy")
@click.option("--capacity", default=None, type=float, help="requests/s to scale the loads by [measured]")
@click.option("--osc-load", default=0.8, show_default=True, type=float, help="osc mean rate / capacity")
@click.option("--period", default=4.0, show_default=True, type=float, help="osc period (s)")
@click.option("--amplitude", default=0.9, show_default=True, type=float, help="osc relative amplitude")
@click.option("--max-batch-size", default=16, show_default=True, type=int)
@click.option("--max-num-tokens", default=2048, show_default=True, type=int)
@click.option("--max-seq-len", default=None, type=int, help="[longest prompt + generation of the mix]")
@click.option("--kv-cache-mb", default=None, type=float, help="[max batch + 2 slots of --max-seq-len]")
@click.option("--granularity", default="fixed", show_default=True, type=click.Choice(["fixed", "elastic"]))
@click.option("--refresh-share", default=None, type=float, help="phase's Refresh share [the server's]")
@click.option("--lookahead-steps", default=None, type=int, help="Reuse steps run ahead [the server's]")
@click.option("--lookahead-max-ms", default=None, type=float,
              help="a run of Reuse steps ahead lasts at most about this long [the server's]")
@click.option("--ttft-defer-iters", default=None, type=int,
              help="phase: later blocks' Refresh waits up to N iterations for first blocks [the server's]")
@click.option("--device", default=None, help="cpu or cuda [cuda when available]")
@click.option("--dtype", default="auto", show_default=True,
              type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--compile/--no-compile", "compile_", default=None, help="torch.compile blocks [the server's]")
@click.option("--random-weights", is_flag=True,
              help="engine driver: the preset, random weights built on the device (bench/serve_bench.py)")
@click.option("--port", default=0, show_default=True, type=int, help="first server port (0: free ones)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="write the whole result (every run, medians, spreads, targets) here")
def serve_bench(model, driver, workloads, policies, num_requests, prompt_len, gen_lens, block_length,
                tokens_per_step, rounds, warmup, capacity, osc_load, period, amplitude, max_batch_size,
                max_num_tokens, max_seq_len, kv_cache_mb, granularity, refresh_share, lookahead_steps,
                lookahead_max_ms, ttft_defer_iters, device, dtype, compile_, random_weights, port, seed,
                json_path):
    """Serve MODEL under each scheduler policy with the same seeded workloads (burst; Poisson at 50/80/95 %
    of the measured capacity; oscillating load), warmed and repeated over rounds in rotated policy order;
    print throughput, TTFT and latency (median [min-max]) and the target ratios (PASS/MISS), table last."""
    from dlc.runtime.benchmark import run_suite, table
    from dlc.runtime.loadgen import Workload, model_config_of, prompt_token_ids

    pols = [p.strip() for p in policies.split(",") if p.strip()]
    names = [w.strip() for w in workloads.split(",") if w.strip()]
    if rounds < 1:
        raise click.ClickException(f"--rounds must be >= 1, got {rounds}")
    if random_weights and (driver != "engine" or click.get_current_context().obj is None):
        raise click.ClickException("--random-weights needs --driver engine and the model builder of "
                                   "bench/engine_path.py: run python bench/serve_bench.py")
    if driver == "http":
        _check_extras()
    try:
        if random_weights:                         # the preset's shape; no checkpoint needed
            from dlc.models.presets import preset_config
            mc = preset_config(model)
        else:
            mc = model_config_of(model)
        base = Workload("burst", num_requests, 1.0, period, amplitude, _pair(prompt_len),
                        tuple(int(g) for g in gen_lens.split(",")), block_length, tokens_per_step, seed,
                        prompt_token_ids(mc))
        settings = _settings(base, mc, max_batch_size, max_num_tokens, max_seq_len, kv_cache_mb, dtype,
                             device, granularity, refresh_share, compile_, num_requests)
        for k, v in (("lookahead_steps", lookahead_steps), ("lookahead_max_ms", lookahead_max_ms),
                     ("ttft_defer_iters", ttft_defer_iters)):
            if v is not None:
                settings[k] = v
        drv = _driver(driver, model, settings, port, random_weights)
        res = run_suite(drv, base, pols, names, rounds, capacity, osc_load, warmup, log=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    res["model"], res["settings"] = model, settings
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    click.echo("\n" + table(res))


def _settings(base, mc, max_batch_size, max_num_tokens, max_seq_len, kv_cache_mb, dtype, device, granularity,
              refresh_share, compile_, num_requests) -> dict:
    """The ServeConfig fields every server / the engine gets (the same for every policy)."""
    import torch

    from dlc.models.loading import resolve_dtype
    from dlc.runtime.kv_cache import slot_bytes
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    seq = max_seq_len or base.prompt_len[1] + max(base.gen_lens)
    if kv_cache_mb is None:
        kv_cache_mb = slot_bytes(mc, seq, resolve_dtype(dtype, device)) * (max_batch_size + 2) / 2**20 + 1
    top = max(base.gen_lens)
    s = dict(device=device, dtype=dtype, max_batch_size=max_batch_size, max_num_tokens=max_num_tokens,
             max_seq_len=seq, kv_cache_mb=round(kv_cache_mb, 3), max_queue=num_requests + 16,
             granularity=granularity, gen_length=top, block_length=base.block_length,
             steps=top // base.tokens_per_step, kv_cache="dual", log_interval_s=0.0)
    if refresh_share is not None:
        s["refresh_share"] = refresh_share
    if compile_ is not None:
        s["compile"] = compile_
    return s


def _driver(kind, model, settings, port, random_weights):
    from dlc.runtime.benchmark import EngineDriver, HttpDriver
    if kind == "http":
        args = []
        for k, v in settings.items():
            flag = "--" + k.replace("_", "-")
            args += ([flag] if v is True else ["--no-" + flag[2:]] if v is False else [flag, str(v)])
        return HttpDriver(model, args, port)
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.session import Session, open_model
    cfg = ServeConfig(model=model, **settings)
    if random_weights:
        from dlc.models.loading import resolve_dtype
        from dlc.runtime.runners.eager import EagerRunner
        obj = click.get_current_context().obj
        m = obj["build"](model, settings["device"], resolve_dtype(settings["dtype"], settings["device"]))
        session = Session(obj.get("runner", EagerRunner)(m), None, m.config, False, model)
    else:
        session = open_model(model, dtype=settings["dtype"], device=settings["device"], progress=False)
    return EngineDriver(Engine(session, cfg))
