"""`dlc bench serve` runs both policies against real servers and prints the comparison."""
import json
import subprocess
import sys

import pytest

from dlc.runtime.loadgen import Workload

SPEED_UPS = ("ttft_p50", "ttft_p90", "ttft_p99", "latency_p50", "latency_p90", "latency_p99")


@pytest.mark.slow
def test_bench_serve_prints_the_comparison():
    out = subprocess.run([sys.executable, "-m", "dlc.cli", "bench", "serve", "tiny-llada", "--workload", "burst",
                          "--num-requests", "6", "--gen-lens", "8,16", "--prompt-len", "4:12", "--port", "0",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    sent = Workload("burst", 6, prompt_len=(4, 12), gen_lens=(8, 16)).requests()      # the bench's requests
    max_tokens = sum(r["gen_length"] for r in sent)                     # a request streams <= its gen_length
    for p in ("fcfs", "phase"):
        s = res[p]
        assert s["requests"] == 6 and s["errors"] == 0, s                # every request sent completed
        tokens = 6 * s["tokens_per_s"] / s["requests_per_s"]             # all tokens streamed
        assert tokens == pytest.approx(round(tokens)) and 0 < round(tokens) <= max_tokens, (p, tokens)
        assert s["ttft_p50"] <= s["ttft_p90"] <= s["ttft_p99"] <= s["latency_p99"] and s["iterations"] >= 1
    r, fcfs, phase = res["ratio_phase_vs_fcfs"], res["fcfs"], res["phase"]
    assert r["throughput"] == pytest.approx(phase["tokens_per_s"] / fcfs["tokens_per_s"])
    assert all(r[k] == pytest.approx(fcfs[k] / phase[k]) for k in SPEED_UPS), r    # > 1: phase is faster
    assert f"phase vs fcfs: throughput x{r['throughput']:.2f}; TTFT speed-up p50/p90/p99 " in out.stdout


def test_bench_serve_dlc_tiny_draws_prompts_it_accepts():
    out = subprocess.run([sys.executable, "-m", "dlc.cli", "bench", "serve", "dlc-tiny", "--workload", "burst",
                          "--num-requests", "4", "--gen-lens", "8", "--prompt-len", "4:12", "--policies", "phase",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout.strip().splitlines()[-1])["phase"]
    assert s["requests"] == 4 and s["errors"] == 0 and s["tokens_per_s"] > 0


def test_bench_serve_prints_the_first_error_of_each_kind():
    """Prompts past dlc-tiny's 256 columns: every request gets a 400, the bench says why and still reports
    (the ratio against a baseline without throughput is nan: test_loadgen.py)."""
    out = subprocess.run([sys.executable, "-m", "dlc.cli", "bench", "serve", "dlc-tiny", "--workload", "burst",
                          "--num-requests", "3", "--gen-lens", "8", "--prompt-len", "300:300", "--policies",
                          "phase"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("first error of kind HTTP 400") == 1
    assert "exceeds the maximum sequence length" in out.stdout and "errors 3" in out.stdout
    assert "Traceback" not in out.stderr
