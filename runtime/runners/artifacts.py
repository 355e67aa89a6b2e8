"""Loading the artifacts of an engine directory: one loader per backend, each returning a callable phase.

``LOADERS[runtime](path, device)`` -> a callable taking the phase's inputs positionally
(dlc_engine.json order) and
returning its outputs in order. The compiler writes these artifacts (dlc/compiler/backends.py); the runtime
alone loads them, so serving an engine never imports the compiler."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("dlc.engine")


class BackendUnavailable(RuntimeError):
    """The backend's library or hardware is missing here (the message says what to install)."""


TRT_INSTALL = ("TensorRT is not installed: `pip install tensorrt` "
               "(NVIDIA's wheel, needs a CUDA GPU and driver), "
               "or build the engine on the target with the trtexec command recorded in dlc_engine.json")


def trt_available() -> str | None:
    """None when TensorRT can build here, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return TRT_INSTALL
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU; none is visible on this machine"
    return None


def load_export(path: Path, device="cpu"):
    """The unlifted program as a GraphModule (callable positionally; ``torch.compile`` can take it whole:
    ``CompiledRunner.enable_compile``)."""
    return torch.export.load(str(path)).module()


def load_aoti(path: Path, device="cpu"):
    dev = torch.device(device)
    index = dev.index if dev.index is not None else (torch.cuda.current_device()
                                                     if dev.type == "cuda" else -1)
    if dev.type == "cuda":
        hint = aoti_cuda_preload_hint()
        if hint:
            log.warning(hint)
    model = torch._inductor.aoti_load_package(str(path), device_index=index)
    return lambda *args: model(*args)


def aoti_cuda_preload_hint(maps: str = "/proc/self/maps", env: dict | None = None) -> str | None:
    """The fix to print before loading a CUDA AOTI package, or None. On the H200 image of torch
    2.11.0+cu130 the package's wrapper .so segfaults in its device-string parser (std::regex reaching another
    C++ runtime's locale symbols, docs/COMPILER.md); starting the process with the C++ runtime it maps
    first in the lookup order (LD_PRELOAD) fixes it, and a CUDA AOTI engine then gives eager's tokens (the
    GPU test passed that way). A process cannot change its lookup order once started, so this only says
    how."""
    env = os.environ if env is None else env
    if "libstdc++" in env.get("LD_PRELOAD", ""):
        return None
    try:
        lib = next((line.split()[-1] for line in Path(maps).read_text().splitlines()
                    if "/libstdc++.so" in line), None)
    except OSError:
        return None
    if lib is None:
        return None
    return (f"loading a CUDA AOTI package: if this process crashes here (a segfault in the package's "
            f"parse_device_str), start it with LD_PRELOAD={lib}")


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
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                 "(or dlc[onnx])") from None
    dev = torch.device(device)
    opts = ort.SessionOptions()
    if dev.type == "cpu":
        # the process's thread budget (torch.set_num_threads / OMP_NUM_THREADS), as the torch backends: ORT's
        # own default (one spinning thread per core, per session) made two processes on 2 cores 3x slower
        opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(path), opts, providers=_ort_providers(device))
    names = [i.name for i in sess.get_inputs()]

    def run(*args):
        feed = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        return [torch.from_numpy(o).to(dev) for o in sess.run(None, feed)]
    return run


_TRT_DTYPES = {"BOOL": torch.bool, "INT64": torch.long, "INT32": torch.int32, "FLOAT": torch.float32,
               "HALF": torch.float16, "BF16": torch.bfloat16}


def check_bindings(engine, path, names: list[str], args) -> None:
    """Every input against the engine's binding before anything runs: its dtype, rank, static dims and the
    optimisation profile's [min, max] (TensorRT reads raw device pointers: a float64 or wrongly shaped tensor
    would be read as garbage). Raises ValueError naming the binding."""
    if len(args) != len(names):
        raise ValueError(f"{path}: the engine takes {len(names)} inputs ({', '.join(names)}), "
                         f"got {len(args)}")
    for n, a in zip(names, args):
        kind = engine.get_tensor_dtype(n).name
        want = _TRT_DTYPES.get(kind)
        if want is None or a.dtype != want:
            raise ValueError(f"{path}: input {n} is {a.dtype}, the engine binds {kind} ({want})")
        dims = tuple(engine.get_tensor_shape(n))
        lo, _, hi = (tuple(x) for x in engine.get_tensor_profile_shape(n, 0))
        shape = tuple(a.shape)
        if len(shape) != len(dims) or any(d >= 0 and d != s for d, s in zip(dims, shape)) \
                or any(not lo_d <= s <= hi_d for lo_d, s, hi_d in zip(lo, shape, hi)):
            raise ValueError(f"{path}: input {n} has shape {list(shape)}; the engine binds {list(dims)} "
                             f"within [{list(lo)}, {list(hi)}]")


def load_tensorrt(path: Path, device="cuda"):
    reason = trt_available()
    if reason:
        raise BackendUnavailable(reason)
    import tensorrt as trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    if engine is None:
        raise ValueError(f"{path}: TensorRT could not deserialize the engine (another TensorRT "
                         "version or GPU?)")
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def run(*args):
        check_bindings(engine, path, ins, args)
        stream = torch.cuda.current_stream()
        feed = [a.contiguous().cuda() for a in args]        # kept alive until the engine has run
        for n, a in zip(ins, feed):
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


LOADERS = {"export": load_export, "aoti": load_aoti, "onnx": load_onnx, "tensorrt": load_tensorrt}
