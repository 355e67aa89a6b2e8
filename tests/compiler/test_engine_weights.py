"""One copy of the weights per engine: the phase programs take them as inputs, ``weights.safetensors`` holds
them once, the runtime loads them once; the programs write K/V into the runtime's pool in place."""
import dataclasses
import json
import os

import pytest
import torch

from compiler_helpers import gen_tokens, run_cli
from dlc.manifest import EngineError
from dlc.models import build_model
from dlc.models.loading import init_weights, load_model, save_checkpoint
from dlc.runtime.runners.engine_dir import engine_runner, open_engine

OVERHEAD = 1.05          # the target: an engine on disk is at most 5% more than its weights


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """tiny-llada's layout and tokenizer at d_model 512 (28 MB of fp32 weights): weights dominate the
    engine, so a second copy would double its size."""
    lm = load_model("tiny-llada", seed=1)
    cfg = dataclasses.replace(lm.config, d_model=512, n_heads=8, n_kv_heads=8, mlp_hidden=1536)
    torch.manual_seed(0)
    m = build_model(cfg)
    init_weights(m, 1, std=0.25)
    path = tmp_path_factory.mktemp("wide-ckpt")
    save_checkpoint(m.eval(), path, tokenizer=lm.tokenizer)
    return path, sum(p.numel() * p.element_size() for p in m.parameters())


def _compile(ckpt, out, backend):
    res = run_cli(["compile", ckpt, "--target", "cpu", "--backend", backend, "-o", out, "--max-seq-len", "64",
                   "--max-batch-size", "2", "--block-length", "8"])
    assert res.exit_code == 0, res.output
    return json.loads((out / "dlc_engine.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["export", "onnx"])
def test_engine_stores_the_weights_once(wide_ckpt, tmp_path, backend):
    if backend == "onnx":
        pytest.importorskip("onnxscript")
    ckpt, weight_bytes = wide_ckpt
    out = tmp_path / backend
    m = _compile(ckpt, out, backend)
    size = sum(p.stat().st_size for p in out.iterdir() if p.name not in ("tokenizer.json", "config.json"))
    assert weight_bytes > 25e6 and m["weights"]["weight_bytes"] == weight_bytes
    assert weight_bytes <= size <= OVERHEAD * weight_bytes, (size, weight_bytes)
    runner, _ = engine_runner(out)                      # one copy on the device, shared by both phases
    assert sum(t.numel() * t.element_size()
               for t in {t.data_ptr(): t for t in runner.weights.values()}.values()) \
        == weight_bytes
    assert gen_tokens(str(out), "dual") == gen_tokens(str(ckpt), "dual")


def test_export_programs_hold_no_weights(tmp_path, tiny_ckpt):
    out = tmp_path / "e"
    m = _compile(tiny_ckpt, out, "export")
    for ph in ("refresh", "reuse"):
        ep = torch.export.load(str(out / f"{ph}.pt2"))
        held = sum(t.numel() for t in list(ep.state_dict.values()) + list(ep.constants.values())
                   if isinstance(t, torch.Tensor))
        assert held < 1000, held                                   # a few scalars at most
        assert ep.example_inputs is None                           # (they would be the weights)
        assert len(m["phases"][ph]["weight_inputs"]) == len(ep.graph_signature.user_inputs) \
            - len(m["phases"][ph]["inputs"])
        # K/V go into the pool inputs in place: index_put_ on views of k_pool / v_pool, no K/V outputs
        writes = [n for n in ep.graph.nodes if n.op == "call_function" and "index_put_" in str(n.target)]
        assert len(writes) == 2 * m["model"]["n_layers"]
        assert [o["name"] for o in m["phases"][ph]["outputs"]] == ["tokens", "confidence"]


def test_damaged_weights_are_refused_naming_the_file(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "e"
    _compile(tiny_ckpt, out, "export")
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="weights.safetensors does not match the sha256"):
        open_engine(out)
    res = run_cli(["generate", out, "hi", "--device", "cpu"])
    assert res.exit_code != 0 and "weights.safetensors" in res.output and "Traceback" not in res.output
    os.remove(w)
    with pytest.raises(EngineError, match="weights.safetensors is missing"):
        open_engine(out)
