"""Emission backends: one artifact per phase.

``BACKENDS[name] = {"emit": emit(ep, phase, out_dir, ctx) -> file name, "portable": bool}``. Loading an
artifact is the runtime's (``dlc.runtime.runners.artifacts.LOADERS``): the compiler only writes engines."""
from __future__ import annotations

from pathlib import Path

import torch

from dlc.runtime.runners.artifacts import BackendUnavailable, trt_available

# above this, AOTI keeps the weights out of the .so (binary blobs in the package)
LARGE_WEIGHTS = 1 << 30


# --- export: the pass-transformed ExportedProgram, saved with torch.export.save ---------------------------
def emit_export(ep, phase: str, out: Path, ctx: dict) -> str:
    name = f"{phase}.pt2"
    ep.example_inputs = None       # they hold the weights: torch.export.save would write another copy
    torch.export.save(ep, str(out / name))
    return name


# --- aoti: torch._inductor.aoti_compile_and_package -------------------------------------------------------
def aoti_configs(weight_bytes: int) -> dict:
    if weight_bytes <= LARGE_WEIGHTS:
        return {}
    return {"aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob"}


def emit_aoti(ep, phase: str, out: Path, ctx: dict) -> str:
    name = f"{phase}.aoti.pt2"
    torch._inductor.aoti_compile_and_package(ep, package_path=str(out / name),
                                             inductor_configs=aoti_configs(ctx.get("weight_bytes", 0)))
    return name


# --- onnx: torch.onnx.export(dynamo=True) with external data --------------------------------------------
def emit_onnx(ep, phase: str, out: Path, ctx: dict) -> str:
    name = f"{phase}.onnx"
    prog = torch.onnx.export(ep, (), dynamo=True, external_data=True, optimize=True,
                             input_names=ctx["input_names"], output_names=ctx["output_names"])
    prog.save(str(out / name), external_data=True)
    return name


# --- tensorrt: from the ONNX, through the TensorRT Python API ---------------------------------------------
def trtexec_command(onnx_name: str, engine_name: str, profiles: dict, dtype: str) -> str:
    """The trtexec line that builds ``engine_name`` from ``onnx_name`` with the build limits as the
    profile."""
    fmt = lambda which: ",".join(f"{n}:{'x'.join(str(d) for d in s[which])}"
                                 for n, s in profiles.items())  # noqa
    prec = {"bf16": " --bf16", "fp16": " --fp16", "fp32": ""}[dtype]
    return (f"trtexec --onnx={onnx_name} --saveEngine={engine_name} --minShapes={fmt('min')} "
            f"--optShapes={fmt('opt')} --maxShapes={fmt('max')}{prec}")


def emit_tensorrt(ep, phase: str, out: Path, ctx: dict) -> str:
    reason = trt_available()
    if reason:
        raise BackendUnavailable(reason)
    import tensorrt as trt
    onnx_name = ctx["onnx_files"][phase]
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(out / onnx_name)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_name}: {errs}")
    config = builder.create_builder_config()
    if ctx["dtype"] == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif ctx["dtype"] == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, s in ctx["profiles"][phase].items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build the {phase} engine")
    name = f"{phase}.engine"
    (out / name).write_bytes(bytes(blob))
    return name


BACKENDS: dict[str, dict] = {
    "export": {"emit": emit_export, "portable": True},
    "aoti": {"emit": emit_aoti, "portable": False},
    "onnx": {"emit": emit_onnx, "portable": True},
    "tensorrt": {"emit": emit_tensorrt, "portable": False},
}


def get_backend(name: str) -> dict:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def artifact_bytes(out: Path, name: str) -> int:
    """Size of an artifact including ONNX external data files beside it."""
    p = out / name
    total = p.stat().st_size if p.exists() else 0
    for extra in out.glob(name + ".data"):
        total += extra.stat().st_size
    return total


__all__ = ["BACKENDS", "get_backend", "BackendUnavailable", "trtexec_command", "trt_available",
           "artifact_bytes"]
