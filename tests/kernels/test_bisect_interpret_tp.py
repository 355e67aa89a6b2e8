"""The fused bisection kernels under vocab parallelism in Triton's interpreter: two gloo processes, each its
head shard, ``group`` the ranks (``filter_bisect.bisect_filters`` as runtime/distributed/vocab_filters.py
calls it), give one process's tokens and survivors' confidences (tests/kernels/bisect_check.py
``check_group``; logits on a coarse grid, so tie groups at t* span both ranks and the lower rank's tie count
decides which survive)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", minversion="3.9")


def test_fused_bisection_over_two_ranks_in_interpreter_matches_one_process():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONHASHSEED="0")
    seed = str(int.from_bytes(os.urandom(2), "little"))
    script = Path(__file__).with_name("bisect_check.py")
    r = subprocess.run([sys.executable, str(script), seed, "group"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "bisect-ok" in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"
