"""``dlc bench``: benchmarks that print ratios against a baseline run in the same process."""
from __future__ import annotations

import json

import click


@click.group("bench")
def bench_command():
    """Benchmarks (serving: phase-multiplexed batcher vs FCFS static batching)."""


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
@click.option("--workload", "pattern", default="poisson", show_default=True,
              type=click.Choice(["poisson", "burst", "osc"]))
@click.option("--num-requests", default=48, show_default=True, type=int)
@click.option("--rate", default=8.0, show_default=True, type=float, help="requests/s (poisson, osc mean)")
@click.option("--period", default=4.0, show_default=True, type=float, help="osc period (s)")
@click.option("--amplitude", default=0.9, show_default=True, type=float, help="osc relative amplitude")
@click.option("--prompt-len", default="8:64", show_default=True, help="uniform range LO:HI of prompt tokens")
@click.option("--gen-lens", default="16,32,64", show_default=True, help="generation lengths to draw from")
@click.option("--block-length", default=8, show_default=True, type=int)
@click.option("--tokens-per-step", default=2, show_default=True, type=int)
@click.option("--policies", default="fcfs,phase", show_default=True, help="first one is the baseline; POLICY:elastic for elastic granularity")
@click.option("--max-batch-size", default=16, show_default=True, type=int)
@click.option("--max-num-tokens", default=2048, show_default=True, type=int)
@click.option("--max-seq-len", default=256, show_default=True, type=int)
@click.option("--granularity", default="fixed", show_default=True, type=click.Choice(["fixed", "elastic"]))
@click.option("--port", default=0, show_default=True, type=int, help="server port (0: a free one)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--refresh-share", default=None, type=float, help="passed to every server (default: the server's)")
@click.option("--rounds", default=1, show_default=True, type=int, help="alternate the policies; report medians")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object as the last line")
def serve_bench(model, pattern, num_requests, rate, period, amplitude, prompt_len, gen_lens, block_length,
                tokens_per_step, policies, max_batch_size, max_num_tokens, max_seq_len, granularity, port, seed,
                refresh_share, rounds, as_json):
    """Drive `dlc serve MODEL` once per scheduler policy with the same workload; print throughput, TTFT and
    latency percentiles and the ratios against the baseline (the first policy)."""
    _check_extras()
    from dlc.runtime.loadgen import Workload, compare, format_row, model_config_of, prompt_token_ids, ratios

    try:
        ids = prompt_token_ids(model_config_of(model))
        wl = Workload(pattern, num_requests, rate, period, amplitude, _pair(prompt_len),
                      tuple(int(g) for g in gen_lens.split(",")), block_length, tokens_per_step, seed, ids)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    pols = [p.strip() for p in policies.split(",") if p.strip()]
    args = ["--max-batch-size", str(max_batch_size), "--max-num-tokens", str(max_num_tokens),
            "--max-seq-len", str(max_seq_len), "--max-queue", str(num_requests + 16)]
    if refresh_share is not None:
        args += ["--refresh-share", str(refresh_share)]
    if granularity != "fixed":
        args += ["--granularity", granularity]
    click.echo(f"workload {pattern}: {num_requests} requests, rate {rate}/s, prompt {prompt_len}, gen {gen_lens}, "
               f"block {block_length}; model {model}, max batch {max_batch_size}, granularity {granularity}")
    if rounds < 1:
        raise click.ClickException(f"--rounds must be >= 1, got {rounds}")
    res = compare(model, wl, pols, args, port, rounds=rounds, log=click.echo)
    if rounds > 1:
        for p in pols:
            click.echo(f"  {p} (median of {rounds}): {format_row(res[p])}")
    base = pols[0]
    for p in pols[1:]:
        r = ratios(res, base, p)
        click.echo(f"{p} vs {base}: throughput x{r['throughput']:.2f}; TTFT speed-up p50/p90/p99 "
                   f"x{r['ttft_p50']:.2f}/x{r['ttft_p90']:.2f}/x{r['ttft_p99']:.2f}; latency speed-up p50/p90/p99 "
                   f"x{r['latency_p50']:.2f}/x{r['latency_p90']:.2f}/x{r['latency_p99']:.2f}")
        res[f"ratio_{p}_vs_{base}"] = r
    if as_json:
        click.echo(json.dumps(res))
