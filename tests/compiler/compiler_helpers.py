"""Helpers of the compiler tests: a tiny LLaDA checkpoint in HF layout, the CLI in-process."""
from dlc.models.loading import load_model, save_checkpoint


def make_checkpoint(path):
    """tiny-llada (a decisive random init: predictions vary with the input)
    saved as config.json + safetensors +
    tokenizer files: what a user's checkpoint directory looks like."""
    lm = load_model("tiny-llada", seed=1)
    save_checkpoint(lm.model, path, tokenizer=lm.tokenizer)
    return path



def run_cli(args):
    from click.testing import CliRunner

    from dlc.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


GEN = ["--gen-length", "16", "--block-length", "8", "--steps", "8", "--device", "cpu", "--json", "--no-chat"]


def gen_tokens(model, kv="dual", prompt="The cat", extra=()):
    import json
    res = run_cli(["generate", model, prompt, *GEN, "--kv-cache", kv, *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])["token_ids"]
