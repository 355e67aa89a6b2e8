"""Quality gates across backends on dlc-tiny: compiled engines (export, onnx, aoti) decode the held-out set with
completions identical to eager (the passes are exact). Head-sparse retention 1.0 vs dense: tests/tiny/test_eval_cli.py."""
import pytest

from dlc.tiny.evaluate import evaluate, make_config
from dlc.tiny.quality_table import BACKENDS, SETTINGS

N = 48                     # held-out prompts (one batch)
EXACT_SETTINGS = ("exact", "low_confidence dual", "threshold 0.9 dual")


@pytest.fixture(scope="module")
def eager_results():
    session = BACKENDS["eager"]("dlc-tiny")
    return {name: evaluate(session, make_config(**SETTINGS[name]), n=N, batch_size=N) for name in EXACT_SETTINGS}


def _check_identical(session, eager_results, names):
    for name in names:
        res = evaluate(session, make_config(**SETTINGS[name]), n=N, batch_size=N)
        assert res.completions == eager_results[name].completions, f"{name}: completions differ from eager"
        assert res.accuracy == eager_results[name].accuracy


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["export", "onnx", "aoti"])
def test_compiled_backend_completions_identical_to_eager(backend, eager_results):
    _check_identical(BACKENDS[backend]("dlc-tiny"), eager_results, EXACT_SETTINGS)

