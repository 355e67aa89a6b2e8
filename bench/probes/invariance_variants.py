"""Which serving choice breaks batch invariance with --batch-invariant on? The GPU test's small engine check
(probes alone vs among background requests, bench/batch_invariance.py's run_mode) under runner variants:
defaults, no run-ahead, exact graph decoding, no CUDA graphs, and a background of one KV mode / T = 0 only.
GPU diagnostic for issue 17 item 8."""
import dataclasses
import os
import sys
from argparse import Namespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import batch_invariance as bi  # noqa: E402

from dlc.runtime.config import ServeConfig  # noqa: E402
from dlc.runtime.engine import Engine  # noqa: E402
from dlc.runtime.kv_cache import slot_bytes  # noqa: E402
from dlc.runtime.runners.eager import EagerRunner  # noqa: E402
from dlc.runtime.session import Session  # noqa: E402

VARIANTS = {"defaults": {}, "lookahead1": dict(lookahead_steps=1), "exact": dict(graph_decode="exact"),
            "eager": dict(cuda_graphs=False), "eager-la1": dict(cuda_graphs=False, lookahead_steps=1)}


def engine(model, dev, max_seq, max_batch, **kw):
    cfg = model.config
    mib = slot_bytes(cfg, max_seq, next(model.parameters()).dtype) * (2 * max_batch + 2) / 2**20 + 1
    sc = ServeConfig(model="bench", device=dev, max_batch_size=max_batch, max_seq_len=max_seq,
                     kv_cache_mb=mib, max_queue=4096, log_interval_s=0, compile=False, batch_invariant=True,
                     **kw)
    eng = Engine(Session(EagerRunner(model), None, cfg, False, "bench"), sc)
    eng.warmup()
    return eng


def small_model(tiny: bool):
    """-> (config, model, device): the GPU test's small random LLaDA shape, bf16 (tiny-llada fp32 on CPU)."""
    dev = "cpu" if tiny else "cuda"
    from dlc.models.presets import preset_config
    cfg = dataclasses.replace(preset_config("llada-8b"), d_model=512, n_layers=4, n_heads=8, n_kv_heads=8,
                              mlp_hidden=1408, max_seq_len=512) if not tiny else bi.model_config(True)
    return cfg, bi.build(cfg, dev, torch.float32 if tiny else torch.bfloat16), dev


def main():
    tiny = "--tiny" in sys.argv
    cfg, model, dev = small_model(tiny)
    scale = (8, 96, 32, 16, (16, 32, 64))
    plain = dict(bi.MODES)
    orig_bg = bi.background
    for only_plain in (False, True):
        if only_plain:      # background of dual-cache T = 0 requests only (same phases as the probes)
            bi.background = lambda c, g, n, s: [(p, {**pr, "kv_cache": "dual", "temperature": 0.0})
                                                for p, pr in orig_bg(c, g, n, s)]
        for name, kw in VARIANTS.items():
            if tiny and kw.get("cuda_graphs") is None and name != "defaults":
                continue
            eng = engine(model, dev, 2 * scale[1] + max(scale[4]), 16, **kw)
            args = Namespace(probes=12, background=12, seed=0)
            row = bi.run_mode(eng, cfg, "greedy-1", plain["greedy-1"], args, scale)
            print(f"RESULT bg={'plain' if only_plain else 'mixed'} variant={name} "
                  f"runner={bi.runner_name(eng)} "
                  f"differing={row['differing']} first={row['first_diff']}", flush=True)
            del eng
            torch.cuda.empty_cache() if dev == "cuda" else None


if __name__ == "__main__":
    main()
