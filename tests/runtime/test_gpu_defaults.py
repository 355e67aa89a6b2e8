"""dlc serve's runner defaults, shared by dlc generate: CUDA graphs and compiled blocks on with CUDA, off on
CPU; flags turn them on or off; generate() drives a CUDA-graph runner over its own pool (scratch slot
bound)."""
import json
import subprocess
import sys

import pytest
import torch

from dlc.runtime.engine import graph_runner_for
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import open_model


@pytest.fixture(scope="module")
def session():
    return open_model("tiny-llada", progress=False)


def test_cpu_defaults_and_flags(session):
    eager = session.runner
    assert graph_runner_for(eager) is eager                                  # CPU: no graphs, no compile
    gr = graph_runner_for(eager, cuda_graphs=True)
    assert isinstance(gr, GraphRunner) and not gr.compiled and not gr.capture  # compile's default is CUDA's
    with pytest.raises(ValueError, match="compile"):
        graph_runner_for(eager, cuda_graphs=False, compile=True)


def test_generate_replays_through_a_graph_runner(session):
    """generate() binds its pool to a graphed runner: Reuse steps replay the static-buffer step (exact decode)
    and the tokens equal the eager runner's."""
    prompts = [[5, 17, 33, 2, 90], [7, 7, 120, 64, 3, 11, 200]]
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    gr = GraphRunner(session.runner.model, decode="exact")
    out = generate(gr, prompts, cfg).token_ids
    assert gr.stats["replays"] > 0 and gr.stats["eager_reuse"] == 0
    assert out == generate(session.runner, prompts, cfg).token_ids
    assert len({t for row in out for t in row}) > 2


def _dlc(*args):
    return subprocess.run([sys.executable, "-m", "dlc.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_cli_flags():
    base = ["generate", "tiny-llada", "hello", "--gen-length", "16", "--block-length", "8", "--steps", "16",
            "--no-chat", "--kv-cache", "dual", "--json"]
    plain = json.loads(_dlc(*base).stdout.splitlines()[-1])
    graphed = json.loads(_dlc(*base, "--cuda-graphs", "--no-compile").stdout.splitlines()[-1])
    assert graphed["token_ids"] == plain["token_ids"]
    p = _dlc(*base, "--no-cuda-graphs", "--compile")
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("Error: compile:")
    assert "Traceback" not in p.stderr


def test_compiled_blocks_are_the_cuda_default_moe_models_included(monkeypatch):
    """Compiled blocks are the CUDA default for every model: compiled MoE blocks read the packed experts
    (tests/models/test_fused_moe.py), and the graph runner packs them before it compiles."""
    from dlc.runtime import engine as E
    assert E.compiled_blocks_default(torch.device("cuda"))
    assert not E.compiled_blocks_default(torch.device("cpu"))
    seen = []                                   # graph_runner_for asks it (a CPU model, graphs forced on)
    monkeypatch.setattr(E, "compiled_blocks_default", lambda dev: seen.append(dev.type) or True)
    moe = open_model("tiny-llada-moe", progress=False).runner
    gr = E.graph_runner_for(moe, cuda_graphs=True)
    assert seen == ["cpu"] and gr.compiled
    blocks = [m for m in moe.model.modules() if type(m).__name__ == "Experts"]
    assert blocks and all(b.packed is not None for b in blocks)      # packed before the blocks compiled
    assert not E.graph_runner_for(moe, cuda_graphs=True, compile=False).compiled
