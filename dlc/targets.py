"""Deployment targets: the hardware facts ``dlc compile --target`` sizes a build for.

Memory in GiB as sold, bandwidth in GB/s, peak dense bf16 tensor rate in TFLOP/s (no sparsity), from the
vendors' datasheets. ``cpu`` is this machine class (no accelerator): memory is read from the host at plan
time when possible."""
from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Target:
    name: str
    arch: str                 # CUDA arch (sm_XX) or "x86_64"
    device: str               # "cuda" or "cpu"
    memory_gib: float
    bandwidth_gbs: float
    bf16_tflops: float
    utilisation: float = 0.90  # fraction of memory a build may plan for
    description: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def to_dict(self) -> dict:
        return asdict(self)


TARGETS: dict[str, Target] = {
    "rtx4090": Target("rtx4090", "sm_89", "cuda", 24, 1008, 165.2, description="GeForce RTX 4090 (Ada)"),
    "l40s": Target("l40s", "sm_89", "cuda", 48, 864, 362.1, description="NVIDIA L40S (Ada)"),
    "a100-40g": Target("a100-40g", "sm_80", "cuda", 40, 1555, 312, description="NVIDIA A100 40GB SXM"),
    "a100-80g": Target("a100-80g", "sm_80", "cuda", 80, 2039, 312, description="NVIDIA A100 80GB SXM"),
    "h100": Target("h100", "sm_90", "cuda", 80, 3350, 989, description="NVIDIA H100 SXM5 80GB"),
    "h200": Target("h200", "sm_90", "cuda", 141, 4800, 989, description="NVIDIA H200 SXM 141GB"),
    "cpu": Target("cpu", "x86_64", "cpu", 16, 50, 1.0, utilisation=0.5,
                  description="host CPU (memory from the host)"),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    t = TARGETS[name]
    if t.name == "cpu":
        mem = _host_memory_gib()
        if mem:
            t = Target(**{**t.to_dict(), "memory_gib": mem})
    return t


def _host_memory_gib() -> float | None:
    try:
        import os
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError, AttributeError):
        return None


def local_matches(t: Target) -> bool:
    """Whether this machine can build/run engines for the target (same device type, and for CUDA the same
    compute capability)."""
    if t.device == "cpu":
        return True
    import torch
    if not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability()
    return t.arch == f"sm_{major}{minor}"
