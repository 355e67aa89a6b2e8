"""bench/tp_bench.py on CPU (gloo, graph runners uncaptured): the script the lead runs on 2 GPUs completes,
its fp32 TP=2 tokens equal TP=1's, the TP side replayed its graphs, and the table carries the issue's targets.
(Its agreement step, ``dlc generate --tp 2``, is left out here: test_tensor_parallel.py runs that command.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tp_bench.py"


@pytest.mark.slow                      # ~25 s: a checkpoint, a TP group of 2 processes, generate and serve
def test_tp_bench_cpu_smoke(tmp_path):
    out = tmp_path / "tp.json"
    r = subprocess.run([sys.executable, "-P", str(BENCH), "--preset", "tiny-llada", "--device", "cpu",
                        "--dtype", "fp32", "--batch", "3", "--prompt", "16", "--gen", "16", "--block", "8",
                        "--rounds", "1", "--reps", "2", "--agree-preset", "none",
                        "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["identical_sequences"] == "3/3"
    assert res["tp_graph_stats"]["replays"] > 0 and res["tp_graph_stats"]["eager_reuse"] == 0
    assert res["tp1"]["reuse_b1_ms"] > 0 and res["tp2"]["tokens_per_s"] > 0
    assert "<= 0.6x" in r.stdout and ">= 1.7x" in r.stdout
    # the served side (Engine, steps run ahead): the same T = 0 tokens as generate on both sides
    assert res["served_identical_to_generate"] == "3/3 (TP=1), 3/3 (TP=2)"
    assert res["tp1"]["served_tokens_per_s"] > 0 and res["served_ratio"] > 0
    assert "served tok/s, B=3 (Engine, run ahead)" in r.stdout
