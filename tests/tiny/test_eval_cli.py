"""`dlc eval` and the quick start `dlc generate dlc-tiny ...` as a user runs them (real subprocesses)."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dlc.runtime.session import open_model
from dlc.tiny import tasks
from dlc.tiny.cli import eval_command
from dlc.tiny.evaluate import evaluate, make_config


def dlc(*args):
    p = subprocess.run([sys.executable, "-m", "dlc.cli", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"dlc {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.mark.slow
def test_quick_start_generate_answers_with_the_bundled_defaults():
    assert dlc("generate", "dlc-tiny", "sort 52913") == "12359\n"
    out = json.loads(dlc("generate", "dlc-tiny", "64+78", "--json").splitlines()[-1])
    assert out["text"] == tasks.solve("64+78") == "142" and out["nfe"] <= 8


def test_generate_library_path_answers_held_out_prompts():
    """What the quick start runs, in process: chat template, bundled defaults, stop at EOS."""
    from dlc.cli import _generation_defaults
    from dlc.runtime.generate import GenerationConfig, generate
    from dlc.runtime.session import decode_tokens, encode_prompt

    session = open_model("dlc-tiny", progress=False)
    gd = _generation_defaults("dlc-tiny", None)
    assert gd == {"gen_length": 8, "block_length": 4, "steps": 8}
    prompts = [p for p, _ in tasks.eval_set(12)] + ["rev diffuse"]
    ids = [encode_prompt(session, p) for p in prompts]
    res = generate(session.runner, ids, GenerationConfig(**gd, stop_at_eos=True))
    assert [decode_tokens(session, t) for t in res.token_ids] == [tasks.solve(p) for p in prompts]


@pytest.mark.slow
def test_eval_json_matches_the_library():
    line = dlc("eval", "dlc-tiny", "--n", "24", "--decoder", "threshold", "--kv-cache", "dual", "--json")
    out = json.loads(line.strip().splitlines()[-1])
    assert {"accuracy", "tpf", "n", "seconds"} <= set(out) and out["n"] == 24 and out["seconds"] > 0
    ref = evaluate(open_model("dlc-tiny", progress=False), make_config("threshold", kv_cache="dual"), n=24)
    assert out["accuracy"] == round(ref.accuracy, 4) and out["tpf"] == round(ref.tpf, 3)
    assert out["accuracy"] >= 0.95 and out["tpf"] > 1.5


@pytest.mark.parametrize("args,needle", [
    (["--n", "0"], "n (0) and batch_size (64) must be > 0"),
    (["--decoder", "greedy"], "'greedy' is not one of"),
    (["--kv-cache", "paged"], "'paged' is not one of"),
    (["--sparse-retention", "0.5"], "use it with --kv-cache prefix or dual"),
    (["--sparse-retention", "1.5", "--kv-cache", "dual"], "must be in (0, 1], got 1.5"),
    (["--threshold", "1.5", "--decoder", "threshold"], "threshold must be in (0, 1], got 1.5"),
    (["--gen-length", "6"], "gen_length 6 must be a multiple of block_length 4"),
])
def test_bad_input_is_a_clear_error(args, needle):
    r = CliRunner().invoke(eval_command, ["dlc-tiny", *args])
    assert r.exit_code != 0 and needle in r.output, r.output


def test_unknown_model_is_a_clear_error():
    r = CliRunner().invoke(eval_command, ["no-such-model"])
    assert r.exit_code != 0 and "Known presets" in r.output


@pytest.mark.slow
def test_sparse_retention_one_equals_dense_dual():
    """--sparse-retention compiles the model with the head-sparse pass; retention 1.0 keeps every column. In
    process (the subprocess of `dlc eval`: test_eval_json_matches_the_library)."""
    r = CliRunner().invoke(eval_command, ["dlc-tiny", "--n", "48", "--kv-cache", "dual", "--sparse-retention",
                                          "1.0", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = r.stdout
    out = json.loads(line.strip().splitlines()[-1])
    ref = evaluate(open_model("dlc-tiny", progress=False), make_config(kv_cache="dual"), n=48)
    assert out["sparse_retention"] == 1.0 and out["engine"] != "eager"
    assert out["accuracy"] == round(ref.accuracy, 4) and out["tpf"] == round(ref.tpf, 3)
