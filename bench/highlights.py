"""Regenerate README's highlights rows from the latest bench/RESULTS.md entries (issue 13, item 9).

RESULTS.md is a log: one ``## <what>: <GPU>, <date> (bench/<script>.py, ...)`` section per run (the oldest,
gpu_bench's, names its date in a ``- date:`` line), newer runs of a script added as new sections. For every
bench script this takes its latest section (by the date and ``HH:MM`` of its heading or ``- date:`` line; on a
tie, the later section in the file), reads the section's first table and turns the figures a reader needs
into rows, each saying which path was timed (compiled engine, runtime graph path, hand-built loop, ...) and on
which GPU. ``EXTRACTORS`` (script -> function) is the one place that knows each table's columns; a section
whose table lacks a row an extractor needs is reported and skipped, never guessed.

README holds the rows between ``<!-- highlights:begin -->`` and ``<!-- highlights:end -->``:

    python3 bench/highlights.py            # rewrite README.md's rows from bench/RESULTS.md
    python3 bench/highlights.py --check    # exit 1 when README's rows are not what RESULTS.md gives
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- highlights:begin -->", "<!-- highlights:end -->"
HEAD = "| result | path timed | GPU | date | source |\n|---|---|---|---|---|\n"


@dataclass
class Section:
    title: str
    script: str                     # "gpu_bench" for "(bench/gpu_bench.py, ...)"
    gpu: str
    date: str                       # "2026-11-27"
    time: str                       # "17:05" or "" when the section gives none
    order: int                      # position in the file
    tables: list[list[dict]] = field(default_factory=list)   # each: rows as {lower-cased header: cell}


@dataclass
class Row:
    result: str
    path: str
    section: Section
    script: str = ""                # a script the section also ran, where the row comes from it

    def markdown(self) -> str:
        s = self.section
        script = self.script or s.script.split(":")[0]
        return f"| {self.result} | {self.path} | {s.gpu} | {s.date} | `bench/{script}.py` |"


# ------------------------------------------------------------------------------------------------ parsing
def parse_table(lines: list[str]) -> list[dict]:
    """A markdown table (header, separator, rows) -> rows keyed by the lower-cased header cells (a repeated
    header keeps its first column); ``**`` emphasis dropped."""
    def cells(line):
        return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]

    def row(line):
        d = {}
        for k, v in zip(head, cells(line)):
            d.setdefault(k, v)
        return d
    head = [c.lower() for c in cells(lines[0])]
    return [row(line) for line in lines[2:]]


def parse_sections(text: str) -> list[Section]:
    out, cur, table = [], None, []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table and cur is not None and len(table) > 2:
            cur.tables.append(parse_table(table))
        table = []
        if line.startswith("## "):
            cur = new_section(line[3:], len(out))
            if cur is not None:
                out.append(cur)
        elif line.startswith("- date:") and cur is not None:
            m = re.search(r"(\d{4}-\d{2}-\d{2})(?:\D{1,3}(\d{1,2}:\d{2}))?", line)
            if m:
                cur.date, cur.time = m.group(1), m.group(2) or cur.time
    return out


def new_section(heading: str, order: int) -> Section | None:
    """``What: GPU, 2026-11-27 (bench/x.py, issue 13)`` or ``What: GPU (bench/x.py)``; None without a
    bench script. ``(bench/x.py --preset P, ...)``: a run of x on another model, its own entry ``x:P``."""
    m = re.search(r"\(bench/(\w+)\.py(?: --preset ([\w.-]+))?", heading)
    if not m:
        return None
    head = heading[:m.start()].strip()
    title, _, rest = head.partition(":")
    gpu, _, date = rest.rpartition(",") if re.search(r",\s*\d{4}-", rest) else (rest, "", "")
    d = re.match(r"(\d{4}-\d{2}-\d{2})\s+(\d{1,2}:\d{2})", date.strip())      # "2026-11-28 22:20": split
    day, time = (d.group(1), d.group(2)) if d else (date.strip(), "")
    script = m.group(1) + (f":{m.group(2)}" if m.group(2) else "")
    return Section(title.strip(), script, gpu.strip() or "-", day, time, order)


def latest(sections: list[Section]) -> dict[str, Section]:
    best: dict[str, Section] = {}
    for s in sections:
        key = (s.date, s.time.zfill(5), s.order)
        b = best.get(s.script)
        if b is None or key >= (b.date, b.time.zfill(5), b.order):
            best[s.script] = s
    return best


# ------------------------------------------------------------------------------------------------ extractors
def find(table: list[dict], **match) -> dict:
    """The one row whose columns start with the given values (KeyError naming them otherwise)."""
    for r in table:
        if all(str(r.get(k, "")).startswith(v) for k, v in match.items()):
            return r
    raise KeyError(f"no row with {match}")


def gpu_bench(s: Section) -> list[tuple[str, str]]:
    t = s.tables[0]
    reuse = find(t, section="Reuse step via dlc.runtime GraphRunner", case="B=1")
    refresh = find(t, section="Refresh step", case="B=1")
    e1 = find(t, section="End-to-end via dlc.runtime Engine", case="B=1")
    e32 = find(t, section="End-to-end via dlc.runtime Engine", case="B=32")
    hand1 = find(t, section="End-to-end tok/s", case="B=1")
    hand32 = find(t, section="End-to-end tok/s", case="B=32")
    memo = [find(t, section="Logit transient", case=f"B={b}") for b in (1, 64)]
    return [
        (f"Reuse step, batch 1: {reuse['optimized']} (eager {reuse['eager / baseline']}; floor "
         f"{reuse['floor / budget']})", "runtime graph path (GraphRunner)"),
        (f"Refresh step, batch 1: {refresh['optimized']} (eager {refresh['eager / baseline']}; floor "
         f"{refresh['floor / budget']})", "hand-built loop (gpu_bench, compiled, one CUDA graph)"),
        (f"end to end vs an eager Fast-dLLM dual-cache loop: {e1['ratio']} (batch 1), {e32['ratio']} "
         f"(batch 32)", "runtime graph path (Engine + GraphRunner)"),
        (f"end to end vs the same eager loop: {hand1['ratio']} (batch 1), {hand32['ratio']} (batch 32)",
         "hand-built loop (gpu_bench FastDual)"),
        (f"logit transient of decoding every row: {memo[0]['optimized']} / {memo[1]['optimized']} vs "
         f"{memo[0]['eager / baseline']} / {memo[1]['eager / baseline']} monolithic (batch 1 / 64)",
         "fused logits kernel (dlc.kernels)"),
    ]


def engine_bench(s: Section) -> list[tuple[str, str]]:
    t = s.tables[0]
    parts = []
    for b in ("1", "32"):
        e, r = find(t, path="engine", b=b), find(t, path="runtime", b=b)
        ratio = e.get("engine / runtime") or e.get("ratio engine/runtime")
        parts.append(f"{e['tok/s']} vs {r['tok/s']} tok/s = {ratio} (batch {b})")
    return [("end to end, engine vs runtime graph path: " + ", ".join(parts),
             "compiled engine (export programs compiled by Inductor at load, Reuse in CUDA graphs)")]


def serve_pace(s: Section) -> list[tuple[str, str]]:
    t = s.tables[0]
    runs = sorted({r["path"] for r in t if r["path"].startswith("engine-la") and r["path"] != "engine-la1"})
    la = runs[-1] if runs else "engine-la1"
    eng = [find(t, b=b, path=la) for b in ("1", "32")]
    http = [find(t, b=b, path="http") for b in ("1", "32")]
    return [(f"in process: {eng[0]['x hand']}x (batch 1), {eng[1]['x hand']}x (batch 32) the hand-built loop",
             f"runtime graph path (Engine, {la[7:]} run-ahead)"),
            (f"through HTTP (openai client): {http[0]['x hand']}x (batch 1), {http[1]['x hand']}x (batch 32) "
             f"the hand-built loop", "dlc serve (runtime graph path)")]


def tp_bench(s: Section) -> list[tuple[str, str]]:
    # the first column is "metric" or "metric (<what ran>)"
    t = [{("metric" if k.startswith("metric") else k): v for k, v in r.items()} for r in s.tables[0]]
    step, e2e = find(t, metric="Reuse step, B=1"), find(t, metric="e2e tok/s, B=32")
    head = next(iter(s.tables[0][0])).lower()
    path = ("CUDA graphs and compiled blocks per rank, tensor parallel (fused shard decode)"
            if "compiled on both" in head else "CUDA graphs per rank, tensor parallel (no compiled blocks)"
            if "cuda graphs" in head else "eager runner, tensor parallel (no CUDA graphs)")
    if "copy engines" in head:
        path += ", copy-engine all-reduce (--tp-all-reduce auto)"
    served = next((r for r in t if r["metric"].startswith("served tok/s, B=32")), None)
    also = f", served by the Engine {served['ratio']}" if served else ""
    return [(f"TP=2 vs one GPU: Reuse step {step['ratio']} the time (batch 1), e2e {e2e['ratio']} the "
             f"throughput (batch 32){also}", path)]


def serve_bench(s: Section) -> list[tuple[str, str]]:
    """The targets table's ratios the section measured (a run may time only some workloads)."""
    t = s.tables[1] if len(s.tables) > 1 else s.tables[0]
    wanted = (("phase vs fcfs-continuous, poisson-80: TTFT p99", "TTFT p99 {} continuous FCFS's (Poisson at "
               "80%)"), ("phase vs fcfs, burst: throughput", "burst throughput {} static FCFS's"))
    parts = [text.format(r["ratio (medians)"]) for target, text in wanted
             for r in t if r.get("target", "").startswith(target)]
    if not parts:
        raise KeyError(f"no row with a target of {[w for w, _ in wanted]}")
    return [("phase-multiplexed scheduler: " + ", ".join(parts), "runtime graph path (Engine)")]


def batch_invariance(s: Section) -> list[tuple[str, str]]:
    """Rows with the mode on and rows without it are reported apart; when both have a greedy-1 row with solo
    tokens/s, the mode's cost is their ratio."""
    t = s.tables[0]
    on = [r for r in t if r.get("batch-invariant") == "on"]
    off = [r for r in t if r.get("batch-invariant") != "on"]
    out = []
    if on:
        n, diff = sum(int(r["requests"]) for r in on), sum(int(r["differing"]) for r in on)
        cost = ""
        solo = [next((r.get("solo tok/s") for r in rs if r["mode"] == "greedy-1"), None) for rs in (on, off)]
        if all(solo):
            cost = f"; solo {solo[0]} vs {solo[1]} tok/s without the mode (greedy-1)"
        out.append((f"batch invariance with --batch-invariant: {diff} of {n} requests differ solo vs under a "
                    f"mixed load ({', '.join(r['mode'] for r in on)}){cost}",
                    "serving Engine (CUDA graphs, compile off)"))
    if off and not on:
        n, diff = sum(int(r["requests"]) for r in off), sum(int(r["differing"]) for r in off)
        modes = ", ".join(f"{r['runner']} {r['mode']}" if "runner" in r else r["mode"] for r in off)
        out.append((f"batch invariance: {diff} of {n} requests differ solo vs under a mixed load ({modes})",
                    "serving Engine (default GPU runner: CUDA graphs + compiled blocks; eager where named)"))
    return out


def head_sparse(s: Section) -> list[tuple[str, str]]:
    t = s.tables[0]
    parts = []
    for b, cached in (("1", "4096"), ("32", "4096")):
        r = find(t, b=b, **{"s cached": cached}, attention="head-sparse r=0.25")
        parts.append(f"{r['dense/sparse step']} (batch {b})")
    return [("head-sparse Reuse step (retention 0.25, 4096 cached tokens) vs dense: " + ", ".join(parts),
             "runtime graph path (GraphRunner, kept-column pool attention)")]


def block_diffusion(s: Section) -> list[tuple[str, str]]:
    parts = []
    for b in ("1", "32"):
        r = find(s.tables[0], b=b)
        if r["dlc tok/s"] != "-":
            parts.append(f"dlc {r['dlc tok/s']} vs plain eager loop {r['eager tok/s']} tok/s "
                         f"({r['dlc / eager']}) (batch {b})")
    path = s.tables[0][0].get("dlc path", "generate(), eager runner")
    served = "runtime graph path (Engine + GraphRunner, lookahead 16) with the exact block cache"
    what = {"served Engine, CUDA graphs, run ahead": served}.get(path, "runtime eager path with the exact "
                                                                       "block cache")
    return [("LLaDA2-mini shape: " + ", ".join(parts), what)]


def block_cost(s: Section) -> list[tuple[str, str]]:
    t = s.tables[0]
    parts = [f"{find(t, b=b, variant='graphs la16')['vs eager']} (batch {b})" for b in ("1", "8")]
    rows = [("block diffusion (SDAR-8B shape) served, graphs + run ahead vs the eager runner: "
             + ", ".join(parts), "runtime graph path (Engine + GraphRunner, lookahead 16)")]
    firsts = [t for t in s.tables if any(r.get("variant") == "la16 first eager" for r in t)]
    if firsts:                                  # the table with the most tokens a forward
        t = max(firsts, key=lambda t: float(find(t, b="1", variant="graphs la16")["tokens / forward"]))
        ms = [(b, float(find(t, b=b, variant="la16 first eager")["ms / forward"]),
               float(find(t, b=b, variant="graphs la16")["ms / forward"])) for b in ("1", "8")]
        tpf = find(t, b="1", variant="graphs la16")["tokens / forward"]
        rows.append((f"block diffusion at {tpf} tokens a forward: blocks' first steps replayed vs eager: "
                     + ", ".join(f"{a / g:.2f}x (batch {b})" for b, a, g in ms),
                     "runtime graph path (Engine + GraphRunner, lookahead 16)"))
    return rows


def engine_rule_cost(s: Section) -> list[tuple]:
    """The rules' served cost per forward vs low-confidence (issue 18's target < 3%): through the compiled
    engine (first table's ``now`` columns) and, where the section has it, on the runtime path (a second
    table with batch 1 and 32 rows, from bench/rule_cost.py)."""
    rules = ("entropy_bound", "credit", "logprobs", "smoothing")
    t = s.tables[0]
    parts = [f"{r.split('_')[0]} {find(t, b='1', rule=r)['now: vs low-conf']}" for r in rules]
    rows = [("decoding rules' cost a forward vs low-confidence at batch 1 (target < 3%): " + ", ".join(parts),
             "compiled engine (export, Inductor at load, CUDA graphs, lookahead 16)")]
    runtime = [t for t in s.tables[1:] if any(r.get("b") == "32" for r in t)]
    if runtime:                     # batch 32 only: batch 1 on the runtime path is ``rule_cost``'s row
        t = runtime[0]
        part = ", ".join(f"{r.split('_')[0]} {find(t, b='32', rule=r)['vs low-conf']}" for r in rules
                         if any(x.get("rule", "").startswith(r) and x.get("b") == "32" for x in t))
        rows.append(("decoding rules' cost a forward vs low-confidence at batch 32 (target < 3%): " + part,
                     "runtime graph path (Engine + GraphRunner, compiled blocks, lookahead 16)", "rule_cost"))
    return rows


def rule_cost(s: Section) -> list[tuple]:
    """The rules' served cost per forward vs low-confidence at batch 1 on the runtime path (issue 18's target
    < 3%): the section's table with ``now: vs low-conf`` per rule (bench/rule_cost.py --path engine)."""
    t = next((t for t in s.tables if any("now: vs low-conf" in r for r in t)), None)
    if t is None:
        raise KeyError("now: vs low-conf")
    parts = [f"{r['rule'].split()[0].split('_')[0]} {r['now: vs low-conf']}" for r in t
             if r.get("b") == "1" and r["rule"] != "low_confidence"]
    return [("decoding rules' cost a forward vs low-confidence at batch 1 (target < 3%): " + ", ".join(parts),
             "runtime graph path (Engine + GraphRunner, compiled blocks, lookahead 16)")]


def moe_engine_bench(s: Section) -> list[tuple]:
    """LLaDA-MoE-7B: the engine with the grouped-GEMM MoE vs the runtime path (first table; its runtime
    column says whether the runtime's blocks were compiled), and the runtime's compiled blocks over the packed
    experts vs uncompiled (a table with a ``runtime blocks`` column, bench/engine_path.py, where the section
    has one)."""
    t = s.tables[0]
    runtime = next((c for c in t[0] if c.startswith("runtime tok/s (")), None)
    if runtime is None:
        raise KeyError("runtime tok/s (...)")
    blocks = runtime[len("runtime tok/s ("):-1]
    parts = []
    for b in ("1", "32"):
        r = find(t, **{"engine moe forward": "fused", "b": b})
        parts.append(f"{r['engine tok/s']} vs {r[runtime]} tok/s = {r['engine / runtime']} (batch {b})")
    rows = [(f"LLaDA-MoE-7B shape end to end, engine vs runtime graph path ({blocks}): " + ", ".join(parts),
             "compiled engine (export, grouped-GEMM MoE, Inductor at load, CUDA graphs)")]
    t2 = next((t for t in s.tables[1:] if any("runtime blocks" in r for r in t)), None)
    if t2 is not None:
        now = find(t2, **{"runtime blocks": "compiled, packed"})
        before = find(t2, **{"runtime blocks": "uncompiled"})
        rows.append((f"LLaDA-MoE-7B shape, compiled blocks over the packed experts vs uncompiled: "
                     f"{now['b = 1 tok/s']} vs {before['b = 1 tok/s']} (batch 1), {now['b = 32 tok/s']} vs "
                     f"{before['b = 32 tok/s']} tok/s (batch 32)",
                     "runtime graph path (Engine + GraphRunner)", "engine_path"))
    return rows


EXTRACTORS = {"gpu_bench": gpu_bench, "engine_bench": engine_bench, "serve_pace": serve_pace,
              "tp_bench": tp_bench, "serve_bench": serve_bench, "batch_invariance": batch_invariance,
              "head_sparse": head_sparse, "block_diffusion": block_diffusion, "block_cost": block_cost,
              "engine_rule_cost": engine_rule_cost, "rule_cost": rule_cost,
              "engine_bench:llada-moe-7b": moe_engine_bench}


def highlight_rows(text: str, notes: list[str] | None = None) -> list[Row]:
    """Rows of every script with an extractor, from its latest section, in EXTRACTORS order."""
    best, rows = latest(parse_sections(text)), []
    for script, fn in EXTRACTORS.items():
        s = best.get(script)
        if s is None:
            continue
        try:
            rows += [Row(*r[:2], s, *r[2:]) for r in fn(s)] if s.tables else []
        except (KeyError, IndexError, ValueError) as e:
            if notes is not None:
                notes.append(f"bench/{script}.py ({s.title}, {s.date}): skipped: {e}")
    return rows


def render(rows: list[Row]) -> str:
    return HEAD + "\n".join(r.markdown() for r in rows) + "\n"


def update_readme(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README has no {BEGIN} ... {END} block")
    a, b = readme.index(BEGIN) + len(BEGIN), readme.index(END)
    return readme[:a] + "\n" + block + readme[b:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="regenerate README's highlights rows from bench/RESULTS.md")
    p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--check", action="store_true", help="exit 1 when README is out of date; write nothing")
    a = p.parse_args(argv)
    notes: list[str] = []
    block = render(highlight_rows(Path(a.results).read_text(), notes))
    for n in notes:
        print(n, file=sys.stderr)
    readme = Path(a.readme).read_text()
    new = update_readme(readme, block)
    if a.check:
        if new != readme:
            print(f"{a.readme}: highlights out of date; run python3 bench/highlights.py", file=sys.stderr)
            return 1
        return 0
    Path(a.readme).write_text(new)
    print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
