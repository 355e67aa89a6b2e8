"""Where a decoding rule's served cost goes beyond its device work (issue 18).

``bench/rule_cost.py --path step`` (H200, 2026-11-29) puts the extras' device cost of entropy-bound, credit and
logprobs at +0.4-2.2% of a B = 1 Reuse step, while ``--path engine`` (whole requests served, 16 steps ahead)
measures +3.5-5%: the rest must be time the device waits for the host. This probe serves one request set per
rule through the same Engine (``rule_cost.make_engine``: graph runner, compiled blocks, steps run ahead) under
``torch.profiler`` and reads the trace: per forward, the device's busy time (the union of its kernels, copies
and sets), its idle time (the set's span less busy), the idle gaps longer than ``--gap-us`` (count and time)
and the host's synchronising CUDA calls (stream / event / device synchronise, blocking copies) with the time
the host spent in them.

    python3 -P bench/probes/served_timeline.py --rules "low_confidence,entropy_bound 0.1,credit 0.9"
    python3 bench/probes/served_timeline.py --preset tiny-llada --device cpu --dtype fp32 --prompt 16 \
        --gen 32 --block 8 --rules "low_confidence,entropy_bound 0.1"        # a smoke run (no device trace)
"""
from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # bench/ (python3 -P adds no script dir)
import rule_cost as RC  # noqa: E402
from engine_path import build  # noqa: E402

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
              "cudaStreamWaitEvent")


def union_us(spans: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """(busy µs of the union of [start, end) spans, the idle gaps between them: (gap's end, µs))."""
    busy, gaps, end = 0.0, [], None
    for s, e in sorted(spans):
        if end is None or s > end:
            if end is not None:
                gaps.append((s, s - end))
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, gaps


def read_trace(path: str, gap_us: float) -> dict:
    """Device busy / idle µs, long gaps and the host's synchronising calls of one chrome trace."""
    events = json.loads(Path(path).read_text()).get("traceEvents", [])
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0), e.get("name", "?")) for e in events
                 if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS)
    spans = [(s, e) for s, e, _ in dev]
    sync: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and e.get("name") in SYNC_CALLS:
            sync.setdefault(e["name"], []).append(e.get("dur", 0))
    if not spans:
        return {"busy_us": 0.0, "span_us": 0.0, "idle_us": 0.0, "long_gaps": 0, "long_gap_us": 0.0,
                "sync": {}, "gap_ended_by": {}, "graph_launches": 0, "gap_pairs": {}}
    busy, gaps = union_us(spans)
    span = max(e for _, e in spans) - min(s for s, _ in spans)
    long = [(end, g) for end, g in gaps if g > gap_us]
    calls = sorted((e["ts"], e["name"]) for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime")
    ends: dict[str, int] = {}               # the host call that launched the work ending each long gap
    for end, _ in long:
        i = bisect.bisect_right(calls, (end, "\uffff")) - 1
        name = calls[i][1] if i >= 0 else "?"
        ends[name] = ends.get(name, 0) + 1
    pairs: dict[str, list] = {}             # (device op before -> after) of each long gap: [count, µs]
    starts = [s for s, _, _ in dev]
    for end, g in long:
        i = bisect.bisect_left(starts, end)
        before = max((x for x in dev[:i]), key=lambda x: x[1], default=(0, 0, "?"))[2]
        key = f"{before[:36]} -> {dev[i][2][:36] if i < len(dev) else '?'}"
        pairs.setdefault(key, [0, 0.0])
        pairs[key][0] += 1
        pairs[key][1] += g
    launches = sum(1 for _, n in calls if n == "cudaGraphLaunch")
    return {"busy_us": busy, "span_us": span, "idle_us": span - busy, "long_gaps": len(long),
            "long_gap_us": sum(g for _, g in long), "sync": {k: (len(v), sum(v)) for k, v in sync.items()},
            "gap_ended_by": ends, "graph_launches": launches,
            "gap_pairs": dict(sorted(pairs.items(), key=lambda kv: -kv[1][1])[:6])}


def profiled_set(eng, prompts, params, clock, gap_us: float) -> dict:
    """One request set under the profiler: the set's numbers (``rule_cost.serve_set``) and its trace's."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        res = RC.serve_set(eng, prompts, params, clock)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        res.update(read_trace(f.name, gap_us))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llada-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--lookahead", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="profiled sets per rule, order reversed each round")
    ap.add_argument("--gap-us", type=float, default=50.0)
    ap.add_argument("--rules", default="low_confidence,entropy_bound 0.1,credit 0.9,logprobs 5")
    a = ap.parse_args()
    names = [n.strip() for n in a.rules.split(",") if n.strip()]
    bad = [n for n in names if n not in RC.RULES]
    if bad:
        ap.error(f"--rules: unknown {bad}; choose from {list(RC.RULES)}")
    a.paced, a.graph_decode, a.compile = None, None, None          # rule_cost.make_engine's other fields
    model = build(a.preset, a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    eng = RC.make_engine(model, a.batch, a)
    cfg, clock = model.config, RC.Clock(a.device)
    g = torch.Generator().manual_seed(a.batch)
    hi = min(cfg.vocab_size, cfg.mask_id) - 1
    prompts = [torch.randint(0, hi, (a.prompt,), generator=g).tolist() for _ in range(a.batch)]
    params = {n: dict(gen_length=a.gen, block_length=a.block, steps=a.gen, kv_cache="dual", seed=1,
                      **RC.RULES[n]) for n in names}
    for n in names:
        for _ in range(a.warmup):
            RC.serve_set(eng, prompts, params[n], clock)
    rows: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            res = profiled_set(eng, prompts, params[n], clock, a.gap_us)
            rows[n].append(res)
            print(json.dumps({"rule": n, "round": r, **res}), flush=True)   # gap_ended_by: where they end
    print(f"\ndevice {torch.cuda.get_device_name() if a.device == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, B {a.batch}, lookahead {a.lookahead}; per forward, mean of {a.rounds} "
          f"profiled sets (the profiler slows the host: compare rules, not with rule_cost's ms)")
    print("\n| rule | wall ms | device busy ms | device idle ms | gaps > "
          f"{a.gap_us:.0f} µs (ms) | host sync calls (ms) | gaps ended by |\n|---|---|---|---|---|---|---|")
    for n in names:
        xs = rows[n]

        def per_fwd(key, xs=xs):
            return sum(x[key] / x["forwards"] for x in xs) / len(xs)
        sync = {}
        for x in xs:
            for k, (c, us) in x["sync"].items():
                c0, us0 = sync.get(k, (0, 0.0))
                sync[k] = (c0 + c / x["forwards"] / len(xs), us0 + us / x["forwards"] / len(xs))
        ends = {}
        for x in xs:
            for k, c in x["gap_ended_by"].items():
                ends[k] = ends.get(k, 0) + c / x["forwards"] / len(xs)
        ends = ", ".join(f"{k} {c:.2f}" for k, c in sorted(ends.items(), key=lambda kv: -kv[1])[:3]) or "-"
        sync_s = ", ".join(f"{k} {c:.2f} ({us / 1e3:.3f})" for k, (c, us) in sorted(sync.items())) or "-"
        print(f"| {n} | {1e3 * per_fwd('s'):.3f} | {per_fwd('busy_us') / 1e3:.3f} | "
              f"{per_fwd('idle_us') / 1e3:.3f} | {per_fwd('long_gaps'):.2f} ({per_fwd('long_gap_us') / 1e3:.3f})"
              f" | {sync_s} | {ends} |")


if __name__ == "__main__":
    main()
