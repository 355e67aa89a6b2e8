"""bench/serve_bench.py with tokens returned only at their block's end (``DecodeState.final_prefix`` returns
nothing, as before the engine streamed final tokens early): the "before" rows of bench/RESULTS.md's TTFT
comparison, run beside the "after" run (bench/serve_bench.py itself) with the same arguments on one box.

    python bench/probes/serve_block_stream.py tiny-llada --driver engine --random-weights --paced 2 \
        --device cpu --block-length 32 --tokens-per-step 2 --max-batch-size 32 --num-requests 24 \
        --workloads poisson-80 --prompt-len 256:512 --gen-lens 64,128 --max-num-tokens 8192
"""
import runpy
import sys
from pathlib import Path

from dlc.runtime.decoding import DecodeState

DecodeState.final_prefix = lambda self: []
bench = Path(__file__).resolve().parents[1] / "serve_bench.py"
sys.argv = [str(bench)] + sys.argv[1:]
runpy.run_path(str(bench), run_name="__main__")
