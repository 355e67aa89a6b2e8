"""Leaving a tensor-parallel group (runtime/distributed/runner.py ``close``, issue 16). Its own module: a TP
session cannot open while another module's session holds this process's group."""
from dlc.runtime.engine import graph_runner_for
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, write_tiny
from test_tp_graphs import GEN, PROMPTS


def test_close_frees_the_graphs_before_leaving_the_group(tmp_path):
    """NCCL's destroy_process_group hangs on every rank while a CUDA graph holding its collectives is alive
    (2 x H100, bench/probes/nccl_graph_destroy.py): close() frees rank 0's graphs before leaving the group
    (the workers free theirs on STOP), and returns."""
    path = write_tiny(tmp_path, MODELS["llada"])
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2)
    graph_runner_for(tp.runner, cuda_graphs=True)
    generate(tp.runner, PROMPTS, GenerationConfig(**GEN))
    shard = tp.runner.shard
    assert shard.graphs
    tp.runner.close()
    assert not shard.graphs and all(p.exitcode == 0 for p in tp.runner.procs)
