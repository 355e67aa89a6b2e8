"""bench/gpu_bench.py on CPU: the e2e baseline's chunked float64 softmax equals the monolithic one, its chunk
fits an 80 GB card at the LLaDA-8B shape, and the script's smoke mode runs every section."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
GB80 = 80 * 10**9


def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench_under_test", BENCH / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_chunked_confidence_equals_the_monolithic_softmax():
    gb = gpu_bench()
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 7, 301, generator=g) * 4).to(torch.bfloat16)          # [B, N, V]
    x0, ref = gb.monolithic_decode(logits)
    assert ref.std() > 0.05                                                # confidences vary
    for rows in (1, 2, 5, 8):
        torch.testing.assert_close(gb.chunked_confidence(logits, x0, rows), ref, rtol=1e-12, atol=0)


def test_e2e_baseline_fits_an_80gb_card_at_b32():
    """Bytes alive at the baseline's block-start step, LLaDA-8B, bf16, prompt 512 + gen 256, B = 32: weights,
    the [B, L] K/V cache, the bf16 [B, L, V] logits, and the float64 softmax transient (chunked vs not)."""
    from dlc.models.presets import preset_config
    gb = gpu_bench()
    cfg, B, L = preset_config("llada-8b"), 32, 768
    weights = cfg.num_parameters() * 2
    kv = 2 * cfg.n_layers * B * cfg.n_kv_heads * L * cfg.head_dim * 2
    logits = B * L * cfg.vocab_size * 2
    rows = gb.softmax_rows_per_chunk(L, cfg.vocab_size, 4096 * 2**20)          # the default budget
    chunk = rows * L * cfg.vocab_size * 16
    assert rows == 2 and chunk <= 4096 * 2**20
    assert weights + kv + logits + B * L * cfg.vocab_size * 16 > GB80          # unchunked: the reported OOM
    assert weights + kv + logits + chunk < 0.6 * GB80                         # chunked: room for activations


@pytest.mark.slow
def test_gpu_bench_smoke_runs_every_section(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "gpu_bench.py"), "--smoke", "--json",
                          str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert not [n for n in res["notes"] if "FAILED" in n], res["notes"]
    assert any("float64 softmax runs 1 sequence(s) at a time" in n for n in res["notes"])
    sections = {r["section"] for r in res["rows"]}
    assert {"Serving phase vs fcfs, burst: throughput", "End-to-end tok/s (512+256, blk 32)"} <= sections


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_batch_invariance_smoke_finds_no_difference(tmp_path):
    """bench/batch_invariance.py --tiny: probes alone vs inside the mixed load, greedy and seeded sampling;
    the mixed run really mixes (batches > 1, Refresh beside Reuse rows) and writes its log."""
    bi = bench_module("batch_invariance")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # a d-64 model: threads only add contention on a busy host
    try:
        rows = bi.main(["--tiny", "--probes", "6", "--background", "6", "--modes", "greedy-4,sampled",
                        "--batch-invariant", "both", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert [(r["mode"], r["batch_invariant"]) for r in rows] == \
        [("greedy-4", True), ("sampled", True), ("greedy-4", False), ("sampled", False)]
    for r in rows:
        assert r["distinct_solo"] == 6                                  # outputs vary across prompts
        assert r["max_batch"] > 2 and r["mixed_iterations"] > 0
        assert r["differing"] == 0, r["diffs"]
        assert r["solo_tokens_per_s"] > 0
    log = json.loads((tmp_path / "batch_invariance.json").read_text())
    assert log["rows"][0]["requests"] == 6
    text = (tmp_path / "batch_invariance.log").read_text()
    assert "| greedy-4 | 6 | 0 |" in text and "cost of --batch-invariant, sampled: solo" in text


def _block_diffusion(monkeypatch, capsys, *args: str):
    """Runs bench/block_diffusion.py's main() in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location("block_diffusion_under_test", BENCH / "block_diffusion.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["block_diffusion.py", *args])
    threads = torch.get_num_threads()
    try:
        mod.main()
    finally:
        torch.set_num_threads(threads)                                  # --smoke runs on one thread
    text = capsys.readouterr().out
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")], text


def test_block_diffusion_smoke_prints_moe_layers_forwards_and_the_table(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        _block_diffusion(monkeypatch, capsys, "--help")
    assert "--time-limit" in capsys.readouterr().out
    lines, text = _block_diffusion(monkeypatch, capsys, "--smoke", "--batches", "2", "--layer-tokens", "8")
    assert {r["moe_layer"] for r in lines if "moe_layer" in r} == {"fused", "grouped", "stacked"}
    fwd = [r for r in lines if "fwd" in r]
    assert {r["path"] for r in fwd} == {"dlc", "eager"} and all(r["ms"] > 0 for r in fwd)
    row = next(r for r in lines if "dlc_tok_s" in r)
    assert row["B"] == 2 and row["tokens_equal"] and row["dlc_forwards"] == len([r for r in fwd
                                                                                 if r["path"] == "dlc"])
    assert "| B | dlc tok/s |" in text and "\n| 2 | " in text and "generate(), eager runner |" in text
    # dlc's served path (the GPU default): an Engine on the CUDA-graph runner, the same tokens
    lines, text = _block_diffusion(monkeypatch, capsys, "--smoke", "--batches", "2", "--layer-tokens", "",
                                   "--runner", "graphs")
    row = next(r for r in lines if "dlc_tok_s" in r)
    assert row["runner"] == "graphs" and row["tokens_equal"] and row["dlc_mean_forward_ms"] > 0
    assert "served Engine, CUDA graphs, run ahead |" in text
    # a time limit already spent: no forward runs, the table still closes the log
    lines, text = _block_diffusion(monkeypatch, capsys, "--smoke", "--batches", "1,2", "--layer-tokens", "",
                                   "--time-limit", "0")
    assert not [r for r in lines if "fwd" in r]
    assert [r["B"] for r in lines if "stopped" in r] == [1, 2] and "| 2 | - |" in text


def test_rule_cost_smoke_times_every_rule_on_the_graph_runner():
    """bench/rule_cost.py on CPU (tiny-llada): one row per rule and batch through the graph runner, none of
    whose Reuse steps fell back to the eager runner (issue 18), and the PASS / MISS table."""
    args = ["--preset", "tiny-llada", "--device", "cpu", "--dtype", "fp32", "--batches", "1,2",
            "--prompt", "8", "--gen", "16", "--block", "8", "--iters", "1", "--warmup", "1"]
    out = subprocess.run([sys.executable, str(BENCH / "rule_cost.py"), *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"runner"')]
    rule_cost = bench_module("rule_cost")
    assert [(r["B"], r["rule"]) for r in rows] == [(b, n) for b in (1, 2) for n in rule_cost.RULES]
    assert all(r["runner"] == "graph" and r["eager_reuse"] == 0 for r in rows)
    assert {r["target"] for r in rows} <= {"PASS", "MISS"}
    assert "| runner | B | rule |" in out.stdout


@pytest.mark.parametrize("limit,sets", [("0", 1), ("600", 3)])
def test_rule_cost_engine_path_stops_whole_iterations_at_its_time_limit(limit, sets):
    """bench/rule_cost.py --path engine --time-limit: no iteration starts that would end past the limit (a
    spent limit: one iteration), and the table still closes the log with the sets it has."""
    args = ["--path", "engine", "--preset", "tiny-llada", "--device", "cpu", "--dtype", "fp32",
            "--batches", "1", "--prompt", "8", "--gen", "16", "--block", "8", "--iters", "3", "--warmup", "1",
            "--rules", "low_confidence,threshold 0.9", "--time-limit", limit]
    out = subprocess.run([sys.executable, str(BENCH / "rule_cost.py"), *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"B"')]
    assert [(r["rule"], r["sets"]) for r in rows] == [("low_confidence", sets), ("threshold 0.9", sets)]
    assert f"medians over {sets} interleaved sets (of 3 asked" in out.stdout
    assert out.stdout.rstrip().endswith("|")


def test_engine_bench_smoke_serves_a_block_diffusion_engine_as_the_runtime_does(tmp_path, monkeypatch):
    """bench/engine_bench.py --device cpu on tiny-llada2: the compiled engine and the runtime path each serve
    the batch with LLaDA2's decoder over the exact block cache (one token a step), with the same tokens, and
    the row's ceiling is the block-diffusion floor's (no whole-sequence Refresh a block: above the dual-cache
    schedule's ceiling for the same model)."""
    out = tmp_path / "eb.json"
    args = ["--device", "cpu", "--preset", "tiny-llada2", "--prompt", "16", "--gen", "16", "--block", "8",
            "--batches", "2", "--repeats", "1", "--once", "--work", str(tmp_path / "work"), "--out", str(out)]
    run = subprocess.run([sys.executable, str(BENCH / "engine_bench.py"), *args], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["path"]: r for r in res["e2e"]}
    assert set(rows) == {"engine", "runtime"}
    for r in rows.values():
        assert r["schedule"]["decoder"] == "llada2" and r["schedule"]["kv_cache"] == "block"
        assert r["tokens"] == 2 * 16
    assert rows["engine"]["first_tokens"] == rows["runtime"]["first_tokens"]
    assert len(set(rows["engine"]["first_tokens"])) > 1                   # a decisive model: tokens vary
    monkeypatch.syspath_prepend(str(BENCH))
    import floors
    from dlc.models.presets import preset_config
    cfg = preset_config("tiny-llada2")
    dual = 2 * 16 / floors.e2e_floor_s(cfg, 2, 16, 16, 8, 8, res["copy_bw"], res["matmul_rate"])
    assert rows["engine"]["ceiling_tok_s"] > dual
    assert "| engine | 2 |" in run.stdout and "| runtime | 2 |" in run.stdout
