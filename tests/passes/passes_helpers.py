"""Helpers of the pass tests: tiny models of each family and their phase programs (built once)."""
import torch

from dlc.compiler.export import trace_forward
from dlc.models.loading import load_model
from dlc.passes.pipeline import PassContext, run_pipeline

FAMILIES = ["tiny-llada", "tiny-dream", "tiny-llada-moe"]
_CACHE: dict = {}


def tiny(name: str):
    """A tiny random model with its matrices scaled x10: the plain init barely moves the residual stream, so
    every masked position would predict one token and token comparisons would prove little."""
    if name not in _CACHE:
        m = load_model(name, seed=1).model
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if p.ndim == 2 and "embed" not in pname and "wte" not in pname:
                    p.mul_(10)
        _CACHE[name] = m
    return _CACHE[name]


def traced(name: str):
    key = ("trace", name)
    if key not in _CACHE:
        _CACHE[key] = trace_forward(tiny(name))
    return _CACHE[key]


def kv_phases(name: str):
    """refresh/reuse programs after cache_kv_reuse only (outputs: hidden, k, v)."""
    key = ("kv", name)
    if key not in _CACHE:
        m = tiny(name)
        ctx = PassContext(config=m.config)
        _CACHE[key] = (run_pipeline(traced(name), ctx, ["cache_kv_reuse"]), ctx)
    return _CACHE[key]


def token_state(config, B=3, L=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (B, L), generator=g)
    ids[:, L // 2:] = torch.where(torch.rand(B, L - L // 2, generator=g) < 0.6, config.mask_id, ids[:, L // 2:])
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :3] = False                                        # a left-padded row
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    return ids, pos, key_mask

