"""The fused bisection kernels under vocab parallelism in Triton's interpreter: two gloo processes, each its
head shard, ``group`` the ranks (``filter_bisect.bisect_filters`` as runtime/distributed/vocab_filters.py
calls it), give one process's tokens and survivors' confidences (tests/kernels/bisect_check.py
``check_group``; logits on a coarse grid, so tie groups at t* span both ranks and the lower rank's tie count
decides which survive)."""
import pytest

from interpreted import run_interpreted

pytest.importorskip("triton", minversion="3.9")


def test_fused_bisection_over_two_ranks_in_interpreter_matches_one_process():
    run_interpreted("bisect_check.py", "bisect-ok", "group")
