"""The fused bisection kernels (kernels/filter_bisect.py ``fused_draw``) and the unfiltered draw
(``plain_draw``) in Triton's interpreter on CPU against the torch path: tests/kernels/bisect_check.py in a
subprocess with TRITON_INTERPRET=1 (skipped where Triton is missing or older than 3.9, as
test_kernel_interpret.py)."""
import pytest

from interpreted import run_interpreted

pytest.importorskip("triton", minversion="3.9")


def test_fused_bisection_in_interpreter_matches_the_torch_path():
    run_interpreted("bisect_check.py", "bisect-ok")


def test_fused_unfiltered_draw_in_interpreter_matches_the_sweep():
    """A sampled step without filters or extras (``filter_bisect.plain_draw``, decode_rows_ext's route on
    CUDA): the torch sweep's tokens, confidences within 1e-12 relative (bisect_check.py ``check_plain``)."""
    run_interpreted("bisect_check.py", "plain-ok", "plain")
