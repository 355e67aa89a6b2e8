"""The serving benchmark's method (dlc.runtime.benchmark.run_suite) with a scripted driver: warm-up before any
timed run, capacity measured first and setting the load rates, policies' order rotated per round, medians and
spreads, the target ratios' PASS/MISS, compiles during timed rounds. (The real drivers:
tests/server/test_bench.py.)"""
import statistics

import pytest

from dlc.runtime.benchmark import WORKLOADS, run_suite, table
from dlc.runtime.loadgen import Workload

POLICIES = ["fcfs", "fcfs-continuous", "phase"]
REQ_S = {"fcfs": 5.0, "fcfs-continuous": 8.0, "phase": 10.0}           # saturated (burst) requests/s
TTFT_P99 = {"fcfs": 4.0, "fcfs-continuous": 3.0, "phase": 1.0}


class ScriptedDriver:
    name = "scripted"

    def __init__(self, burst_fcfs_tok_s=40.0, captures_in_rounds=0):
        self.calls, self.prepared, self.closed = [], None, False
        self.burst_fcfs, self.extra_captures, self.captures = burst_fcfs_tok_s, captures_in_rounds, 3

    def prepare(self, policies):
        self.prepared = list(policies)

    def run(self, policy, reqs):
        burst = all(r["t"] == 0 for r in reqs)
        jitter = 1 + 0.1 * (len(self.calls) % 3)                          # rounds differ
        self.calls.append((policy, "burst" if burst else f"{len(reqs) / reqs[-1]['t']:.1f}"))
        if self.calls and len(self.calls) > 30:
            self.captures += self.extra_captures
        tok = ((self.burst_fcfs if policy == "fcfs" else 100.0) if burst
               else {"phase": 100.0}.get(policy, 90.0))
        return {"tokens_per_s": tok * jitter, "requests_per_s": REQ_S[policy] * jitter if burst else 1.0,
                "ttft_p50": 0.5, "ttft_p99": TTFT_P99[policy] * jitter, "latency_p50": 1.0,
                "latency_p99": 2.0 * jitter, "errors": 0, "iterations": 10}

    def counters(self):
        return {"graph_captures": self.captures, "dynamo_graphs": 7}

    def close(self):
        self.closed = True


def base():
    return Workload("burst", num_requests=400, rate=1.0, prompt_len=(4, 8), gen_lens=(8, 16), block_length=8)


def test_warmup_capacity_rotation_and_spreads():
    d = ScriptedDriver()
    res = run_suite(d, base(), POLICIES, WORKLOADS, rounds=3, log=lambda *_: None)
    assert d.prepared == POLICIES and d.closed
    n = len(POLICIES)
    assert d.calls[:n] == [(p, "burst") for p in POLICIES]                       # warm-up first, untimed
    cap_calls = d.calls[n:4 * n]
    assert cap_calls == [(p, "burst") for r in range(3) for p in POLICIES[r:] + POLICIES[:r]]
    assert res["capacity"]["source"] == "phase"
    assert res["capacity"]["requests_per_s"] == pytest.approx(statistics.median(
        REQ_S["phase"] * (1 + 0.1 * (i % 3)) for i, c in enumerate(d.calls[:4 * n]) if c == ("phase", "burst")
        and i >= n))
    cap = res["capacity"]["requests_per_s"]
    rates = {w: res["workloads"][w]["rate"] for w in ("poisson-50", "poisson-80", "poisson-95", "osc")}
    assert rates == pytest.approx({"poisson-50": 0.5 * cap, "poisson-80": 0.8 * cap, "poisson-95": 0.95 * cap,
                                   "osc": 0.8 * cap})
    warm_loads = d.calls[4 * n:8 * n]                                  # every load workload once per policy
    assert sorted(warm_loads) == sorted(set(warm_loads)) and len(warm_loads) == 4 * n
    timed = d.calls[8 * n:]
    assert len(timed) == 3 * len(WORKLOADS) * n
    for r in range(3):
        first = timed[r * len(WORKLOADS) * n:(r * len(WORKLOADS) + 1) * n]
        assert [p for p, _ in first] == POLICIES[r:] + POLICIES[:r]               # rotated per round
    assert res["order"] == [POLICIES[r:] + POLICIES[:r] for r in range(3)]
    for w in WORKLOADS:
        for p in POLICIES:
            runs = res["runs"][w][p]
            assert len(runs) == 3
            for m in ("tokens_per_s", "ttft_p99"):
                vals = [r[m] for r in runs]
                assert res["results"][w][p][m] == {"median": statistics.median(vals), "min": min(vals),
                                                   "max": max(vals)}
            assert res["results"][w][p]["ttft_p99"]["min"] < res["results"][w][p]["ttft_p99"]["max"]
    assert res["timed_compiles"] == {"graph_captures": 0, "dynamo_graphs": 0}


def test_target_ratios_pass_and_miss():
    res = run_suite(ScriptedDriver(burst_fcfs_tok_s=60.0), base(), POLICIES, WORKLOADS, rounds=3,
                    log=lambda *_: None)
    t = {x["name"]: x for x in res["targets"]}
    ttft = t["phase vs fcfs-continuous, poisson-80: TTFT p99"]
    assert ttft["status"] == "PASS" and ttft["ratio"] == pytest.approx(
        res["results"]["poisson-80"]["phase"]["ttft_p99"]["median"]
        / res["results"]["poisson-80"]["fcfs-continuous"]["ttft_p99"]["median"]) and ttft["ratio"] < 0.5
    assert t["phase vs fcfs-continuous, poisson-80: throughput"]["status"] == "PASS"
    burst = t["phase vs fcfs, burst: throughput"]
    assert burst["status"] == "MISS" and burst["ratio"] == pytest.approx(100 / 60)
    assert burst["miss_by"] == pytest.approx((1.8 - 100 / 60) / 1.8)
    assert burst["min"] <= burst["ratio"] <= burst["max"]
    text = table(res)
    assert text.splitlines()[-1].startswith("| phase vs fcfs, burst: throughput | 1.67x |")
    assert text.splitlines()[-1].endswith("| >= 1.8x | MISS by 7% |")
    assert "prompt 4-8 tokens (uniform), generation 8/16 tokens" in text
    assert res["capacity"]["requests_per_s"] > 0
    ok = run_suite(ScriptedDriver(burst_fcfs_tok_s=50.0), base(), POLICIES, ["burst"], rounds=3,
                   log=lambda *_: None)
    assert [x["status"] for x in ok["targets"]] == ["PASS"]                   # 2.0x >= 1.8x


def test_compiles_during_timed_rounds_are_reported():
    res = run_suite(ScriptedDriver(captures_in_rounds=1), base(), POLICIES, ["burst", "poisson-80"], rounds=3,
                    log=lambda *_: None)
    assert res["timed_compiles"]["graph_captures"] > 0
    assert "NOT warm" in table(res)


def test_bad_suites_fail_before_any_work():
    d = ScriptedDriver()
    with pytest.raises(ValueError, match="workload 'wave'"):
        run_suite(d, base(), POLICIES, ["burst", "wave"])
    with pytest.raises(ValueError, match="rounds"):
        run_suite(d, base(), POLICIES, rounds=0)
    with pytest.raises(ValueError, match="osc_load and capacity"):
        run_suite(d, base(), POLICIES, capacity=0.0)
    assert d.calls == [] and d.prepared is None
