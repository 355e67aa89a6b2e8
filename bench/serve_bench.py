"""Serving benchmark: the phase-multiplexed batcher vs FCFS static batching on the same engine.

Same as `dlc bench serve` (see dlc/bench_cli.py; the workload generator and driver are dlc.runtime.loadgen):

    python bench/serve_bench.py tiny-llada --workload burst --num-requests 48
    python bench/serve_bench.py tiny-llada --workload osc --rate 8 --period 4
"""
import sys

from dlc.bench_cli import serve_bench

if __name__ == "__main__":
    sys.exit(serve_bench.main(args=sys.argv[1:], prog_name="serve_bench.py"))
