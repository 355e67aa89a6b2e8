"""`dlc bench serve` runs both policies against real servers and prints the comparison."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_serve_prints_the_comparison():
    out = subprocess.run([sys.executable, "-m", "dlc.cli", "bench", "serve", "tiny-llada", "--workload", "burst",
                          "--num-requests", "6", "--gen-lens", "8,16", "--prompt-len", "4:12", "--port", "0",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "phase vs fcfs: throughput x" in out.stdout
    res = json.loads(out.stdout.strip().splitlines()[-1])
    for p in ("fcfs", "phase"):
        assert res[p]["requests"] == 6 and res[p]["errors"] == 0 and res[p]["tokens_per_s"] > 0
    assert res["ratio_phase_vs_fcfs"]["throughput"] > 0
