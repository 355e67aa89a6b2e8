"""`dlc compile` of block-diffusion models (LLaDA2.0 / LLaDA2.1 MoE, SDAR): engines (export, ONNX, AOTI on
CPU, fp32) decode exactly as the eager model.

* tiny LLaDA2 (MoE: dense first layer, shared expert, group-limited sigmoid router, partial rotary, GQA) and
  SDAR (Qwen3 layout, explicit head_dim) checkpoints written by the tests in the released HF layout
  (tests/models/hf_layouts.py): mixed batches through the serving Engine (llada2 exact / threshold, LLaDA2.1
  editing, the exact block cache and no cache, block lengths 4 and 8, prompt lengths, eos early stop) give
  the tokens of eager ``generate`` for each request alone, at T = 0 and sampled;
* the bundled trained dlc-tiny-bd: issue 14's gate, the engines' completions on held-out prompts (48 of the
  150 of tests/tiny/test_block_quality.py, one batch) identical to eager's, exact and threshold decoding;
* the manifest records what the runtime needs, the dry-run plan lists the passes and files, and what engines
  cannot run is refused naming the field.

Every engine build is a torch.export (~20 s here); ONNX and AOTI builds are marked slow (AOTI ~1-2 min
each) and run on dlc-tiny-bd only (SDAR layout); the LLaDA2 MoE checkpoint is compiled with export."""
import json
import sys
from pathlib import Path

import pytest
import torch

from compiler_helpers import run_cli
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import FieldError
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.session import encode_prompt, open_model
from dlc.tiny.evaluate import evaluate
from dlc.tiny.tasks import eval_set
from dlc.tiny.train_bd import BD_THRESHOLD, gen_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from hf_layouts import HF_CONFIGS, HF_NAMES, MASK, random_tensors, write_checkpoint  # noqa: E402

N_GATE = 48                   # dlc-tiny-bd held-out prompts of the engine gate (one batch)
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> a tiny checkpoint in the released HF layout (config.json + sharded safetensors)."""
    out = {}
    for fam in ("llada2_moe", "sdar"):
        d = HF_CONFIGS[fam]
        w = random_tensors(HF_NAMES[fam](d), seed=3)
        if fam == "sdar":        # tied embedding: masked inputs would predict the mask id everywhere
            w["model.embed_tokens.weight"][MASK] = 0
        out[fam] = write_checkpoint(tmp_path_factory.mktemp(fam), d, w, shards=2)
    return out


def build(shared_engine, model, backend: str):
    """One engine per (model, backend) for the run (builds are the slow part): the ``shared_engine`` fixture,
    so tests/server/test_block_engine_server.py serves this dlc-tiny-bd export engine without a second
    build."""
    return shared_engine(str(model), backend, max_seq_len=64, max_batch_size=8)


def _prompts(n, vocab, seed=0, lo=2, hi=14):
    """Random prompts of ids in [3, min(vocab, 250)): below every tiny model's mask / eos ids, above
    dlc-tiny-bd's (mask 1, stops 0 and 2)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, min(vocab, 250), (int(torch.randint(lo, hi, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


def _mixed_specs(prompts: list[list[int]], temperature: float = 0.0):
    """Eight requests that differ in everything a block engine must honour per request (threshold 1.0: the
    schedule alone, one token per step; a request's None would take the family's default)."""
    specs = []
    for i, p in enumerate(prompts):
        params = dict(gen_length=(10, 16)[i % 2], block_length=(4, 8)[i % 2] if i % 3 else 4,
                      kv_cache=("block", "none")[i % 4 == 3], threshold=(1.0, 0.2, 0.1)[i % 3],
                      temperature=temperature, seed=i)
        params["steps_per_block"] = params["block_length"]
        if i % 4 == 1:
            params.update(decoder="llada2.1", threshold=0.3, edit_threshold=0.2, steps_per_block=None)
        if i % 5 == 2:
            params["eos_early_stop"] = True
        specs.append((p, params))
    return specs


def check_engine_mixed_batch(engine_dir, ckpt, temperature=0.0, prompts=None):
    """The engine's Engine answers every mixed request with eager generate's tokens for it alone. ``prompts``
    (8): default random ids (a trained model needs its tasks' prompts to say something)."""
    eager = open_model(str(ckpt), dtype="fp32", progress=False)
    session = open_model(str(engine_dir), progress=False)
    assert session.kind != "eager" and session.config.block_diffusion
    eng = Engine(session, ServeConfig(max_seq_len=64, kv_cache_mb=8, max_num_tokens=400))
    assert eng.gen_defaults["kv_cache"] == "block" and eng.gen_defaults["decoder"] == "llada2"
    specs = _mixed_specs(prompts or _prompts(8, session.config.vocab_size, seed=21), temperature)
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    outs = []
    for r, (p, params) in zip(reqs, specs):
        want = generate(eager.runner, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert r.output_ids == want, params
        outs.append(tuple(want))
    assert eng.kv.num_used == 0
    assert len(set(outs)) > 4 and max(len(set(o)) for o in outs) > 2      # decisive: outputs vary


# ---------------------------------------------------------------------------- HF-layout LLaDA2 (MoE), SDAR
@pytest.mark.parametrize("family", ["llada2_moe", "sdar"])
def test_export_engine_mixed_batches_equal_eager(family, checkpoints, shared_engine):
    check_engine_mixed_batch(build(shared_engine, checkpoints[family], "export"), checkpoints[family])


def test_export_engine_sampled_mixed_batches_equal_eager(checkpoints, shared_engine):
    """T > 0: the same Gumbel draws (step seeds from each request's generator) and the block decoders'
    tempered confidence (softmax(logits / T), decided by the thresholds) in the programs."""
    ckpt = checkpoints["llada2_moe"]
    check_engine_mixed_batch(build(shared_engine, ckpt, "export"), ckpt, temperature=0.3)


def test_manifest_records_what_the_runtime_needs(checkpoints, shared_engine):
    out = build(shared_engine, checkpoints["llada2_moe"], "export")
    m = json.loads((out / "dlc_engine.json").read_text())
    assert m["model"]["block_diffusion"] and m["build"]["block_diffusion"] and m["build"]["kv_inplace"]
    assert m["generation"]["decoder"] == "llada2" and m["generation"]["kv_cache"] == "block"
    assert m["build"]["block_length"] == m["generation"]["block_length"] == 32     # LLaDA2's own
    assert [p["name"] for p in m["passes"]] == ["fold_weight_stacks", "mask_blocks", "cache_kv_reuse",
                                                "chunk_logits", "lift_weights"]
    for phase in ("refresh", "reuse"):
        ins = {i["name"]: i for i in m["phases"][phase]["inputs"]}
        assert ins["block_size"]["shape"] == [1] and ins["block_size"]["dtype"] == "int64"
        assert ins["k_pool"]["shape"][-1] == 16                    # LLaDA2's head_dim, not hidden / heads
    assert next(p for p in m["passes"] if p["name"] == "mask_blocks")["rewrites"] == {"refresh": 3,
                                                                                     "reuse": 3}


def test_engines_refuse_what_they_cannot_decode(checkpoints, shared_engine):
    session = open_model(str(build(shared_engine, checkpoints["sdar"], "export")), progress=False)
    with pytest.raises(FieldError) as e:
        generate(session.runner, [[5, 6]], GenerationConfig(gen_length=8, block_length=4, decoder="llada2",
                                                             temperature=0.5, top_k=3))
    assert e.value.field == "top_k"
    with pytest.raises(FieldError) as e:
        generate(session.runner, [[5, 6]], GenerationConfig(gen_length=8, block_length=4, steps=8,
                                                             decoder="llada"))
    assert e.value.field == "decoder"


def test_compile_refuses_head_sparse_block_diffusion(checkpoints, tmp_path):
    res = run_cli(["compile", checkpoints["sdar"], "--target", "cpu", "--backend", "export", "-o",
                   tmp_path / "x", "--sparse-retention", "0.5"])
    assert res.exit_code != 0 and "--sparse-retention" in res.output and "Traceback" not in res.output
    res = run_cli(["compile", "tiny-llada", "--target", "cpu", "--dry-run", "--passes",
                   "mask_blocks,cache_kv_reuse,chunk_logits,lift_weights"])
    assert res.exit_code != 0 and "mask_blocks applies to block-diffusion models" in res.output


# ---------------------------------------------------------------------------------- dlc-tiny-bd: the gate
@pytest.fixture(scope="module")
def bd_eager():
    session = open_model("dlc-tiny-bd", device="cpu", dtype="fp32", progress=False)
    return {name: evaluate(session, cfg, n=N_GATE, batch_size=N_GATE)
            for name, cfg in (("exact", gen_config(None)), ("threshold", gen_config(BD_THRESHOLD)))}


def _gate(engine_dir, bd_eager):
    session = open_model(str(engine_dir), progress=False)
    for name, cfg in (("exact", gen_config(None)), ("threshold", gen_config(BD_THRESHOLD))):
        res = evaluate(session, cfg, n=N_GATE, batch_size=N_GATE)
        assert res.completions == bd_eager[name].completions, f"{name}: completions differ from eager"
        assert res.tpf == bd_eager[name].tpf
    assert bd_eager["exact"].accuracy >= 0.9 and bd_eager["threshold"].tpf > 1.5     # a trained model


def test_tiny_bd_export_engine_gives_eager_completions(bd_eager, shared_engine):
    _gate(build(shared_engine, "dlc-tiny-bd", "export"), bd_eager)


def test_generate_and_eval_cli_on_the_engine(shared_engine):
    """`dlc generate ENGINE` and `dlc eval ENGINE` take the engine's generation defaults (block 4, llada2
    threshold 0.9, the block cache) and answer as the checkpoint."""
    out = build(shared_engine, "dlc-tiny-bd", "export")
    gen = [json.loads(run_cli(["generate", m, "12+34", "--device", "cpu", "--json"]).output.strip()
                      .splitlines()[-1]) for m in ("dlc-tiny-bd", out)]
    assert gen[1]["engine"] == "export" and gen[1]["token_ids"] == gen[0]["token_ids"]
    assert gen[1]["nfe"] == gen[0]["nfe"] and gen[0]["text"].strip() == "46"
    args = ["--n", "16", "--decoder", "llada2", "--kv-cache", "block", "--json"]
    ev = [json.loads(run_cli(["eval", m, *args]).output.strip().splitlines()[-1])
          for m in ("dlc-tiny-bd", out)]
    assert ev[1]["engine"] == "export" and ev[0]["accuracy"] > 0.8
    assert (ev[1]["accuracy"], ev[1]["tpf"]) == (ev[0]["accuracy"], ev[0]["tpf"])


@SLOW
@pytest.mark.parametrize("backend", ["onnx", "aoti"])
def test_tiny_bd_onnx_and_aoti_engines_give_eager_completions(backend, bd_eager, shared_engine):
    out = build(shared_engine, "dlc-tiny-bd", backend)
    _gate(out, bd_eager)
    eager = open_model("dlc-tiny-bd", progress=False)
    prompts = [encode_prompt(eager, p, True) for p, _ in eval_set(8)]
    check_engine_mixed_batch(out, "dlc-tiny-bd", prompts=prompts)


# ------------------------------------------------------------------------------------- the dry-run plan
@SLOW
def test_llada2_mini_dry_run_plans_passes_and_files():
    """The 16B MoE traced on the meta device (~2 min here): the plan, the passes with their rewrite counts
    (20 layers) and the files the build would write."""
    res = run_cli(["compile", "llada2-mini", "--target", "h100", "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["plan"]["fits"] and out["passes"] == ["fold_weight_stacks", "mask_blocks", "cache_kv_reuse",
                                                     "chunk_logits", "lift_weights"]
    assert out["counts"]["mask_blocks/reuse"] == 20 and out["counts"]["cache_kv_reuse/refresh"] == 20
    assert "weights.safetensors" in out["files"] and "reuse.onnx" in out["files"]
    assert "256 experts" in res.output and "block-causal" in res.output and "plan only" not in res.output
