"""Quality gates of dlc-tiny-bd, the bundled block-diffusion model (SDAR layout; dlc/tiny/train_bd.py), on the
held-out set: exact block decoding (one token per step), the LLaDA2 threshold rule against it, the exact block
cache against recomputation, and LLaDA2.1's editing decoder."""
import pytest

from dlc.runtime.session import open_model
from dlc.tiny import tasks
from dlc.tiny.evaluate import evaluate
from dlc.tiny.train_bd import BD_THRESHOLD, gen_config

N = 150                  # held-out prompts per gate (one batch)
EXACT_MIN = 0.95         # exact decoding accuracy
MAX_DROP = 0.02          # threshold decoding: at most 2 points below exact
THRESHOLD_TPF_MIN = 1.5  # ... at more than 1.5 tokens per forward


@pytest.fixture(scope="module")
def session():
    return open_model("dlc-tiny-bd", device="cpu", dtype="fp32", progress=False)


@pytest.fixture(scope="module")
def results(session):
    cache = {}

    def get(name):
        if name not in cache:
            cfg = {"exact": gen_config(None), "exact, no cache": gen_config(None, kv_cache="none"),
                   "threshold": gen_config(BD_THRESHOLD)}[name]
            cache[name] = evaluate(session, cfg, n=N, batch_size=N)
        return cache[name]
    return get


def test_bundled_model_is_block_diffusion(session):
    assert session.config.family == "sdar" and session.config.block_diffusion


def test_exact_block_decoding_accuracy(results):
    r = results("exact")
    wrong = [c for c in r.completions if not c[2]][:5]
    assert r.n == N and r.accuracy >= EXACT_MIN, f"exact accuracy {r.accuracy:.3f}; wrong: {wrong}"
    assert set(r.per_task) == set(tasks.TASKS)
    assert r.tpf <= 1.0


def test_block_cache_equals_recomputation(results):
    assert [c[1] for c in results("exact").completions] == [c[1]
                                                            for c in results("exact, no cache").completions]


def test_threshold_decoding_is_parallel_and_accurate(results):
    exact, r = results("exact"), results("threshold")
    assert r.tpf > THRESHOLD_TPF_MIN
    assert r.accuracy >= exact.accuracy - MAX_DROP, (r.accuracy, exact.accuracy)
