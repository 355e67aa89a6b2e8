"""Tensor parallelism across the GPUs (or CPU processes) of one host: rank 0 runs the scheduler, decoding
core and server, and drives the other ranks through one runner behind the phase-runner seam
(runner.py); launch.py starts the group, channel.py carries the batches, every rank runs a shard_runner.py
(eager) or shard_graph.py (CUDA graphs captured per rank) runner, vocab.py decodes the vocab-parallel head;
the parallel layers are ``dlc.models.tensor_parallel``."""
from .launch import open_tp_model, torchrun_rank
from .runner import RankFailure, TensorParallelRunner

__all__ = ["open_tp_model", "torchrun_rank", "RankFailure", "TensorParallelRunner"]
