"""One GPU's filter-bisection variant vs the eager sort (the open bug behind GraphRunner.bisect_on_cuda).

On an H200 (2026-11-28) a GraphRunner with the bisection variant forced on gave other tokens than the eager
runner for top-p 0.7 and min-p 0.1 (tiny-llada fp32, head x12, T 0.9), captured or not, with Triton or torch
halvings, while top-k 5 (the candidates' route) and unfiltered sampling matched; on CPU every case matches.
This probe prints, per case, whether the graph runner's tokens equal eager's (on a shared and on a separate
model) and the first sequence of each when they differ; the next step is dumping the bisection's t*, keep
counts and noise for one step on CUDA and on CPU.

    python3 -P bench/probes/bisect_one_gpu.py            # a GPU; --device cpu for the reference behaviour
"""
import argparse

import torch

import dlc.kernels.filter_bisect as fb
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.runners.graph import GraphRunner
from dlc.runtime.session import open_model


def run(device: str, label: str, params: dict, capture: bool = True, triton: bool = True) -> None:
    sess = open_model("tiny-llada", device=device, dtype=torch.float32, progress=False)
    ref = open_model("tiny-llada", device=device, dtype=torch.float32, progress=False)
    with torch.no_grad():
        sess.runner.model.head_weight().mul_(12.0)
        ref.runner.model.head_weight().mul_(12.0)
    gr = GraphRunner(sess.runner.model, decode="exact", capture=capture and device == "cuda")
    gr.bisect_on_cuda = True
    real = fb.use_triton
    if not triton:
        fb.use_triton = lambda x: False
    try:
        prompts = [[5, 17, 99, 3], [42, 8, 9, 1]]
        cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache="dual", temperature=0.9,
                               seed=3, **params)
        a = generate(gr, prompts, cfg).token_ids
        b = generate(sess.runner, prompts, cfg).token_ids
        c = generate(ref.runner, prompts, cfg).token_ids
    finally:
        fb.use_triton = real
    print(f"{label}: graph == eager (shared model) {a == b}, graph == eager (own model) {a == c}, "
          f"eager_reuse {gr.stats['eager_reuse']}, replays {gr.stats['replays']}", flush=True)
    if a != c:
        print(f"   graph {a[0]}\n   eager {c[0]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = ap.parse_args().device
    run(dev, "top_p 0.7", dict(top_p=0.7))
    run(dev, "top_p 0.7, uncaptured", dict(top_p=0.7), capture=False)
    run(dev, "top_p 0.7, torch halvings", dict(top_p=0.7), triton=False)
    run(dev, "min_p 0.1", dict(min_p=0.1))
    run(dev, "top_k 5 (candidates)", dict(top_k=5))
    run(dev, "no filter", {})


if __name__ == "__main__":
    main()
