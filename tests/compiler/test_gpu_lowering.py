"""GPU targets lower chunk_logits to dlc.fused_select_logits when the artifact runs torch ops (export, AOTI);
ONNX / TensorRT artifacts keep the chunked lowering. Checked on CPU: the engine's op runs its reference."""
import json

import pytest

from compiler_helpers import gen_tokens, run_cli


def dry_run(target, backend):
    res = run_cli(["compile", "tiny-llada", "--target", target, "--backend", backend, "--dry-run", "--json",
                   "--max-seq-len", "64", "--max-batch-size", "2"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


@pytest.mark.parametrize("target,backend,device,lowering", [
    ("cpu", "export", "cpu", "chunked"),
    ("cpu", "aoti", "cpu", "chunked"),
    ("h200", "export", "cuda", "fused_select_logits"),
    ("h200", "onnx", "cuda", "chunked"),                 # ONNX cannot carry the custom op
])
def test_dry_run_reports_the_lowering(target, backend, device, lowering):
    s = dry_run(target, backend)
    assert (s["device"], s["lowering"]) == (device, lowering)
    assert ("fuse_projections" in s["passes"]) == (lowering == "fused_select_logits")
    if lowering == "fused_select_logits":
        assert s["counts"]["chunk_logits/refresh"] == s["counts"]["chunk_logits/reuse"] == 1    # one op


def test_gpu_target_export_engine_generates_eager_tokens(tiny_ckpt, tmp_path):
    out = tmp_path / "h200-export"
    res = run_cli(["compile", tiny_ckpt, "--target", "h200", "--backend", "export", "--dtype", "fp32", "-o",
                   out, "--max-seq-len", "96", "--max-batch-size", "4", "--block-length", "8"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "dlc_engine.json").read_text())
    chunk = next(p for p in m["passes"] if p["name"] == "chunk_logits")
    assert chunk["params"]["device"] == "cuda" and chunk["params"]["lowering"] == "fused_select_logits"
    assert chunk["rewrites"] == {"refresh": 1, "reuse": 1}
    assert {"name": "confidence", "shape": ["C", "N"], "dtype": "float64"} in m["phases"]["reuse"]["outputs"]
    for kv in ("none", "dual"):
        eager = gen_tokens(str(tiny_ckpt), kv)
        assert len(set(eager)) > 1
        assert gen_tokens(str(out), kv) == eager


def test_gpu_target_export_engine_with_decode_extras_samples_filters_as_eager(tiny_ckpt, tmp_path):
    """--decode-extras on the GPU lowering: the programs take smoothing's embed_delta and return hidden_rows
    (no chunked extras); `dlc generate` on the engine then samples top-p at T > 0 and smooths exactly as the
    eager checkpoint (the runner decodes those batches from the rows with the eager runner's function)."""
    out = tmp_path / "h200-export-extras"
    res = run_cli(["compile", tiny_ckpt, "--target", "h200", "--backend", "export", "--dtype", "fp32", "-o",
                   out, "--max-seq-len", "96", "--max-batch-size", "4", "--block-length", "8",
                   "--decode-extras"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "dlc_engine.json").read_text())
    ins = [i["name"] for i in m["phases"]["reuse"]["inputs"]]
    assert "embed_delta" in ins and "credit_ids" not in ins
    assert [o["name"] for o in m["phases"]["reuse"]["outputs"]] == ["tokens", "confidence", "hidden_rows"]
    from dlc.runtime.session import open_model
    runner = open_model(str(out), device="cpu").runner
    assert "reuse_rows" in runner.phases                             # the loaded program's variant
    runner.enable_compile(True)                                      # (compiles lazily: nothing runs here)
    full, rows = (dict(runner.phases[ph].module.named_children()) for ph in ("reuse", "reuse_rows"))
    alike = [k for k in full if full[k] is rows.get(k)]
    assert len(alike) == len(full) - 1                               # one compile for all but the epilogue
    assert len(full) == runner.config.n_layers + 2                   # split: prelude, the layers, epilogue
    assert len({id(f) for f in full.values()}) == runner.phases["reuse"].n_compiled
    epilogue = [k for k in full if k not in alike][0]
    assert rows[epilogue] not in full.values()                       # the variant's own epilogue
    hot = ["--temperature", "1.5", "--seed", "3"]
    for extra in (hot + ["--top-p", "0.5"], ["--smoothing", "--threshold", "0.3"]):
        eager = gen_tokens(str(tiny_ckpt), extra=extra)
        assert gen_tokens(str(out), extra=extra) == eager, extra
        assert eager != gen_tokens(str(tiny_ckpt), extra=extra[:-2] if extra[0] == "--temperature"
                                   else extra[1:]), extra            # the filter / smoothing really acted
