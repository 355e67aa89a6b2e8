"""The floors every bench compares against: what one diffusion step must at least move and compute (issue 13,
item 9). One home: bench/gpu_bench.py, bench/engine_bench.py and bench/serve_pace.py all count with it.

What a step really does (LLaDA-style dense model; ``ModelConfig`` of any family):

* **Reuse** (a block of ``T`` tokens per row over ``S`` cached columns, dual cache) reads every layer's
  weights once, the whole LM head (each decoded row needs every vocabulary logit for its argmax and
  softmax) and the rows' cached K/V; it does *not* read the embedding table (a gather of B x T rows, counted
  as such). FLOPs: layers over B x T tokens, the LM head over the B x T decoded rows, attention of T queries
  over S keys.
* **Refresh** (the whole sequence of ``L`` tokens per row, K/V written for every column, ``n_out`` decoded
  rows) multiplies the layer weights over B x L tokens and the LM head over the B x n_out decoded rows only;
  attention is L queries over L keys. Bytes: the weights once (layers + head), the embedding rows it
  gathers, the K/V it writes.
* A step's floor is ``max(bytes / bandwidth, FLOPs / matmul rate)`` at the rates measured in the same process
  (``copy_bandwidth``: bytes read + written per second of a device copy; ``matmul_rate``: a bf16 n^3
  matmul). The end-to-end floor of the fixed schedule (per block one Refresh, then ``steps_per_block - 1``
  Reuse steps) follows, and its ceiling is the generated tokens over that time: no implementation beats it.

MoE: bytes count every expert (a batch of B x T tokens routed top-k touches nearly all of them), FLOPs the
active parameters (``num_active_parameters``)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepCost:
    """Least bytes moved and FLOPs done by one step."""
    bytes: float
    flops: float

    def seconds(self, bw: float, rate: float) -> float:
        """The step's floor at ``bw`` bytes/s and ``rate`` FLOP/s: the binding one of the two."""
        return max(self.bytes / bw, self.flops / rate)

    def __add__(self, other: "StepCost") -> "StepCost":
        return StepCost(self.bytes + other.bytes, self.flops + other.flops)


# ------------------------------------------------------------------------------------------ parameter counts
def embed_params(cfg) -> int:
    return cfg.embedding_size * cfg.d_model


def head_params(cfg) -> int:
    """The LM head (vocab_size x d; tied heads are the embedding read as the head: the same bytes)."""
    return cfg.vocab_size * cfg.d_model


def layer_params(cfg, active: bool = False) -> int:
    """Every transformer layer plus the final norm: all parameters but the embedding table and the head
    (``active``: those one token runs through, MoE)."""
    n = cfg.num_active_parameters() if active else cfg.num_parameters()
    return n - embed_params(cfg) - (0 if cfg.tie_embeddings else head_params(cfg))


def kv_bytes(cfg, B: int, S: int, elt: int = 2) -> int:
    """K and V of ``S`` columns for ``B`` rows over every layer."""
    return 2 * cfg.n_layers * B * cfg.n_kv_heads * S * cfg.head_dim * elt


def attention_flops(cfg, B: int, T: int, S: int) -> int:
    """Scores (q.k) and the weighted sum (p.v) of T queries over S keys, every head of every layer."""
    return 4 * cfg.n_layers * B * T * S * cfg.n_heads * cfg.head_dim


# ------------------------------------------------------------------------------------------------ step costs
def reuse_cost(cfg, B: int, T: int, S: int, elt: int = 2) -> StepCost:
    """One Reuse step: B rows feed a T-token block over S cached columns (all T decoded)."""
    weights = (layer_params(cfg) + head_params(cfg)) * elt
    nbytes = weights + kv_bytes(cfg, B, S, elt) + B * T * cfg.d_model * elt        # + embedding rows
    flops = 2 * (layer_params(cfg, active=True) + head_params(cfg)) * B * T + attention_flops(cfg, B, T, S)
    return StepCost(nbytes, flops)


def refresh_cost(cfg, B: int, L: int, n_out: int, elt: int = 2) -> StepCost:
    """One Refresh step: B rows of L tokens through every layer (K/V of all L written), n_out decoded."""
    weights = (layer_params(cfg) + head_params(cfg)) * elt
    nbytes = weights + kv_bytes(cfg, B, L, elt) + B * L * cfg.d_model * elt
    flops = (2 * layer_params(cfg, active=True) * B * L + 2 * head_params(cfg) * B * n_out
             + attention_flops(cfg, B, L, L))
    return StepCost(nbytes, flops)


def e2e_floor_s(cfg, B: int, prompt: int, gen: int, block: int, steps_per_block: int, bw: float,
                rate: float, elt: int = 2) -> float:
    """Seconds the fixed dual-cache schedule needs at the floors: per block one Refresh over the whole
    sequence (decoding the block) and ``steps_per_block - 1`` Reuse steps of the block over L cached
    columns."""
    L = prompt + gen
    refresh = refresh_cost(cfg, B, L, block, elt).seconds(bw, rate)
    reuse = reuse_cost(cfg, B, block, L, elt).seconds(bw, rate)
    return (gen // block) * (refresh + (steps_per_block - 1) * reuse)


def bd_floor_s(cfg, B: int, prompt: int, gen: int, block: int, steps_per_block: int, bw: float,
               rate: float, elt: int = 2) -> float:
    """Seconds a block-diffusion schedule needs at the floors (exact block cache): the prompt's prefill once,
    then per block ``steps_per_block`` steps of the block over the cached blocks before it and itself; a
    block's first step also feeds the finished block before it (its clean K/V written in that forward,
    docs/BLOCK_DIFFUSION.md), so it is a step of two blocks."""
    total = refresh_cost(cfg, B, prompt, 0, elt).seconds(bw, rate)
    for i in range(gen // block):
        S = prompt + (i + 1) * block                            # cached columns the block's steps read
        first = reuse_cost(cfg, B, 2 * block if i else block, S, elt).seconds(bw, rate)
        total += first + (steps_per_block - 1) * reuse_cost(cfg, B, block, S, elt).seconds(bw, rate)
    return total


def e2e_ceiling_tok_s(cfg, B: int, prompt: int, gen: int, block: int, steps_per_block: int, bw: float,
                      rate: float, elt: int = 2) -> float:
    """Generated tokens per second at the floors (the best any implementation of the schedule can do): the
    dual-cache schedule's, or a block-diffusion model's (``bd_floor_s``)."""
    floor = bd_floor_s if getattr(cfg, "block_diffusion", False) else e2e_floor_s
    return B * gen / floor(cfg, B, prompt, gen, block, steps_per_block, bw, rate, elt)


# -------------------------------------------------------------------------------------- measured device rates
def time_ms(fn, dev, iters: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in ms: CUDA events on GPU, perf_counter on CPU (gpu_bench times with it)."""
    for _ in range(warmup):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def copy_bandwidth(dev, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    dev = torch.device(dev)
    src = torch.randn(nbytes // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return 2 * nbytes / (time_ms(lambda: dst.copy_(src), dev, iters=10) / 1e3)


def matmul_rate(dev, n: int) -> float:
    """FLOP/s of an n^3 bf16 matmul on random data."""
    dev = torch.device(dev)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return 2 * n**3 / (time_ms(lambda: a @ b, dev, iters=10) / 1e3)


def measure(dev) -> tuple[float, float]:
    """(copy bandwidth, bf16 matmul rate) of ``dev``: full sizes on a GPU, small ones elsewhere."""
    big = torch.device(dev).type == "cuda"
    return copy_bandwidth(dev, 4 * 2**30 if big else 64 * 2**20), matmul_rate(dev, 8192 if big else 512)
