"""Engine directories through the in-process export backend: dlc_engine.json, the HF files beside it,
generate, inspect, refusals."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from compiler_helpers import gen_tokens, run_cli
from dlc.runtime.runners.engine_dir import engine_runner, open_engine
from dlc.manifest import EngineError, settings_hash
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import open_model


@pytest.fixture(scope="module")
def engine(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "export"
    res = run_cli(["compile", tiny_ckpt, "--target", "cpu", "--backend", "export", "-o", out,
                   "--max-seq-len", "96", "--max-batch-size", "4", "--block-length", "8"])
    assert res.exit_code == 0, res.output
    assert "[export refresh] done" in res.output and "wrote" in res.output
    return out


def test_manifest_describes_the_engine(engine, tiny_ckpt):
    m = json.loads((engine / "dlc_engine.json").read_text())
    assert m["format"] == "dlc-engine" and m["dlc"] and m["torch"] == torch.__version__
    assert m["target"]["name"] == "cpu" and m["dtype"] == "fp32" and m["backend"] == m["runtime"] == "export"
    assert m["model"]["mask_id"] == 257 and m["model"]["eos_id"] == 256 and m["model"]["n_layers"] == 2
    assert m["build"]["max_seq_len"] == 96 and m["build"]["max_batch_size"] == 4 and \
        m["build"]["block_length"] == 8
    assert [p["name"] for p in m["passes"]] == ["cache_kv_reuse", "chunk_logits", "lift_weights"]
    assert m["passes"][1]["params"]["vocab_chunk"] == m["build"]["logit_chunk"]
    refresh, reuse = m["phases"]["refresh"], m["phases"]["reuse"]
    assert refresh["file"] == "refresh.pt2" and (engine / "refresh.pt2").exists()
    assert [i["name"] for i in refresh["inputs"]][:3] == ["input_ids", "position_ids", "key_mask"]
    assert {"name": "k_pool", "shape": [2, "P", 4, "S", 16], "dtype": "float32"} in reuse["inputs"]
    assert {"name": "rows", "shape": ["B"], "dtype": "int64"} in reuse["inputs"]
    assert {"name": "confidence", "shape": ["C", "N"], "dtype": "float64"} in reuse["outputs"]
    assert [o["name"] for o in reuse["outputs"]] == ["tokens", "confidence"]      # K/V written in place
    assert m["build"]["kv_inplace"] is True
    assert m["weights"]["file"] == "weights.safetensors" and (engine / "weights.safetensors").exists()
    assert refresh["weight_inputs"] == reuse["weight_inputs"] and len(reuse["weight_inputs"]) > 10
    assert m["settings_hash"] == settings_hash(m)
    assert "tokenizer.json" in m["tokenizer"] and (engine / "tokenizer.json").exists()
    assert set(m["compile_seconds"]) >= {"load", "trace+passes", "export refresh", "export reuse"}
    assert m["artifact_bytes"]["refresh"] > 0


def test_hf_tooling_reads_the_engine_directory_like_the_checkpoint(engine, tiny_ckpt):
    """config.json is the model's HF config (the checkpoint's own keys), so transformers loads the engine's
    tokenizer from the directory; dlc's description stays in dlc_engine.json."""
    from transformers import AutoTokenizer
    assert json.loads((engine / "config.json").read_text()) == \
        json.loads((tiny_ckpt / "config.json").read_text())
    tok, ref = AutoTokenizer.from_pretrained(str(engine)), AutoTokenizer.from_pretrained(str(tiny_ckpt))
    text = "The cat sat"
    assert tok(text)["input_ids"] == ref(text)["input_ids"] and len(tok(text)["input_ids"]) == len(text)


@pytest.mark.parametrize("kv", ["none", "prefix", "dual"])
def test_generate_from_the_engine_equals_eager(engine, tiny_ckpt, kv):
    eager = gen_tokens(str(tiny_ckpt), kv)
    assert len(set(eager)) > 1                                   # a real comparison, not a constant
    assert gen_tokens(str(engine), kv) == eager


def test_engine_runner_in_a_batch_with_cfg(engine, tiny_ckpt):
    runner, _ = engine_runner(engine)
    eager = open_model(str(tiny_ckpt), device="cpu").runner
    prompts = [[72, 101, 108], [87, 111, 114, 108, 100, 33, 32]]
    for kv, cfg_scale in [("dual", 1.0), ("prefix", 0.0)]:
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=8, kv_cache=kv, cfg_scale=cfg_scale)
        assert generate(runner, prompts, cfg).token_ids == generate(eager, prompts, cfg).token_ids


def test_inspect_summarises(engine):
    res = run_cli(["inspect", engine])
    assert res.exit_code == 0, res.output
    for word in ("export", "cpu", "fp32", "mask 257", "cache_kv_reuse", "refresh.pt2", "k_pool",
                 "weights.safetensors", "status      ok"):
        assert word in res.output


def _copy(engine, tmp_path):
    dst = tmp_path / "engine"
    shutil.copytree(engine, dst)
    return dst, json.loads((dst / "dlc_engine.json").read_text())


def test_missing_artifact_is_refused(engine, tmp_path):
    dst, _ = _copy(engine, tmp_path)
    (dst / "reuse.pt2").unlink()
    with pytest.raises(EngineError, match="reuse artifact reuse.pt2 is missing"):
        open_engine(dst)
    res = run_cli(["generate", dst, "hi", "--device", "cpu"])
    assert res.exit_code != 0 and "missing" in res.output


def test_other_torch_version_is_refused(engine, tmp_path):
    dst, m = _copy(engine, tmp_path)
    m["torch"] = "2.11.0+cu128"
    (dst / "dlc_engine.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="built with torch 2.11.0"):
        open_engine(dst)


def test_edited_settings_are_refused_by_the_hash(engine, tmp_path):
    dst, m = _copy(engine, tmp_path)
    m["build"]["logit_chunk"] = 7
    (dst / "dlc_engine.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="settings hash mismatch"):
        open_engine(dst)
    res = run_cli(["inspect", dst])
    assert "REFUSED" in res.output and res.exit_code == 1
    res = run_cli(["inspect", dst, "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["status"] == "REFUSED"


def test_truncated_artifact_is_refused(engine, tmp_path):
    dst, _ = _copy(engine, tmp_path)
    data = (dst / "refresh.pt2").read_bytes()
    (dst / "refresh.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="damaged"):
        open_engine(dst)


def test_manifest_records_each_artifacts_sha256(engine):
    m = json.loads((engine / "dlc_engine.json").read_text())
    for spec in m["phases"].values():
        files = [spec["file"], *spec["extra_files"]]
        assert sorted(spec["sha256"]) == sorted(files)
        for f in files:
            assert spec["sha256"][f] == hashlib.sha256((engine / f).read_bytes()).hexdigest()
    res = run_cli(["inspect", engine, "--json", "--verify"])
    assert res.exit_code == 0 and json.loads(res.output)["status"] == "ok"


def _scribble(path):
    """Overwrite 4 KiB in the middle of ``path`` with random bytes: same size, same mtime as before."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                         dtype=torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_random_bytes_in_an_artifact_are_refused_naming_the_file(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dst, _ = _copy(engine, tmp_path)
    size = (dst / "refresh.pt2").stat().st_size
    (dst / "refresh.pt2").write_bytes(bytes(torch.randint(0, 256, (size,), dtype=torch.uint8).numpy()))
    with pytest.raises(EngineError, match="refresh.pt2 does not match the sha256"):
        open_engine(dst)
    res = run_cli(["generate", dst, "hi", "--device", "cpu"])
    assert res.exit_code != 0 and "refresh.pt2 does not match the sha256" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    res = run_cli(["inspect", dst])
    assert res.exit_code == 1 and "REFUSED" in res.output and "refresh.pt2" in res.output


def test_verification_is_cached_by_size_and_mtime_and_verify_rehashes(engine, tmp_path, monkeypatch):
    """A file verified once is trusted while its size and mtime are unchanged (16 GB engines load without
    re-hashing); `dlc inspect --verify` hashes again and catches a same-size, same-mtime change."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    dst, _ = _copy(engine, tmp_path)
    open_engine(dst)                                            # verifies and remembers each file
    assert (tmp_path / "cache" / "dlc" / "verified.json").exists()
    _scribble(dst / "reuse.pt2")
    assert run_cli(["inspect", dst]).exit_code == 0              # trusted: (size, mtime) unchanged
    res = run_cli(["inspect", dst, "--verify"])
    assert res.exit_code == 1 and "reuse.pt2 does not match the sha256" in res.output
    os.utime(dst / "reuse.pt2")                                  # touched: hashed again on open
    with pytest.raises(EngineError, match="reuse.pt2 does not match the sha256"):
        open_engine(dst)


def test_compile_refuses_a_foreign_non_empty_directory(tiny_ckpt, engine, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["compile", tiny_ckpt, "--target", "cpu", "--backend", "export", "--max-seq-len", "48",
            "--max-batch-size", "2", "--block-length", "8", "-o"]
    res = run_cli(args + [out])
    assert res.exit_code != 0 and "not empty and is not a dlc engine" in res.output and \
        "--force" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    res = run_cli(args + [out, "--force"])
    assert res.exit_code == 0 and (out / "notes.txt").read_text() == "keep me"
    dst, _ = _copy(engine, tmp_path)                             # an engine directory is recompiled in place
    assert run_cli(args + [dst]).exit_code == 0
    assert json.loads((dst / "dlc_engine.json").read_text())["build"]["max_seq_len"] == 48


def test_sparse_engine_with_full_retention_equals_eager(tiny_ckpt, tmp_path):
    out = tmp_path / "sparse"
    res = run_cli(["compile", tiny_ckpt, "--target", "cpu", "--backend", "export", "-o", out, "--max-seq-len",
                   "64", "--max-batch-size", "2", "--block-length", "8", "--sparse-retention", "1.0"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "dlc_engine.json").read_text())
    assert [p["name"] for p in m["passes"]] == ["cache_kv_reuse", "sparsify_heads", "chunk_logits",
                                                "lift_weights"]
    assert any(i["name"] == "keep_idx" for i in m["phases"]["reuse"]["inputs"])
    assert gen_tokens(str(out), "dual") == gen_tokens(str(tiny_ckpt), "dual")


def test_head_sparse_engine_serves_default_requests(tiny_ckpt, tmp_path):
    """The engine keeps each row's Refresh head scores in its KV pool, so a head-sparse engine serves
    dual-cache requests in a batch (it answered 500 to every one while the scores rode on the cache
    object)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    out = tmp_path / "sparse-half"
    res = run_cli(["compile", tiny_ckpt, "--target", "cpu", "--backend", "export", "-o", out, "--max-seq-len",
                   "64", "--max-batch-size", "4", "--block-length", "8", "--sparse-retention", "0.5"])
    assert res.exit_code == 0, res.output
    eng = Engine(open_model(str(out), device="cpu"),
                 ServeConfig(kv_cache_mb=16, kv_cache="dual", gen_length=16,
                                                               block_length=8, steps=16))
    assert eng.kv.scores is not None
    reqs = [eng.make_request(p, {}) for p in ([72, 101, 108], [87, 111, 114, 108, 100], [1, 2, 3, 4, 5, 6])]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert all(r.finish_reason in ("stop", "length") and r.error is None for r in reqs)
    assert all(r.output_ids for r in reqs) and eng.metrics.counter("phase_tokens_total", phase="reuse") > 0
    assert eng.metrics.counter("isolated_batches_total") == 0


def test_unreadable_manifest_is_refused(engine, tmp_path):
    dst, _ = _copy(engine, tmp_path)
    text = (dst / "dlc_engine.json").read_text()
    (dst / "dlc_engine.json").write_text(text[: len(text) // 2])
    with pytest.raises(EngineError, match="not valid JSON"):
        open_model(str(dst), device="cpu")


def test_forged_manifest_is_refused_at_load(engine, tmp_path):
    """An edited model config whose settings hash was recomputed: the programs' recorded K/V shapes no longer
    match it, so opening the engine fails (not every request later)."""
    dst, m = _copy(engine, tmp_path)
    m["model"]["d_model"] *= 2
    m["settings_hash"] = settings_hash(m)
    (dst / "dlc_engine.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"refresh program's k_pool input has shape .* the model config"):
        open_engine(dst)
    res = run_cli(["generate", dst, "hi", "--device", "cpu"])
    assert res.exit_code != 0 and "the manifest does not describe these programs" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_unreadable_program_with_a_forged_sha_names_the_file(engine, tmp_path):
    dst, m = _copy(engine, tmp_path)
    f = dst / "reuse.pt2"
    f.write_bytes(bytes(torch.randint(0, 256, (f.stat().st_size,), dtype=torch.uint8).numpy()))
    m["phases"]["reuse"]["sha256"]["reuse.pt2"] = hashlib.sha256(f.read_bytes()).hexdigest()
    m["settings_hash"] = settings_hash(m)
    (dst / "dlc_engine.json").write_text(json.dumps(m))
    res = run_cli(["generate", dst, "hi", "--device", "cpu"])
    assert res.exit_code != 0 and f"{f}: cannot load the reuse program (export)" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("kv,window", [("dual", 16), ("prefix", 3)])
def test_engine_steps_run_ahead_give_generate_tokens(engine, tiny_ckpt, kv, window):
    """An engine's Reuse program runs fixed-schedule steps back to back over its graphs' static inputs
    (ProgramGraphs.run_ahead; without capture on CPU), the commits landing in the static q_ids; a window of 3
    launches the block's later steps as earlier ones land (continue_ahead, no restaging); the serving engine
    applies them through the decoding core: tokens equal generate() on the eager checkpoint."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache=kv)
    prompts = [[72, 101, 108, 108, 111], [87, 111, 114], [1, 2, 3, 4, 5, 6, 7]]
    eager = open_model(str(tiny_ckpt), device="cpu").runner
    refs = [generate(eager, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0] for p in prompts]
    assert len({tuple(r) for r in refs}) > 1                       # decisive: outputs vary by prompt
    eng = Engine(open_model(str(engine), device="cpu"), ServeConfig(kv_cache_mb=16, max_batch_size=4,
                                                                    lookahead_steps=window,
                                                                    lookahead_max_ms=0, **params))
    eng.runner.enable_graphs(True, capture=False)
    eng.runner.bind_pool(eng.kv)
    reqs = [eng.make_request(p, {}) for p in prompts]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.output_ids for r in reqs] == refs
    st = eng.runner.graphs.stats
    assert st["ahead_calls"] > 0 and eng.metrics.counter("lookahead_dropped_steps_total") == 0
    assert (st["ahead_continued"] > 0) == (window < 7)                 # 7 Reuse steps per block


def _compile_at_load(engine, tiny_ckpt, prompts):
    """-> (a serving Engine over the export engine with compile at load, eager generate()'s tokens of each
    prompt alone); the prompts' outputs must vary (a decisive model)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    params = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    eager = open_model(str(tiny_ckpt), device="cpu").runner
    refs = [generate(eager, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0] for p in prompts]
    assert len({tuple(r) for r in refs}) > 1                       # decisive: outputs vary by prompt
    eng = Engine(open_model(str(engine), device="cpu"), ServeConfig(kv_cache_mb=16, max_batch_size=4,
                                                                    compile=True, **params))
    return eng, refs


@pytest.mark.slow
def test_export_engine_compiled_at_load_serves_eager_tokens_and_writes_the_pool_in_place(engine, tiny_ckpt):
    """``--compile`` on an export engine: Inductor compiles both phase programs at load (CompiledRunner.
    enable_compile; the GPU default). Through the serving Engine, requests of different lengths in one batch
    (Refresh and Reuse rows, static-buffer graphs without capture) give eager generate()'s tokens, and the
    compiled Reuse program writes its K/V into the pool tensors themselves (no copy of the pool)."""
    prompts = [[72, 101, 108, 108, 111], [87, 111, 114], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    eng, refs = _compile_at_load(engine, tiny_ckpt, prompts)
    runner = eng.runner
    assert runner.compiled
    assert all(type(piece).__name__ == "OptimizedModule"                   # Inductor runs every piece
               for p in runner.phases.values() for _, piece in p.module.named_children())
    runner.enable_graphs(True, capture=False)
    runner.bind_pool(eng.kv)
    k_all, ptr = eng.kv.k_all, eng.kv.k_all.data_ptr()
    before = k_all.clone()
    reqs = [eng.make_request(p, {}) for p in prompts]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    assert [r.output_ids for r in reqs] == refs
    assert eng.kv.k_all is k_all and k_all.data_ptr() == ptr and not torch.equal(k_all, before)
    assert runner.graphs.stats["captures"] > 0                   # Reuse steps went through the static path


def test_compile_at_load_splits_programs_by_layer_and_shares_one_layer_function(engine, tiny_ckpt,
                                                                               monkeypatch):
    """Compile at load splits each phase program at its layer boundaries (runners/inductor.py): a prelude,
    one piece per layer and an epilogue, the layers' pieces one shared function. Run uncompiled (the compile
    step replaced by the identity, so the test checks the split itself, fast), the split programs serve
    eager's tokens in mixed batches: pieces merged that are not the same computation would not."""
    from dlc.runtime.runners import inductor
    monkeypatch.setattr(inductor, "_compile", lambda fn: fn)
    prompts = [[72, 101, 108, 108, 111], [87, 111, 114], [3, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    eng, refs = _compile_at_load(engine, tiny_ckpt, prompts)
    n_layers = eng.runner.config.n_layers
    assert n_layers > 1
    for program in eng.runner.phases.values():
        pieces = [m for _, m in program.module.named_children()]           # shared modules listed once
        layer_fn = getattr(program.module, "submod_1")
        assert program.n_compiled == 3 == len(pieces)
        assert all(getattr(program.module, f"submod_{i + 1}") is layer_fn for i in range(n_layers))
    calls = {"refresh": 0, "refresh_unpadded": 0}
    for phase in calls:                                   # count the Refresh programs' calls
        program = eng.runner.phases[phase]
        eng.runner.phases[phase] = lambda *a, _p=program, _n=phase: calls.__setitem__(_n, calls[_n] + 1) \
            or _p(*a)
    reqs = [eng.make_request(p, {}) for p in prompts]
    for r in reqs:                                        # one batch of three lengths: padded rows
        eng.add_request(r)
    eng.run_until_done()
    solo = eng.make_request(prompts[0], {})               # alone: no padded row, the unmasked program
    eng.add_request(solo)
    eng.run_until_done()
    assert [r.output_ids for r in reqs] + [solo.output_ids] == refs + refs[:1]
    assert calls["refresh"] > 0 and calls["refresh_unpadded"] > 0, calls


def test_padding_mask_is_dropped_only_where_it_is_one():
    """``without_padding_mask``: a program whose attention mask is the key-padding input seen through views
    gets a copy without the mask (same values on an unpadded batch); any other mask (block-causal, combined)
    keeps its program (None)."""
    import torch.nn.functional as F
    from dlc.runtime.runners.inductor import SDPA, without_padding_mask

    class Attn(torch.nn.Module):
        def __init__(self, causal: bool):
            super().__init__()
            self.causal = causal

        def forward(self, q, key_mask):
            mask = key_mask[:, None, None, :]                                    # [B, 1, 1, T]
            if self.causal:
                mask = mask & torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    q, km = torch.randn(2, 2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    padded = torch.export.export(Attn(False), (q, km)).module()
    bare = without_padding_mask(padded)
    assert bare is not None
    assert [n.args[3:4] for n in bare.graph.nodes if n.target is SDPA] == [(None,)]
    torch.testing.assert_close(bare(q, km), padded(q, km), rtol=1e-5, atol=1e-6)
    assert without_padding_mask(torch.export.export(Attn(True), (q, km)).module()) is None


def test_compile_at_load_is_for_export_engines(engine):
    """AOTI packages are Inductor code already; ONNX / TensorRT compile themselves: --compile is refused."""
    runner, _ = engine_runner(engine)
    runner.kind = "aoti"
    with pytest.raises(ValueError, match="compile: the aoti engine's programs are compiled code already"):
        runner.enable_compile(True)
    assert not runner.compiled
