"""Serving benchmark: the phase-multiplexed batcher vs static FCFS and continuous (iteration-level) FCFS.

Same as `dlc bench serve` (dlc/bench_cli.py; the method is dlc.runtime.benchmark, workloads and the HTTP
client dlc.runtime.loadgen), plus ``--random-weights``: the preset built with random weights directly on the
device by bench/engine_path.py's ``build`` (no checkpoint on disk), for the in-process engine driver:

    python bench/serve_bench.py tiny-llada                             # CPU, HTTP servers, every workload
    python bench/serve_bench.py llada-8b --driver engine --random-weights --device cuda \\
        --prompt-len 256:512 --gen-lens 64,128 --block-length 32 --tokens-per-step 2 --max-batch-size 32 \\
        --max-num-tokens 8192 --num-requests 24 --workloads burst,poisson-80 \\
        --json serve.json  # docs/SERVING.md
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # `python3 -P` leaves the script's folder out

from engine_path import build  # noqa: E402

from dlc.bench_cli import serve_bench  # noqa: E402

if __name__ == "__main__":
    sys.exit(serve_bench.main(args=sys.argv[1:], prog_name="serve_bench.py", obj={"build": build}))
