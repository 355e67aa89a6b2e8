"""`dlc bench serve` end to end on dlc-tiny: the in-process engine driver and real `dlc serve` processes
(HTTP). The method itself (warm-up, capacity, rotation, spreads, targets) is tested with a scripted driver in
tests/runtime/test_benchmark_method.py."""
import json
import subprocess
import sys

import pytest

from dlc.runtime.loadgen import Workload

POLICIES = ("fcfs", "fcfs-continuous", "phase")


def bench(tmp_path, *args, timeout=600):
    out = subprocess.run([sys.executable, "-m", "dlc.cli", "bench", "serve", "dlc-tiny", "--json",
                          str(tmp_path / "res.json"), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, json.loads((tmp_path / "res.json").read_text())


def check_result(stdout, res, workloads, n, prompt_len, gen_lens):
    sent = Workload("burst", n, prompt_len=prompt_len, gen_lens=gen_lens).requests()     # the bench's mix
    # a request streams <= its gen_length
    max_tokens = sum(r["gen_length"] for r in sent)
    assert list(res["results"]) == list(workloads)
    for w in workloads:
        for p in POLICIES:
            # every request of every run completed
            for s in res["runs"][w][p]:
                assert s["requests"] == n and s["errors"] == 0, (w, p, s)
                tokens = n * s["tokens_per_s"] / s["requests_per_s"]
                assert 0 < round(tokens) <= max_tokens and tokens == pytest.approx(round(tokens), rel=1e-6)
                assert s["ttft_p50"] <= s["ttft_p99"] <= s["latency_p99"] and s["iterations"] >= 1
            assert len(res["runs"][w][p]) == 3
            m = res["results"][w][p]["tokens_per_s"]
            assert m["min"] <= m["median"] <= m["max"]
    cap = res["capacity"]["requests_per_s"]
    assert cap == max(res["capacity"]["measured"].values()) > 0
    if "poisson-80" in workloads:
        assert res["workloads"]["poisson-80"]["rate"] == pytest.approx(0.8 * cap)
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("| phase vs fcfs, burst: throughput |")                # the table is last
    assert len(res["targets"]) == 1 + 2 * ("poisson-80" in workloads)
    for t in res["targets"]:
        op, bound = t["target"].split()                                   # e.g. ">= 1.8x"
        met = t["ratio"] >= float(bound[:-1]) if op == ">=" else t["ratio"] <= float(bound[:-1])
        assert t["status"] == ("PASS" if met else "MISS"), t
        assert f"| {t['name']} | {t['ratio']:.2f}x |" in stdout
    lo, hi = prompt_len
    assert f"prompt {lo}-{hi} tokens (uniform), generation {'/'.join(map(str, gen_lens))} tokens" in stdout
    order = [ln.split()[2:4] for ln in lines if ln.startswith("  round ")]         # "round R workload policy"
    first = [p for r in range(3) for (w, p) in order[r * len(workloads) * 3:][:3]]
    assert first == [*POLICIES, *POLICIES[1:], POLICIES[0], POLICIES[2], *POLICIES[:2]]    # rotated per round


def test_bench_serve_engine_driver(tmp_path):
    """Every policy in one in-process engine: warmed, capacity measured, 3 rounds in rotated order, the
    table last; no graph capture or compile during timed rounds (none on CPU, and the count says so)."""
    workloads = ("burst", "poisson-80")
    stdout, res = bench(tmp_path, "--driver", "engine", "--workloads", ",".join(workloads), "--num-requests",
                        "4", "--gen-lens", "8,16", "--prompt-len", "4:12", "--warmup", "burst")
    check_result(stdout, res, workloads, 4, (4, 12), (8, 16))
    assert res["driver"] == "engine" and res["timed_compiles"] == {"graph_captures": 0, "dynamo_graphs": 0}
    assert "graph captures / Dynamo compiles during timed rounds: 0 / 0" in stdout


@pytest.mark.slow
def test_bench_serve_http_every_workload(tmp_path):
    """Real `dlc serve` processes, one per policy, through every workload."""
    workloads = ("burst", "poisson-50", "poisson-80", "poisson-95", "osc")
    stdout, res = bench(tmp_path, "--num-requests", "4", "--gen-lens", "8,16", "--prompt-len", "4:12",
                        "--period", "0.5")
    check_result(stdout, res, workloads, 4, (4, 12), (8, 16))
    assert res["driver"] == "http" and res["timed_compiles"] is None
    assert "not visible through this driver" in stdout


def test_bench_serve_prints_the_first_error_of_each_kind(tmp_path):
    """Prompts past dlc-tiny's 256 columns: every request gets a 400; the bench says why and stops at the
    capacity step with one line, no traceback."""
    out = subprocess.run([sys.executable, "-m", "dlc.cli", "bench", "serve", "dlc-tiny", "--num-requests",
                          "3", "--gen-lens", "8", "--prompt-len", "300:300", "--policies", "phase",
                          "--rounds", "1", "--max-seq-len", "256"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "first error of kind HTTP 400" in out.stdout and \
        "exceeds the maximum sequence length" in out.stdout
    assert "no request of the burst completed under any policy" in out.stderr and \
        "Traceback" not in out.stderr
