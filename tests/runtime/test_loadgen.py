"""Workload generator of the serving benchmark: seeded, the three arrival patterns, validated."""
import pytest

from dlc.runtime.loadgen import Workload, percentile, ratios


def test_patterns():
    p = Workload("poisson", num_requests=400, rate=10.0, seed=3)
    t = p.arrivals()
    assert t == sorted(t) and len(t) == 400 and t == Workload("poisson", 400, 10.0, seed=3).arrivals()
    assert 30 < t[-1] < 50                                      # ~ 400 / 10 s
    assert Workload("burst", num_requests=7).arrivals() == [0.0] * 7
    osc = Workload("osc", num_requests=2000, rate=10.0, period=4.0, amplitude=1.0, seed=1).arrivals()
    phase = [(x % 4.0) for x in osc]
    high = sum(1 for x in phase if x < 2.0)                    # sin > 0 in the first half period
    assert high > 3 * (len(osc) - high)


def test_requests_follow_the_distributions():
    w = Workload("burst", num_requests=200, prompt_len=(5, 9), gen_lens=(16, 32), block_length=8)
    reqs = w.requests()
    assert {len(r["prompt"]) for r in reqs} <= set(range(5, 10)) and {r["gen_length"] for r in reqs} == {16, 32}
    assert all(r["steps"] == r["gen_length"] // 2 and all(32 <= t <= 126 for t in r["prompt"]) for r in reqs)


@pytest.mark.parametrize("kw,needle", [({"pattern": "wave"}, "pattern"), ({"rate": 0}, "rate"),
                                       ({"amplitude": 2}, "amplitude"), ({"prompt_len": (9, 2)}, "prompt_len"),
                                       ({"gen_lens": (12,)}, "multiples")])
def test_bad_workloads(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Workload(**kw)


def test_percentiles_and_ratios():
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2], 100) == 2
    base = {"tokens_per_s": 100.0, **{f"{m}_p{q}": 2.0 for m in ("ttft", "latency") for q in (50, 90, 99)}}
    fast = {"tokens_per_s": 150.0, **{f"{m}_p{q}": 1.0 for m in ("ttft", "latency") for q in (50, 90, 99)}}
    r = ratios({"fcfs": base, "phase": fast}, "fcfs", "phase")
    assert r["throughput"] == 1.5 and r["ttft_p99"] == 2.0


def test_prompt_ids_stay_inside_the_vocabulary():
    from dlc.runtime.loadgen import model_config_of, prompt_token_ids
    mc = model_config_of("dlc-tiny")
    ids = prompt_token_ids(mc)
    assert mc.vocab_size == 102 and max(ids) < 102 and mc.mask_id not in ids and not set(mc.stop_ids) & set(ids)
    reqs = Workload("burst", 50, token_ids=ids).requests()
    assert all(t in ids for r in reqs for t in r["prompt"])


def test_ratios_without_throughput_are_nan():
    empty = {"tokens_per_s": 0.0, **{f"{m}_p{q}": float("nan") for m in ("ttft", "latency") for q in (50, 90, 99)}}
    r = ratios({"a": empty, "b": empty}, "a", "b")
    assert r["throughput"] != r["throughput"]                                # nan, not ZeroDivisionError
