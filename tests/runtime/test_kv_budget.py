"""The KV pool's budget (runtime/memory.py): from free device memory on CUDA (a fake torch.cuda.mem_get_info
here), --kv-cache-mb as an override, 512 MiB on CPU, and one-line errors naming what to change."""
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from dlc.models.presets import preset_config
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.kv_cache import slot_bytes
from dlc.runtime.memory import plan_kv_budget
from dlc.runtime.server_cli import serve_command
from dlc.runtime.session import open_model

GIB = 2 ** 30
LLADA = preset_config("llada-8b")


class _Params(torch.nn.Module):
    """Stands for a loaded model: ``n`` bytes of bf16 parameters (on the meta device: no memory)."""
    def __init__(self, n: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.empty(n // 2, dtype=torch.bfloat16, device="meta"))


def _runner(weights=16 * GIB):
    return SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, model=_Params(weights))


def _fake_gpu(monkeypatch, free, total):
    calls = []

    def mem_get_info(device=None):
        calls.append(device)
        return free, total
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return calls


def _plan(max_seq=1024, **kw):
    return plan_kv_budget(ServeConfig(**kw), _runner(), LLADA, max_seq, 32)


def test_pool_takes_the_rest_of_the_fraction(monkeypatch):
    """An 80 GiB card with 17 GiB in use (an 8B bf16 model + context): the pool gets 0.9 x 80 - 17 GiB minus
    the activation reserve, tens of GiB (more than the old 512 MiB default by far)."""
    total, in_use = 80 * GIB, 17 * GIB
    calls = _fake_gpu(monkeypatch, total - in_use, total)
    b = _plan()
    assert calls and b.source == "gpu-memory-utilization"
    assert b.weights == 16 * GIB and b.in_use == in_use
    assert 0.5 * GIB < b.activations < 12 * GIB                   # an 8192-token iteration of LLaDA-8B
    assert b.bytes == int(0.9 * total) - in_use - b.activations
    slots = b.bytes // slot_bytes(LLADA, 1024, torch.bfloat16)     # 512 MiB per 1024-token slot
    assert 80 <= slots <= 110, slots
    lower = _plan(gpu_memory_utilization=0.5)
    assert b.bytes - lower.bytes == int(0.9 * total) - int(0.5 * total)
    _fake_gpu(monkeypatch, total - in_use - 4 * GIB, total)         # another process took 4 GiB
    assert b.bytes - _plan().bytes == 4 * GIB


def test_activation_reserve_follows_the_iteration_budget(monkeypatch):
    _fake_gpu(monkeypatch, 60 * GIB, 80 * GIB)
    small, large = _plan(max_num_tokens=1024), _plan(max_num_tokens=16384)
    assert small.activations < large.activations and small.bytes > large.bytes


def test_explicit_kv_cache_mb_overrides(monkeypatch):
    calls = _fake_gpu(monkeypatch, 60 * GIB, 80 * GIB)
    b = _plan(kv_cache_mb=2048)
    assert (b.bytes, b.source, calls) == (2048 * 2 ** 20, "kv-cache-mb", [])


def test_errors_name_what_to_change(monkeypatch):
    _fake_gpu(monkeypatch, 4 * GIB, 24 * GIB)                      # 16 GiB of weights on a 24 GiB card
    with pytest.raises(ValueError, match="--gpu-memory-utilization") as e:
        _plan()
    msg = str(e.value)
    assert "\n" not in msg and "weights 16.00 GiB" in msg and "--dtype" in msg
    _fake_gpu(monkeypatch, 19 * GIB, 80 * GIB)                     # 61 GiB in use: a little is left, but
    b = _plan(max_seq=4096)                                         # not one 2 GiB slot of 4096 tokens
    per = slot_bytes(LLADA, 4096, torch.bfloat16)
    assert 0 < b.bytes < per
    with pytest.raises(ValueError, match="--max-seq-len") as e:
        b.check_slot(per, 4096)
    assert "--gpu-memory-utilization" in str(e.value) and "\n" not in str(e.value)
    _plan(max_seq=1024).check_slot(slot_bytes(LLADA, 1024, torch.bfloat16), 1024)     # 1024 tokens fit


def test_bad_fraction_is_named():
    for bad in (0, 1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="gpu_memory_utilization"):
            ServeConfig(gpu_memory_utilization=bad)


def test_cpu_default_and_override_through_the_engine():
    sess = open_model("tiny-llada", progress=False)
    per = slot_bytes(sess.config, 64, torch.float32)
    eng = Engine(sess, ServeConfig(max_seq_len=64, max_batch_size=4096))
    assert eng.kv_budget.source == "cpu-default" and eng.kv.n_slots == 512 * 2 ** 20 // per
    eng = Engine(sess, ServeConfig(max_seq_len=64, max_batch_size=4096, kv_cache_mb=3.5 * per / 2 ** 20))
    assert eng.kv.n_slots == 3


def test_serve_refuses_a_pool_without_one_slot_in_one_line():
    res = CliRunner().invoke(serve_command, ["tiny-llada", "--max-seq-len", "128", "--kv-cache-mb", "0.01"])
    assert res.exit_code != 0
    err = res.output.strip()
    assert err.startswith("Error: --kv-cache-mb 0.01 MiB holds no KV slot") and "--max-seq-len" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("major,stacked", [(9, False), (8, True)])
def test_moe_reserve_follows_the_forward_the_gpu_runs(monkeypatch, major, stacked):
    """A MoE model's activation reserve holds its routed experts' hidden where the grouped GEMM runs (sm90 /
    sm100 in bf16) and every expert's where the stacked forward runs (older GPUs): LLaDA2-mini's 257 vs 9
    experts' hidden for each fed token."""
    from dlc.runtime.memory import activation_bytes
    mini = preset_config("llada2-mini")
    _fake_gpu(monkeypatch, 100 * GIB, 141 * GIB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev=None: SimpleNamespace(major=major))
    b = plan_kv_budget(ServeConfig(max_num_tokens=8192, max_batch_size=32), _runner(), mini, 4096, 32)
    tokens = 8192
    want = activation_bytes(mini, tokens, 32, 4096, 32 * 32, 32 * 32, 2, stacked_moe=stacked)
    assert b.activations == want
    wide = activation_bytes(mini, tokens, 32, 4096, 32 * 32, 32 * 32, 2, stacked_moe=True)
    narrow = activation_bytes(mini, tokens, 32, 4096, 32 * 32, 32 * 32, 2)
    assert wide - narrow == (tokens + 32 * 32) * 3 * 2 * (mini.ffn_hidden(True) - mini.ffn_hidden())
