"""End-to-end compile -> generate through the ONNX and AOTI backends (and TensorRT's clear refusal), plus
the C++ example running an AOTI engine.

The ONNX engines compile the tiny-llada checkpoint (tiny_ckpt) through the CLI. The AOTI checks run on
dlc-tiny's AOTI engine as tests/tiny/test_backend_gates.py builds it (the ``shared_engine`` fixture: a CPU
AOTInductor build is ~1.5 min on 2 cores, so one build per run serves both files)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from compiler_helpers import gen_tokens, run_cli
from dlc.runtime.runners.engine_dir import engine_runner
from dlc.models.loading import load_model
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.step import build_batch
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model
from dlc.tiny.quality_table import compiled_options

# confidences: onnxruntime's fp32 GEMMs round differently from PyTorch's (logits to fp32 eps)
CONF_ATOL = 1e-5
KV_ATOL = 1e-5        # fp32 K/V
ROOT = Path(__file__).resolve().parents[2]


def compile_engine(ckpt, out, backend, extra=()):
    res = run_cli(["compile", ckpt, "--target", "cpu", "--backend", backend, "-o", out, "--max-seq-len", "64",
                   "--max-batch-size", "2", "--block-length", "8", *extra])
    return res


@pytest.fixture(scope="module")
def onnx_engine(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "onnx"
    res = compile_engine(tiny_ckpt, out, "onnx")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_onnx_files_pass_the_checker(onnx_engine):
    import onnx
    m = json.loads((onnx_engine / "dlc_engine.json").read_text())
    for phase, spec in m["phases"].items():
        assert spec["runtime"] == "onnx" and spec["file"] == f"{phase}.onnx"
        onnx.checker.check_model(str(onnx_engine / spec["file"]), full_check=True)
        model = onnx.load(str(onnx_engine / spec["file"]), load_external_data=False)
        # weights are inputs, stored once
        names = [i["name"] for i in spec["inputs"]] + spec["weight_inputs"]
        assert [i.name for i in model.graph.input] == names and len(spec["weight_inputs"]) > 10
        data = sum(n for f, n in spec["bytes"].items() if f != spec["file"])   # external data: constants only
        assert data < m["weights"]["weight_bytes"] / 100
    assert "trtexec --onnx=refresh.onnx" in m["tensorrt"]["trtexec"]["refresh"]


@pytest.mark.slow
def test_onnxruntime_matches_pytorch_per_phase(onnx_engine, tiny_ckpt, tmp_path):
    """One Refresh and one Reuse step through onnxruntime (functional programs: K/V returned, the runner
    writes the pool) and through the in-process export backend (K/V written into the pool by the program):
    the same tokens, confidences and pool contents."""
    pt = tmp_path / "export"
    assert compile_engine(tiny_ckpt, pt, "export").exit_code == 0
    results = []
    for path in (onnx_engine, pt):
        runner, m = engine_runner(path)
        assert m["build"]["kv_inplace"] is (path == pt)
        pool = KVCacheManager(runner.config, 24, 1 << 40, runner.dtype, "cpu", max_slots=4)
        x = [torch.tensor([72, 101, 108, 108] + [257] * 8), torch.tensor([87, 111] + [257] * 8)]
        a = runner.refresh(build_batch(runner, "refresh", x, [4, 2], [4, 2], 8, slots=[(3,), (1,)],
                                       pool=pool))
        x[0][6], x[1][3] = 72, 101
        b = runner.reuse(build_batch(runner, "reuse", x, [4, 2], [4, 2], 8, [(4, 12), (2, 10)], [(3,), (1,)],
                                     pool))
        results.append((a, b, pool.k_all.clone(), pool.v_all.clone()))
    (a1, b1, k1, v1), (a2, b2, k2, v2) = results
    for (t1, c1), (t2, c2) in [(a1, a2), (b1, b2)]:
        assert torch.equal(t1, t2)                                          # tokens
        assert torch.allclose(c1, c2, rtol=0, atol=CONF_ATOL)               # confidence
    assert k1[:, [3, 1]].abs().amax() > 0 and not k1[:, [0, 2]].any()
    assert torch.allclose(k1, k2, atol=KV_ATOL) and torch.allclose(v1, v2, atol=KV_ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["none", "dual"])
def test_onnx_engine_generates_eager_tokens(onnx_engine, tiny_ckpt, kv):
    eager = gen_tokens(str(tiny_ckpt), kv)
    assert len(set(eager)) > 1
    assert gen_tokens(str(onnx_engine), kv) == eager


@pytest.fixture(scope="module")
def trt_prepared(tiny_ckpt, tmp_path_factory):
    """``dlc compile --backend tensorrt --prepare-only`` without TensorRT: the ONNX half and the manifest
    (the CLI's exit code and output with them). Two tests read it; neither writes into it."""
    pytest.importorskip("onnx")
    out = tmp_path_factory.mktemp("engines") / "trt"
    res = compile_engine(tiny_ckpt, out, "tensorrt", ["--prepare-only"])
    return out, res


@pytest.mark.slow
def test_tensorrt_missing_fails_unless_prepare_only(tiny_ckpt, trt_prepared, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    out = tmp_path / "trt"
    # the backend asked for cannot be built: fail first
    res = compile_engine(tiny_ckpt, out, "tensorrt")
    assert res.exit_code != 0
    assert "TensorRT is not installed" in res.output and "pip install tensorrt" in res.output
    assert "Nothing was written" in res.output and "--prepare-only" in res.output
    assert not out.exists() or not any(out.iterdir())
    out, res = trt_prepared                                                # the portable half, on purpose
    assert res.exit_code == 0, res.output
    assert "TensorRT engines not built" in res.output
    m = json.loads((out / "dlc_engine.json").read_text())
    assert m["backend"] == "tensorrt" and m["runtime"] == "onnx" and "not built" in m["pending"]
    cmd = m["tensorrt"]["trtexec"]["reuse"]
    assert cmd.startswith("trtexec --onnx=reuse.onnx --saveEngine=reuse.engine")
    assert "--minShapes=q_ids:1x1," in cmd and "--maxShapes=q_ids:4x64," in cmd and \
        "k_pool:2x16x4x64x16" in cmd
    assert not list(out.glob("*.engine"))                                  # never claims it ran
    assert run_cli(["inspect", out]).exit_code == 0
    assert gen_tokens(str(out), "dual") == gen_tokens(str(tiny_ckpt), "dual")   # the ONNX runs meanwhile


def double_tensors(path) -> list[str]:
    """Every float64 place of an ONNX model: graph inputs, outputs, initializers, inferred value types, Cast
    targets and Constant values, in subgraphs too."""
    import onnx
    from onnx import TensorProto
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    found = []

    def walk(g, where):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == TensorProto.DOUBLE:
                found.append(f"{where}value {vi.name}")
        found.extend(f"{where}initializer {t.name}" for t in g.initializer
                     if t.data_type == TensorProto.DOUBLE)
        for node in g.node:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.DOUBLE:
                    found.append(f"{where}Cast {node.name}")
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.DOUBLE:
                    found.append(f"{where}{node.op_type} {node.name}")
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, f"{where}{node.name}/")
    walk(model.graph, "")
    for fn in model.functions:
        for node in fn.node:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.DOUBLE:
                    found.append(f"function {fn.name}: Cast {node.name}")
    return found


@pytest.mark.slow
def test_tensorrt_onnx_has_no_float64(tiny_ckpt, onnx_engine, trt_prepared):
    """TensorRT has no double type: the ONNX written for --backend tensorrt decodes in float32 (temperature,
    confidence, the sampling noise) and holds no float64 anywhere; the plain ONNX backend keeps LLaDA's
    float64 decoding (so the check finds something where there is something to find)."""
    out, res = trt_prepared
    assert res.exit_code == 0, res.output
    for ph in ("refresh", "reuse"):
        assert double_tensors(out / f"{ph}.onnx") == [], ph
        assert double_tensors(onnx_engine / f"{ph}.onnx")
    m = json.loads((out / "dlc_engine.json").read_text())
    assert {"name": "temperature", "shape": [1], "dtype": "float32"} in m["phases"]["refresh"]["inputs"]
    assert {"name": "confidence", "shape": ["C", "N"], "dtype": "float32"} in m["phases"]["reuse"]["outputs"]
    runner, _ = engine_runner(out)                    # onnxruntime runs the same ONNX meanwhile, T > 0 too
    ref = open_model(str(tiny_ckpt), device="cpu").runner
    prompts = [[72, 101, 108, 108], [87, 111, 114, 108, 100]]
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    assert generate(runner, prompts, cfg).token_ids == generate(ref, prompts, cfg).token_ids
    hot = GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual", temperature=0.8, seed=3)
    sampled = generate(runner, prompts, hot).token_ids
    assert sampled == generate(runner, prompts, hot).token_ids and \
        sampled != generate(runner, prompts, cfg).token_ids


@pytest.mark.slow
def test_aoti_for_a_gpu_not_here_fails_unless_prepare_only(tiny_ckpt, tmp_path):
    """One rule for every backend: exit 0 only when the artifact asked for exists (or --prepare-only)."""
    pytest.importorskip("onnx")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: whether it is an sm_89 decides, not this test")
    out = tmp_path / "ada"
    args = ["compile", tiny_ckpt, "--target", "rtx4090", "--backend", "aoti", "--dtype", "fp32", "-o", out,
            "--max-seq-len", "64", "--max-batch-size", "2", "--block-length", "8"]
    res = run_cli(args)
    assert res.exit_code != 0 and "must be built on a sm_89 GPU" in res.output and \
        "--prepare-only" in res.output
    assert not out.exists() or not any(out.iterdir())
    res = run_cli(args + ["--prepare-only"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "dlc_engine.json").read_text())
    assert m["backend"] == "aoti" and m["runtime"] == "onnx" and "sm_89" in m["pending"]
    assert not list(out.glob("*.aoti.pt2"))


@pytest.fixture(scope="module")
def aoti_engine(shared_engine):
    """dlc-tiny (LLaDA layout, 4 layers, trained) compiled for the CPU with AOTInductor, once per run."""
    return shared_engine("dlc-tiny", "aoti", **compiled_options("dlc-tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["prefix", "dual"])
def test_aoti_engine_generates_eager_tokens(aoti_engine, kv):
    """16 tokens in 8 steps (two per step) past the answer of a dlc-tiny task without its chat template:
    low-confidence predictions (7 and 10 different tokens, prefix / dual), so the compiled numerics decide
    more tokens than the held-out gate does (tests/tiny/test_backend_gates.py)."""
    m = json.loads((aoti_engine / "dlc_engine.json").read_text())
    assert m["runtime"] == "aoti" and m["phases"]["refresh"]["file"] == "refresh.aoti.pt2"
    eager = gen_tokens("dlc-tiny", kv, prompt="6+32")
    assert len(set(eager)) > 4
    assert gen_tokens(str(aoti_engine), kv, prompt="6+32") == eager


@pytest.mark.slow
def test_aoti_packages_hold_no_weights(aoti_engine):
    """The weights are program inputs read from weights.safetensors: no AOTI package carries constants."""
    m = json.loads((aoti_engine / "dlc_engine.json").read_text())
    for ph in ("refresh", "reuse"):
        pkg = torch._inductor.aoti_load_package(str(aoti_engine / m["phases"][ph]["file"]))
        assert pkg.get_constant_fqns() == [] and len(m["phases"][ph]["weight_inputs"]) > 10


@pytest.mark.slow
def test_cpp_example_runs_refresh_and_reuse(aoti_engine, tmp_path):
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler")
    exe = tmp_path / "dlc_engine_demo"
    build = subprocess.run(["bash", str(ROOT / "examples/cpp/build.sh"), str(exe)], capture_output=True,
                           text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    res = run_cli(["tokenize", aoti_engine, "Hell", "--no-chat", "--cpp", "--gen-length", "4",
                   "--block-length", "4"])
    # dlc-tiny's ids of "Hell", then 4 x its mask id (1)
    assert res.exit_code == 0 and res.output.split() == "4 8 47 76 83 83 1 1 1 1".split(), res.output
    ids = [47, 76, 83, 83, 1, 1, 1, 1]
    run = subprocess.run([str(exe), str(aoti_engine), *res.output.split()], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    lines = dict(line.split(":", 1) for line in run.stdout.splitlines() if ":" in line)
    cpp_refresh = [int(t) for t in lines["refresh tokens"].split()]
    cpp_reuse = [int(t) for t in lines["reuse tokens"].split()]
    # the same two steps through the Python runner of the same engine
    runner, _ = engine_runner(aoti_engine)
    x = torch.tensor(ids)
    pool = KVCacheManager(runner.config, 8, 1 << 40, runner.dtype, "cpu", max_slots=1)
    x0, conf = runner.refresh(build_batch(runner, "refresh", [x], [4], [4], 4, slots=[(0,)], pool=pool))
    assert cpp_refresh == x0[0].tolist()
    best = int(conf[0].argmax())
    x[4 + best] = x0[0, best]
    y0, _ = runner.reuse(build_batch(runner, "reuse", [x], [4], [4], 4, [(4, 8)], [(0,)], pool))
    assert cpp_reuse == y0[0].tolist()
    assert f"committed column {4 + best} = {int(x0[0, best])}" in run.stdout


class _Kind:
    def __init__(self, name):
        self.name = name


class _FakeEngine:
    """The three calls of TensorRT's ICudaEngine that check_bindings reads (TensorRT cannot be installed
    here)."""
    binds = {"q_ids": ("INT64", (-1, -1), ((1, 1), (2, 8), (4, 64))),
             "temperature": ("FLOAT", (1,), ((1,), (1,), (1,)))}

    def get_tensor_dtype(self, n):
        return _Kind(self.binds[n][0])

    def get_tensor_shape(self, n):
        return self.binds[n][1]

    def get_tensor_profile_shape(self, n, profile):
        return self.binds[n][2]


def test_tensorrt_bindings_are_checked_before_running():
    from dlc.runtime.runners.artifacts import check_bindings
    names, eng = ["q_ids", "temperature"], _FakeEngine()
    ok = [torch.zeros(2, 8, dtype=torch.long), torch.zeros(1)]
    check_bindings(eng, "reuse.engine", names, ok)
    bad = [([torch.zeros(2, 8, dtype=torch.long), torch.zeros(1, dtype=torch.float64)],
            "input temperature is"),
           ([torch.zeros(2, 8, dtype=torch.int32), torch.zeros(1)], "input q_ids is torch.int32"),
           ([torch.zeros(2, 8, 1, dtype=torch.long), torch.zeros(1)], "input q_ids has shape"),
           ([torch.zeros(5, 8, dtype=torch.long), torch.zeros(1)], r"within \[\[1, 1\], \[4, 64\]\]"),
           ([torch.zeros(2, 8, dtype=torch.long), torch.zeros(2)], "input temperature has shape"),
           ([torch.zeros(2, 8, dtype=torch.long)], "takes 2 inputs")]
    for args, needle in bad:
        with pytest.raises(ValueError, match=needle):
            check_bindings(eng, "reuse.engine", names, args)
