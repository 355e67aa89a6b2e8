"""Probe (issue 13): does torch._inductor.aoti_load_package load a one-Linear CUDA package on this image?
Run under a debugger to get the loader's backtrace:
    cuda-gdb -batch -ex run -ex bt --args python3 bench/probes/aoti_cuda_load.py /tmp/lin.pt2
"""
import sys

import torch

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/lin.pt2"
m = torch.nn.Linear(64, 64).cuda()
x = torch.randn(4, 64, device="cuda")
p = torch._inductor.aoti_compile_and_package(torch.export.export(m, (x,)), package_path=path)
print("compiled", p, flush=True)
loaded = torch._inductor.aoti_load_package(p)
print("loaded", flush=True)
print("max abs diff", float((loaded(x) - m(x)).abs().max()), flush=True)
