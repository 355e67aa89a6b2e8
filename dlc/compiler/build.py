"""The ``dlc compile`` driver: plan -> trace -> passes -> export -> emit -> dlc_engine.json (+ the model's HF
config.json and tokenizer files), with per-stage timings."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from dlc.manifest import MANIFEST, WEIGHTS_FILE, file_sha256, is_engine_dir, is_weight_input, write_manifest
from dlc.models import config_to_hf
from dlc.models.tokenizer import TOKENIZER_FILES
from dlc.passes.pipeline import input_names
from dlc.targets import get_target, local_matches

from .backends import BackendUnavailable, artifact_bytes, get_backend, trt_available, trtexec_command
from .export import build_phases, export_phase, input_specs, output_specs
from .plan import plan_build

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Stage:
    """Progress output per stage with its wall time (collected in ``times``)."""

    def __init__(self, echo, times: dict):
        self.echo, self.times = echo, times

    def __call__(self, name: str):
        stage = self

        class _Ctx:
            def __enter__(self):
                stage.echo(f"[{name}] ...")
                self.t0 = time.perf_counter()

            def __exit__(self, exc_type, *_):
                dt = time.perf_counter() - self.t0
                stage.times[name] = round(stage.times.get(name, 0) + dt, 3)
                if exc_type is None:
                    stage.echo(f"[{name}] done in {dt:.1f}s")
        return _Ctx()


def model_for_build(model: str, weights: str | None, dtype: torch.dtype, device: str, dry_run: bool):
    """(DiffusionLM, LoadedModel | None). Dry runs build the architecture on the meta device (no weights)."""
    from dlc.models import build_model
    from dlc.models.loading import load_model, read_config, resolve_checkpoint_dir
    from dlc.models.presets import PRESETS, preset_config, unknown_model_error

    if not dry_run:
        lm = load_model(model, weights=weights, dtype=dtype, device=device, progress=False)
        return lm.model, lm
    p = Path(weights or model).expanduser()
    if p.is_dir():
        cfg = read_config(resolve_checkpoint_dir(model, weights))
    elif model in PRESETS and PRESETS[model].get("config"):
        cfg = preset_config(model)
    elif model in PRESETS:
        cfg = read_config(resolve_checkpoint_dir(model, weights))
    else:
        raise unknown_model_error(model)
    with torch.device("meta"):
        m = build_model(cfg).to(dtype)
    return m.eval(), None


def check_onnx_extras(backend: str) -> None:
    """Before any work: the ONNX export needs onnx and onnxscript (the 'onnx' extra)."""
    missing = []
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise BackendUnavailable(f"--backend {backend} writes ONNX, which needs {' and '.join(missing)} "
                                 f"(pip install 'dlc[onnx]'); nothing was written")


def check_output_dir(out: Path) -> None:
    """Refuse to write into a file, or a non-empty directory that is not a dlc engine (its files would be
    mixed with or overwritten by the engine's)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_engine_dir(out):
        raise ValueError(f"-o {out}: the directory is not empty and is not a dlc engine; choose an "
                         f"empty or new directory, or pass --force to write into it")


def build_limits(plan) -> dict[str, int]:
    b, s = plan.max_batch_size, plan.max_seq_len
    # M: credited ids per position
    return {"B": 2 * b, "C": b, "L": s, "S": s, "T": s, "N": s, "K": s, "M": s}


# a TensorRT engine binds KV pools of up to 8 x max_batch_size slots (P has a range there)
TRT_POOL_SLOTS = 8


def profiles(specs: dict, plan) -> dict:
    """TensorRT optimisation profile per input: min (1 per dim), opt (batch, whole sequence, one block), max.
    torch artifacts take any pool size (P unbounded)."""
    mx = {**build_limits(plan), "P": TRT_POOL_SLOTS * plan.max_batch_size}
    opt = {"P": plan.max_batch_size, "B": plan.max_batch_size, "C": plan.max_batch_size,
           "L": plan.max_seq_len, "S": plan.max_seq_len, "T": plan.block_length, "N": plan.block_length,
           "K": plan.max_seq_len, "M": plan.block_length}
    res = {}
    for name, (shape, _) in specs.items():
        res[name] = {"min": [1 if isinstance(d, str) else d for d in shape],
                     "opt": [min(opt[d], mx[d]) if isinstance(d, str) else d for d in shape],
                     "max": [mx[d] if isinstance(d, str) else d for d in shape]}
    return res


def _sig(specs: dict) -> list[dict]:
    return [{"name": n, "shape": list(shape), "dtype": str(dt).replace("torch.", "")}
            for n, (shape, dt) in specs.items()]


def block_generation(lm, model: str, cfg, block_length: int | None) -> dict:
    """A block-diffusion engine's generation defaults (the manifest's ``generation`` section, read by
    ``dlc.runtime.config.model_generation_defaults``): the checkpoint's generation_config.json over the
    family's (decoder, block length, steps per block, threshold, the exact block cache); ``--block-length``
    given to dlc compile replaces the block length."""
    from dlc.runtime.config import BLOCK_GEN_KEYS, GEN_KEYS, model_generation_defaults

    d = model_generation_defaults(str(lm.source) if lm is not None else model, cfg)
    out = {k: d[k] for k in GEN_KEYS + BLOCK_GEN_KEYS if k in d}
    if block_length is not None:
        out["block_length"] = block_length
    return out


def phases_line(block: bool, kv_inplace: bool) -> str:
    """What the phase programs compute (the compile log's line)."""
    kv_io = "written into the KV pool in place" if kv_inplace else "returned for the runner to write"
    if block:
        return ("phases (block-causal attention, the block size a runtime input): reuse = the exact block "
                "cache's step (fed columns over the pool rows -> tokens, confidence; the first step prefills "
                "the prompt's complete blocks with the first block, a block's first step also writes the "
                f"finished block's clean K/V; K/V {kv_io}), refresh = the whole canvas without a cache "
                f"(kv_cache none); weights are inputs, stored once ({WEIGHTS_FILE})")
    return (f"phases: refresh (whole sequence -> tokens, confidence; every layer's K/V {kv_io}), "
            f"reuse (fed slice over the pool rows -> tokens, confidence; the slice's new K/V {kv_io}); "
            f"weights are inputs, stored once ({WEIGHTS_FILE})")


MOE_LINES = {"fused": "grouped GEMMs over each expert's routed tokens: the routed FLOPs only",
             "stacked": "every expert on every token, one static GEMM pair: E / k times the routed FLOPs"}


def traced_moe_impl(cfg, tgt, dtype: torch.dtype, runtime: str, asked: str = "auto") -> str | None:
    """The MoE forward a build traces (None for dense models). ``auto``: ``fused`` (``torch._grouped_mm``
    over each expert's routed tokens, the path the runtime's CUDA graphs replay) for torch artifacts (export,
    AOTI) in bf16 on GPUs whose grouped GEMM reads its offsets on the device (sm90 / sm100); ``stacked``
    elsewhere: ONNX / TensorRT have no grouped GEMM, and older GPUs' fallback copies the offsets to the host
    (no CUDA graph). ``fused`` asked where it cannot run is an error naming the option."""
    from dlc.models.llada_moe import grouped_mm_target

    if asked not in ("auto", "fused", "stacked"):
        raise ValueError(f"--moe-impl {asked!r}: choose auto, fused or stacked")
    if not getattr(cfg, "is_moe", False):
        return None
    fits = runtime in ("export", "aoti") and dtype == torch.bfloat16 and (
        tgt.device == "cpu" or grouped_mm_target(tgt.arch, dtype))
    if asked == "fused" and not fits:
        raise ValueError(f"--moe-impl fused needs a torch artifact (--backend export or aoti) in bf16 for an "
                         f"sm90 / sm100 target or the CPU; this build is {runtime} {str(dtype)[6:]} for "
                         f"{tgt.name} ({tgt.arch})")
    if asked == "auto":
        return "fused" if fits and tgt.device == "cuda" else "stacked"
    return asked


def tp_engines_later(model: str, n: int, dry_run: bool = False) -> str:
    """The one line ``dlc compile --tensor-parallel-size N`` (N > 1) answers: no per-rank engines yet."""
    return (f"--tensor-parallel-size {n}: dlc compile builds single-GPU engines; tensor-parallel "
            "engines (one phase program set per rank) are a later step. Run the model tensor parallel on "
            f"the runtime path instead: `dlc serve {model} --tensor-parallel-size {n}` or "
            f"`dlc generate {model} PROMPT --tensor-parallel-size {n}`"
            + ("" if dry_run else " (add --dry-run to see the per-GPU plan)"))


def compile_model(model: str, target: str, out_dir: str | None, backend: str = "aoti",
                  weights: str | None = None, dtype: str | None = None, max_batch_size: int | None = None,
                  max_seq_len: int | None = None, block_length: int | None = None,
                  passes: list[str] | None = None,
                  sparse_retention: float | None = None, dump_graph_after: str | None = None,
                  dry_run: bool = False, logprobs: int = 0, echo=print, force: bool = False,
                  prepare_only: bool = False, decode_extras: bool = False, tensor_parallel: int = 1,
                  moe_impl: str = "auto") -> dict:
    """Compile MODEL for TARGET into OUT_DIR; returns the manifest dict (dry run: the plan). OUT_DIR must be
    empty, absent, or an engine directory (recompiled in place); anything else needs ``force``.

    The backend asked for is the backend built: when this machine cannot build it (AOTI / TensorRT for a GPU
    that is not here, TensorRT not installed) the command fails before any work, unless ``prepare_only``: then
    it writes the portable half (ONNX phases + the manifest with the exact commands that finish the build on
    the target, ``pending``) and succeeds."""
    tgt = get_target(target)
    get_backend(backend)
    if tensor_parallel != 1 and not dry_run:
        raise ValueError(tp_engines_later(model, tensor_parallel))
    dtype = dtype or ("fp32" if tgt.device == "cpu" else "bf16")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not dry_run and not out_dir:
        raise ValueError("-o/--output OUT_DIR is required (or use --dry-run)")
    if not dry_run and not force:
        check_output_dir(Path(out_dir))
    times: dict = {}
    stage = Stage(echo, times)
    local = local_matches(tgt)
    device = "cuda" if tgt.device == "cuda" and local else "cpu"
    writes_onnx = backend in ("onnx", "tensorrt") or (backend == "aoti" and not local and prepare_only)
    if writes_onnx and not dry_run:
        check_onnx_extras(backend)

    with stage("load"):
        m, lm = model_for_build(model, weights, DTYPES[dtype], device, dry_run)
    cfg = m.config
    block = bool(getattr(cfg, "block_diffusion", False))
    gen_defaults = block_generation(lm, model, cfg, block_length) if block else None
    if block_length is None:
        block_length = gen_defaults["block_length"] if block else 32
    # what this machine writes: TensorRT's ONNX until its engines are built; AOTI for another GPU: ONNX
    runtime = "onnx" if backend == "tensorrt" or (backend == "aoti" and not local) else backend
    traced_moe = traced_moe_impl(cfg, tgt, DTYPES[dtype], runtime, moe_impl)
    plan = plan_build(cfg, tgt, dtype, max_batch_size, max_seq_len, block_length, tensor_parallel, traced_moe)
    on = f"{tensor_parallel} x {tgt.name}" if tensor_parallel > 1 else tgt.name
    echo(f"plan for {model} on {on} ({tgt.description}; {tgt.memory_gib} GiB, {tgt.bandwidth_gbs} GB/s, "
         f"{tgt.bf16_tflops} TFLOP/s bf16):")
    for line in plan.lines():
        echo("  " + line)
    if not plan.fits:
        raise ValueError(f"cannot build {model} for {on}: {plan.reason}")
    if tensor_parallel > 1:
        echo(f"dry run, plan only: {tp_engines_later(model, tensor_parallel, dry_run=True)}")
        return {"plan": plan.to_dict(), "passes": [], "files": [], "tensor_parallel": tensor_parallel}

    pending = None
    if backend in ("aoti", "tensorrt") and not local:
        pending = (f"the {backend} artifacts must be built on a {tgt.arch} GPU ({tgt.name}); this "
                   f"machine has {'no CUDA GPU' if not torch.cuda.is_available() else 'another GPU'}. Run "
                   f"`dlc compile {model} --target {tgt.name} --backend {backend} -o OUT_DIR` there; "
                   f"{MANIFEST} carries the trtexec commands for the ONNX.")
    blocker = pending or (trt_available() if backend == "tensorrt" else None)
    if blocker and not dry_run and not prepare_only:
        raise BackendUnavailable(f"--backend {backend} cannot be built on this machine: "
                                 f"{blocker.rstrip('.')}. Nothing was written; pass --prepare-only to write "
                                 f"the portable ONNX half and {MANIFEST} with the commands that finish the "
                                 "build on the target.")
    # GPU targets lower to the dlc kernel ops when the artifact runs torch ops (export, AOTI); ONNX/TensorRT
    # cannot run them, so those keep the portable chunked lowering.
    kernels = tgt.device == "cuda" and runtime in ("aoti", "export")
    # TensorRT has no double type: its ONNX decodes in float32 (temperature, confidence, the sampling noise).
    decode_dtype = torch.float32 if backend == "tensorrt" else torch.float64
    # torch artifacts write K/V into the runtime's pool in place; ONNX has no input mutation: it returns K/V.
    kv_inplace = runtime in ("export", "aoti")
    # the rules' decoding extras (--decode-extras): in the chunked lowering entropy, logprobs and credit, and
    # in every lowering smoothing's inputs and the hidden rows the runner decodes the rest from (passes/
    # chunk_logits.py); not TensorRT's float32 build. Off by default: they change the programs' signatures.
    extras = decode_extras and backend != "tensorrt"
    if decode_extras and not extras:
        raise ValueError("--decode-extras is not available for --backend tensorrt (its float32 build); use "
                         "--backend onnx, export or aoti")
    if traced_moe:
        echo(f"MoE forward traced: {traced_moe} ({MOE_LINES[traced_moe]})")
    with stage("trace+passes"):
        phases, ctx, names = build_phases(m, passes=passes, sparse_retention=sparse_retention,
                                          logit_chunk=plan.logit_chunk, logprobs=logprobs,
                                          dump_after=dump_graph_after, dump=echo, device=tgt.device,
                                          kernels=kernels, decode_dtype=decode_dtype, kv_inplace=kv_inplace,
                                          extras=extras, moe_impl=traced_moe)
    echo(phases_line(block, kv_inplace))
    for name in names:
        echo(f"  pass {name:<15} rewrites: refresh {ctx.counts[(name, 'refresh')]}, "
             f"reuse {ctx.counts[(name, 'reuse')]}  params {ctx.params(name)}")

    weights = ctx.shared["weights"]
    # runtime inputs (weights follow them)
    specs = {ph: input_specs(ph, [n for n in input_names(g) if not is_weight_input(n)], cfg, DTYPES[dtype],
                             decode_dtype) for ph, g in phases.items()}
    weight_inputs = {ph: [n for n in input_names(g) if is_weight_input(n)] for ph, g in phases.items()}
    outs = {ph: output_specs(ph, cfg, DTYPES[dtype], sparse_retention is not None, logprobs, decode_dtype,
                             kv_inplace=kv_inplace, extras=ctx.params("chunk_logits")["extras"],
                             rows=ctx.params("chunk_logits")["hidden_rows"])
            for ph in phases}
    ext = {"export": ".pt2", "aoti": ".aoti.pt2", "onnx": ".onnx", "tensorrt": ".onnx"}[runtime]
    files = [WEIGHTS_FILE] + [f"{ph}{ext}" for ph in phases] + (["refresh.engine", "reuse.engine"]
                                                                  if backend == "tensorrt" else [])
    files += [MANIFEST, "config.json (the model's HF config)", "tokenizer files"]
    if dry_run:
        echo(f"dry run: would write to {out_dir or 'OUT_DIR'}: {', '.join(files)}")
        if pending:
            echo(f"note: {pending}")
        return {"plan": plan.to_dict(), "passes": names,
                "counts": {f"{k[0]}/{k[1]}": v for k, v in ctx.counts.items()}, "files": files,
                "times": times, "device": ctx.device, "lowering": ctx.params("chunk_logits")["lowering"],
                **({"moe": traced_moe} if traced_moe else {})}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limits = build_limits(plan)
    with stage("write weights"):
        weights_info = write_weights(weights, out)
    weight_bytes = weights_info["weight_bytes"]
    phase_info, onnx_files, trt_cmds = {}, {}, {}
    for ph, g in phases.items():
        with stage(f"export {ph}"):
            ep = export_phase(g, ph, cfg, DTYPES[dtype], limits=limits, device=device,
                              decode_dtype=decode_dtype, weights=weights)
        ectx = {"input_names": list(specs[ph]) + weight_inputs[ph], "output_names": list(outs[ph]),
                "weight_bytes": weight_bytes,
                "dtype": dtype, "profiles": {p: profiles(specs[p], plan) for p in phases},
                "onnx_files": onnx_files}
        with stage(f"emit {ph} ({runtime})"):
            f = get_backend(runtime)["emit"](ep, ph, out, ectx)
        if runtime == "onnx":
            onnx_files[ph] = f
            trt_cmds[ph] = trtexec_command(f, f"{ph}.engine", profiles(specs[ph], plan), dtype)
        extra = [p.name for p in out.glob(f + ".data")]
        phase_info[ph] = {"file": f, "extra_files": extra, "runtime": runtime,
                          "bytes": {x: (out / x).stat().st_size for x in [f] + extra},
                          "sha256": {x: file_sha256(out / x) for x in [f] + extra},
                          "inputs": _sig(specs[ph]), "weight_inputs": weight_inputs[ph],
                          "outputs": _sig(outs[ph])}
    _copy_tokenizer(lm, out)
    (out / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))     # HF tooling reads the dir
    manifest = {
        "backend": backend, "runtime": runtime, "dtype": dtype, "target": tgt.to_dict(), "source": model,
        "chat": bool(lm.chat) if lm else False,
        "model": cfg.to_dict(),
        "build": {**{k: v for k, v in plan.to_dict().items() if k in ("max_batch_size", "max_seq_len",
                                                                        "block_length", "logit_chunk")},
                  "dims": limits, "plan": plan.to_dict(), "kv_inplace": kv_inplace,
                  **({"block_diffusion": True} if block else {}),
                  **({"moe": traced_moe} if traced_moe else {})},
        "weights": weights_info,
        "passes": [{"name": n, "params": ctx.params(n),
                    "rewrites": {ph: ctx.counts[(n, ph)] for ph in phases}} for n in names],
        "phases": phase_info,
        "tokenizer": sorted(p.name for p in out.iterdir() if p.name in TOKENIZER_FILES),
        "compile_seconds": times,
        "artifact_bytes": {ph: artifact_bytes(out, i["file"]) for ph, i in phase_info.items()},
    }
    if block:
        manifest["generation"] = gen_defaults
    if trt_cmds and backend in ("tensorrt", "onnx", "aoti"):
        manifest["tensorrt"] = {"trtexec": trt_cmds}
    if pending:
        manifest["pending"] = pending
    if backend == "tensorrt" and not pending:
        reason = trt_available()
        if reason:                                        # prepare_only (checked above)
            manifest["pending"] = f"TensorRT engines not built: {reason}"
        for ph in ([] if reason else phases):
            with stage(f"emit {ph} (tensorrt)"):
                f = get_backend("tensorrt")["emit"](None, ph, out, ectx)
            phase_info[ph].update({"file": f, "extra_files": [], "runtime": "tensorrt",
                                   "bytes": {f: (out / f).stat().st_size},
                                   "sha256": {f: file_sha256(out / f)}})
        if not reason:
            manifest["runtime"] = "tensorrt"
    write_manifest(out, manifest)
    total = sum(manifest["artifact_bytes"].values())
    echo(f"wrote {out} ({weight_bytes / 1e6:.2f} MB of weights in {WEIGHTS_FILE}, once; "
         f"{total / 1e6:.2f} MB of phase programs; "
         + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) + ")")
    if manifest.get("pending"):
        echo(f"note: {manifest['pending']}")
    return manifest


def write_weights(weights: dict[str, torch.Tensor], out: Path) -> dict:
    """Write the lifted weights once to ``WEIGHTS_FILE``; names that are the same tensor (tied embeddings and
    heads) are stored once and recorded as aliases. Returns the manifest's ``weights`` entry."""
    from safetensors.torch import save_file

    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set = set()
    for name in sorted(weights):
        t = weights[name]
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        sp = t.untyped_storage().data_ptr()
        t = t.detach()
        stored[name] = t.contiguous() if sp not in storages else t.clone().contiguous()   # no shared storage
        storages.add(sp)
    save_file(stored, str(out / WEIGHTS_FILE))
    f = WEIGHTS_FILE
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / f, 0o666 & ~umask)                 # readable like the other engine files
    return {"file": f, "tensors": len(stored), "aliases": aliases,
            "weight_bytes": sum(t.numel() * t.element_size() for t in stored.values()),
            "bytes": {f: (out / f).stat().st_size}, "sha256": {f: file_sha256(out / f)}}


def _copy_tokenizer(lm, out: Path) -> None:
    if lm is None or lm.tokenizer is None:
        return
    src = Path(lm.source)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).exists():
                shutil.copy2(src / name, out / name)
    else:
        lm.tokenizer.save_pretrained(str(out))
        stray = out / "config.json"
        if stray.exists():
            stray.unlink()
