"""Triton kernels under TRITON_INTERPRET=1 on CPU (skipped where Triton is missing or older than 3.9)."""
import pytest

from interpreted import run_interpreted

# triton 3.6's interpreter (a CUDA torch 2.11's pin) fails these kernels' loops over loaded bounds ("only
# 0-dimensional arrays can be converted"); 3.9's runs them (the GPU tests run the compiled kernels on 3.6)
pytest.importorskip("triton", minversion="3.9")


@pytest.mark.slow
def test_triton_kernels_in_interpreter_match_references():
    run_interpreted("interpret_check.py", "interpret-ok")
