"""Start of an export engine on a fresh machine, without and with the engine's compile cache
(runtime/compile_cache.py).

Each start is its own process with an empty Inductor cache directory (what a new container has): it opens the
engine with compile at load, warms up as ``dlc serve`` does, serves one request and shuts down (the Engine
writes the cache after the warm-up and at shutdown). Start 1 finds no cache file (it is removed first), the
later starts find the one start 1 wrote. Printed per start: open, warm-up and first-request seconds and
Inductor's FX-graph cache hits and misses.

    python bench/probes/compile_cache_start.py --engine ENGINE_DIR --device cpu --starts 3
    python3 -P bench/probes/compile_cache_start.py --engine ENGINE_DIR --device cuda --starts 2
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ONE_START = r"""
import json, sys, time, torch
from torch._dynamo.utils import counters
from dlc.runtime.config import ServeConfig
from dlc.runtime.engine import Engine
from dlc.runtime.session import open_model
engine, device = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
session = open_model(engine, device=device, progress=False)
eng = Engine(session, ServeConfig(model="x", device=device, max_batch_size=4, max_seq_len=int(sys.argv[3]),
                                  compile=True, **({"kv_cache_mb": 64} if device == "cpu" else {})))
t1 = time.perf_counter()
eng.warmup()
t2 = time.perf_counter()
out = eng.generate([list(range(5, 37))], dict(gen_length=32, block_length=8, steps=32))
if device == "cuda":
    torch.cuda.synchronize()
t3 = time.perf_counter()
eng.shutdown()
c = counters["inductor"]
print(json.dumps({"open_s": t1 - t0, "warmup_s": t2 - t1, "first_request_s": t3 - t2,
                  "total_s": t3 - t0, "hits": c["fxgraph_cache_hit"], "misses": c["fxgraph_cache_miss"],
                  "loaded": eng.compile_cache.loaded, "saved": eng.compile_cache.saved,
                  "tokens": out[0][:8]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, help="an export engine directory (it gets compile_cache/)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--starts", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=96)
    args = ap.parse_args()
    shutil.rmtree(Path(args.engine) / "compile_cache", ignore_errors=True)
    rows = []
    for i in range(args.starts):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            run = subprocess.run([sys.executable, "-c", ONE_START, args.engine, args.device,
                                  str(args.max_seq_len)], capture_output=True, text=True, env=env)
        if run.returncode:
            raise SystemExit(f"start {i + 1} failed:\n{run.stderr[-3000:]}")
        r = json.loads(run.stdout.strip().splitlines()[-1])
        r["start"] = i + 1
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("\n| start | compile cache | open s | warm-up s | first request s | total s "
          "| graph hits / misses |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        what = "none (start 1 writes it)" if r["loaded"] == 0 else f"{r['loaded']} artifacts loaded"
        print(f"| {r['start']} | {what} | {r['open_s']:.1f} | {r['warmup_s']:.1f} | "
              f"{r['first_request_s']:.1f} | {r['total_s']:.1f} | {r['hits']} / {r['misses']} |")
    if len({tuple(r["tokens"]) for r in rows}) != 1:
        raise SystemExit("the starts served different tokens")


if __name__ == "__main__":
    main()
