"""The fused bisection kernels (``filter_bisect.fused_draw``) against the torch path, in Triton's interpreter
on CPU (run by test_bisect_interpret.py with TRITON_INTERPRET=1) or compiled on CUDA (test_bisect_fused_gpu.py
imports ``check``): for the same raw logits, filters and seeds, the same survivors (exactly), the same draw
(token, score), the survivors' mass within 1e-12 relative, and the kernels' recomputed weights e = exp(s - M)
equal to torch's (bit for bit on CUDA; within 2 ulp in the interpreter, whose exp is numpy's).

Cases: bf16 logits on a coarse grid (many exact ties at every threshold), fp32 logits; a row whose top-p keeps
one token, rows whose top-p keeps thousands, min-p alone, a top-k over 64 with top-p (Z_k), a top-k alone,
unfiltered rows beside filtered ones. Decisive: each plan's survivors differ from the unfiltered row's."""
import sys

import torch

from dlc.kernels import filter_bisect as FB

ACC = torch.float64


def _logits(dt, c, N, V, seed, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(c, N, V, generator=g) * 2.0
    if dt == torch.bfloat16:
        # a coarse grid: ties everywhere; + 0.0 turns the grid's -0.0 into +0.0: the kernels' keys order -0.0
        # below +0.0 where the torch path's values tie them, a divergence filter_bisect documents (a row whose
        # t* is a signed zero holding both zeros: seed 44619 kept 93 more ids)
        x = (x * 4).round() / 4 + 0.0
    x[0, 0, 7] = 40.0                                             # one dominant token: top-p keeps it alone
    if N > 1:
        x[-1, 1] = torch.randn(V, generator=g) * 0.05             # nearly flat: top-p keeps thousands
    return x.to(dt).to(device)


def _reference(lraw, temp, filters, vocab, plan):
    """The torch path's survivors, draw and survivors' mass (``_draw_torch``'s own steps)."""
    l64 = lraw.to(ACC)
    s = l64 / temp
    M = s.amax(-1)
    e = torch.exp(s - M[..., None])
    keep = FB._survivors(lraw, e, M, lraw.amax(-1).to(ACC), lraw.amin(-1).to(ACC), temp, filters, vocab, plan,
                         None, True)
    return keep, M, e


PLANS = {                                   # per sequence (top_k, top_p, min_p)
    "bisectkzp": [(0, 0.5, 0.0), (100, 0.7, 0.0), (0, 0.9, 0.01)],
    "bisectp": [(0, 0.3, 0.0), (0, 1.0, 0.0), (0, 0.95, 0.0)],
    "bisect": [(0, 1.0, 0.05), (0, 1.0, 0.3), (0, 1.0, 0.0)],
    "bisectk": [(200, 1.0, 0.0), (0, 1.0, 0.0), (1000, 1.0, 0.0)],
}


def check_case(lraw, temp, plan, seeds):
    """One plan's fused draw vs the torch path on the same logits: survivors, draw, mass, M."""
    device, (_, N, V) = lraw.device, lraw.shape
    k, p, m = zip(*PLANS[plan])
    filters = (torch.tensor(k, device=device), torch.tensor(p, dtype=ACC, device=device),
               torch.tensor(m, dtype=ACC, device=device))
    assert FB.bisect_plan(*filters) == plan
    keep, M, e = _reference(lraw, temp, filters, V, plan)
    best, Mf, kept, raw, kf = FB.fused_draw(lraw, temp, seeds, filters, 0, V, plan, None, True, stats=True,
                                            keep_out=True)
    what = (lraw.dtype, plan)
    assert torch.equal(kf, keep), (what, (kf != keep).sum().item())
    assert torch.equal(Mf, M), what
    bm, den = FB._raw_stats(lraw, None)                                 # the raw softmax's max and sum
    assert torch.equal(raw[0], bm), what
    assert ((raw[1] - den).abs() / den).max() < 1e-12, what
    want_kept = torch.where(keep, e, 0.0).sum(-1)
    assert ((kept - want_kept).abs() / want_kept).max() < 1e-12, what
    g = torch.log(-torch.log(FB.uniform_noise(seeds, N, 0, V, V, device, ACC)))
    score = torch.where(keep, lraw.to(ACC) - temp * g, -float("inf"))
    j = score.argmax(-1)
    assert torch.equal(best[1].long(), j), what
    assert torch.equal(best[0], score.gather(-1, j[..., None])[..., 0]), what
    n = keep.sum(-1)
    assert (n < V).any() and (n > 1).any(), (what, n)                  # decisive: the filter bites
    if plan == "bisectp":
        assert n[0, 0] == 1 and n[-1, 1] > 1000, n                      # one token; thousands
    return M


def check_weights(lraw, M, temp):
    w = FB.element_weights(lraw, M, temp)
    want = torch.exp(lraw.to(ACC) / temp - M[..., None])
    if lraw.device.type == "cpu":                # numpy's exp vs torch's: an ulp
        assert ((w - want).abs() <= 4.5e-16 * want).all(), lraw.dtype
    else:                                        # CUDA: the same function, the same bits
        ulps = ((w - want).abs() / (want * 2.0**-52)).max().item()
        assert torch.equal(w, want), (lraw.dtype, f"{ulps:.2f} ulp apart")


def check(device="cpu", seed=0, V=3000, split=2048, block=2048, plans=tuple(PLANS),
          fp32_plans=("bisectp",), fp16_plans=(), weights=True):
    """bf16 (a [1] tensor temperature: division) over ``plans``, fp32 (a Python temperature: on CUDA the
    reciprocal multiply) over ``fp32_plans``, fp16 over ``fp16_plans``; several splits and a ragged tail
    (several tiles a split: ``check_group``'s shards, and the GPU test's default geometry)."""
    saved, (FB.FUSED_SPLIT, FB.FUSED_BLOCK) = (FB.FUSED_SPLIT, FB.FUSED_BLOCK), (split, block)
    try:
        seeds = torch.tensor([5, 11, 2**40 + 3], device=device)
        for dt, temp, names in ((torch.bfloat16, torch.tensor([1.3], dtype=ACC, device=device), plans),
                                (torch.float32, 0.7, fp32_plans), (torch.float16, 0.9, fp16_plans)):
            if not names:
                continue
            lraw = _logits(dt, 3, 2, V, seed, device)
            for plan in names:
                M = check_case(lraw, temp, plan, seeds)
            if weights:
                check_weights(lraw, M, temp)
    finally:
        FB.FUSED_SPLIT, FB.FUSED_BLOCK = saved
    return True


def check_pass(device="cpu", R=4, V=1000):
    """One search pass (``_pass_kernel``, no prologue) at 16 consecutive keys vs torch's sums above each.
    Inputs: bf16 logits on 16 consecutive values (every 64-column tile's largest key just above the lowest
    threshold: no tile may skip its exp) and whole tiles below every threshold (those may skip: zeros)."""
    saved, (FB.FUSED_SPLIT, FB.FUSED_BLOCK) = (FB.FUSED_SPLIT, FB.FUSED_BLOCK), (256, 64)
    try:
        one = int(FB.key_of(torch.tensor(1.0, dtype=torch.bfloat16)))
        keys = one + torch.randint(0, 16, (R, V))
        keys[:, 64:192] = int(FB.key_of(torch.tensor(0.5, dtype=torch.bfloat16)))
        lraw = FB.value_of(keys.to(torch.int16), torch.bfloat16).to(device)               # [R, V]
        geo = FB._Geometry(lraw.view(torch.int16), 2, torch.bfloat16, 1.0)
        M = lraw.to(ACC).amax(-1) / 1.0
        row = torch.zeros(R, FB._ROW, dtype=ACC, device=device)
        row[:, FB._M], row[:, FB._TDIV] = M, FB._tempering(1.0, lraw.device)[0]
        a = one - 1
        state = torch.tensor([[a, a + 16]] * R, device=device)
        part = torch.empty(R, geo.S, FB.K_ARY, 2, dtype=ACC, device=device)
        geo.launch(FB._pass_kernel, row, state, torch.empty_like(state), part, 1, part, part, K=FB.K_ARY,
                   PROLOGUE=False, COUNT_ONLY=False, EVAL_MASS=True, EVAL_COUNT=True, SET_Z=False,
                   FINAL=False, BODY_MASS=True, WITH_DEN=False)
    finally:
        FB.FUSED_SPLIT, FB.FUSED_BLOCK = saved
    got = part.sum(1)                                                      # [R, K, 2]
    e = torch.exp(lraw.to(ACC) / 1.0 - M[:, None])
    for j in range(FB.K_ARY):                                              # thresholds a + j
        gt = keys.to(device) > a + j
        assert torch.equal(got[:, j, 1], gt.sum(-1).to(ACC)), j
        want = torch.where(gt, e, 0.0).sum(-1)
        assert ((got[:, j, 0] - want).abs() <= 1e-12 * want).all(), j
    assert (got[:, 0, 1] > 0).all() and (got[:, -1, 1] < V - 128).all()   # the keys split the rows


def _group_inputs(seed, V=3000):
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-1, 2, (3, 2, 16), generator=g).to(torch.bfloat16)         # logits on a 0.5 grid:
    w = (torch.randint(-2, 3, (V, 16), generator=g) * 0.5).to(torch.bfloat16)    # tie groups span ranks
    k, p, m = zip(*PLANS["bisectkzp"])
    filters = (torch.tensor(k), torch.tensor(p, dtype=ACC), torch.tensor(m, dtype=ACC))
    return h, w, filters, torch.arange(3), torch.tensor([3, 8, 1])


def _decode_group(h, w, filters, rows, seeds, v0, V, group):
    return FB.bisect_filters(h, w, v0, V, rows, rows, torch.ones(1, dtype=h.dtype), 0.9, seeds, filters, {},
                             chunk=512, filtered_conf=True, plan="bisectkzp", group=group)


def _rank(rank, world, init, seed, split, block):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    FB.FUSED_SPLIT, FB.FUSED_BLOCK = split, block
    h, w, filters, rows, seeds = _group_inputs(seed)
    V, shard = w.shape[0], w.shape[0] // world
    FB.FUSED = True
    got = _decode_group(h, w[rank * shard:(rank + 1) * shard], filters, rows, seeds, rank * shard, V,
                        dist.group.WORLD)
    if rank == 0:                                # every rank holds the merged draw: rank 0 checks it
        FB.FUSED = False                         # one process, the torch path: the reference
        want = _decode_group(h, w, filters, rows, seeds, 0, V, None)
        assert torch.equal(got["tokens"], want["tokens"]), (got["tokens"], want["tokens"])
        torch.testing.assert_close(got["confidence"], want["confidence"], rtol=1e-12, atol=0)
        ids = got["tokens"]
        assert ((ids >= shard) & (ids < V)).any() and (ids < shard).any()   # both ranks' draws win
    dist.destroy_process_group()


def check_group(seed=0, world=2, split=1024, block=512):
    """Vocab parallelism (gloo, ``world`` processes, each its head shard, ``group`` = the ranks): the fused
    kernels' extent gather, all_reduced search sums, tie offsets of the lower ranks and merged draws give one
    process's tokens and survivors' confidences (its torch path)."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, f"file://{tmp}/init", seed, split, block), nprocs=world)
    return True


def _plain_inputs(dt, seed, device, B, N, d, V, block):
    """Rows and a head whose logits are an id offset plus a small product: most ids near 0 (the draw varies),
    a few ids at +6 (the T = 0 argmax, which a hot draw leaves), each with a twin half the vocabulary away
    (the same head row: the row max ties across chunks), whole tiles at -40 and -120 (below the split max by
    more than ``GUMBEL_SPAN`` T at low temperatures: their noise is skipped); bf16 on a 0.25 grid, so logits
    tie everywhere."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, d, generator=g) * 0.5
    w = torch.randn(V, d, generator=g) * 0.5
    h[..., 0] = 1.0                                               # w[:, 0] is each id's offset
    w[:, 0] = 0.0
    top = torch.randint(0, V, (5,), generator=g)
    w[top, 0] = 6.0
    for t in range(1, V // block, 3):                             # every third tile far below
        w[t * block:(t + 1) * block, 0] = -40.0 if t % 2 else -120.0
    w[(top + V // 2) % V] = w[top]                                # twins: exact ties at the max
    if dt == torch.bfloat16:
        h, w = (h * 4).round() / 4, (w * 4).round() / 4          # a coarse grid: exact ties
    return h.to(dt).to(device), w.to(dt).to(device)


def _plain_decode(fused, h, w, cond, un, temp, seeds, chunk, torch_sweep=False):
    """decode_rows_ext's unfiltered decode (guidance weight 1.5) on the fused route or the torch path
    (``FUSED = False``: ``decode_rows``); ``torch_sweep``: ``sampling._decode_chunked`` instead."""
    from dlc.kernels.sampling import _decode_chunked, decode_rows_ext
    cfg_w, V = torch.full((1,), 1.5, dtype=h.dtype, device=h.device), w.shape[0]
    if torch_sweep:
        return _decode_chunked(h, w, cond, un, cfg_w, temp, seeds, vocab=V, chunk=chunk, topk=0,
                               logprobs=False, entropy=False, credit=None, soft=None, acc=ACC)
    from dlc.kernels import sampling
    saved, FB.FUSED = FB.FUSED, fused
    real, calls = sampling.plain_draw, []
    sampling.plain_draw = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        out = decode_rows_ext(h, w, cond, un, cfg_w, temp, seeds, vocab=V, chunk=chunk)
    finally:
        FB.FUSED, sampling.plain_draw = saved, real
    sampled = not (isinstance(temp, float) and temp == 0)
    assert len(calls) == (fused and sampled), (fused, temp, calls)         # the route taken (or not)
    return out


def check_plain(device="cpu", seed=0, V=2000, chunk=768, split=512, block=256, B=2, N=3, d=12):
    """The unfiltered sampled decode (``decode_rows_ext`` at T > 0 without filters or extras) by the fused
    ``plain_draw`` vs the torch path (``decode_rows``, ``FUSED = False``) and ``sampling._decode_chunked``:
    the same tokens, confidences within 1e-12 relative; fp32 and bf16 (ties) logits, T 0.3 / 1.0 / 2.5 (a
    Python number and a [1] tensor), two seeds, chunks with a ragged tail over several splits of several
    tiles, with guidance once per dtype; at T = 1e-20 tied maxima resolve to the lowest id, as the T = 0
    argmax. Decisive: tokens differ across seeds and from the T = 0 argmax; some rows' maxima tie."""
    saved, (FB.FUSED_SPLIT, FB.FUSED_BLOCK) = (FB.FUSED_SPLIT, FB.FUSED_BLOCK), (split, block)
    moved = {"seed": 0, "greedy": 0, "tied": 0}
    try:
        for dt in (torch.float32, torch.bfloat16):
            h, w = _plain_inputs(dt, seed, device, B, N, d, V, block)
            assert FB.plain_ok(h, 1.0, ACC) == FB.fused_ok(h) and not FB.plain_ok(h, 0.0, ACC)
            rows = torch.arange(B, device=device)
            greedy = _plain_decode(False, h, w, rows, rows, 0.0, rows, chunk)["tokens"]
            for temp in (0.3, torch.tensor([1.0], dtype=ACC, device=device), 2.5):
                toks = []
                for s in (seed, seed + 1):
                    seeds = torch.tensor([s, 2**40 + 3 * s] + [11 * s + j for j in range(B - 2)])
                    seeds = seeds.to(device)
                    half = (rows[:B // 2], rows[B // 2:2 * (B // 2)])
                    cases = [(rows, rows)] + [half] * (s == seed and temp == 2.5)
                    for cond, un in cases:                        # guided: un + 1.5 (cond - un)
                        sd, what = seeds[:len(cond)], (dt, float(temp), s, len(cond))
                        got = _plain_decode(True, h, w, cond, un, temp, sd, chunk)
                        for sweep in (False, True):
                            ref = _plain_decode(False, h, w, cond, un, temp, sd, chunk, sweep)
                            assert torch.equal(got["tokens"], ref["tokens"]), (what, got, ref)
                            err = ((got["confidence"] - ref["confidence"]).abs() / ref["confidence"]).max()
                            assert err < 1e-12, (what, sweep, err.item())
                        if cond is rows:
                            toks.append(got["tokens"])
                moved["seed"] += int((toks[0] != toks[1]).sum())
                moved["greedy"] += int((toks[0] != greedy).sum())
            # T = 1e-20: every score rounds to its logit, so tied maxima tie in score: the first (lowest id)
            tiny = _plain_decode(True, h, w, rows, rows, 1e-20, rows, chunk)["tokens"]
            assert torch.equal(tiny, greedy), (dt, tiny, greedy)
            assert torch.equal(tiny, _plain_decode(False, h, w, rows, rows, 1e-20, rows, chunk)["tokens"])
            moved["tied"] += _tied_rows(h, w, rows, chunk)
    finally:
        FB.FUSED_SPLIT, FB.FUSED_BLOCK = saved
    assert moved["seed"] >= 4 and moved["greedy"] >= 4, moved              # decisive: the noise draws,
    assert moved["tied"] >= 2, moved                                        # and rows whose max ties
    return True


def _tied_rows(h, w, rows, chunk) -> int:
    """How many decoded rows' largest logit (the decode's chunks, guidance 1.5) is held by several ids."""
    from dlc.kernels.sampling import _guided
    cfg_w, V = torch.full((1,), 1.5, dtype=h.dtype, device=h.device), w.shape[0]
    l = torch.cat([_guided(h, w, rows, rows, cfg_w, c0, min(V, c0 + chunk), h.dtype)
                   for c0 in range(0, V, chunk)], -1)                                     # [B, N, V]
    return int(((l == l.amax(-1, keepdim=True)).sum(-1) > 1).sum())


def check_plain_shards(device="cpu", seed=0, V=2000, cut=1100, chunk=768, split=512, block=256, B=2, N=4,
                       d=12):
    """Vocab parallelism's sampled statistics (``vocab.shard_stats`` of two uneven head shards, global ids
    and noise; on the fused route ``plain_stats``) merged as the ranks' all_gather merges them
    (``vocab.merge``): the torch path's tokens (one process's ``decode_rows`` too), confidences within 1e-12;
    bf16 ties, T 1.0 ([1] tensor) and 2.5."""
    from dlc.runtime.distributed import vocab as VP
    saved, (FB.FUSED_SPLIT, FB.FUSED_BLOCK) = (FB.FUSED_SPLIT, FB.FUSED_BLOCK), (split, block)
    real, calls = VP.plain_stats, []
    VP.plain_stats = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        h, w = _plain_inputs(torch.bfloat16, seed, device, B, N, d, V, block)
        rows, one = torch.arange(B, device=device), torch.ones(1, dtype=h.dtype, device=device)
        seeds = (torch.arange(B) * 977 + seed + 2**40 * (torch.arange(B) % 2)).to(device)
        drawn = []
        for temp in (torch.tensor([1.0], dtype=ACC, device=device), 2.5):
            outs = []
            for fused in (True, False):
                FB.FUSED = fused
                st = [VP.shard_stats(h, w[a:b], a, rows, rows, one, temp, seeds, V, chunk=chunk)
                      for a, b in ((0, cut), (cut, V))]
                outs.append(VP.merge(torch.stack([torch.stack([x[k] for k in VP.STATS]) for x in st])))
                FB.FUSED = True
            one_gpu = _plain_decode(False, h, w, rows, rows, temp, seeds, chunk)
            for ref in (outs[1], one_gpu):
                assert torch.equal(outs[0]["tokens"], ref["tokens"]), (float(temp), outs[0], ref)
                err = ((outs[0]["confidence"] - ref["confidence"]).abs() / ref["confidence"]).max()
                assert err < 1e-12, (float(temp), err.item())
            drawn.append(outs[0]["tokens"])
        drawn = torch.cat(drawn)
        assert (drawn >= cut).any() and (drawn < cut).any()                # decisive: both shards' draws win
    finally:
        FB.FUSED_SPLIT, FB.FUSED_BLOCK = saved
        VP.plain_stats = real
    assert len(calls) == 4                                                  # 2 temperatures x 2 shards
    return True


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    if len(sys.argv) > 2 and sys.argv[2] == "group":
        check_group(seed)
    elif len(sys.argv) > 2 and sys.argv[2] == "plain":
        check_plain(seed=seed)
        check_plain_shards(seed=seed)
        print("plain-ok")
        sys.exit(0)
    else:
        check_pass()
        check(seed=seed)
    print("bisect-ok")
