"""Workload generator of the serving benchmark: seeded, the three arrival patterns, validated."""
import pytest

from dlc.runtime.benchmark import targets
from dlc.runtime.loadgen import Workload, percentile


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
    assert {len(r["prompt"]) for r in reqs} <= set(range(5, 10)) and \
        {r["gen_length"] for r in reqs} == {16, 32}
    assert all(r["steps"] == r["gen_length"] // 2 and all(32 <= t <= 126 for t in r["prompt"]) for r in reqs)


@pytest.mark.parametrize("kw,needle", [({"pattern": "wave"}, "pattern"), ({"rate": 0}, "rate"),
                                       ({"amplitude": 2}, "amplitude"),
                                       ({"prompt_len": (9, 2)}, "prompt_len"),
                                       ({"gen_lens": (12,)}, "multiples")])
def test_bad_workloads(kw, needle):
    with pytest.raises(ValueError, match=needle):
        Workload(**kw)


def test_percentiles_and_ratios():
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2], 100) == 2
    run = lambda tok, ttft: {"tokens_per_s": tok, "ttft_p99": ttft}                       # noqa: E731
    runs = {"burst": {"fcfs": [run(100.0, 2.0)], "phase": [run(150.0, 1.0)]}}
    med = {w: {p: {k: {"median": rs[0][k]} for k in rs[0]} for p, rs in by.items()} for w, by in runs.items()}
    (t,) = targets(runs, med)
    assert t["ratio"] == 1.5 and t["status"] == "MISS" and t["miss_by"] == pytest.approx(0.3 / 1.8)


def test_prompt_ids_stay_inside_the_vocabulary():
    from dlc.runtime.loadgen import model_config_of, prompt_token_ids
    mc = model_config_of("dlc-tiny")
    ids = prompt_token_ids(mc)
    assert mc.vocab_size == 102 and max(ids) < 102 and mc.mask_id not in ids and \
        not set(mc.stop_ids) & set(ids)
    reqs = Workload("burst", 50, token_ids=ids).requests()
    assert all(t in ids for r in reqs for t in r["prompt"])


def test_ratios_without_throughput_are_nan():
    runs = {"burst": {p: [{"tokens_per_s": 0.0}] for p in ("fcfs", "phase")}}
    med = {"burst": {p: {"tokens_per_s": {"median": 0.0}} for p in ("fcfs", "phase")}}
    (t,) = targets(runs, med)
    assert t["ratio"] != t["ratio"] and t["status"] == "MISS"              # nan, not ZeroDivisionError
