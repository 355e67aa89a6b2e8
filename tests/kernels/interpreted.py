"""One home for the interpreter checks' runner: a check script of this folder in a subprocess under
TRITON_INTERPRET=1 with a fresh seed (fresh inputs each run; the seed is in the failure message)."""
import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(script: str, marker: str, *args: str, timeout: int = 300) -> None:
    """Run ``script`` (a file beside this one) with a random seed and ``args``; assert it exits 0 and prints
    ``marker``."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONHASHSEED="0")
    seed = str(int.from_bytes(os.urandom(2), "little"))
    path = Path(__file__).with_name(script)
    r = subprocess.run([sys.executable, str(path), seed, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and marker in r.stdout, f"seed {seed}\n{r.stdout}\n{r.stderr[-3000:]}"
