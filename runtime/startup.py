"""The startup report of ``dlc serve``: two console lines, as vLLM prints its load / compile / capture times
and its KV cache size before it listens.

    dlc serve: ready in 61.2 s: load 4.1 s, compile 48.0 s, capture 9.1 s (27 CUDA graphs)
    dlc serve: KV cache 97 slots x 1024 tokens = 99328 tokens, 48.50 GiB (gpu-memory-utilization 0.9 of ...)

``compile`` is the warm-up's time outside graph capture (the first forwards, where torch.compile compiles), or
"off" when nothing is compiled; ``capture`` is the CUDA-graph capture itself, or "off" without graphs."""
from __future__ import annotations

import gc
import time

from .memory import fmt_bytes
from .step import is_graphed


def freeze_heap() -> tuple[int, float]:
    """After warm-up, before serving: one full collection, then everything still alive (the model, graphs,
    compiled code, imported modules) moves to the collector's permanent generation (``gc.freeze``, as vLLM
    does after start-up). The collections serving triggers then never walk the startup heap: a full one
    over it costs tens of ms (86 ms over 224k objects on the 2-core CPU box; more after torch.compile) and
    would land inside some request's latency. -> (objects frozen, seconds the collection took)."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count(), time.perf_counter() - t0


def graph_stats(runner) -> dict | None:
    """Capture statistics of a graphed runner (GraphRunner's own, an engine's ProgramGraphs'), else None."""
    stats = getattr(runner, "stats", None)
    if isinstance(stats, dict):
        return stats
    stats = getattr(getattr(runner, "graphs", None), "stats", None)
    return stats if isinstance(stats, dict) else None


def startup_lines(engine) -> list[str]:
    t = engine.timings
    load, warm = t.get("load_s"), t.get("warmup_s") or 0.0
    stats = graph_stats(engine.runner) if is_graphed(engine.runner) else None
    # GraphRunner's capture_s includes its warm runs (warm_s); an engine's ProgramGraphs has no warm_s
    capture = None if stats is None else stats["capture_s"] - stats.get("warm_s", 0.0)
    compiled = getattr(engine.runner, "compiled", False)
    parts = [f"load {load:.1f} s" if load is not None else "load -"]
    parts.append(f"compile {max(0.0, warm - (capture or 0.0)):.1f} s" if compiled else "compile off")
    if stats is None:
        parts.append("capture off")
    elif getattr(engine.runner, "capture", True):
        parts.append(f"capture {capture:.1f} s ({stats['captures']} CUDA graphs)")
    else:                                   # GraphRunner without CUDA: the same steps, run uncaptured
        parts.append(f"capture off ({stats['captures']} shapes warmed uncaptured)")
    total = (load or 0.0) + t.get("init_s", 0.0) + warm
    kv = engine.kv
    usable = kv.n_slots - is_graphed(engine.runner)            # the graphs' padding rows own one slot
    return [f"dlc serve: ready in {total:.1f} s: " + ", ".join(parts),
            f"dlc serve: KV cache {usable} slots x {kv.s_max} tokens = {usable * kv.s_max} tokens, "
            f"{fmt_bytes(kv.n_slots * kv.slot_bytes)} ({engine.kv_budget.describe()})"]
