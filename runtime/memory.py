"""How much memory the KV slot pool gets (vLLM's ``--gpu-memory-utilization``).

Three sources, in this order:

* ``kv_cache_mb`` (``--kv-cache-mb``): an explicit budget on any device;
* on CUDA, ``gpu_memory_utilization`` (default 0.9, as vLLM's): the server may fill that fraction of the
  device's total memory (``torch.cuda.mem_get_info``). Everything already on the device once the model is
  loaded counts against it (the weights, the CUDA context, other processes: ``total - free``), then the
  activation peak of the largest iteration (``activation_bytes``: estimated from the model's shape and the
  serving limits, no profile run), and the pool takes the rest in whole slots of ``max_seq_len`` tokens;
* on CPU, ``CPU_DEFAULT_MB`` (512 MiB): host memory is shared with everything else on the machine, so the
  pool never grows on its own; ``--kv-cache-mb`` raises it.

When the model cannot fit, ``KVBudget.check_slot`` / ``plan_kv_budget`` raise one ValueError line naming what
to change (``--max-seq-len``, ``--gpu-memory-utilization``, ``--kv-cache-mb``, ``--max-num-tokens``,
``--max-batch-size``, ``--dtype``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

CPU_DEFAULT_MB = 512.0
GIB = 2 ** 30


@dataclass
class KVBudget:
    bytes: int                  # the pool's budget
    source: str                 # "kv-cache-mb" | "gpu-memory-utilization" | "cpu-default"
    total: int = 0              # device memory (CUDA sizing only)
    in_use: int = 0             # on the device when sized: weights, CUDA context, other processes
    weights: int = 0            # the model's parameters and buffers (part of in_use)
    activations: int = 0        # the reserved activation peak
    utilization: float = 0.0

    def check_slot(self, slot_bytes: int, max_seq: int) -> None:
        """One slot of ``max_seq`` tokens must fit, else one line saying what to change."""
        if self.bytes >= slot_bytes:
            return
        need = f"one KV slot of {max_seq} tokens needs {fmt_bytes(slot_bytes)}"
        if self.source == "gpu-memory-utilization":
            raise ValueError(
                f"the KV cache gets {fmt_bytes(self.bytes)} ({self.utilization:g} of {fmt_bytes(self.total)} "
                f"minus {fmt_bytes(self.in_use)} in use, weights {fmt_bytes(self.weights)}, minus "
                f"{fmt_bytes(self.activations)} of activations); {need}: lower --max-seq-len, raise "
                f"--gpu-memory-utilization, lower --max-num-tokens, or use a smaller --dtype")
        flag = "--kv-cache-mb" + ("" if self.source == "kv-cache-mb"
                                  else f" (default {CPU_DEFAULT_MB:g} on CPU)")
        raise ValueError(f"{flag} {self.bytes / 2**20:.3g} MiB holds no KV slot: {need}; raise --kv-cache-mb "
                         f"or lower --max-seq-len")

    def describe(self) -> str:
        if self.source == "gpu-memory-utilization":
            return (f"gpu-memory-utilization {self.utilization:g} of {fmt_bytes(self.total)}: "
                    f"{fmt_bytes(self.in_use)} in use (weights {fmt_bytes(self.weights)}), "
                    f"{fmt_bytes(self.activations)} activations")
        return f"--kv-cache-mb {self.bytes / 2**20:.4g}" if self.source == "kv-cache-mb" else "CPU default"


def fmt_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2 ** 20:.3g} MiB"


def model_bytes(runner) -> int:
    """Parameters and buffers of the runner's model (0 for runners without one, e.g. compiled engines)."""
    model = getattr(runner, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    ts = {t.data_ptr(): t.untyped_storage().nbytes() for t in [*model.parameters(), *model.buffers()]}
    return sum(ts.values())


def activation_bytes(mc, tokens: int, rows: int, max_seq: int, decoded: int, reuse_tokens: int,
                     elem: int, stacked_moe: bool = False) -> int:
    """Estimated activation peak of one iteration (bytes), conservative:

    * one layer's transients over ``tokens`` fed tokens (residual, norm, q|k|v, RoPE's float32 copies,
      attention output, gate|up, the SwiGLU product, down; a MoE layer: its routed experts' hidden, every
      expert's where the stacked forward runs, ``stacked_moe``);
    * attention over ``max_seq`` keys: the K/V of ``rows`` rows gathered out of the pool and expanded to every
      query head (the eager path), and the scores of every fed token if SDPA materialises them;
    * decoding ``decoded`` rows: one float64 vocabulary chunk (``VOCAB_CHUNK``) three times (logits, their
      exp, the noise);
    * the CUDA graphs' memory pool: one layer's transients over ``reuse_tokens`` (held, not transient)."""
    from .runners.eager import VOCAB_CHUNK

    d, hd, h, hkv = mc.d_model, mc.head_dim, mc.n_heads, mc.n_kv_heads
    ffn = mc.ffn_hidden(every_expert=stacked_moe) or 4 * d
    per_token = (4 * d + (h + 2 * hkv) * hd + 4 * (h + hkv) * hd + h * hd + 3 * ffn) * elem
    attention = rows * h * max_seq * hd * 2 * elem + tokens * h * max_seq * elem            # K/V, scores
    decode = decoded * min(VOCAB_CHUNK, mc.vocab_size) * 8 * 3
    return tokens * per_token + attention + decode + reuse_tokens * per_token


def plan_kv_budget(cfg, runner, mc, max_seq: int, block: int) -> KVBudget:
    """The pool's budget for a ServeConfig ``cfg`` over ``runner`` (model loaded, pool not yet allocated)."""
    if cfg.kv_cache_mb is not None:
        return KVBudget(int(cfg.kv_cache_mb * 2 ** 20), "kv-cache-mb")
    dev = torch.device(runner.device)
    if dev.type != "cuda":
        return KVBudget(int(CPU_DEFAULT_MB * 2 ** 20), "cpu-default")
    torch.cuda.empty_cache()              # blocks the loader freed are free memory, not "in use"
    free, total = torch.cuda.mem_get_info(dev)
    elem = torch.empty((), dtype=runner.dtype).element_size()
    rows = cfg.max_batch_size
    tokens = min(cfg.max_num_tokens, rows * max_seq)
    from dlc.models.llada_moe import grouped_mm_device
    stacked = mc.is_moe and not grouped_mm_device(dev, runner.dtype)   # the MoE forward auto runs here
    act = activation_bytes(mc, tokens, rows, max_seq, min(tokens, rows * block), rows * block, elem, stacked)
    util = cfg.gpu_memory_utilization
    in_use, weights = total - free, model_bytes(runner)
    left = int(util * total) - in_use - act
    if left <= 0:
        raise ValueError(
            f"no memory left for the KV cache on {dev}: {fmt_bytes(in_use)} in use (weights "
            f"{fmt_bytes(weights)}, CUDA context, other processes) plus {fmt_bytes(act)} of activations "
            f"exceed --gpu-memory-utilization {util:g} of {fmt_bytes(total)}; raise "
            f"--gpu-memory-utilization, lower --max-num-tokens or --max-batch-size, use a smaller --dtype, "
            f"or free the device")
    return KVBudget(left, "gpu-memory-utilization", total, in_use, weights, act, util)
