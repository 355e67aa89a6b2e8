#!/usr/bin/env bash
# Issue 16, the TP all-reduce backends (dlc.models.all_reduce) on one 2-GPU host, in one call (< 600 s):
#   1. the GPU tests: TP=2 symm (compiled + captured) == TP=2 nccl == one GPU, auto on the same group, and the
#      TP GPU tests that run with the new default (auto): compiled blocks, graphs, fused shard decode;
#   2. the collectives alone: NCCL vs one-shot per call and in a 32-layer stack (dlc's in-place fused copy);
#   3. bench/tp_bench.py: TP=1 beside TP=2 under nccl, symm and auto in one process (B=1 Reuse synchronous and
#      run ahead, B=32 tokens/s, ratios), blocks compiled on both sides.
#     bash bench/tp_all_reduce_gpu.sh          # writes under $OUT (default /tmp/tp_all_reduce)
set -u
OUT=${OUT:-/tmp/tp_all_reduce}
mkdir -p "$OUT"
if ! python3 -c "import dlc.runtime" 2>/dev/null; then       # offline machine: dlc on the path by a shim
  mkdir -p /tmp/shim/dlc && ln -sf "$PWD"/dlc/* /tmp/shim/dlc/
  for p in models kernels runtime passes; do ln -sfn "$PWD/$p" "/tmp/shim/dlc/$p"; done
  export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
fi
env | grep -E "MULTICAST|NVLS" | tee "$OUT/env_multicast.txt"    # stays off (KINDS.md)
nvidia-smi -L | tee "$OUT/gpus.txt"
timeout 230 python3 -m pytest -q -m gpu tests/runtime/test_tp_all_reduce.py tests/runtime/test_tp_compile.py \
    tests/runtime/test_tp_graphs.py 2>&1 | tee "$OUT/tp_all_reduce_gpu_tests.log" | tail -15
timeout 60 python3 -P bench/probes/nccl_allreduce.py --rows 32,1024 2>&1 | tee "$OUT/nccl_allreduce.log" | tail -5
timeout 290 python3 -P bench/tp_bench.py --tp 2 --compile --quick --all-reduce nccl,symm,auto \
    --agree-preset none --out "$OUT/tp_bench_all_reduce.json" 2>&1 | tee "$OUT/tp_bench_all_reduce.log" | tail -12
