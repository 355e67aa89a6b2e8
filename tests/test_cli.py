"""The dlc command line as a user runs it: a real subprocess, output parsed. Checks of many flag
combinations on one command run ``main`` in process (``dlc_in_process``: click's runner, stdout and stderr
apart, each ~4 s of torch import less); every command keeps real subprocess tests here."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dlc.cli import main


def dlc(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "dlc.cli", *args], capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"dlc {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def dlc_in_process(*args):
    """``dlc ARGS`` in this process -> its stdout (exit code 0 asserted)."""
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, f"dlc {' '.join(args)} failed ({r.exit_code}):\n{r.output}"
    return r.stdout


def test_generate_json_matches_library():
    p = dlc("generate", "tiny-llada", "hello", "--gen-length", "16", "--block-length", "8", "--steps", "16",
            "--no-chat", "--json")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(out) >= {"text", "token_ids", "nfe", "seconds"}
    assert len(out["token_ids"]) == 16 and out["nfe"] == 16

    from dlc.models.loading import load_model
    from dlc.runtime.generate import GenerationConfig, generate
    lm = load_model("tiny-llada")
    ids = lm.tokenizer("hello", add_special_tokens=False)["input_ids"]
    ref = generate(lm.model, [ids], GenerationConfig(gen_length=16, block_length=8, steps=16))
    assert out["token_ids"] == ref.token_ids[0]


def test_generate_threshold_dual_plain_text():
    """Plain output is the completion alone (progress goes to stderr); dlc-tiny answers 64+78 with 142."""
    p = dlc("generate", "dlc-tiny", "64+78", "--threshold", "0.9", "--kv-cache", "dual")
    assert p.stdout == "142\n"


def test_models_lists_presets():
    rows = json.loads(dlc("models", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["llada-8b"]["repo"] == "GSAI-ML/LLaDA-8B-Instruct"
    assert 7.9e9 < by_name["llada-8b"]["parameters"] < 8.1e9


@pytest.mark.parametrize("args,needle", [
    (["generate", "no-such-model", "hi"], "Known presets"),
    (["generate", "tiny-llada", "hi", "--bogus"], "No such option"),
    (["generate", "tiny-llada", "hi", "--gen-length", "10"], "block_length must be in"),
    (["generate", "tiny-llada", "hi", "--kv-cache", "paged"], "paged"),
])
def test_bad_input_is_a_clear_error(args, needle):
    p = dlc(*args, check=False)
    assert p.returncode != 0
    assert needle in p.stderr


def test_preset_without_weights_names_repo_and_option(tmp_path):
    import os
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "dlc.cli", "generate", "llada-8b", "hi"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0
    assert "GSAI-ML/LLaDA-8B-Instruct" in p.stderr and "--weights" in p.stderr


def test_generate_with_the_parallel_decoders_and_logprobs():
    for flags in (["--threshold", "0.9", "--low-threshold", "0.3"], ["--entropy-bound", "0.5"],
                  ["--threshold", "0.9", "--credit", "--smoothing", "--kv-cache", "dual"],
                  ["--threshold", "0.9", "--smoothing", "--smoothing-top-k", "4", "--kv-cache", "dual"]):
        assert dlc_in_process("generate", "dlc-tiny", "64+78", *flags) == "142\n", flags
    out = json.loads(dlc_in_process("generate", "dlc-tiny", "64+78", "--logprobs", "2",
                                    "--json").splitlines()[-1])
    assert len(out["logprobs"]) == len(out["token_ids"]) == 3
    assert all(len(e["top"]) == 2 and e["logprob"] <= 0 for e in out["logprobs"])
    bad = subprocess.run([sys.executable, "-m", "dlc.cli", "generate", "dlc-tiny", "x", "--entropy-bound",
                          "-1"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "entropy_bound must be >= 0" in bad.stderr and \
        "Traceback" not in bad.stderr


def test_generate_batch_invariant_flag():
    """``--batch-invariant`` runs generation inside the mode (on CPU its overrides are CUDA-only: the same
    tokens as without it) and refuses ``--compile`` in one line naming the flag."""
    args = ("generate", "dlc-tiny", "64+78", "--threshold", "0.9", "--kv-cache", "dual")
    assert dlc_in_process(*args, "--batch-invariant") == "142\n"     # test_generate_threshold_dual_plain_text
    p = dlc(*args, "--batch-invariant", "--cuda-graphs", "--compile", check=False)
    assert p.returncode != 0 and "--batch-invariant keeps --compile off" in p.stderr
    assert "Traceback" not in p.stderr
