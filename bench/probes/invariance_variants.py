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


VARIANTS = {"defaults": {}, "lookahead1": dict(lookahead_steps=1), "exact": dict(graph_decode="exact"),
            "eager": dict(cuda_graphs=False), "eager-la1": dict(cuda_graphs=False, lookahead_steps=1)}


def engine(model, dev, max_seq, max_batch, **kw):
    """The bench's serving Engine with the batch-invariant mode on, compile off, and ``kw`` ServeConfig
    fields (the variant)."""
    return bi.make_engine(model, dev, max_seq, max_batch, batch_invariant=True, compile=False, **kw)


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
