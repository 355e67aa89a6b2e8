"""Emission backends: one artifact per phase, and the loaders that turn an artifact back into a callable.

``BACKENDS[name] = {"emit": emit(ep, phase, out_dir, ctx) -> file name, "load": load(path, device) -> callable,
"portable": bool}``. A loaded phase is called with its inputs positionally (the config.json order) and
returns its outputs in order."""
from __future__ import annotations

from pathlib import Path

import torch

LARGE_WEIGHTS = 1 << 30        # above this, AOTI keeps the weights out of the .so (binary blobs in the package)


class BackendUnavailable(RuntimeError):
    pass


# --- export: the pass-transformed ExportedProgram, saved with torch.export.save ---------------------------
def emit_export(ep, phase: str, out: Path, ctx: dict) -> str:
    name = f"{phase}.pt2"
    torch.export.save(ep, str(out / name))
    return name


def load_export(path: Path, device="cpu"):
    mod = torch.export.load(str(path)).module()
    return lambda *args: mod(*args)


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


def load_aoti(path: Path, device="cpu"):
    dev = torch.device(device)
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else -1)
    model = torch._inductor.aoti_load_package(str(path), device_index=index)
    return lambda *args: model(*args)


# --- onnx: torch.onnx.export(dynamo=True) with external data --------------------------------------------
def emit_onnx(ep, phase: str, out: Path, ctx: dict) -> str:
    name = f"{phase}.onnx"
    prog = torch.onnx.export(ep, (), dynamo=True, external_data=True, optimize=True,
                             input_names=ctx["input_names"], output_names=ctx["output_names"])
    prog.save(str(out / name), external_data=True)
    return name


def _ort_providers(device) -> list[str]:
    import onnxruntime as ort
    have = ort.get_available_providers()
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" in have:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(path: Path, device="cpu"):
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime (or dlc[onnx])") from None
    sess = ort.InferenceSession(str(path), providers=_ort_providers(device))
    names = [i.name for i in sess.get_inputs()]
    dev = torch.device(device)

    def run(*args):
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        return [torch.from_numpy(o).to(dev) for o in sess.run(None, feed)]
    return run


# --- tensorrt: from the ONNX, through the TensorRT Python API ---------------------------------------------
TRT_INSTALL = ("TensorRT is not installed: `pip install tensorrt` (NVIDIA's wheel, needs a CUDA GPU and driver), "
               "or build the engine on the target with the trtexec command recorded in config.json")


def trt_available() -> str | None:
    """None when TensorRT can build here, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return TRT_INSTALL
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU; none is visible on this machine"
    return None


def trtexec_command(onnx_name: str, engine_name: str, profiles: dict, dtype: str) -> str:
    """The trtexec line that builds ``engine_name`` from ``onnx_name`` with the build limits as the profile."""
    fmt = lambda which: ",".join(f"{n}:{'x'.join(str(d) for d in s[which])}" for n, s in profiles.items())  # noqa
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


_TRT_DTYPES = {"BOOL": torch.bool, "INT64": torch.long, "INT32": torch.int32, "FLOAT": torch.float32,
               "HALF": torch.float16, "BF16": torch.bfloat16, "DOUBLE": torch.float64}


def load_tensorrt(path: Path, device="cuda"):
    reason = trt_available()
    if reason:
        raise BackendUnavailable(reason)
    import tensorrt as trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(*args):
        stream = torch.cuda.current_stream()
        for n, a in zip(ins, args):
            a = a.contiguous().cuda()
            context.set_input_shape(n, tuple(a.shape))
            context.set_tensor_address(n, a.data_ptr())
        results = []
        for n in outs:
            shape = tuple(context.get_tensor_shape(n))
            t = torch.empty(shape, dtype=_TRT_DTYPES[engine.get_tensor_dtype(n).name], device="cuda")
            context.set_tensor_address(n, t.data_ptr())
            results.append(t)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {path} failed")
        stream.synchronize()
        return results
    return run


BACKENDS: dict[str, dict] = {
    "export": {"emit": emit_export, "load": load_export, "portable": True},
    "aoti": {"emit": emit_aoti, "load": load_aoti, "portable": False},
    "onnx": {"emit": emit_onnx, "load": load_onnx, "portable": True},
    "tensorrt": {"emit": emit_tensorrt, "load": load_tensorrt, "portable": False},
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


__all__ = ["BACKENDS", "get_backend", "BackendUnavailable", "trtexec_command", "trt_available", "artifact_bytes"]
