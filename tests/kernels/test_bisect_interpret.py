"""The fused bisection kernels (kernels/filter_bisect.py ``fused_draw``) in Triton's interpreter on CPU
against the torch path: tests/kernels/bisect_check.py in a subprocess with TRITON_INTERPRET=1 (skipped where
Triton is missing or older than 3.9, as test_kernel_interpret.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", minversion="3.9")


def test_fused_bisection_in_interpreter_matches_the_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONHASHSEED="0")
    seed = str(int.from_bytes(os.urandom(2), "little"))               # fresh inputs each run
    script = Path(__file__).with_name("bisect_check.py")
    r = subprocess.run([sys.executable, str(script), seed], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "bisect-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"
