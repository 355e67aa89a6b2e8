#!/usr/bin/env bash
# Build examples/cpp/main.cpp with g++ against the torch wheel's headers and libraries (no cmake needed).
#   bash examples/cpp/build.sh OUT_BINARY
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/dlc_engine_demo}"
torch_dir="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
abi="$(python -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
"${CXX:-g++}" -std=c++20 -O1 -D_GLIBCXX_USE_CXX11_ABI="$abi" "$here/main.cpp" -o "$out" \
  -I"$torch_dir/include" \
  -L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10
echo "$out"
