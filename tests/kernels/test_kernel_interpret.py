"""Triton kernels under TRITON_INTERPRET=1 on CPU (skipped where Triton does not import)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_triton_kernels_in_interpreter_match_references():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONHASHSEED="0")
    seed = str(int.from_bytes(os.urandom(2), "little"))               # fresh inputs each run
    script = Path(__file__).with_name("interpret_check.py")
    r = subprocess.run([sys.executable, str(script), seed], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "interpret-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"
