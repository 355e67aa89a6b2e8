"""The all-reduce backend of tensor parallelism (``tp_all_reduce``: auto, nccl, symm; dlc.models.all_reduce).

CPU: the byte-threshold selection (which messages go one-shot, per world size, dtype and layout), ``symm``
refused where it cannot run (one line naming the field, before any process starts), ``auto`` resolving to
gloo on a 2-process CPU group with tokens equal to one process's, and the custom op that carries the
symmetric path through ``torch.compile`` (one extern call in the traced graph, run by the compiled code; on
CPU through its gloo fallback, a 1-process group). GPU (2 devices): TP=2 with ``symm``, blocks compiled and
Reuse steps captured, gives the tokens of TP=2 over NCCL and of one process on a decisive fp32 tiny
checkpoint, and every rank sent its all-reduces one-shot.

    python -m pytest -q tests/runtime/test_tp_all_reduce.py            # CPU part
    python -m pytest -q -m gpu tests/runtime/test_tp_all_reduce.py     # 2 GPUs (the lead)
"""
import socket

import pytest
import torch

from dlc.models import all_reduce as ar
from dlc.runtime.config import TP_ALL_REDUCE, ServeConfig
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from test_tensor_parallel import MODELS, write_tiny

PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 64], [9, 8, 7, 6, 5]]
GEN = dict(gen_length=16, block_length=8, steps=8, kv_cache="dual")
MiB, KiB = 1 << 20, 1 << 10


# -- selection -----------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_symm(monkeypatch):
    """Selection as on a CUDA host whose PyTorch has the one-shot op (the decision itself is host logic)."""
    monkeypatch.setattr(ar, "symm_missing", lambda device_type: None)


def test_auto_thresholds_per_world_size(cuda_symm):
    bf16 = torch.bfloat16
    assert ar.one_shot_limit("auto", "cuda", 2, bf16) == 8 * MiB
    assert ar.one_shot_limit("auto", "cuda", 4, bf16) == 512 * KiB
    assert ar.one_shot_limit("auto", "cuda", 8, bf16) == 256 * KiB
    assert ar.one_shot_limit("auto", "cuda", 3, bf16) == 0                # no measured crossover: NCCL
    assert ar.one_shot_limit("auto", "cuda", 2, torch.float32) == 8 * MiB
    assert ar.one_shot_limit("auto", "cuda", 2, torch.float16) == 0       # the kernel sums bf16 / fp32 only
    assert ar.one_shot_limit("auto", "cuda", 2, bf16, p2p=False) == 0     # GPUs without peer access
    assert ar.one_shot_limit("nccl", "cuda", 2, bf16) == 0
    assert ar.one_shot_limit("symm", "cuda", 2, bf16) > 8 * MiB           # symm: up to its buffer
    with pytest.raises(ValueError, match="tp_all_reduce symm: .*fp16|tp_all_reduce symm: .*float16"):
        ar.one_shot_limit("symm", "cuda", 2, torch.float16)
    with pytest.raises(ValueError, match="tp_all_reduce symm: .*peer to peer"):
        ar.one_shot_limit("symm", "cuda", 2, bf16, p2p=False)


def test_auto_is_plain_on_cpu():
    assert ar.one_shot_limit("auto", "cpu", 2, torch.float32) == 0
    with pytest.raises(ValueError, match="^tp_all_reduce symm: it needs CUDA GPUs"):
        ar.one_shot_limit("symm", "cpu", 2, torch.float32)


def test_buffer_is_sized_for_the_largest_message_that_uses_it(cuda_symm):
    # LLaDA-8B bf16: auto's buffer is its 8 MiB threshold; symm's the largest captured step, 8192 x 4096 x 2
    assert ar.buffer_bytes(ar.one_shot_limit("auto", "cuda", 2, torch.bfloat16), 4096, 2) == 8 * MiB
    assert ar.buffer_bytes(ar.one_shot_limit("symm", "cuda", 2, torch.bfloat16), 4096, 2) == 64 * MiB
    assert ar.buffer_bytes(ar.one_shot_limit("auto", "cuda", 2, torch.float32), 64, 4) == 2 * MiB


@pytest.mark.parametrize("nbytes,offset,contiguous,dtype,want", [
    (32 * 4096 * 2, 0, True, torch.bfloat16, True),          # a B=1 Reuse step's message of LLaDA-8B
    (8 * MiB, 0, True, torch.bfloat16, True),                # at the threshold
    (8 * MiB + 16, 0, True, torch.bfloat16, False),          # past it: NCCL
    (0, 0, True, torch.bfloat16, False),                     # empty
    (4096, 8, True, torch.bfloat16, False),                  # start not 16-byte aligned
    (4096 + 4, 0, True, torch.float32, False),               # size not a multiple of 16 bytes
    (4096, 0, False, torch.bfloat16, False),                 # strided
    (4096, 0, True, torch.float16, False),                   # dtype the kernel does not sum
    (4096, 0, True, torch.float32, True),
])
def test_takes_one_shot(nbytes, offset, contiguous, dtype, want):
    assert ar.takes_one_shot(nbytes, offset, contiguous, dtype, 8 * MiB) is want
    assert ar.takes_one_shot(nbytes, offset, contiguous, dtype, 0) is False   # limit 0: never


def test_copy_engine_range(monkeypatch):
    """World 2 sums messages of 4 MiB and more with the copy engines (the probe's crossover with one-shot),
    up to the receive buffer; other world sizes never; ``DLC_TP_CE_MIN_BYTES`` moves the threshold."""
    monkeypatch.delenv(ar.CE_MIN_ENV, raising=False)
    assert ar.ce_min_bytes(2) == 4 * MiB and ar.ce_min_bytes(4) == 0 and ar.ce_min_bytes(8) == 0
    monkeypatch.setenv(ar.CE_MIN_ENV, "1024")
    assert ar.ce_min_bytes(2) == 1024 and ar.ce_min_bytes(4) == 0
    take = ar.takes_copy_engine
    assert take(8 * MiB, 0, True, 4 * MiB, 64 * MiB) and take(4 * MiB, 0, True, 4 * MiB, 64 * MiB)
    assert not take(4 * MiB - 16, 0, True, 4 * MiB, 64 * MiB)            # below: one-shot / NCCL
    assert not take(64 * MiB + 16, 0, True, 4 * MiB, 64 * MiB)           # past the receive buffer
    assert not take(8 * MiB, 8, True, 4 * MiB, 64 * MiB)                 # start not 16-byte aligned
    assert not take(8 * MiB, 0, False, 4 * MiB, 64 * MiB)                # strided
    assert not take(8 * MiB, 0, True, 0, 64 * MiB)                       # least 0: never


def test_the_op_sends_copy_engine_messages_there_and_issue_runs_them_aside(monkeypatch):
    """``run`` gives a message the copy engines take to them (at once; ``issue``: on the side stream,
    joined by ``wait``), every other message to one-shot / NCCL as before, and never under ``nccl``."""
    from types import SimpleNamespace

    class Engines:
        def __init__(self):
            self.log = []

        def takes(self, x):
            return x.numel() >= 8

        def run(self, x):
            self.log.append(("run", x.numel()))

        def issue(self, x):
            self.log.append(("issue", x.numel()))

        def wait(self, x):
            self.log.append(("wait", x.numel()))
    red = ar.AllReduce(SimpleNamespace(group_name="fake-ce", size=lambda: 2), "auto", 0,
                       torch.empty(0, dtype=torch.uint8))
    red.ce = Engines()
    plain = []
    import torch.distributed as dist
    monkeypatch.setattr(dist, "all_reduce", lambda x, group=None: plain.append(x.numel()))
    ar._REDUCERS[red.group_name] = red
    try:
        red(torch.ones(8))
        red(torch.ones(4))                                            # small: the plain path
        t = red.issue(torch.ones(16))
        red.wait(t)
        red.switch("nccl")
        red(torch.ones(8))                                            # nccl: never the copy engines
    finally:
        ar._REDUCERS.pop(red.group_name, None)
    assert red.ce.log == [("run", 8), ("issue", 16), ("wait", 16)]
    assert plain == [4, 8] and red.calls == {"one_shot": 0, "nccl": 1, "copy_engine": 0}   # since switch


def test_setup_configures_the_one_reduce_of_the_layers_and_auto_falls_back(cuda_symm, monkeypatch):
    """``setup`` as on a 2-GPU rank (the buffer faked on the host): the one AllReduce every parallel layer was
    built with gets the buffer sized for the largest message that uses it; a buffer that cannot be set up
    makes ``auto`` NCCL (a warning) and ``symm`` a one-line error naming the field."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from dlc.models.tensor_parallel import RowParallelLinear, VocabParallelEmbedding
    group = SimpleNamespace(group_name="fake-tp")
    red = ar.AllReduce(group)
    o, down = RowParallelLinear(32, 64, False, red), RowParallelLinear(64, 64, False, red)
    embed = VocabParallelEmbedding(0, 10, 64, red)
    monkeypatch.setattr(dist, "get_world_size", lambda g: 2)
    monkeypatch.setattr(ar, "p2p_ok", lambda world: True)
    sizes = []

    def buffer(nbytes, g):
        sizes.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)
    monkeypatch.setattr(ar, "symmetric_buffer", buffer)
    engines = []
    monkeypatch.setattr(ar, "copy_engine_sum", lambda *a: engines.append(a) or f"ce{len(engines)}")
    for backend in ("auto", "symm"):
        r = ar.setup(red, backend, "cuda", torch.float32, 64)
        assert sizes[-1] == 2 * MiB and r.max_bytes() == 2 * MiB     # 8192 tokens x 64 x fp32 < 8 MiB
        assert r.op and r.backend == backend and ar._REDUCERS["fake-tp"] is r
        assert o.reduce is down.reduce is embed.reduce is r is red
        assert r.ce == f"ce{len(engines)}" and engines[-1] == (group, 2, 64, 4, backend)  # the receive buffer

    def broken(nbytes, g):
        raise RuntimeError("CUDASymmetricMemory: no peer access\nmore")
    monkeypatch.setattr(ar, "symmetric_buffer", broken)
    with pytest.warns(UserWarning, match="tp_all_reduce auto: symmetric memory unavailable"):
        r = ar.setup(ar.AllReduce(group), "auto", "cuda", torch.float32, 64)
    assert not r.op and r.max_bytes() == 0 and r.ce is None and len(engines) == 2
    with pytest.raises(ValueError, match="^tp_all_reduce symm: the symmetric buffer failed: CUDASymm"):
        ar.setup(ar.AllReduce(group), "symm", "cuda", torch.float32, 64)


def test_a_closing_rank_frees_its_symmetric_buffer_before_leaving_the_group(cuda_symm, monkeypatch):
    """``release_before_leaving`` (what a closing rank runs before ``destroy_process_group``) frees the
    all-reduce's symmetric buffer and drops the op's registry entry at once, instead of whenever the model is
    garbage collected (after the group is gone); later messages would take the plain path."""
    from types import SimpleNamespace

    import torch.distributed as dist

    from dlc.models.tensor_parallel import RowParallelLinear
    from dlc.runtime.distributed.collectives import ShardCollectives
    from dlc.runtime.distributed.shard_graph import release_before_leaving
    group = SimpleNamespace(group_name="fake-tp-close")
    layer = RowParallelLinear(32, 64, False, ar.AllReduce(group))
    monkeypatch.setattr(dist, "get_world_size", lambda g: 2)
    monkeypatch.setattr(ar, "p2p_ok", lambda world: True)
    monkeypatch.setattr(ar, "symmetric_buffer", lambda nbytes, g: torch.empty(nbytes, dtype=torch.uint8))
    r = ar.setup(layer.reduce, "symm", "cuda", torch.float32, 64)
    assert r.buffer is not None and ar._REDUCERS["fake-tp-close"] is r
    # the layer stays alive: only an explicit release frees the buffer
    release_before_leaving(SimpleNamespace(collectives=ShardCollectives(r), device=torch.device("cpu")))
    assert r.buffer is None and not r.op and r.max_bytes() == 0
    assert "fake-tp-close" not in ar._REDUCERS and layer.reduce is r


def test_a_second_group_of_one_process_takes_nccl(monkeypatch):
    """After this process rendezvoused symmetric memory once (an earlier TP group), a new group's ``auto``
    takes NCCL with a warning and ``symm`` is refused naming the field: the second rendezvous hung on
    2 x H200. A fresh process asks for what it likes; ``nccl`` is never changed."""
    assert ar.for_new_group("auto") == "auto" and ar.for_new_group("symm") == "symm"
    monkeypatch.setattr(ar, "_RENDEZVOUSED", True)
    assert ar.for_new_group("nccl") == "nccl"
    with pytest.warns(UserWarning, match="^tp_all_reduce auto: this process already set up symmetric"):
        assert ar.for_new_group("auto") == "nccl"
    with pytest.raises(ValueError, match="^tp_all_reduce symm: this process already set up symmetric"):
        ar.for_new_group("symm")


# -- refusals ------------------------------------------------------------------------------------------------
def test_symm_on_cpu_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError) as e:
        open_model("tiny-llada", dtype="fp32", progress=False, tensor_parallel_size=2, tp_all_reduce="symm")
    msg = str(e.value)
    assert msg.startswith("tp_all_reduce symm:") and "cpu" in msg and "\n" not in msg
    import torch.distributed as dist
    assert not dist.is_initialized()                          # refused before any group formed
    with pytest.raises(ValueError, match="tp_all_reduce must be one of"):
        open_model("tiny-llada", progress=False, tp_all_reduce="mpi")
    with pytest.raises(ValueError, match="serve config: tp_all_reduce must be one of"):
        ServeConfig(tp_all_reduce="mpi")
    assert ServeConfig().tp_all_reduce == "nccl" and TP_ALL_REDUCE == ar.BACKENDS


def test_cli_flag_maps_to_the_field():
    from click.testing import CliRunner

    from dlc.cli import generate as generate_cmd
    from dlc.runtime.server_cli import build_config
    assert build_config("tiny-llada", None, tp_all_reduce="auto").tp_all_reduce == "auto"
    r = CliRunner().invoke(generate_cmd, ["tiny-llada", "hi", "--device", "cpu", "--tp", "2",
                                          "--tp-all-reduce", "symm"])
    assert r.exit_code != 0 and "tp_all_reduce symm:" in r.output and "Traceback" not in r.output, r.output


# -- the custom op through torch.compile (CPU: a 1-process gloo group, the op's gloo fallback) ---------------
@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("this process already belongs to a group")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def test_the_op_is_one_extern_call_in_compiled_code(one_rank_group):
    """A RowParallelLinear whose AllReduce takes the op path (a buffer; limit 0: every message to the
    fallback): Dynamo traces the op as one node without a graph break, Inductor's code calls the real impl,
    and the output equals the eager layer's."""
    from dlc.models.tensor_parallel import RowParallelLinear
    torch.manual_seed(0)
    red = ar.AllReduce(one_rank_group, "symm", 0, torch.empty(0, dtype=torch.uint8))
    layer = RowParallelLinear(16, 8, bias=True, reduce=red)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    ar._REDUCERS[red.group_name] = red
    try:
        x = torch.randn(2, 3, 16)
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)        # the 1-rank sum: itself
        graphs = []

        def record(gm, inputs):
            graphs.append(gm)
            return gm.forward
        eager = layer(x)
        assert red.calls["nccl"] == 1
        torch._dynamo.reset()
        got = torch.compile(layer, backend=record, fullgraph=True)(x)
        ops = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
        op = (torch.ops.dlc.tp_all_reduce_, torch.ops.dlc.tp_all_reduce_.default)
        assert sum(t in op for t in ops) == 1 and len(ops) == 3, ops       # linear, the op, + bias
        torch._dynamo.reset()
        before = red.calls["nccl"]
        ind = torch.compile(layer, backend="inductor", fullgraph=True)(x)
        assert red.calls["nccl"] > before                     # Inductor's code ran the op's real impl
        for out in (eager, got, ind):
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    finally:
        ar._REDUCERS.pop(red.group_name, None)
        torch._dynamo.reset()


# -- a 2-process CPU group -----------------------------------------------------------------------------------
def test_auto_on_cpu_is_gloo_and_tokens_equal_one_process(tmp_path):
    path = write_tiny(tmp_path, MODELS["llada"])
    one = open_model(str(path), dtype="fp32", progress=False)
    tp = open_model(str(path), dtype="fp32", progress=False, tensor_parallel_size=2, tp_all_reduce="auto")
    try:
        cfg = GenerationConfig(**GEN)
        got = generate(tp.runner, PROMPTS, cfg).token_ids
        want = generate(one.runner, PROMPTS, cfg).token_ids
        assert got == want
        assert len({tuple(t) for t in want}) == 3 and len(set(want[0])) > 2    # decisive: prompts matter
        ranks = tp.runner.step_times()
        assert [r["all_reduce"] for r in ranks] == [{"backend": "auto", "one_shot_max_bytes": 0,
                                                     "copy_engine_min_bytes": 0, "one_shot": 0, "nccl": 0,
                                                     "copy_engine": 0}] * 2   # gloo, traced
        with pytest.raises(ValueError, match="tp_all_reduce symm: this group started with auto"):
            tp.runner.step_times(all_reduce="symm")                # no buffer: refused before any rank moves
        assert generate(tp.runner, PROMPTS[:1], cfg).token_ids == want[:1]    # the group still serves
    finally:
        tp.runner.close()


# -- 2 GPUs --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_tp2_symm_compiled_captured_tokens_equal_nccl_and_one_process(tmp_path):
    """2 GPUs: every rank's captured Reuse steps replay compiled blocks whose all-reduces are symmetric
    memory's one-shot (the custom op inside Inductor's code, inside the CUDA graph). Tokens equal TP=2 over
    NCCL (world 2 sums a + b in either order: the same bits), at T = 0 and seeded T > 0, and one GPU's
    graph runner (CUDA defaults: compiled, captured, fused decode) at T = 0, fp32, decisive tiny LLaDA.
    ``auto`` on the same group (switched on every rank, recaptured) takes one-shot too, capped at 8 MiB."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    from dlc.runtime.engine import graph_runner_for
    path = write_tiny(tmp_path, MODELS["llada"])
    cfgs = [GenerationConfig(**GEN), GenerationConfig(**GEN, temperature=0.9, seed=11)]
    got, reports = {}, {}
    for backend in ("symm", "nccl"):            # symm first: a fresh process state for symmetric memory
        torch._dynamo.reset()                   # rank 0 compiles from the state its worker starts from
        tp = open_model(str(path), dtype="fp32", device="cuda", progress=False, tensor_parallel_size=2,
                        tp_all_reduce=backend)
        try:
            runner = graph_runner_for(tp.runner)                   # CUDA defaults: graphs and compile on
            assert runner.graphed and runner.capture and runner.compiled
            got[backend] = [generate(runner, PROMPTS, c).token_ids for c in cfgs]
            assert runner.stats["replays"] > 0 and runner.stats["captures"] > 0
            assert runner.stats["eager_reuse"] == 0
            ranks = runner.step_times()
            assert all(r["compiled"] for r in ranks), ranks
            reports[backend] = [r["all_reduce"] for r in ranks]
            if backend == "symm":
                runner.step_times(all_reduce="auto")
                assert generate(runner, PROMPTS, cfgs[0]).token_ids == got["symm"][0]
                reports["auto"] = [r["all_reduce"] for r in runner.step_times()]
        finally:
            tp.runner.close()
    torch._dynamo.reset()
    one = open_model(str(path), dtype="fp32", device="cuda", progress=False)
    ref = graph_runner_for(one.runner)
    assert ref.capture and ref.compiled and ref.decoding == "fused"
    want = generate(ref, PROMPTS, cfgs[0]).token_ids
    assert len({tuple(t) for t in want}) == 3 and len(set(want[0])) > 2       # decisive: prompts matter
    assert got["symm"] == got["nccl"] and got["symm"][0] == want
    assert got["symm"][0] != got["symm"][1]                                   # the temperature matters
    sy, nc, au = reports["symm"], reports["nccl"], reports["auto"]
    assert all(r["backend"] == "symm" and r["one_shot"] > 0 for r in sy), sy  # one-shot on every rank,
    assert sy[0]["one_shot"] == sy[1]["one_shot"]                             # the same calls (lockstep)
    assert all(r["one_shot_max_bytes"] == 0 and r["one_shot"] == 0 for r in nc), nc
    assert all(r["backend"] == "auto" and r["one_shot"] > 0 for r in au), au
    assert au[0]["one_shot_max_bytes"] == min(8 << 20, sy[0]["one_shot_max_bytes"])


@pytest.mark.slow                            # ~30 s: a TP group of 2 processes, each backend's rounds
def test_tp_bench_times_each_backend_beside_tp1(tmp_path):
    """bench/tp_bench.py --all-reduce on CPU: one TP group switched between backends on every rank (gloo
    either way here), every side's tokens equal TP=1's, and the table carries each backend's ratios."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[2] / "bench" / "tp_bench.py"
    out = tmp_path / "tp.json"
    r = subprocess.run([sys.executable, "-P", str(bench), "--preset", "tiny-llada", "--device", "cpu",
                        "--dtype", "fp32", "--batch", "3", "--prompt", "16", "--gen", "16", "--block", "8",
                        "--rounds", "1", "--reps", "2", "--agree-preset", "none", "--all-reduce", "nccl,auto",
                        "--no-served",
                        "--ckpt", str(tmp_path / "ckpt"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    for side in ("tp2-nccl", "tp2-auto"):
        assert res[side]["identical_sequences"] == "3/3" and res[side]["tokens_per_s"] > 0
        assert [a["backend"] for a in res[side]["all_reduce"]] == [side[4:]] * 2      # every rank switched
    assert "| tp2-nccl |" in r.stdout and "| tp2-auto |" in r.stdout and "sync vs nccl" in r.stdout


def _copy_engine_rank(rank: int, port: int, q) -> None:
    """One rank of ``test_copy_engine_sums_equal_nccl_on_two_gpus`` (a fresh process: its own rendezvous)."""
    import os

    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            device_id=torch.device("cuda", rank))
    try:
        os.environ[ar.CE_MIN_ENV] = "2048"         # [1, 256] bf16 one-shot, [4+, 256] the copy engines
        red = ar.setup(ar.AllReduce(dist.group.WORLD), "symm", "cuda", torch.bfloat16, 256)
        g = torch.Generator(device="cuda").manual_seed(rank)
        xs = [torch.randn(n, 256, device="cuda", dtype=torch.bfloat16, generator=g) for n in (1, 4, 64)]

        def nccl(x):
            y = x.clone()
            dist.all_reduce(y)
            return y

        def ours(x):                               # one sum each way: at once, and two issued in flight
            a, b, c = x.clone(), x.clone(), (2 * x).clone()
            red(a)
            tb, tc = red.issue(b), red.issue(c)
            return a, red.wait(tb), red.wait(tc)
        eager = all(torch.equal(o, w) for x in xs for o, w in zip(ours(x), (nccl(x), nccl(x), nccl(2 * x))))
        static = [torch.zeros_like(x) for x in xs]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            outs = [ours(x) for x in static]                   # warm outside the capture
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [ours(x) for x in static]
        captured = True
        for it in range(3):                                    # new inputs, replayed in lockstep
            for x, st in zip(xs, static):
                st.copy_(x * (it + 1))
            graph.replay()
            torch.cuda.synchronize()
            captured &= all(torch.equal(o, w) for x, out in zip(static, outs)
                            for o, w in zip(out, (nccl(x), nccl(x), nccl(2 * x))))
        q.put((rank, eager, captured, red.report()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_copy_engine_sums_equal_nccl_on_two_gpus():
    """2 GPUs, ``symm`` with the copy engines from 2 KiB: sums at once and issued on the side stream (two in
    flight, joined by ``wait``), eagerly and captured in a CUDA graph replayed on new inputs, equal NCCL's bit
    for bit on both ranks; small messages still go one-shot."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_copy_engine_rank, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted(q.get(timeout=240) for _ in procs)
    for p in procs:
        p.join(60)
    for rank, eager, captured, report in res:
        assert eager and captured, (rank, eager, captured)
        assert report["copy_engine"] > 0 and report["one_shot"] > 0, report
        assert report["copy_engine_min_bytes"] == 2048
    assert res[0][3] == res[1][3]                              # the same choices on both ranks
