"""Serving benchmark: the phase-multiplexed batcher vs static FCFS and continuous (iteration-level) FCFS.

Same as `dlc bench serve` (dlc/bench_cli.py; the method is dlc.runtime.benchmark, workloads and the HTTP
client dlc.runtime.loadgen), plus ``--random-weights``: the preset built with random weights directly on the
device by bench/engine_path.py's ``build`` (no checkpoint on disk), for the in-process engine driver:

    python bench/serve_bench.py tiny-llada                             # CPU, HTTP servers, every workload
    python bench/serve_bench.py llada-8b --driver engine --random-weights --device cuda \\
        --prompt-len 256:512 --gen-lens 64,128 --block-length 32 --tokens-per-step 2 --max-batch-size 32 \\
        --max-num-tokens 8192 --num-requests 24 --workloads burst,poisson-80 \\
        --json serve.json  # docs/SERVING.md

``--paced SCALE`` (CPU, with ``--driver engine --random-weights``): the runner is bench/paced_device.py's
PacedRunner with LLaDA-8B-on-H200 device times x SCALE (Refresh rows cost their tokens, a Reuse step the
weights plus a little per row), so the policies meet a GPU's cost structure on a tiny model:

    python bench/serve_bench.py tiny-llada --driver engine --random-weights --paced 1 --device cpu \
        --prompt-len 256:512 --gen-lens 64,128 --block-length 32 --tokens-per-step 2 --max-batch-size 32 \
        --max-num-tokens 8192 --num-requests 24 --workloads poisson-80
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # `python3 -P` leaves the script's folder out

from engine_path import build  # noqa: E402

from dlc.bench_cli import serve_bench  # noqa: E402



def obj_for(argv: list[str]) -> tuple[list[str], dict]:
    """Takes ``--paced SCALE`` out of argv -> (the rest, the click obj: the model builder, and the paced
    runner's factory when asked)."""
    obj = {"build": build}
    if "--paced" in argv:
        i = argv.index("--paced")
        scale = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
        from paced_device import H200_8B, PacedRunner
        obj["runner"] = lambda m: PacedRunner(m, **H200_8B, scale=scale)
    return argv, obj


if __name__ == "__main__":
    args, obj = obj_for(sys.argv[1:])
    sys.exit(serve_bench.main(args=args, prog_name="serve_bench.py", obj=obj))
