"""H200 benchmark of dlc's LLaDA-8B-shaped model: Reuse/Refresh steps, logit memory, end-to-end, serving.

One invocation prints ONE table; every ratio compares numbers measured in this same process:

* floors (bench/floors.py, the one home of what a step must move and compute): device-copy bandwidth (bytes
  read + written) and a bf16 8192^3 matmul rate, measured first;
* Reuse step (a 32-token block over a cached 768-token K/V) at B = 1, 8, 32: the eager runner
  (``dlc.runtime.runners.eager.EagerRunner``: dlc.models forward + [B, 32, V] logits + float64 softmax) vs the
  optimized step (the same dlc.models forward with its blocks under torch.compile, ``dlc.kernels``'s fused
  selected-row logits, the static in-place KVCache, the whole step captured as one CUDA graph per batch size),
  against the Reuse floor (layer weights + the whole LM head + the rows' cached K/V read, no embedding
  table; or its FLOPs if those bind);
* Refresh step at B = 1 (L = 768) vs the Refresh floor (layer weights over L tokens, the LM head over the
  decoded block only, attention; or the bytes if those bind);
* peak transient memory of decoding every row of [B, L] hidden states: monolithic (``head`` -> [B, L, V]
  logits -> float64 softmax: ``monolithic_decode`` below) vs the fused op, vs a budget;
* end-to-end tokens/s at a fixed schedule (prompt 512, gen 256, block 32, one token per step, dual cache):
  optimized vs a plain eager Fast-dLLM dual-cache loop written below;
* serving: phase-multiplexed vs static and continuous FCFS through one ``dlc.runtime.Engine``, with the
  serving benchmark's method (``dlc.runtime.benchmark``: warmed, capacity measured, rotated rounds, medians);
  the issue's target ratios (burst, Poisson at 80 % of capacity) as rows.

Every section fits an 80 GB card at the default shapes (LLaDA-8B, bf16, prompt 512 + gen 256, B up to 32): the
e2e eager baseline takes its float64 softmax over chunks of sequences (``--softmax-chunk-mib``) and the memory
section reports a monolithic decode that cannot fit as OOM without attempting it.

Random bf16 weights are created directly on the GPU. ``--smoke`` runs every section on a tiny model on CPU (no
graphs, no compile) to check the script itself.

    python bench/gpu_bench.py                      # on the H200
    python bench/gpu_bench.py --smoke              # anywhere
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dlc.kernels as K
from dlc.models import KVCache
from dlc.models.presets import preset_config
from dlc.runtime.runners.eager import EagerRunner
from dlc.runtime.kv_cache import KVCacheManager, slot_bytes
from dlc.runtime.step import build_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))      # bench/ (python3 -P does not add it)
import floors  # noqa: E402  (the step floors every bench counts with)
from engine_path import construct, sync  # noqa: E402  (every bench's random model starts there)

GiB = 2**30
# the one table: section, case, eager, optimized, floor/budget, ratio, target, status
ROWS: list[dict] = []
NOTES: list[str] = []


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------- timing
time_ms = floors.time_ms


# ----------------------------------------------------------------------------------------------- model
def build(cfg, dev, dtype):
    """dlc.models LLaDA with random weights created on ``dev`` in ``dtype`` (never materialised on the
    host)."""
    model = construct(cfg, dev, dtype)
    with torch.no_grad():                      # random-model logits peaked enough to make argmax stable
        model.head_weight().mul_(4.0)
    return model


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


_COMPILED: dict[int, object] = {}   # id(block) -> its torch.compile wrapper (``set_compiled`` toggles it)


def compile_blocks(model) -> None:
    """torch.compile each transformer block (one compiled code object shared by all layers: same class)."""
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 64)
    for b in model.blocks:
        b.compile(fullgraph=True)
        _COMPILED[id(b)] = b._compiled_call_impl


def set_compiled(model, on: bool) -> None:
    for b in model.blocks:
        if id(b) in _COMPILED:
            b._compiled_call_impl = _COMPILED[id(b)] if on else None


_FUSED_OFF: dict[int, tuple] = {}        # id(module) -> its Fusable.fused while the bench runs unfused


def set_fused(model, on: bool) -> None:
    """q|k|v and gate|up as one GEMM each (dlc.models.common.fuse_projections_) on or off; the eager baselines
    run unfused, as the model issues its products."""
    from dlc.models.common import Fusable
    for m in model.modules():
        if not isinstance(m, Fusable):
            continue
        if on and id(m) in _FUSED_OFF:
            m.fused = _FUSED_OFF.pop(id(m))
        elif not on and m.fused:
            _FUSED_OFF[id(m)], m.fused = m.fused, ()


def optimized(model, on: bool, args) -> None:
    set_compiled(model, on and args.compile)
    set_fused(model, on and args.fuse)


class Graphed:
    """fn() captured as one CUDA graph (fn reads/writes only static tensors); eager call on CPU."""

    def __init__(self, fn, dev, use_graph: bool):
        self.fn, self.graph, self.out = fn, None, None
        if use_graph and dev.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn()

    def __call__(self):
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


def graph_ms(fn, dev, iters: int):
    """Median ms of fn captured as a CUDA graph (no Python/launch overhead in the number)."""
    return time_ms(Graphed(fn, dev, True), dev, iters)


KERNEL_KINDS = (("fused logits", ("select_logits",)), ("attention", ("flash", "fmha", "attention", "attn")),
                ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "sm90")),
                ("inductor fused", ("triton_",)))


def kernel_breakdown(fn, dev, iters: int = 3) -> str:
    """GPU kernel time per call of fn by kind (torch.profiler): where a step's time goes."""
    if dev.type != "cuda":
        return "n/a on cpu"
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        sync(dev)
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        name = e.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us / 1e3 / iters
    total = sum(kinds.values())
    return f"kernels {total:.2f} ms = " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(kinds.items(),
                                                                                   key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------- steps
def eager_inputs(cfg, B, L, dev, g):
    ids = torch.randint(0, cfg.vocab_size, (B, L), device=dev, generator=g)
    pos = torch.arange(L, device=dev)[None].expand(B, L).contiguous()
    return ids, pos, torch.ones(B, L, dtype=torch.bool, device=dev)


def monolithic_decode(logits):
    """[B, N, V] logits -> (argmax [B, N], float64 softmax probability of it): the unchunked decoding."""
    x0 = logits.argmax(-1)
    return x0, torch.softmax(logits.to(torch.float64), -1).gather(-1, x0[..., None])[..., 0]


def softmax_rows_per_chunk(N: int, V: int, budget_bytes: int) -> int:
    """Sequences per chunk of the baseline's float64 softmax: its float64 copy and its softmax (16 bytes per
    logit) of that many [N, V] rows fit ``budget_bytes`` (at least one)."""
    return max(1, int(budget_bytes // (N * V * 16)))


def chunked_confidence(logits, x0, rows: int):
    """float64 softmax probability of x0 [B, N] under logits [B, N, V], ``rows`` sequences at a time. Equal
    to ``monolithic_decode``'s (softmax is per position); the transient is rows x N x V x 16 bytes instead of
    B x N x V x 16 (B=32, N=768, V=126464: 3.1 GB per 2 rows instead of 49.7 GB, which with the weights, the
    [B, L] K/V and the bf16 logits does not fit an 80 GB card)."""
    conf = torch.empty(x0.shape, dtype=torch.float64, device=x0.device)              # [B, N]
    for i in range(0, x0.shape[0], rows):
        p = torch.softmax(logits[i:i + rows].to(torch.float64), -1)                  # [rows, N, V]
        conf[i:i + rows] = p.gather(-1, x0[i:i + rows, :, None])[..., 0]
        del p
    return conf


def make_pool(cfg, B, L, dt, dev, extra=0):
    """A KVCacheManager slot pool of B (+ extra) rows of L columns."""
    return KVCacheManager(cfg, L, slot_bytes(cfg, L, dt) * (B + extra), dt, dev, max_slots=B + extra)


def step_batch(runner, phase, ids, a, T, pool, slots):
    """The StepBatch of token states ids [B, L] decoding (and, for reuse, feeding) columns [a, a + T)."""
    B = ids.shape[0]
    rows = list(ids.cpu())
    spans = [(a, a + T)] * B if phase == "reuse" else None
    return build_batch(runner, phase, rows, [a] * B, [a] * B, T, spans, [(s,) for s in slots], pool)


def fused_decode(model, h):
    """[B, T, d] -> (token [B, T], confidence [B, T]) through dlc.kernels.fused_select_logits."""
    B, T, d = h.shape
    tok, conf = K.fused_select_logits(h.reshape(B * T, d), model.head_weight())
    return tok.view(B, T), conf.view(B, T)


def unmask_one(blk, tok, conf, mask_id):
    """One token per step: the most confident masked position of each row takes its prediction, in place."""
    conf = conf.masked_fill(blk != mask_id, -math.inf)
    j = conf.argmax(1, keepdim=True)                                   # [B, 1]
    blk.scatter_(1, j, tok.gather(1, j))
    return blk


@torch.no_grad()
def bench_reuse(model, args, dev, g):
    cfg, L, T, a = model.config, args.prompt + args.gen, args.block, args.prompt
    runner = EagerRunner(model)
    res = {}
    for B in args.batches:
        floor_ms = floors.reuse_cost(cfg, B, T, L).seconds(args.bw, args.rate) * 1e3
        ids, pos, km = eager_inputs(cfg, B, L, dev, g)
        kv = make_pool(cfg, B, L, next(model.parameters()).dtype, dev)
        slots = list(range(B))
        cache = KVCache(kv.k, kv.v)                                      # pool row b = batch row b
        runner.refresh(step_batch(runner, "refresh", ids, a, T, kv, slots))          # fill the cache once
        optimized(model, False, args)
        reuse_batch = step_batch(runner, "reuse", ids, a, T, kv, slots)
        eager = time_ms(lambda: runner.reuse(reuse_batch), dev, args.iters)
        optimized(model, True, args)
        blk = ids[:, a:a + T].contiguous()
        sdpa_step = Graphed(lambda: fused_decode(model, model(blk, None, None, cache, a)), dev, args.graphs)
        pool = KVCache(cache.k, cache.v, torch.arange(B, device=dev), torch.full((B,), L, device=dev))
        pool_step = Graphed(lambda: fused_decode(model, model(blk, None, None, pool, a)), dev, args.graphs)
        t_sdpa, t_pool = time_ms(sdpa_step, dev, args.iters), time_ms(pool_step, dev, args.iters)
        step, opt = (sdpa_step, t_sdpa) if t_sdpa <= t_pool else (pool_step, t_pool)
        NOTES.append(f"Reuse B={B} optimized step: {t_sdpa:.3f} ms with SDPA (contiguous cache, no mask), "
                     f"{t_pool:.3f} ms with dlc.kernels.pool_attention; the table takes the faster")
        if B == args.batches[0]:
            NOTES.append(f"Reuse B={B} optimized step ({opt:.2f} ms in a CUDA graph): "
                         + kernel_breakdown(step.fn, dev))
        ref_tok, ref_conf = runner.reuse(reuse_batch)
        tok, conf = step()
        agree = (tok == ref_tok).float().mean().item()
        res[B] = dict(eager=eager, opt=opt, agree=agree)
        target = "<= 1.25x floor" if B == 1 else ""
        add_row("Reuse step (32 tok / 768 cached)", f"B={B}", eager, opt, floor_ms, opt / floor_ms,
                target, None if B != 1 else opt / floor_ms <= 1.25, "ms")
        NOTES.append(f"Reuse B={B}: optimized vs eager token agreement {agree:.3f} (bf16 compiled vs eager)")
        del cache, kv, reuse_batch, step, sdpa_step, pool_step, pool
        free(dev)
        rt, host, wall = runtime_reuse(model, args, dev, B, ids)
        add_row("Reuse step via dlc.runtime GraphRunner", f"B={B}", eager, rt, floor_ms, rt / floor_ms, "",
                None, "ms")
        NOTES.append(f"runtime Reuse B={B}: GraphRunner.reuse (slot pool, key mask, bucket "
                     f"padding, copy-out) {rt:.2f} ms GPU-timed, {wall:.2f} ms wall per call with a sync; "
                     f"host work {host:.3f} ms per call (prepare + launch, queued ahead of the GPU)")
        free(dev)
    return res


@torch.no_grad()
def runtime_reuse(model, args, dev, B, ids):
    """The product's Reuse path: dlc.runtime.GraphRunner over a KVCacheManager slot pool, as the engine calls
    it (a StepBatch built per call). -> (ms per call by CUDA events, host ms per call (StepBatch build +
    GraphRunner host work), wall ms per call with a sync)."""
    from dlc.runtime.runners.graph import GraphRunner
    cfg, L, T, a = model.config, args.prompt + args.gen, args.block, args.prompt
    dt = next(model.parameters()).dtype
    kv = make_pool(cfg, B, L, dt, dev, extra=1)
    gr = GraphRunner(model, decode="fused", fuse=False, capture=args.graphs and dev.type == "cuda")
    gr.bind_pool(kv)
    slots = [kv.allocate() for _ in range(B)]
    gr.refresh(step_batch(gr, "refresh", ids, a, T, kv, slots))
    host_ids = ids.cpu()
    build_s = []

    def call():
        t = time.perf_counter()
        b = step_batch(gr, "reuse", host_ids, a, T, kv, slots)
        build_s.append(time.perf_counter() - t)
        return gr.reuse(b)
    ms = time_ms(call, dev, args.iters)
    h0, n0 = gr.stats["host_s"], gr.stats["replays"]
    walls = []
    for _ in range(args.iters):
        sync(dev)
        t = time.perf_counter()
        call()
        sync(dev)
        walls.append((time.perf_counter() - t) * 1e3)
    host = (gr.stats["host_s"] - h0) / max(gr.stats["replays"] - n0, 1) * 1e3
    host += statistics.median(build_s) * 1e3
    del kv, gr
    return ms, host, statistics.median(walls)


@torch.no_grad()
def bench_refresh(model, args, dev, g):
    cfg, L, T, a = model.config, args.prompt + args.gen, args.block, args.prompt
    floor_ms = floors.refresh_cost(cfg, 1, L, T).seconds(args.bw, args.rate) * 1e3
    runner = EagerRunner(model)
    ids, pos, km = eager_inputs(cfg, 1, L, dev, g)
    kv = make_pool(cfg, 1, L, next(model.parameters()).dtype, dev)
    cache = KVCache(kv.k, kv.v)
    optimized(model, False, args)
    refresh_batch = step_batch(runner, "refresh", ids, a, T, kv, [0])
    eager = time_ms(lambda: runner.refresh(refresh_batch), dev, args.iters)
    optimized(model, True, args)

    def step():
        h = model(ids, None, None, cache, 0)                             # [1, L, d]; fills the cache
        return fused_decode(model, h[:, a:a + T])
    step()                                                               # compile outside the capture
    opt = time_ms(Graphed(step, dev, args.graphs), dev, args.iters)
    NOTES.append(f"Refresh B=1 optimized step ({opt:.2f} ms in a CUDA graph): " + kernel_breakdown(step, dev))
    add_row("Refresh step (L=768)", "B=1", eager, opt, floor_ms, opt / floor_ms, "<= 1.15x floor",
            opt / floor_ms <= 1.15, "ms")
    del cache, kv, refresh_batch
    free(dev)


# ----------------------------------------------------------------------------------------------- memory
def free(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def transient(fn, dev):
    """(peak bytes above the starting allocation, result) of fn(); None on CPU."""
    if dev.type != "cuda":
        return None, fn()
    free(dev)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, out


@torch.no_grad()
def bench_memory(model, args, dev, g):
    L, d = args.prompt + args.gen, model.config.d_model
    budget = args.logit_budget_mib * 2**20
    for B in args.mem_batches:
        h = torch.randn(B, L, d, device=dev, generator=g, dtype=next(model.parameters()).dtype)

        def mono():
            x0, conf = monolithic_decode(model.logits(h))              # [B, L, V] logits, float64 softmax
            return x0

        def fused():
            return fused_decode(model, h)[0]
        need = B * L * model.config.vocab_size * 18                    # bf16 logits + float64 copy + softmax
        avail = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
        try:
            if avail is not None and need > avail:                     # do not fragment the allocator trying
                raise torch.OutOfMemoryError(f"needs {need / GiB:.0f} GiB, {avail / GiB:.0f} GiB free")
            m_bytes, x_mono = transient(mono, dev)
            m_txt = m_bytes / GiB if m_bytes is not None else None
        except torch.OutOfMemoryError:
            m_txt, x_mono = None, None
            NOTES.append(f"logits B={B}: the monolithic path does not fit (needs ~{need / GiB:.0f} GiB"
                         + (f", {avail / GiB:.0f} GiB free)" if avail is not None
                            else ")") + ": reported as OOM")
            free(dev)
        f_bytes, x_fused = transient(fused, dev)
        if x_mono is not None:
            NOTES.append(f"logits B={B}: fused vs monolithic argmax agreement "
                         f"{(x_mono == x_fused).float().mean().item():.4f}")
        f_gib = f_bytes / GiB if f_bytes is not None else None
        ok = None if f_bytes is None else f_bytes <= budget
        add_row("Logit transient (all L rows)", f"B={B}",
                m_txt if m_txt is not None or dev.type != "cuda" else "OOM", f_gib,
                budget / GiB, None, f"<= {args.logit_budget_mib} MiB", ok, "GiB")
        del h, x_mono, x_fused
        free(dev)


# ----------------------------------------------------------------------------------------------- kernels
@torch.no_grad()
def bench_kernels(model, args, dev, g):
    """Each dlc.kernels op vs its plain-PyTorch equivalent on LLaDA-8B shapes."""
    W = model.head_weight()
    V, d = W.shape
    dt = W.dtype
    head_floor = W.numel() * W.element_size() / args.bw * 1e3
    for N in args.kernel_rows:
        h = torch.randn(N, d, device=dev, generator=g, dtype=dt)
        mono = graph_ms(lambda: monolithic_decode(model.logits(h[None])), dev, args.iters)
        fused = graph_ms(lambda: K.fused_select_logits(h, W), dev, args.iters)
        add_row("Kernel: fused logits (lm-head read floor)", f"N={N}", mono, fused, head_floor,
                fused / head_floor, "", None, "ms")
        if args.sweep and dev.type == "cuda":
            sweep_select_logits(h, W, dev, args)
    B, H, T, S, D = (args.batches[-1], model.config.n_heads, args.block, args.prompt + args.gen,
                     model.config.head_dim)
    Hkv = model.config.n_kv_heads
    q = torch.randn(B, H, T, D, device=dev, generator=g, dtype=dt)
    k, v = (torch.randn(B, Hkv, S, D, device=dev, generator=g, dtype=dt) for _ in range(2))
    kb, vb = (torch.randn(B, Hkv, T, D, device=dev, generator=g, dtype=dt) for _ in range(2))
    idx = K.select_positions(q, k, 0.5)
    kk, vv = torch.cat([k, kb], 2), torch.cat([v, vb], 2)
    sdpa = graph_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, kk, vv), dev, args.iters)
    sparse = graph_ms(lambda: K.sparse_attention(q, k, v, kb, vb, idx), dev, args.iters)
    dense = graph_ms(lambda: K.sparse_attention(q, k, v, kb, vb), dev, args.iters)
    add_row("Kernel: sparse attn 50% vs SDPA (one layer)", f"B={B}", sdpa, sparse, None, sparse / sdpa, "",
            None, "ms")
    add_row("Kernel: dense attn (Triton) vs SDPA", f"B={B}", sdpa, dense, None, dense / sdpa, "", None, "ms")
    start = torch.full((B,), args.prompt, device=dev, dtype=torch.long)

    def sliced():
        k[:, :, args.prompt:args.prompt + T] = kb
        v[:, :, args.prompt:args.prompt + T] = vb
    write = graph_ms(lambda: torch.ops.dlc.kv_write(k, v, kb, vb, start, None), dev, args.iters)
    sl = graph_ms(sliced, dev, args.iters)
    add_row("Kernel: KV write (per-row start) vs slice", f"B={B}", sl, write, None, write / sl, "", None,
            "ms")
    del q, k, v, kb, vb, kk, vv
    free(dev)
    bench_pool_attention(model, args, dev, g)
    bench_gemms(model, args, dev, g)


@torch.no_grad()
def bench_pool_attention(model, args, dev, g):
    """One layer's Reuse attention (32 queries over the 768 cached keys) as the runtime does it: SDPA over
    rows gathered from the slot pool with a key mask (what GraphRunner did before) vs
    dlc.kernels.pool_attention reading the pool in place; SDPA over a contiguous unmasked cache for
    reference."""
    c, T, S = model.config, args.block, args.prompt + args.gen
    dt = next(model.parameters()).dtype
    kv_floor = None
    for B in args.batches:
        N = B + 1
        q = torch.randn(B, c.n_heads, T, c.head_dim, device=dev, generator=g, dtype=dt)
        kp, vp = (torch.randn(N, c.n_kv_heads, S, c.head_dim, device=dev, generator=g, dtype=dt)
                  for _ in range(2))
        rows = torch.arange(1, N, device=dev)
        lens = torch.full((B,), S, device=dev, dtype=torch.long)
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool, device=dev)
        F_ = torch.nn.functional
        gathered = graph_ms(lambda: F_.scaled_dot_product_attention(q, kp[rows], vp[rows], attn_mask=mask),
                            dev, args.iters)
        plain = graph_ms(lambda: F_.scaled_dot_product_attention(q, kp[1:], vp[1:]), dev, args.iters)
        pool = graph_ms(lambda: K.pool_attention(q, kp, vp, rows, lens), dev, args.iters)
        kv_floor = 2 * B * c.n_kv_heads * S * c.head_dim * kp.element_size() / args.bw * 1e3
        add_row("Kernel: pool attention vs gather + masked SDPA (one layer)", f"B={B}", gathered, pool,
                kv_floor, pool / kv_floor, "", None, "ms")
        NOTES.append(f"attention B={B}, one layer: gather + masked SDPA {gathered * 1e3:.1f} us, "
                     f"pool_attention {pool * 1e3:.1f} us, SDPA on a contiguous cache without mask "
                     f"{plain * 1e3:.1f} us, K/V read floor {kv_floor * 1e3:.1f} us")
        del q, kp, vp
        free(dev)


@torch.no_grad()
def bench_gemms(model, args, dev, g):
    """The Reuse step's weight GEMMs alone (all layers, M = B x 32 rows), as the model runs them (q, k, v, o,
    gate, up, down) and with q|k|v and gate|up concatenated: how close cuBLAS gets to the weight-read
    floor."""
    cfg, T = model.config, args.block
    dt = model.head_weight().dtype
    layers = list(model.blocks)
    x = torch.randn(T, cfg.d_model, device=dev, generator=g, dtype=dt)
    m = torch.randn(T, cfg.mlp_hidden, device=dev, generator=g, dtype=dt)
    sep_w = [[b.q_proj.weight, b.k_proj.weight, b.v_proj.weight, b.attn_out.weight, b.ff_proj.weight,
              b.up_proj.weight] for b in layers]

    def separate():
        for ws, b in zip(sep_w, layers):
            for w in ws:
                x @ w.T
            m @ b.ff_out.weight.T
    nbytes = sum(w.numel() * w.element_size() for ws in sep_w for w in ws) + \
        sum(b.ff_out.weight.numel() * b.ff_out.weight.element_size() for b in layers)
    floor = nbytes / args.bw * 1e3
    sep = graph_ms(separate, dev, args.iters)
    fused_w = [(torch.cat(ws[:3]), ws[3], torch.cat(ws[4:])) for ws in sep_w]     # +13 GB, freed below

    def fused():
        for (qkv, o, gu), b in zip(fused_w, layers):
            x @ qkv.T
            x @ o.T
            x @ gu.T
            m @ b.ff_out.weight.T
    fus = graph_ms(fused, dev, args.iters)
    add_row("Reuse GEMMs only, M=32 (7/layer vs qkv+gate|up fused)", "B=1", sep, fus, floor, fus / floor, "",
            None, "ms")
    NOTES.append(f"Reuse B=1 weight GEMMs alone: {sep:.2f} ms as the model issues them, {fus:.2f} ms "
                 f"with q|k|v and gate|up concatenated; floor {floor:.2f} ms ({nbytes / GiB:.1f} GiB of "
                 "layer weights)")
    del fused_w
    free(dev)


def sweep_select_logits(h, W, dev, args):
    """Tile configurations of the fused-logits kernel (printed, for tuning the defaults)."""
    from dlc.kernels import logits as L
    best = None
    for BN in sorted({L.plan(h.shape[0], W.shape[0], 1)[0], 64 if h.shape[0] > 32 else 16}):
        for BV, BD in ((64, 128), (128, 64), (128, 128), (256, 64)):
            for nw, ns in ((4, 3), (4, 4), (8, 3)):
                for pps in (2, 4, 8):                                  # runtime args: no recompile
                    try:
                        ms = time_ms(lambda: L.select_logits_triton(h, W, BN=BN, BV=BV, BD=BD, num_warps=nw,
                                                                   num_stages=ns, programs_per_sm=pps), dev,
                                     10, 2)
                    except Exception as e:                        # noqa: BLE001 - e.g. out of shared memory
                        log(f"  sweep N={h.shape[0]} BN={BN} BV={BV} BD={BD} w={nw} s={ns}: "
                            f"{type(e).__name__}")
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, BN, BV, BD, nw, ns, pps)
    log(f"  sweep N={h.shape[0]}: best {best}")
    NOTES.append(f"fused-logits sweep N={h.shape[0]}: best (ms, BN, BV, BD, warps, stages, "
                 f"programs/SM) = {best}")


# ----------------------------------------------------------------------------------------------- end to end
def initial_state(cfg, B, args, dev, g):
    x = torch.full((B, args.prompt + args.gen), cfg.mask_id, dtype=torch.long, device=dev)
    x[:, :args.prompt] = torch.randint(0, cfg.mask_id, (B, args.prompt), device=dev, generator=g)
    return x


@torch.no_grad()
def fastdllm_dual_cache(model, x, args):
    """Plain eager Fast-dLLM dual cache: full forward + full [B, L, V] logits at each block start, then
    block-only forwards over the cached K/V with the block's full logits; float64 softmax confidence, taken
    over chunks of sequences (``chunked_confidence``, same numbers) so that B=32 fits an 80 GB card."""
    cfg, P, blk = model.config, args.prompt, args.block
    B, L = x.shape
    cache = KVCache.empty(cfg, B, L, next(model.parameters()).dtype, x.device)
    rows = softmax_rows_per_chunk(L, cfg.vocab_size, args.softmax_chunk_mib * 2**20)

    def step(logits, a):
        x0 = logits.argmax(-1)                                           # [B, n]
        conf = chunked_confidence(logits, x0, rows)                      # [B, n] float64
        n = logits.shape[1]
        region = x[:, a:a + blk] if n == blk else x
        if n != blk:                                                     # full logits: only the block counts
            conf[:, :a] = -math.inf
            conf[:, a + blk:] = -math.inf
        conf = torch.where(region == cfg.mask_id, conf, -math.inf)
        j = conf.argmax(1, keepdim=True)
        region.scatter_(1, j, x0.gather(1, j))

    for a in range(P, L, blk):
        step(model.logits(model(x, None, None, cache, 0)), a)           # Refresh: [B, L, V]
        for _ in range(blk - 1):
            step(model.logits(model(x[:, a:a + blk], None, None, cache, a)), a)   # Reuse: [B, blk, V]
    return x


class FastDual:
    """The optimized loop: compiled Refresh + fused logits of the block rows; each Reuse step one CUDA graph
    (per block start, since dlc.models takes an int start) that also unmasks its token in place."""

    def __init__(self, model, x, args, dev):
        cfg, P, blk = model.config, args.prompt, args.block
        self.model, self.x, self.args = model, x, args
        B, L = x.shape
        self.cache = KVCache.empty(cfg, B, L, next(model.parameters()).dtype, dev)
        self.blks = {a: torch.full((B, blk), cfg.mask_id, dtype=torch.long, device=dev)
                     for a in range(P, L, blk)}
        self.steps = {a: Graphed(self._reuse_fn(a), dev, args.graphs) for a in self.blks}
        with torch.no_grad():
            self.model(x, None, None, self.cache, 0)                      # compile/warm the Refresh shape

    def _reuse_fn(self, a):
        blk = self.blks[a]

        def fn():
            tok, conf = fused_decode(self.model, self.model(blk, None, None, self.cache, a))
            return unmask_one(blk, tok, conf, self.model.config.mask_id)
        return fn

    @torch.no_grad()
    def run(self, x):
        P, L, blk, mask = self.args.prompt, x.shape[1], self.args.block, self.model.config.mask_id
        for a in range(P, L, blk):
            h = self.model(x, None, None, self.cache, 0)                  # Refresh (fills the cache)
            tok, conf = fused_decode(self.model, h[:, a:a + blk])
            b = self.blks[a]
            b.copy_(x[:, a:a + blk])
            unmask_one(b, tok, conf, mask)
            for _ in range(blk - 1):
                self.steps[a]()
            x[:, a:a + blk] = b
        return x


@torch.no_grad()
def bench_e2e(model, args, dev, g):
    cfg = model.config
    for B in args.e2e_batches:
        x0 = initial_state(cfg, B, args, dev, g)
        optimized(model, False, args)
        x = x0.clone()
        sync(dev)
        t = time.perf_counter()
        fastdllm_dual_cache(model, x, args)
        sync(dev)
        base_s = time.perf_counter() - t
        base_x = x
        rows = softmax_rows_per_chunk(args.prompt + args.gen, cfg.vocab_size, args.softmax_chunk_mib * 2**20)
        if rows < B:
            NOTES.append(f"e2e B={B}: the eager baseline's float64 softmax runs {rows} sequence(s) at a time "
                         f"(--softmax-chunk-mib {args.softmax_chunk_mib:g}; unchunked it needs "
                         f"{B * (args.prompt + args.gen) * cfg.vocab_size * 16 / GiB:.0f} GiB at a "
                         "block start)")
        free(dev)
        optimized(model, True, args)
        fast = FastDual(model, x0.clone(), args, dev)                   # capture (warm-up runs excluded)
        x = x0.clone()
        sync(dev)
        t = time.perf_counter()
        fast.run(x)
        sync(dev)
        opt_s = time.perf_counter() - t
        ntok = B * args.gen
        assert (x[:, args.prompt:] != cfg.mask_id).all(), "optimized loop left masks"
        agree = (x == base_x).float()[:, args.prompt:].mean().item()
        NOTES.append(f"e2e B={B}: generated-token agreement optimized vs eager baseline {agree:.3f}")
        ceil = floors.e2e_ceiling_tok_s(cfg, B, args.prompt, args.gen, args.block, args.block, args.bw,
                                        args.rate)
        NOTES.append(f"e2e B={B}: floor-bound ceiling {ceil:.0f} tok/s (bench/floors.py: each Refresh and "
                     f"Reuse step at its floor) = {ceil / (ntok / base_s):.2f}x "
                     f"the eager baseline; optimized reaches {ntok / opt_s / ceil:.0%} of it")
        target = ">= 2x eager" if B == 32 else ""
        add_row("End-to-end tok/s (512+256, blk 32)", f"B={B}", ntok / base_s, ntok / opt_s, None,
                base_s / opt_s, target, None if B != 32 else base_s / opt_s >= 2.0, "tok/s")
        del fast, x, base_x
        free(dev)
        eng_s, _ = engine_e2e(model, args, dev, x0)
        add_row("End-to-end via dlc.runtime Engine (GraphRunner)", f"B={B}", ntok / base_s, ntok / eng_s,
                None, base_s / eng_s, "", None, "tok/s")
        del x0
        free(dev)


@torch.no_grad()
def engine_e2e(model, args, dev, x0):
    """The same fixed schedule through the product: all B requests in one dlc.runtime.Engine (FCFS static
    batch = the schedule above; Refresh by the eager runner, Reuse by GraphRunner). -> (seconds,
    agreement)."""
    P, gen, blk = args.prompt, args.gen, args.block
    optimized(model, True, args)
    B, L = x0.shape
    eng = make_engine(model, dev, "fcfs", B, L, 2 * B * L, args.graphs)
    prompts = [x0[b, :P].tolist() for b in range(B)]
    params = dict(gen_length=blk, block_length=blk, steps=blk)
    eng.generate(prompts, params)                                      # warm-up: capture, compile
    params = dict(gen_length=gen, block_length=blk, steps=gen)
    sync(dev)
    t = time.perf_counter()
    outs = eng.generate(prompts, params)
    sync(dev)
    secs = time.perf_counter() - t
    n = min(len(o) for o in outs)
    NOTES.append(f"e2e B={B} via Engine: {secs:.2f} s, {len(outs[0])} tokens per request, graph replays "
                 f"{eng.runner.stats.get('replays', 0) if hasattr(eng.runner, 'stats') else 0}")
    return secs, n


# ----------------------------------------------------------------------------------------------- serving
def bench_serving(model, args, dev, g):
    """Phase-multiplexed vs static FCFS vs continuous FCFS through one dlc.runtime.Engine (GraphRunner Reuse
    steps on CUDA) with the serving benchmark's method (dlc.runtime.benchmark: every policy warmed on every
    workload, capacity measured, policies' order rotated over >= 3 rounds, medians and min-max)."""
    from dlc.runtime.benchmark import TARGETS, EngineDriver, run_suite
    from dlc.runtime.loadgen import Workload, prompt_token_ids
    base = Workload("burst", args.serve_requests, 1.0, prompt_len=(args.serve_prompt // 2, args.serve_prompt),
                    gen_lens=tuple(args.serve_gens), block_length=args.block, tokens_per_step=args.serve_tps,
                    seed=0, token_ids=prompt_token_ids(model.config))
    seq = args.serve_prompt + max(args.serve_gens)
    optimized(model, True, args)
    eng = make_engine(model, dev, "phase", args.serve_batch, seq, args.serve_batch * seq * 2, args.graphs)
    policies = ["fcfs", "fcfs-continuous", "phase"]
    res = run_suite(EngineDriver(eng, args.serve_timeout_s), base, policies, args.serve_workloads,
                    args.serve_rounds, log=log)
    for name, wl, pol, ref, metric, bound, op in TARGETS:
        if wl not in res["results"]:
            continue
        t = next(t for t in res["targets"] if t["name"] == name)
        a, b = res["results"][wl][pol][metric]["median"], res["results"][wl][ref][metric]["median"]
        add_row(f"Serving {name}", f"{args.serve_requests} req", b, a, None, t["ratio"],
                f"{op} {bound:g}x {ref}", t["status"] == "PASS",
                "s" if metric.startswith("ttft") else "tok/s")
    NOTES.append(f"serving: {res['mix']}; max batch {args.serve_batch}; capacity "
                 f"{res['capacity']['requests_per_s']:.2f} req/s ({res['capacity']['source']}); "
                 f"{args.serve_rounds} rounds, order rotated; graph captures / Dynamo compiles during "
                 f"timed rounds: {res['timed_compiles']['graph_captures']} / "
                 f"{res['timed_compiles']['dynamo_graphs']}")
    for wl, by in res["results"].items():
        for pol, m in by.items():
            NOTES.append(f"serving {wl} {pol}: " + ", ".join(
                f"{k} {m[k]['median']:.3g} [{m[k]['min']:.3g}-{m[k]['max']:.3g}]"
                for k in ("tokens_per_s", "requests_per_s", "ttft_p50", "ttft_p99", "latency_p50",
                          "latency_p99")))
    free(dev)


def make_engine(model, dev, policy, batch, seq, tokens, graphs, runner=None):
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.session import Session
    cfg = model.config
    mib = slot_bytes(cfg, seq, next(model.parameters()).dtype) * (batch + 1) / 2**20 + 1
    sc = ServeConfig(model="bench", policy=policy, device=str(dev), max_batch_size=batch,
                     max_num_tokens=tokens, max_seq_len=seq, kv_cache_mb=mib, max_queue=4096, gen_length=64,
                     block_length=32, steps=64, kv_cache="dual", cuda_graphs=graphs and dev.type == "cuda",
                     compile=False)      # the blocks are compiled (or not) by optimized(): --no-compile holds
    eng = Engine(Session(runner or EagerRunner(model), None, cfg, False, "bench"), sc)
    return eng


# ----------------------------------------------------------------------------------------------- table
def add_row(section, case, eager, opt, floor, ratio, target, ok, unit):
    ROWS.append(dict(section=section, case=case, eager=eager, opt=opt, floor=floor, ratio=ratio,
                     target=target, status="" if ok is None else ("PASS" if ok else "MISS"), unit=unit))


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def table() -> str:
    head = "| section | case | eager / baseline | optimized | floor / budget | ratio | target | status |"
    lines = [head, "|" + "---|" * 8]
    for r in ROWS:
        u = f" {r['unit']}" if r["unit"] else ""
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['section']} | {r['case']} | "
                     f"{fmt(r['eager'])}{u if r['eager'] is not None else ''} | "
                     f"{fmt(r['opt'])}{u if r['opt'] is not None else ''} | "
                     f"{fmt(r['floor'])}{u if r['floor'] is not None else ''} | {ratio} | "
                     f"{r['target'] or '-'} | {r['status'] or '-'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llada-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--mem-batches", default="1,8,32,64")
    p.add_argument("--e2e-batches", default="1,32")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--logit-budget-mib", type=int, default=256)
    p.add_argument("--softmax-chunk-mib", type=float, default=4096,
                   help="e2e eager baseline: float64 softmax over chunks of sequences of at most this size")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-graphs", dest="graphs", action="store_false")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep q/k/v and gate/up as separate GEMMs")
    p.add_argument("--sections", default="kernels,reuse,refresh,memory,e2e,serving")
    p.add_argument("--serve-requests", type=int, default=48)
    p.add_argument("--serve-prompt", type=int, default=128)
    p.add_argument("--serve-gens", default="64,128,256", help="generation lengths drawn per request")
    p.add_argument("--serve-tps", type=int, default=2, help="tokens per step (steps = gen / this)")
    p.add_argument("--serve-batch", type=int, default=16)
    p.add_argument("--serve-timeout-s", type=float, default=300.0, help="per serving run")
    p.add_argument("--serve-rounds", type=int, default=3)
    p.add_argument("--serve-workloads", default="burst,poisson-80",
                   help="of burst, poisson-50, poisson-80, poisson-95, osc (the targets need "
                        "burst, poisson-80)")
    p.add_argument("--kernel-rows", default="32,1024")
    p.add_argument("--sweep", action="store_true",
                   help="sweep fused-logits tile configs in the kernels section")
    p.add_argument("--json", default=None, help="write rows and notes here")
    p.add_argument("--md", default=None, help="write the results markdown (table + notes) here")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU, small shapes (checks the script)")
    a = p.parse_args(argv)
    if a.smoke:
        a.preset, a.device, a.prompt, a.gen, a.block = "tiny-llada", "cpu", 24, 16, 8
        a.batches, a.mem_batches, a.e2e_batches, a.iters, a.kernel_rows = "1,2", "1,2", "1,2", 2, "4"
        a.compile, a.graphs = False, False
        a.serve_requests, a.serve_prompt, a.serve_gens, a.serve_batch = 6, 8, "8,16", 4
        a.serve_workloads, a.softmax_chunk_mib = "burst,poisson-80", 0.01     # chunked baseline softmax too
    for name in ("batches", "mem_batches", "e2e_batches", "kernel_rows", "serve_gens"):
        setattr(a, name, [int(v) for v in getattr(a, name).split(",") if v])
    a.sections = set(a.sections.split(","))
    a.serve_workloads = [w for w in a.serve_workloads.split(",") if w]
    if a.gen % a.block:
        raise SystemExit(f"--gen {a.gen} must be a multiple of --block {a.block}")
    return a


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --smoke for a CPU check)")
    g = torch.Generator(device=dev).manual_seed(0)
    cfg = preset_config(args.preset)
    env = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
               triton=_triton_version(), python=platform.python_version(),
               gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", argv=" ".join(sys.argv))
    log(f"# dlc gpu_bench  {env}")
    bw, rate = floors.measure(dev)
    args.bw, args.rate = bw, rate
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    t = time.perf_counter()
    model = build(cfg, dev, torch.bfloat16)
    sync(dev)
    pbytes, nparams = param_bytes(model), cfg.num_parameters()
    log(f"model {args.preset}: {nparams / 1e9:.2f} B params, {pbytes / GiB:.1f} GiB, built in "
        f"{time.perf_counter() - t:.1f}s")
    L = args.prompt + args.gen
    reuse_floor = floors.reuse_cost(cfg, 1, args.block, L).seconds(bw, rate) * 1e3            # B = 1
    refresh_floor = floors.refresh_cost(cfg, 1, L, args.block).seconds(bw, rate) * 1e3
    add_row("Floors", "copy BW / bf16 matmul", None, None, None, None,
            f"{bw / 1e12:.2f} TB/s, {rate / 1e12:.0f} TFLOP/s", None, "")
    if args.fuse:
        from dlc.models.common import fuse_projections_
        log(f"fused projection groups: {fuse_projections_(model)}")
    if args.compile:
        compile_blocks(model)
    sections = [("kernels", lambda: bench_kernels(model, args, dev, g)),
                ("reuse", lambda: bench_reuse(model, args, dev, g)),
                ("refresh", lambda: bench_refresh(model, args, dev, g)),
                ("memory", lambda: bench_memory(model, args, dev, g)),
                ("e2e", lambda: bench_e2e(model, args, dev, g)),
                ("serving", lambda: bench_serving(model, args, dev, g))]
    for name, fn in sections:
        if name not in args.sections:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:                                       # noqa: BLE001 - report, keep the table
            NOTES.append(f"section {name} FAILED: {type(e).__name__}: {str(e)[:300]}")
            log(f"section {name} failed: {e!r}")
            free(dev)
        log(f"[{name} done in {time.perf_counter() - t:.1f}s]")
    log("\n" + table())
    for n in NOTES:
        log(f"- {n}")
    if args.md:
        write_md(args.md, env, reuse_floor, refresh_floor)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(env=env, rows=ROWS, notes=NOTES, reuse_floor_ms=reuse_floor,
                           refresh_floor_ms=refresh_floor), f, indent=1)
    return ROWS


def write_md(path, env, reuse_floor, refresh_floor) -> None:
    """The results file: environment, exact command, the table, the notes (analysis is added by hand
    below)."""
    text = (f"# GPU results (bench/gpu_bench.py)\n\n- date: {env['date']}\n- GPU: {env['gpu']}\n"
            f"- torch {env['torch']}, triton {env['triton']}, Python {env['python']}\n"
            f"- command: `python {env['argv']}`\n- floors (bench/floors.py) at B = 1: Reuse "
            f"{reuse_floor:.2f} ms (layer weights + LM head + cached K/V read), Refresh "
            f"{refresh_floor:.2f} ms (layers over L tokens + LM head over the decoded block, at the bf16 "
            f"matmul rate)\n\n"
            + table() + "\n\n" + "".join(f"- {n}\n" for n in NOTES))
    with open(path, "w") as f:
        f.write(text)


def _triton_version() -> str:
    with contextlib.suppress(Exception):
        import triton
        return triton.__version__
    return "none"


if __name__ == "__main__":
    main()
