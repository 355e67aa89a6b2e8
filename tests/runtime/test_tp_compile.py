"""Compiled blocks with the collectives inside, on every tensor-parallel rank (issue 16 item 4).

CPU: 2 processes, gloo. ``graph_runner_for(..., cuda_graphs=True, compile=True)`` (here over graph runners
that already run uncompiled: the switch reaches them too) makes every rank's
``ShardGraphRunner`` run its transformer blocks under ``torch.compile`` (Inductor) with the row-parallel
all-reduces traced inside (``_c10d_functional.all_reduce_`` + ``wait_tensor``); on CPU its static-buffer
Reuse steps run uncaptured. Tokens must equal one uncompiled process's (fp32, T = 0, dual cache, a decisive
tiny checkpoint; dense and MoE, whose expert-parallel shards all-reduce inside the compiled blocks), and
each rank must have compiled (Dynamo's graph count in the rank's own process, gathered by ``step_times``):
a worker left uncompiled fails the count. Inductor on 2 CPU cores is slow, so this is one compact module:
one TP session, one generate. The GPU test checks TP=2 compiled + captured against TP=2
uncompiled on 2 GPUs (NCCL collectives inside compiled code inside CUDA graphs)."""
import pytest
import torch
from torch._dynamo.utils import counters

from dlc.runtime.engine import graph_runner_for
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, write_tiny

PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 64], [9, 8, 7, 6, 5]]      # B=3: Reuse pads to bucket 4
GEN = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llada", "llada_moe"])    # MoE: experts split, their sum all-reduced
def test_tp2_compiled_blocks_on_every_rank_equal_one_process(tmp_path, name):
    torch._dynamo.reset()                  # rank 0 (this process) starts from the state the worker has
    counters.clear()
    path = write_tiny(tmp_path, MODELS[name])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2)
    try:
        cfg = GenerationConfig(**GEN)
        runner = graph_runner_for(tp.runner, cuda_graphs=True)     # CPU default: blocks not compiled
        assert runner.graphed and not runner.compiled
        plain = generate(runner, PROMPTS, cfg).token_ids
        runner = graph_runner_for(tp.runner, cuda_graphs=True, compile=True)   # every rank compiles now
        assert runner is tp.runner and runner.graphed and runner.compiled
        before = dict(runner.stats)
        want = generate(one.runner, PROMPTS, cfg).token_ids
        got = generate(runner, PROMPTS, cfg).token_ids
        assert got == want == plain
        assert len({tuple(t) for t in want}) == 3 and len(set(want[0])) > 2    # decisive: prompts matter
        st = runner.stats                                        # 2 blocks: 1 Refresh + 3 Reuse each
        assert st["replays"] - before["replays"] == 2 * 3 and st["eager_reuse"] == before["eager_reuse"]
        ranks = runner.step_times()
        assert [r["rank"] for r in ranks] == [0, 1]
        assert all(r["compiled"] for r in ranks)
        # each rank compiled its blocks: the Refresh forward and the bucket-4 Reuse step (static shapes)
        assert all(r["compiled_graphs"] >= 2 for r in ranks), ranks
        assert ranks[0]["compiled_graphs"] == ranks[1]["compiled_graphs"]          # the same code, lockstep
    finally:
        tp.runner.close()


def test_compile_without_graphs_is_refused_by_the_clis():
    """--compile compiles the graph runner's blocks: without it (CPU default: graphs off) a one-line error."""
    from click.testing import CliRunner

    from dlc.tiny.cli import eval_command
    r = CliRunner().invoke(eval_command, ["dlc-tiny", "--n", "4", "--compile"])
    assert r.exit_code != 0 and "add --cuda-graphs" in r.output, r.output


@pytest.mark.gpu
def test_tp2_compiled_blocks_on_two_gpus(tmp_path):
    """2 GPUs, NCCL: every rank's captured Reuse steps replay compiled blocks with the all-reduces inside;
    tokens equal TP=2 uncompiled, eager, at T = 0 in fp32 (both sides decode with the float64 combine)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = write_tiny(tmp_path, MODELS["dream_gqa"])
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2)
    try:
        cfg = GenerationConfig(**GEN)
        eager = generate(tp.runner, PROMPTS, cfg).token_ids
        runner = graph_runner_for(tp.runner)                  # the CUDA defaults: graphs and compile on
        assert runner.graphed and runner.capture and runner.compiled
        got = generate(runner, PROMPTS, cfg).token_ids
        assert got == eager and len({tuple(t) for t in eager}) == 3
        assert runner.stats["replays"] > 0 and runner.stats["captures"] > 0
        assert runner.stats["eager_reuse"] == 0
        ranks = runner.step_times()
        assert all(r["compiled"] and r["compiled_graphs"] >= 2 for r in ranks), ranks
    finally:
        tp.runner.close()
