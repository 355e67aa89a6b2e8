"""bench/rule_cost.py with logprobs and iteration smoothing kept synchronous (``DecodeState.lookahead``
returns [] for them, as before they ran ahead: commit 04b4add), everything else as checked out: the "before"
rows of bench/RESULTS.md's section on those two running ahead, measured beside the "after" run on one box.

    python bench/probes/rule_cost_sync_extras.py --path engine --paced h200 --preset tiny-llada --device cpu \
        --dtype fp32 --batches 1 --prompt 16 --gen 32 --block 8 --iters 3 --warmup 1 \
        --rules "low_confidence,threshold 0.9,smoothing 0.9,smoothing_top_k 8 (opt-in),logprobs 5"
"""
import runpy
import sys
from pathlib import Path

from dlc.runtime import decoding

_lookahead = decoding.DecodeState.lookahead


def lookahead(self, cap):
    if self.gen.logprobs is not None or self.gen.smoothing:
        return []
    return _lookahead(self, cap)


decoding.DecodeState.lookahead = lookahead
bench = Path(__file__).resolve().parents[1] / "rule_cost.py"
sys.argv = [str(bench)] + sys.argv[1:]
runpy.run_path(str(bench), run_name="__main__")
