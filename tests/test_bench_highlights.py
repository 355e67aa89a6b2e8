"""bench/highlights.py: README's highlights rows come from the latest bench/RESULTS.md section of each bench,
each naming the path timed and the GPU."""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

RESULTS = """# Benchmark results

## Served path vs the hand-built loop: H200, 2026-11-27 (bench/serve_pace.py, issue 15)

- date: 2026-11-27 ~16:40 UTC; GPU: NVIDIA H200

| B | path | tok/s | x hand | host ms / replay |
|---|---|---|---|---|
| 1 | hand | 116.0 | 1.000 | - |
| 1 | engine-la16 | 108.4 | 0.935 | 0.20 |
| 1 | http (la16) | 105.2 | 0.908 | - |
| 32 | engine-la16 | 484.5 | 0.926 | - |
| 32 | http (la16) | 468.7 | 0.896 | - |

## Batch invariance: H100, 2026-11-28 (bench/batch_invariance.py, issue 17)

| mode | requests | differing | first diff pos |
|---|---|---|---|
| greedy-1 | 100 | 0 | - |
| sampled | 100 | **2** | 17 |

## Served path with compiled blocks: H100, 2026-11-27 (bench/serve_pace.py, issue 15)

- date: 2026-11-27 ~17:05 UTC

| B | path | tok/s | x hand | host ms / replay |
|---|---|---|---|---|
| 1 | engine-la16 | 135.1 | 0.984 | 0.25 |
| 1 | http (la16) | 129.5 | 0.943 | - |
| 32 | engine-la16 | 678.4 | 0.991 | - |
| 32 | http (la16) | 643.4 | 0.940 | - |

## Engine vs runtime: H100, 2026-11-27 (bench/engine_bench.py, issue 13)

| path | B | tok/s | s |
|---|---|---|---|
| engine | 1 | 85.3 | 3.00 |
"""


@pytest.fixture(scope="module")
def hl():
    spec = importlib.util.spec_from_file_location("highlights_under_test", BENCH / "highlights.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_rows_come_from_each_bench_latest_section(hl):
    notes = []
    rows = [r.markdown() for r in hl.highlight_rows(RESULTS, notes)]
    assert rows[:2] == [
        "| in process: 0.984x (batch 1), 0.991x (batch 32) the hand-built loop | runtime graph path (Engine, "
        "la16 run-ahead) | H100 | 2026-11-27 | `bench/serve_pace.py` |",
        "| through HTTP (openai client): 0.943x (batch 1), 0.940x (batch 32) the hand-built loop | dlc serve "
        "(runtime graph path) | H100 | 2026-11-27 | `bench/serve_pace.py` |"]        # 17:05, not 16:40
    assert "2 of 200 requests differ" in rows[2] and "| H100 | 2026-11-28 |" in rows[2]
    assert len(rows) == 3                                     # engine_bench's table lacks the runtime rows:
    assert notes and "bench/engine_bench.py" in notes[0] and "runtime" in notes[0]      # skipped, said so


def test_readme_block_is_replaced_in_place(hl):
    readme = f"intro\n{hl.BEGIN}\nold rows\n{hl.END}\nafter\n"
    new = hl.update_readme(readme, hl.render(hl.highlight_rows(RESULTS)))
    assert new.startswith(f"intro\n{hl.BEGIN}\n| result | path timed | GPU | date | source |")
    assert "old rows" not in new and new.endswith(f"{hl.END}\nafter\n")


def test_readme_highlights_match_results_md(hl):
    """README's rows are what bench/RESULTS.md gives today (run `python3 bench/highlights.py` after adding
    results)."""
    assert hl.main(["--check"]) == 0


def test_a_heading_time_orders_as_a_date_line_time(hl):
    """A heading's ``2026-11-28 22:20`` is a day and a time: a later section whose ``- date:`` line says
    23:58 of that day is the latest (compared as one string, the heading's day + time sorted after it)."""
    text = ("## Old: H200, 2026-11-28 22:20 (bench/block_cost.py)\n\n"
            "## New: H200, 2026-11-29 00:00 (bench/block_cost.py)\n\n- date: 2026-11-28 23:58-00:03 UTC\n")
    secs = hl.parse_sections(text)
    assert [(s.date, s.time) for s in secs] == [("2026-11-28", "22:20"), ("2026-11-28", "23:58")]
    assert hl.latest(secs)["block_cost"].title == "New"


def test_rule_cost_rows_name_the_engine_and_the_runtime_path(hl):
    """engine_rule_cost's section: the compiled engine's ``now`` ratios, then the runtime path's second table
    at batch 32 (rules it lacks left out), sourced from bench/rule_cost.py; the runtime path's batch 1 comes
    from the latest bench/rule_cost.py section's ``now`` column (newer than the engine's here)."""
    text = """## Rules at batch 1: H200, 2026-11-29 11:24 (bench/rule_cost.py, issue 18)

| B | rule | before: ms / forward | now: ms / forward | now: vs low-conf |
|---|---|---|---|---|
| 1 | low_confidence | 5.75 | 5.72 | - |
| 1 | threshold 0.9 | | 5.72 | +0.1% |
| 1 | credit 0.9 | 6.04 | 5.88 | **+2.9%** |

"""
    text += """## Rules: H200, 2026-11-29 05:41 (bench/engine_rule_cost.py, bench/rule_cost.py --path engine)

| B | rule | before: ms | before: vs low-conf | now: ms | now: vs low-conf |
|---|---|---|---|---|---|
| 1 | low_confidence | 5.6 | - | 5.5 | - |
| 1 | entropy_bound 0.1 | 6.2 | +9.9% | 5.8 | **+3.8%** |
| 1 | credit 0.9 | 6.4 | +12.6% | 5.8 | +4.5% |
| 1 | smoothing 0.9 | 6.3 | +12.0% | 5.9 | +7.0% |
| 1 | logprobs 5 | 6.1 | +7.8% | 5.7 | +3.2% |

| B | rule | ms / forward | vs low-conf |
|---|---|---|---|
| 1 | credit 0.9 | 5.8 | +3.1% |
| 32 | credit 0.9 | 45.6 | +0.7% |
| 32 | logprobs 5 | 45.6 | +0.9% |
"""
    rows = [r.markdown() for r in hl.highlight_rows(text)]
    assert rows[0].startswith("| decoding rules' cost a forward vs low-confidence at batch 1 (target < 3%): "
                              "entropy +3.8%, credit +4.5%, logprobs +3.2%, smoothing +7.0% | "
                              "compiled engine")
    assert rows[0].endswith("| H200 | 2026-11-29 | `bench/engine_rule_cost.py` |")
    assert ("at batch 32 (target < 3%): credit +0.7%, logprobs +0.9% | runtime graph path" in rows[1]
            and rows[1].endswith("`bench/rule_cost.py` |"))
    assert ("at batch 1 (target < 3%): threshold +0.1%, credit +2.9% | runtime graph path" in rows[2]
            and rows[2].endswith("| H200 | 2026-11-29 | `bench/rule_cost.py` |"))


MOE = """
## Engine at 8B: H200, 2026-11-27 (bench/engine_bench.py, issue 13)

| path | B | tok/s | s | ratio to runtime |
|---|---|---|---|---|
| engine | 1 | 135.1 | 1.9 | 1.033 |
| runtime | 1 | 130.7 | 2.0 | 1.000 |
| engine | 32 | 678.0 | 12.1 | 1.001 |
| runtime | 32 | 677.6 | 12.1 | 1.000 |

## MoE engines: H200, 2026-11-29 08:13 (bench/engine_bench.py --preset llada-moe-7b, bench/engine_path.py)

| engine MoE forward | B | engine tok/s | runtime tok/s (uncompiled blocks) | engine / runtime |
|---|---|---|---|---|
| stacked (before) | 1 | 198.7 | 139.5 | 1.424 |
| **fused (now)** | 1 | **251.1** | 137.4 | **1.828** |
| fused (now) | 32 | 1584.8 | 1212.8 | 1.307 |
"""


def test_a_preset_run_of_a_bench_is_its_own_entry(hl):
    """``(bench/x.py --preset P`` sections are x:P: the MoE engine run does not hide the 8B engine row."""
    rows = [r.markdown() for r in hl.highlight_rows(MOE)]
    assert len(rows) == 2
    assert "135.1 vs 130.7 tok/s" in rows[0] and "`bench/engine_bench.py` |" in rows[0]
    assert rows[1].startswith("| LLaDA-MoE-7B shape end to end")
    assert "251.1 vs 137.4 tok/s = 1.828 (batch 1)" in rows[1]
    assert "| H200 | 2026-11-29 | `bench/engine_bench.py` |" in rows[1]
