"""The batch-invariant mode's kernels under TRITON_INTERPRET=1 on CPU (skipped where Triton is missing or
older than 3.9):
a row's result is bitwise identical whatever batch it is computed in (invariant_check.py says what each
check computes); one subprocess per check (the variable must be set before Triton is imported)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

# triton 3.6's interpreter (a CUDA torch 2.11's pin) fails these kernels' loops over loaded bounds ("only
# 0-dimensional arrays can be converted"); 3.9's runs them (the GPU tests run the compiled kernels on 3.6)
pytest.importorskip("triton", minversion="3.9")


@pytest.mark.parametrize("check", ["matmul", "row_sum", "logits", "pool_attention", "mode"])
def test_row_results_do_not_depend_on_the_batch_in_the_interpreter(check):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONHASHSEED="0")
    seed = str(int.from_bytes(os.urandom(2), "little"))               # fresh inputs each run
    script = Path(__file__).with_name("invariant_check.py")
    r = subprocess.run([sys.executable, str(script), seed, check], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and f"{check}-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"
