"""Bad inputs to the CLI get one line naming the file (or the extra to install), never a traceback: damaged
checkpoints and tokenizers, CUDA asked for where there is none, a KV pool that cannot be allocated, missing
optional dependencies (checked before any work), hints that name commands that exist."""
import sys

import pytest
import torch
from click.testing import CliRunner

from dlc.cli import main


def run(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_line_error(res, *needles):
    assert res.exit_code != 0, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dlc.models.loading import load_model, save_checkpoint
    path = tmp_path_factory.mktemp("ckpt")
    lm = load_model("tiny-llada")
    save_checkpoint(lm.model, path, tokenizer=lm.tokenizer)
    return path


def _copy(ckpt, tmp_path):
    import shutil
    dst = tmp_path / "c"
    shutil.copytree(ckpt, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_damaged_weights_name_the_file(ckpt, tmp_path, damage):
    dst = _copy(ckpt, tmp_path)
    f = dst / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                   "random": torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()}[damage])
    one_line_error(run(["generate", dst, "hi", "--device", "cpu"]), str(f), "not a readable safetensors file")


def test_invalid_tokenizer_names_the_file(ckpt, tmp_path):
    dst = _copy(ckpt, tmp_path)
    (dst / "tokenizer.json").write_text("{not json")
    one_line_error(run(["generate", dst, "hi", "--device", "cpu"]), str(dst / "tokenizer.json"),
                   "not a valid tokenizer file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda():
    one_line_error(run(["generate", "tiny-llada", "hi", "--device", "cuda"]), "CUDA is not available",
                   "--device cpu")
    one_line_error(run(["serve", "tiny-llada", "--device", "cuda"]), "CUDA is not available")


def test_a_kv_pool_that_cannot_be_allocated():
    one_line_error(run(["serve", "tiny-llada", "--kv-cache-mb", "1e11", "--max-batch-size", "100000000"]),
                   "cannot allocate the KV slot pool", "--kv-cache-mb")


def test_onnx_without_onnxscript_names_the_extra_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)          # import onnxscript -> ImportError
    out = tmp_path / "engine"
    res = run(["compile", "tiny-llada", "--target", "cpu", "--backend", "onnx", "-o", out])
    one_line_error(res, "onnxscript", "pip install 'dlc[onnx]'")
    assert "[load]" not in res.output and not out.exists()


def test_bench_without_httpx_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    res = run(["bench", "serve", "dlc-tiny", "--num-requests", "2"])
    one_line_error(res, "httpx", "pip install 'dlc[bench]'")
    assert "workload" not in res.output                                # nothing started


def test_hints_name_commands_that_exist():
    from dlc.models.loading import CheckpointError, load_model
    with pytest.raises(CheckpointError) as e:
        load_model("llada-8b")
    assert "`hf download GSAI-ML/" in str(e.value) and "huggingface-cli" not in str(e.value)
    res = run(["compile", "llada-8b", "--target", "rtx4090", "--dry-run", "--max-seq-len", "1024"])
    note = next(ln for ln in res.output.splitlines() if ln.startswith("note:"))
    assert "--target rtx4090 --backend aoti -o OUT_DIR`" in note
