"""Tensor parallelism (issue 16): TP=N against TP=1 in one run, both on CUDA graphs, LLaDA-8B shape.

TP=1 is the one-GPU serving runner (``GraphRunner`` over the eager model: captured Reuse steps) and TP=N the
tensor-parallel group with a ``ShardGraphRunner`` per rank (captured Reuse steps with the row-parallel
all-reduces and the vocab-parallel combine inside). ``--compile`` compiles both sides' blocks (TP=1's and
every rank's, the all-reduces inside the compiled code): the ratio is then compiled vs compiled, and the
table says so; without it neither side compiles. Both live in this process at once (TP=1 on GPU 0; TP=N's
rank 0 on GPU 0 too, its workers on GPUs 1 .. N-1), so the latency rounds alternate. In this order:

1. token agreement on an fp32 tiny model (``--agree-preset``, default tiny-dream: GQA, shifted logits):
   ``dlc generate --tp N --cuda-graphs [--compile]`` in a subprocess (a process joins one TP group only)
   against TP=1's graph runner here (compiled alike), at T = 0 on a dual cache: identical is the
   expectation;
2. the random-weight checkpoint (``--preset``, bf16, head x4 as engine_path.build) written to disk once
   (``--ckpt`` reuses it), then both sessions opened (TP=N ranks load their slices);
3. Reuse step latency at B=1 (prompt 512 + gen 256, a 32-token block over a dual cache, captured): per round
   the median of ``--reps`` synchronous ``run_batch`` calls for TP=1 then TP=N, ``--rounds`` rounds
   alternating which goes first; reported: the median over rounds;
4. end-to-end tokens/s of ``generate`` at B=``--batch`` (gen 256, block 32, one token per step, dual cache),
   each side warmed by one small run first, then the TP=N / TP=1 agreement of those bf16 sequences
   (rounding-order differences may flip near-ties on random weights);
5. ``--served`` (default on): the same B requests served by ``dlc.runtime.Engine`` with ``--lookahead`` Reuse
   steps run ahead of the host (the product's path: ``generate`` above waits for every step), warmed, then
   timed; its tokens are checked against ``generate``'s (T = 0: identical).

Prints progress (flush) and one table with ratios and the issue's targets (Reuse <= 0.6x, tokens/s >= 1.7x).
Fits one 600 s call on a 2-GPU host; ``--quick`` halves the generation and the rounds.
``--no-cuda-graphs`` runs both sides eager (the numbers of bench/RESULTS.md before graphs).

``--all-reduce nccl,symm[,auto]`` times TP=N once per all-reduce backend (``tp_all_reduce``,
dlc.models.all_reduce) in the same process as TP=1: one TP group, started with ``symm`` when the list names it
(its symmetric buffer allocated at startup), switched between backends on every rank
(``step_times(all_reduce=...)``: the graphs are captured again); the ``nccl`` side then calls NCCL from the
all-reduce op (the same NCCL kernel as a group started with ``nccl``). Per backend: the B=1 Reuse step
synchronous (the latency rounds alternate TP=1 and every backend) and run ahead (``--ahead`` steps per call,
where the runner can), the B=``--batch`` tokens/s, each rank's one-shot / NCCL call counts, and the ratios
to TP=1 and to the ``nccl`` side. Without it, one TP side with the default backend (``auto``).

    python3 -P bench/tp_bench.py --tp 2 --out $OUT/tp_bench.json          # 2 GPUs
    python3 -P bench/tp_bench.py --tp 2 --compile --quick                   # compiled vs compiled
    python3 -P bench/tp_bench.py --tp 2 --compile --quick --all-reduce nccl,symm,auto --agree-preset none
    python3 -P bench/tp_bench.py --preset tiny-llada --device cpu --dtype fp32 --batch 4 --prompt 32 \\
        --gen 32 --agree-preset none                                        # CPU smoke (graphs uncaptured)

``--overlap-ab N`` times only the served path at B=``--batch`` (the issue's target metric), TP=1 and the TP
group with its two-micro-batch overlap on (``--overlap-tokens``, default dlc.models.overlap.TRY_TOKENS) and
off
(threshold 0, switched on every rank by ``step_times(overlap_tokens=...)``: graphs captured again, then warmed
by ``served_throughput``'s warm set), N rounds alternating the order of the three sides; prints the medians,
the ratios to TP=1 and overlap on / off, and how many sequences the two TP sides agree on (bf16: the halves'
GEMM shapes round differently; fp32 tokens are identical, tests/runtime/test_tp_overlap.py). Without it the
TP side runs with the default threshold (B=32 x 32-token Reuse steps split). With ``--all-reduce a,b`` too,
the overlap sides use the last backend and each earlier one adds a side with overlap off (every side in
the alternation: a served A/B of the backends).

    python3 -P bench/tp_bench.py --tp 2 --compile --quick --agree-preset none --overlap-ab 3   # < 4 min
    python3 -P bench/tp_bench.py --tp 2 --compile --quick --agree-preset none --overlap-ab 3 \\
        --all-reduce nccl,auto

An LLaDA-MoE-shaped model (attention TP=2, experts EP=2: dlc.models.expert_parallel) is the same script in a
second call: ``--preset llada-moe-7b --agree-preset tiny-llada-moe --quick``; the MoE layer alone, EP=2 vs
EP=1, is bench/ep_bench.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)

T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def runner_of(session, graphs: bool, compile: bool = False):
    from dlc.runtime.engine import graph_runner_for
    return graph_runner_for(session.runner, graphs, compile if graphs else False)


class ReuseProbe:
    """B rows' Reuse step over a dual cache (their Refresh done), ready to time: ``run()`` is synchronous
    (run_batch copies the result to the host). Also bench/probes/tp_step_breakdown.py's steps."""

    def __init__(self, runner, P: int, G: int, block: int, B: int = 1, seed: int = 0):
        from dlc.runtime.kv_cache import KVCacheManager
        from dlc.runtime.step import build_batch, is_graphed, run_batch
        mc, L = runner.config, P + G
        g = torch.Generator().manual_seed(seed)
        seqs = []
        for _ in range(B):
            s = torch.randint(0, min(mc.vocab_size, 256), (L,), generator=g)
            s[P:] = mc.mask_id
            seqs.append(s)
        pool = KVCacheManager(mc, L, 1 << 62, runner.dtype, runner.device, max_slots=B + 1)
        if is_graphed(runner):
            runner.bind_pool(pool)                 # the spare slot: the graphs' padding rows
        kw = dict(slots=[pool.allocate_n(1) for _ in range(B)], pool=pool)
        run_batch(runner, build_batch(runner, "refresh", seqs, [P] * B, [P] * B, block, **kw))
        self.batch = build_batch(runner, "reuse", seqs, [P] * B, [P] * B, block, spans=[(P, P + block)] * B,
                                 **kw)
        self.runner, self.pool, self.B, self._run = runner, pool, B, run_batch
        for _ in range(3):                         # capture + warm
            self.run()

    def run(self) -> float:
        t0 = time.perf_counter()
        self._run(self.runner, self.batch)
        return time.perf_counter() - t0

    def median_ms(self, reps: int) -> float:
        return statistics.median(self.run() for _ in range(reps)) * 1e3

    def ahead_ms(self, n: int, reps: int) -> float:
        """ms per step of ``n`` steps run ahead (one token per row and step), median over ``reps`` calls."""
        counts = torch.ones(self.B, n, dtype=torch.long)
        per = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            out = self.runner.reuse_ahead(self.batch, counts)
            out.wait(len(out) - 1)
            per.append((time.perf_counter() - t0) / n)
        return statistics.median(per[1:]) * 1e3


def throughput(runner, B: int, P: int, G: int, block: int) -> tuple[float, list, float]:
    """(tokens/s of one ``generate`` at B, its tokens, the seconds of it spent capturing: generate binds a
    fresh pool per call, so its bucket's graph is captured again inside the timed run, on both sides)."""
    from dlc.runtime.generate import GenerationConfig, generate
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(runner.config.vocab_size, 256), (P,), generator=g).tolist()
               for _ in range(B)]
    cfg = GenerationConfig(gen_length=G, block_length=block, steps=G, kv_cache="dual")
    generate(runner, prompts, GenerationConfig(gen_length=block, block_length=block, steps=2,
                                               kv_cache="dual"))                   # warm: the batch's buckets
    stats = getattr(runner, "stats", None) or {}
    c0, t0 = stats.get("capture_s", 0.0), time.perf_counter()
    res = generate(runner, prompts, cfg)
    dt = time.perf_counter() - t0
    return sum(len(t) for t in res.token_ids) / dt, res.token_ids, stats.get("capture_s", 0.0) - c0


def served_throughput(runner, B: int, P: int, G: int, block: int, lookahead: int, graphs: bool,
                      compiled: bool) -> tuple[float, list]:
    """(tokens/s, tokens) of B requests served by ``dlc.runtime.Engine`` over ``runner`` as ``dlc serve``
    runs them: warmed, continuous batching, ``lookahead`` Reuse steps run ahead of the host (the product's
    path; ``throughput``'s ``generate`` waits for every step's tokens). A warm set of the same requests first
    (captures and compiles), then the timed set. ``graphs`` / ``compiled``: the bench's settings, passed on
    so the Engine keeps the runner as the other measurements ran it (its defaults would compile a TP side's
    blocks on CUDA and turn its graphs off on CPU)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.session import Session
    cfg, L = runner.config, P + G
    mib = slot_bytes(cfg, L, runner.dtype) * (B + 2) / 2**20 + 1
    sc = ServeConfig(model="bench", device=str(getattr(runner, "device", "cuda")), max_batch_size=B,
                     max_num_tokens=2 * B * L, max_seq_len=L, kv_cache_mb=mib, max_queue=4096,
                     kv_cache="dual",
                     gen_length=G, block_length=block, steps=G, lookahead_steps=lookahead, policy="fcfs",
                     cuda_graphs=graphs, compile=graphs and compiled)
    eng = Engine(Session(runner, None, cfg, False, "bench"), sc)
    eng.warmup()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, min(cfg.vocab_size, 256), (P,), generator=g).tolist() for _ in range(B)]
    params = dict(gen_length=G, block_length=block, steps=G, kv_cache="dual", temperature=0.0)
    for _ in ("warm", "timed"):
        reqs = [eng.make_request(p, params) for p in prompts]
        t0 = time.perf_counter()
        for r in reqs:
            eng.add_request(r)
        eng.run_until_done()
        dt = time.perf_counter() - t0
    return sum(len(r.output_ids) for r in reqs) / dt, [list(r.output_ids) for r in reqs]


def served(args, runner, side: dict, name: str) -> None:
    """``--served``: the side's B=``--batch`` tokens/s through the Engine (``served_throughput``)."""
    if not args.served:
        return
    tps, side["served_tokens"] = served_throughput(runner, args.batch, args.prompt, args.gen, args.block,
                                                   args.lookahead, args.graphs, args.compile)
    side["served_tokens_per_s"] = tps
    say(f"{name}: {tps:.1f} tok/s at B={args.batch} served (Engine, lookahead {args.lookahead})")


def agreement(args, graphs: bool) -> dict:
    """fp32 tiny model, T = 0, dual cache: ``dlc generate --tp N`` (subprocess) vs TP=1 here, both sides
    compiled with ``--compile`` (explicitly off otherwise: compile is dlc generate's default on CUDA)."""
    from dlc.runtime.generate import GenerationConfig, generate
    from dlc.runtime.session import encode_prompt, open_model
    prompt = "tensor parallel graphs agree"
    gen = ["--gen-length", "32", "--block-length", "8", "--steps", "32"]
    cmd = [sys.executable, "-P", "-m", "dlc.cli", "generate", args.agree_preset, prompt, "--tp", str(args.tp),
           "--dtype", "fp32", "--device", args.device, "--kv-cache", "dual", "--no-chat", "--json", *gen,
           "--cuda-graphs" if graphs else "--no-cuda-graphs",
           "--compile" if graphs and args.compile else "--no-compile"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if r.returncode != 0:
        raise SystemExit(f"tp_bench: the TP={args.tp} agreement run failed: {r.stderr.strip()[-800:]}")
    tp = json.loads(r.stdout.strip().splitlines()[-1])
    one = open_model(args.agree_preset, dtype="fp32", device=args.device, progress=False)
    cfg = GenerationConfig(gen_length=32, block_length=8, steps=32, kv_cache="dual", stop_at_eos=False)
    want = generate(runner_of(one, graphs, args.compile), [encode_prompt(one, prompt, False)],
                    cfg).token_ids[0]
    same = sum(a == b for a, b in zip(tp["token_ids"], want))
    return {"preset": args.agree_preset, "identical": tp["token_ids"] == want,
            "tokens_equal": f"{same}/{len(want)}", "tp_engine": tp["engine"]}


def write_checkpoint(args, dtype) -> Path:
    from dlc.models.loading import save_checkpoint
    from engine_path import build
    ckpt = Path(args.ckpt or tempfile.mkdtemp(prefix="dlc-tp-bench-"))
    if not (ckpt / "config.json").exists():
        model = build(args.preset, args.device if args.device != "cpu" else "cpu", dtype)
        save_checkpoint(model, ckpt, max_shard_bytes=2 << 30)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        say(f"checkpoint {ckpt} written")
    return ckpt


def latency_rounds(probes: dict, rounds: int, reps: int, before=None) -> dict:
    """Median over ``rounds`` of each side's median step (ms); the sides alternate which goes first.
    ``before(side)``: called before a side's round (switches the TP group's all-reduce, then warms)."""
    per = {k: [] for k in probes}
    for r in range(rounds):
        for k in (list(probes) if r % 2 == 0 else list(probes)[::-1]):
            if before is not None:
                before(k)
            per[k].append(probes[k].median_ms(reps))
        say(f"latency round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f} ms" for k, v in per.items()))
    return {k: statistics.median(v) for k, v in per.items()}


def backend_table(res: dict, sides: list[str]) -> str:
    """One row per all-reduce backend of the TP side: its times and the ratios to TP=1 and to ``nccl``."""
    a = res["tp1"]
    out = ["| TP side | Reuse B=1 sync ms | vs TP=1 | run ahead ms/step | vs TP=1 | "
           f"tok/s B={res['batch']} | vs TP=1 | served tok/s | vs TP=1 | sync vs nccl | tok/s vs nccl | "
           "one-shot / NCCL calls (rank 0) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = next((res[k] for k in sides if k.endswith("-nccl")), None)
    f = lambda v: "-" if v is None else f"{v:.2f}"                                    # noqa: E731
    div = lambda x, y: None if x is None or not y else x / y                            # noqa: E731
    out.append(f"| TP=1 | {f(a['reuse_b1_ms'])} | - | {f(a.get('ahead_ms'))} | - | "
               f"{f(a['tokens_per_s'])} | - | {f(a.get('served_tokens_per_s'))} | - | - | - | - |")
    for k in sides:
        b = res[k]
        calls = b.get("all_reduce", [{}])[0]
        out.append(f"| {k} | {f(b['reuse_b1_ms'])} | {f(div(b['reuse_b1_ms'], a['reuse_b1_ms']))}x | "
                   f"{f(b.get('ahead_ms'))} | {f(div(b.get('ahead_ms'), a.get('ahead_ms')))}x | "
                   f"{f(b['tokens_per_s'])} | {f(div(b['tokens_per_s'], a['tokens_per_s']))}x | "
                   f"{f(b.get('served_tokens_per_s'))} | "
                   f"{f(div(b.get('served_tokens_per_s'), a.get('served_tokens_per_s')))}x | "
                   f"{f(div(b['reuse_b1_ms'], base and base['reuse_b1_ms']))}x | "
                   f"{f(div(b['tokens_per_s'], base and base['tokens_per_s']))}x | "
                   f"{calls.get('one_shot', '-')} / {calls.get('nccl', '-')} |")
    return "\n".join(out)


def table(res: dict, tp: int) -> str:
    a, b = res["tp1"], res[f"tp{tp}"]
    rows = [("Reuse step, B=1 (ms)", a["reuse_b1_ms"], b["reuse_b1_ms"], res["reuse_b1_ratio"], "<= 0.6x",
             res["reuse_b1_ratio"] <= 0.6),
            (f"e2e tok/s, B={res['batch']}", a["tokens_per_s"], b["tokens_per_s"], res["tokens_per_s_ratio"],
             ">= 1.7x", res["tokens_per_s_ratio"] >= 1.7)]
    if "served_ratio" in res:
        rows.append((f"served tok/s, B={res['batch']} (Engine, run ahead)", a["served_tokens_per_s"],
                     b["served_tokens_per_s"], res["served_ratio"], ">= 1.7x", res["served_ratio"] >= 1.7))
    out = [f"| metric ({res['runner']}) | TP=1 | TP={tp} | ratio | target |", "|---|---|---|---|---|"]
    out += [f"| {m} | {x:.2f} | {y:.2f} | {r:.2f}x | {t}: {'met' if ok else '**missed**'} |"
            for m, x, y, r, t, ok in rows]
    out.append(f"| identical sequences vs TP=1 ({res['dtype']}) | - | {res['identical_sequences']} | - | - |")
    ag = res.get("agreement")
    if ag:
        out.append(f"| fp32 {ag['preset']} tokens vs TP=1 | - | {ag['tokens_equal']} | - | identical: "
                   f"{'met' if ag['identical'] else '**missed**'} |")
    return "\n".join(out)


def by_backend(args, res: dict, one, tp, backends: list[str]) -> list[str]:
    """TP=1 and the TP group under each all-reduce backend in turn (``--all-reduce``): B=1 Reuse latency
    (synchronous rounds alternating every side; then run ahead), B=``--batch`` tokens/s and identical
    sequences vs TP=1, each backend's one-shot / NCCL calls per rank. Fills ``res``; returns the TP sides."""
    names = {f"tp{args.tp}-{b}": b for b in backends}
    current = [None]

    def use(side: str, probe=None) -> None:
        b = names.get(side)
        if b is None or current[0] == b:
            return
        tp.step_times(all_reduce=b)                        # every rank switches; graphs recaptured on use
        current[0] = b
        for _ in range(3 if probe is not None else 0):
            probe.run()
    p1, pt = (ReuseProbe(one, args.prompt, args.gen, args.block),
              ReuseProbe(tp, args.prompt, args.gen, args.block))
    probes = {"tp1": p1, **{k: pt for k in names}}
    lat = latency_rounds(probes, args.rounds, args.reps, before=lambda k: use(k, probes[k]))
    sides = {k: {"reuse_b1_ms": v} for k, v in lat.items()}
    for k, probe in probes.items():
        use(k, probe)
        runner = one if k == "tp1" else tp
        if getattr(runner, "can_run_ahead", None) and runner.can_run_ahead(probe.batch):
            sides[k]["ahead_ms"] = probe.ahead_ms(args.ahead, 5)
            say(f"{k}: {sides[k]['ahead_ms']:.2f} ms per step run ahead ({args.ahead} per call)")
    del probes, p1, pt
    tokens = {}
    for k in sides:
        use(k)
        runner = one if k == "tp1" else tp
        tps, tokens[k], cap = throughput(runner, args.batch, args.prompt, args.gen, args.block)
        sides[k].update(tokens_per_s=tps, capture_s_in_run=round(cap, 3))
        if k != "tp1":
            sides[k]["all_reduce"] = [r["all_reduce"] for r in tp.step_times()]
            sides[k]["identical_sequences"] = f"{sum(x == y for x, y in zip(tokens[k], tokens['tp1']))}/" \
                                              f"{args.batch}"
        say(f"{k}: {tps:.1f} tok/s at B={args.batch} ({cap:.2f} s of it capturing)")
        served(args, runner, sides[k], k)
        sides[k].pop("served_tokens", None)
    for k in names:
        sides[k]["reuse_b1_ratio"] = sides[k]["reuse_b1_ms"] / sides["tp1"]["reuse_b1_ms"]
        sides[k]["tokens_per_s_ratio"] = sides[k]["tokens_per_s"] / sides["tp1"]["tokens_per_s"]
    res.update(sides)
    return list(names)


def overlap_ab(args, res: dict, one, tp, backends: list[str] | None = None) -> str:
    """``--overlap-ab``: served tok/s of TP=1, TP=N overlap on and off, ``args.overlap_ab`` rounds with the
    order alternating; medians into ``res``; returns the table. With ``backends`` (``--all-reduce``), also
    each backend's TP side with overlap off (``<backend> off``), the overlap sides on the last backend."""
    last = backends[-1] if backends else None
    sides = {"tp1": (one, None, None), "overlap on": (tp, args.overlap_tokens, last),
             "overlap off": (tp, 0, last)}
    for b in (backends or [])[:-1]:
        sides[f"{b} off"] = (tp, 0, b)
    per, toks = {k: [] for k in sides}, {}
    for r in range(args.overlap_ab):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            runner, n, backend = sides[k]
            if n is not None:                                        # every rank; graphs captured again
                tp.step_times(reset=True, overlap_tokens=n, all_reduce=backend)
            tps, toks[k] = served_throughput(runner, args.batch, args.prompt, args.gen, args.block,
                                             args.lookahead, args.graphs, args.compile)
            per[k].append(tps)
            if n is not None:
                splits = [x["overlap"] and x["overlap"]["split_forwards"] for x in tp.step_times()]
                res.setdefault("split_forwards", {})[k] = splits
        say(f"overlap round {r + 1}/{args.overlap_ab}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s"
                                                                   for k, v in per.items()))
    med = {k: statistics.median(v) for k, v in per.items()}
    same = sum(x == y for x, y in zip(toks["overlap on"], toks["overlap off"]))
    res["overlap_ab"] = {"rounds": args.overlap_ab, "min_tokens": args.overlap_tokens,
                         "served_tokens_per_s": med, "per_round": per,
                         "on_vs_off": med["overlap on"] / med["overlap off"],
                         "on_vs_tp1": med["overlap on"] / med["tp1"],
                         "off_vs_tp1": med["overlap off"] / med["tp1"],
                         "identical_on_off": f"{same}/{args.batch}"}
    o = res["overlap_ab"]
    on = f" ({last} all-reduce)" if last else ""
    more = [f"| TP={args.tp} {k[:-4]} all-reduce, overlap off | {med[k]:.1f} | {med[k] / med['tp1']:.2f}x | "
            f"{last} off / this: {med['overlap off'] / med[k]:.3f}x |" for k in sides if k.endswith(" off")
            and k != "overlap off"]
    return "\n".join([
        f"| served tok/s B={args.batch} ({res['runner']}, medians of {args.overlap_ab}) | tok/s | vs TP=1 | "
        "target |",
        "|---|---|---|---|",
        f"| TP=1 | {med['tp1']:.1f} | - | - |", *more,
        f"| TP={args.tp} overlap off{on} | {med['overlap off']:.1f} | {o['off_vs_tp1']:.2f}x | >= 1.7x: "
        f"{'met' if o['off_vs_tp1'] >= 1.7 else '**missed**'} |",
        f"| TP={args.tp} overlap on (>= {args.overlap_tokens} tokens){on} | {med['overlap on']:.1f} | "
        f"{o['on_vs_tp1']:.2f}x | >= 1.7x: {'met' if o['on_vs_tp1'] >= 1.7 else '**missed**'} |",
        f"| overlap on / off | - | {o['on_vs_off']:.3f}x | sequences identical on vs off ({res['dtype']}): "
        f"{o['identical_on_off']} |"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b", help="the shape (a preset's config; weights are random)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=30, help="Reuse steps per latency round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating latency rounds")
    ap.add_argument("--quick", action="store_true", help="gen 128, 3 rounds of 20 steps")
    ap.add_argument("--cuda-graphs", dest="graphs", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the blocks of both sides (TP=1 and every TP rank)")
    ap.add_argument("--agree-preset", default="tiny-dream", help="fp32 agreement model ('none': skip)")
    ap.add_argument("--ckpt", default=None, help="reuse a checkpoint directory written by an earlier run")
    ap.add_argument("--all-reduce", default=None,
                    help="comma list of TP all-reduce backends to time in turn (nccl, symm, auto)")
    ap.add_argument("--ahead", type=int, default=8, help="steps per run-ahead call (--all-reduce)")
    ap.add_argument("--served", action=argparse.BooleanOptionalAction, default=True,
                    help="also B=--batch tokens/s served by the Engine, steps run ahead (served_throughput)")
    ap.add_argument("--lookahead", type=int, default=16, help="--served: Reuse steps run ahead in flight")
    ap.add_argument("--overlap-ab", type=int, default=0, metavar="N",
                    help="only the served B=--batch path: TP=1, TP=N overlap on / off, N alternating rounds")
    ap.add_argument("--overlap-tokens", type=int, default=None,
                    help="the TP group's two-micro-batch threshold (tp_overlap_tokens; default: the "
                         "library's, or TRY_TOKENS where the library's is off)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.overlap_tokens is None:
        from dlc.models.overlap import MIN_TOKENS, TRY_TOKENS
        args.overlap_tokens = MIN_TOKENS or TRY_TOKENS
    if args.quick:
        args.gen, args.rounds, args.reps = min(args.gen, 128), 3, 20

    from dlc.models.loading import DTYPES
    from dlc.runtime.session import open_model
    res = {"preset": args.preset, "tp": args.tp, "device": str(args.device), "dtype": args.dtype,
           "batch": args.batch, "compiled": bool(args.graphs and args.compile),
           "runner": ("eager" if not args.graphs else
                      "CUDA graphs, blocks compiled on both sides" if args.compile
                      else "CUDA graphs, no compile"),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.agree_preset != "none":
        res["agreement"] = agreement(args, args.graphs)
        say(f"fp32 agreement: {res['agreement']}")
    ckpt = write_checkpoint(args, DTYPES[args.dtype])
    one = runner_of(open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False), args.graphs,
                    args.compile)
    say(f"TP=1 loaded ({type(one).__name__})")
    t0 = time.perf_counter()
    backends = args.all_reduce.split(",") if args.all_reduce else []
    first = "symm" if "symm" in backends else "auto" if "auto" in backends or not backends else "nccl"
    tp_session = open_model(str(ckpt), dtype=args.dtype, device=args.device, progress=False,
                            tensor_parallel_size=args.tp, tp_all_reduce=first,
                            tp_overlap_tokens=args.overlap_tokens)
    tp = runner_of(tp_session, args.graphs, args.compile)
    res["tp_load_s"] = round(time.perf_counter() - t0, 2)
    say(f"TP={args.tp} loaded in {res['tp_load_s']} s (graphs {'on' if args.graphs else 'off'}, "
        f"compiled {'on every rank' if getattr(tp, 'compiled', False) else 'off'})")
    if args.overlap_ab:
        try:
            tab = overlap_ab(args, res, one, tp, backends)
        finally:
            tp_session.runner.close()
        print(json.dumps(res, indent=2))
        print(tab, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
        return
    if backends:
        try:
            names = by_backend(args, res, one, tp, backends)
        finally:
            tp_session.runner.close()
        print(json.dumps(res, indent=2))
        print(backend_table(res, names), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2))
        return
    try:
        probes = {"tp1": ReuseProbe(one, args.prompt, args.gen, args.block),
                  f"tp{args.tp}": ReuseProbe(tp, args.prompt, args.gen, args.block)}
        lat = latency_rounds(probes, args.rounds, args.reps)
        del probes
        sides = {}
        for name, runner in (("tp1", one), (f"tp{args.tp}", tp)):
            tps, tokens, cap = throughput(runner, args.batch, args.prompt, args.gen, args.block)
            sides[name] = {"reuse_b1_ms": lat[name], "tokens_per_s": tps, "tokens": tokens,
                           "capture_s_in_run": round(cap, 3)}
            say(f"{name}: {tps:.1f} tok/s at B={args.batch} ({cap:.2f} s of it capturing)")
            served(args, runner, sides[name], name)
        res["tp_overlap"] = [r["overlap"] for r in tp.step_times()]     # threshold, forwards split per rank
        if getattr(tp, "stats", None):
            res["tp_graph_stats"] = {k: v for k, v in tp.stats.items() if k in ("replays", "eager_reuse",
                                                                             "captures")}
    finally:
        tp_session.runner.close()
    a, b = sides["tp1"].pop("tokens"), sides[f"tp{args.tp}"].pop("tokens")
    if args.served:
        sa, sb = sides["tp1"].pop("served_tokens"), sides[f"tp{args.tp}"].pop("served_tokens")
        same = lambda x, y: sum(u == v for u, v in zip(x, y))                         # noqa: E731
        res["served_identical_to_generate"] = f"{same(sa, a)}/{args.batch} (TP=1), " \
                                              f"{same(sb, b)}/{args.batch} (TP={args.tp})"
    res.update(sides)
    res["identical_sequences"] = f"{sum(x == y for x, y in zip(a, b))}/{args.batch}"
    res["reuse_b1_ratio"] = sides[f"tp{args.tp}"]["reuse_b1_ms"] / sides["tp1"]["reuse_b1_ms"]
    res["tokens_per_s_ratio"] = sides[f"tp{args.tp}"]["tokens_per_s"] / sides["tp1"]["tokens_per_s"]
    if args.served:
        res["served_ratio"] = (sides[f"tp{args.tp}"]["served_tokens_per_s"]
                               / sides["tp1"]["served_tokens_per_s"])
    print(json.dumps(res, indent=2))
    print(table(res, args.tp), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
