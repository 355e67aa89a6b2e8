"""Two-micro-batch overlap of a tensor-parallel rank's forward (models/overlap.py, issue 16).

CPU: 2 processes, gloo, a decisive tiny fp32 LLaDA. A step feeding at least ``tp_overlap_tokens`` tokens runs
as two halves whose all-reduces are functional collectives issued before the other half's compute and waited
for at their use. Rows are independent in every op, so tokens must equal the unsplit forward's (threshold 0)
and one process's, in the eager shard runner, the graph runner (its static-buffer steps, uncaptured on CPU)
and with compiled blocks (Inductor compiles one layer over both halves); each rank must count the forwards
it split (``step_times``' ``overlap``): with the split removed the counts stay 0 and the tests fail. A batch
below the threshold (one row) never splits. The GPU test captures the split steps in CUDA graphs on 2 GPUs
(NCCL on its own stream) and compares them with the unsplit captured steps."""
import pytest
import torch
from torch._dynamo.utils import counters

from dlc.runtime.engine import graph_runner_for
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, write_tiny

PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 64], [9, 8, 7, 6, 5], [31, 2, 250, 77]]   # B=4
GEN = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")
SPLIT = 16                  # tokens: a Reuse step of 4 rows x 8 fed splits, one row (8) does not


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(one-process session, TP=2 session splitting steps of >= SPLIT tokens) of one tiny LLaDA."""
    path = write_tiny(tmp_path_factory.mktemp("llada"), MODELS["llada"])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2, tp_overlap_tokens=SPLIT)
    yield one, tp
    tp.runner.close()


def _splits(tp, tokens: int | None = None) -> list[int]:
    """Forwards each rank split since the last call (then switches every rank's threshold to ``tokens``)."""
    ranks = tp.runner.step_times(reset=True, overlap_tokens=tokens)
    assert [r["rank"] for r in ranks] == [0, 1]
    return [r["overlap"]["split_forwards"] for r in ranks]


def _run_on_and_off(one, tp, prompts) -> tuple[list[int], list[int]]:
    """generate() with the split on (threshold SPLIT) and off (0): both equal one process's tokens; returns
    the split counts per rank of each run."""
    cfg = GenerationConfig(**GEN)
    want = generate(one.runner, prompts, cfg)
    _splits(tp, SPLIT)
    on = generate(tp.runner, prompts, cfg)
    split_on = _splits(tp, 0)
    off = generate(tp.runner, prompts, cfg)
    split_off = _splits(tp, SPLIT)
    assert on.token_ids == off.token_ids == want.token_ids
    assert on.nfe == off.nfe == want.nfe
    return split_on, split_off


def test_big_steps_split_with_one_process_tokens_eager(pair):
    one, tp = pair
    assert not tp.runner.graphed
    _splits(tp)
    want = generate(one.runner, PROMPTS, GenerationConfig(**GEN)).token_ids
    assert len({tuple(t) for t in want}) == len(PROMPTS) and len(set(want[0])) > 2   # decisive
    split_on, split_off = _run_on_and_off(one, tp, PROMPTS)
    nfe = generate(one.runner, PROMPTS, GenerationConfig(**GEN)).nfe
    assert split_on == [nfe, nfe] and split_off == [0, 0], (split_on, nfe)    # every forward, on both ranks
    split_on, _ = _run_on_and_off(one, tp, PROMPTS[:3])                     # odd: halves of 2 and 1 rows
    assert split_on[0] == split_on[1] > 0
    split_on, split_off = _run_on_and_off(one, tp, PROMPTS[:1])             # one row: never split
    assert split_on == split_off == [0, 0]


def test_big_steps_split_with_one_process_tokens_graph_runner(pair):
    one, tp = pair
    assert graph_runner_for(tp.runner, cuda_graphs=True) is tp.runner and tp.runner.graphed
    try:
        before = dict(tp.runner.stats)
        split_on, split_off = _run_on_and_off(one, tp, PROMPTS)
        st = tp.runner.stats
        assert st["replays"] > before["replays"] and st["eager_reuse"] == before["eager_reuse"]
        assert split_on[0] == split_on[1] > 0 and split_off == [0, 0]       # the static-buffer steps split
        split_on, split_off = _run_on_and_off(one, tp, PROMPTS[:1])
        assert split_on == split_off == [0, 0]
    finally:
        tp.runner.enable_graphs(False)


@pytest.mark.slow
def test_big_steps_split_with_one_process_tokens_compiled(pair):
    """Compiled blocks: one Inductor-compiled layer over both halves, on every rank (each rank compiled it:
    Dynamo's graph count), tokens as one process's. Only the split forwards run (every step of 4 rows splits,
    so Inductor compiles the layer over both halves and never the single block: test_tp_compile.py covers
    the unsplit compiled blocks); Inductor on 2 CPU cores is slow."""
    one, tp = pair
    torch._dynamo.reset()
    counters.clear()
    runner = graph_runner_for(tp.runner, cuda_graphs=True, compile=True)
    assert runner is tp.runner and runner.compiled
    cfg = GenerationConfig(**GEN)
    _splits(tp, SPLIT)
    assert generate(tp.runner, PROMPTS, cfg).token_ids == generate(one.runner, PROMPTS, cfg).token_ids
    ranks = tp.runner.step_times(reset=True)
    assert ranks[0]["overlap"]["split_forwards"] == ranks[1]["overlap"]["split_forwards"] > 0
    assert ranks[0]["compiled_graphs"] == ranks[1]["compiled_graphs"] > 0


@pytest.mark.parametrize("name,why", [("llada", None), ("dream_gqa", None), ("llada_moe", "MoE")])
def test_which_shards_can_split(name, why):
    """Dense shards (LLaDA's block, the HF-layout PreNormLayer with q/k/v biases) split; a shard whose MLP
    sums through the expert-parallel combine does not (its layers stay unsplit: no overlap installed)."""
    from dlc.models import build_model
    from dlc.models.all_reduce import AllReduce
    from dlc.models.config import ModelConfig
    from dlc.models.overlap import for_shard, unsupported
    from dlc.models.tensor_parallel import shard_modules_
    with torch.device("meta"):
        m = build_model(ModelConfig(**MODELS[name]))
        shard_modules_(m, 0, 2, AllReduce(None))
    got = unsupported(m)
    assert got is None if why is None else why in got
    assert for_shard(m, AllReduce(None)) is None                   # one device: nothing to overlap


def test_threshold_is_validated_and_a_serve_flag():
    import click

    from dlc.models.overlap import MIN_TOKENS, check_min_tokens
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.server_cli import build_config, serve_command
    with pytest.raises(ValueError, match="tp_overlap_tokens"):
        check_min_tokens(-1)
    with pytest.raises(ValueError, match="tp_overlap_tokens"):
        ServeConfig(tp_overlap_tokens=True)
    assert ServeConfig().tp_overlap_tokens is None and MIN_TOKENS == 0     # None: the library's default
    assert build_config("tiny-llada", None, tp_overlap_tokens=0).tp_overlap_tokens == 0
    opts = {o: p.name for p in serve_command.params if isinstance(p, click.Option) for o in p.opts}
    assert opts["--tp-overlap-tokens"] == "tp_overlap_tokens"


@pytest.mark.gpu
def test_tp2_split_steps_captured_on_two_gpus(tmp_path):
    """2 GPUs, NCCL: every rank captures its split steps (the halves' functional all-reduces on NCCL's
    stream, waited for in the graph where used), uncompiled and then with compiled blocks (the CUDA default:
    each half's sublayer step compiled); in fp32 on a decisive tiny model the tokens equal the unsplit
    captured steps' (threshold 0) and TP=2 eager's, and every rank split the steps it captured."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = write_tiny(tmp_path, MODELS["llada"])
    tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2,
                    tp_overlap_tokens=SPLIT)
    try:
        cfg = GenerationConfig(**GEN)
        want = generate(tp.runner, PROMPTS, cfg).token_ids                     # eager, split
        assert len({tuple(t) for t in want}) == len(PROMPTS) and len(set(want[0])) > 2
        for compile in (False, True):
            runner = graph_runner_for(tp.runner, cuda_graphs=True, compile=compile)
            assert runner.capture and runner.compiled == compile
            _splits(tp, SPLIT)
            on = generate(runner, PROMPTS, cfg).token_ids
            split_on = _splits(tp, 0)
            off = generate(runner, PROMPTS, cfg).token_ids
            split_off = _splits(tp, SPLIT)
            assert on == off == want, compile
            assert split_on[0] == split_on[1] > 0 and split_off == [0, 0], (compile, split_on, split_off)
            assert runner.stats["replays"] > 0 and runner.stats["eager_reuse"] == 0
    finally:
        tp.runner.close()


def test_the_collectives_live_in_the_shard_not_on_the_model(pair):
    """The rank's collectives (its all-reduce, its two-micro-batch forward) have one typed home, the shard's
    ``ShardCollectives``, passed to the code that needs them: a TP load sticks nothing onto the model (its
    attributes are the one-process model's), every parallel layer sums with the shard's one all-reduce (given
    at construction), and the split forward is the shard's."""
    from dlc.models.overlap import TwoBatchOverlap
    from dlc.models.tensor_parallel import RowParallelLinear, VocabParallelEmbedding
    one, tp = pair
    shard, ref = tp.runner.shard, one.runner.model
    assert type(shard.model) is type(ref)
    assert set(vars(shard.model)) == set(vars(ref)), set(vars(shard.model)) ^ set(vars(ref))
    col = shard.collectives
    layers = [m for m in shard.model.modules() if isinstance(m, (RowParallelLinear, VocabParallelEmbedding))]
    assert len(layers) == 2 * len(shard.model.blocks) + 1
    assert all(m.reduce is col.reduce for m in layers) and col.reduce.group is shard.group
    assert isinstance(col.overlap, TwoBatchOverlap) and col.overlap.reduce is col.reduce
    from dlc.runtime.distributed.shard_graph import ShardGraphRunner
    graphs = ShardGraphRunner(shard, capture=False)                 # CPU: no capture, no fused weights
    assert graphs.collectives is col and graphs.eager().collectives is col
