"""Run the Triton kernels in Triton's interpreter on CPU tensors (tiny shapes) against the references.

Invoked by test_interpret.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set before Triton
is imported). The interpreter lacks bfloat16 dot support, so float32 and float16 are checked here; bfloat16
runs in the GPU tests."""
import sys

import torch

from dlc.kernels import attention as A
from dlc.kernels import cache_write as C
from dlc.kernels import filter_bisect as FB
from dlc.kernels import logits as L
from dlc.kernels import select_extras as X
from dlc.kernels import shard_logits as S

REL = {torch.float32: 1e-5, torch.float16: 2e-3}
EXTRAS_ATOL = {torch.float32: 1e-4, torch.float16: 1e-4}   # vs the float64 sweep on the same (rounded) inputs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_extras(dt):
    """The selected-row logits kernel with its extras on (entropy, top-k, credit: the plain sweep plus the
    sparse correction over the credited ids' gathered logits, duplicates and padding entries included) vs the
    float64 reference (credit as a term of every vocab tile); tiles small enough that each row's sweep
    crosses several tiles and vocab splits. Tolerance: EXTRAS_ATOL on every float output."""
    h, w = (torch.randn(20, 48) * 0.4).to(dt), torch.randn(700, 48).to(dt)
    ids = torch.randint(0, 700, (20, 5))
    top2 = (h.double() @ w.double().T).topk(2, dim=-1).indices                # [20, 2]
    ids[:, 0] = top2[:, 1]                                                    # flips tokens
    ids[:, 3], ids[:, 4] = ids[:, 0], top2[:, 0]                              # a duplicate, the raw top-1
    vals = torch.rand(20, 5) * 3
    vals[:, 0] = 20.0
    vals[12:16] = 0.0                                                         # padding entries: no credit
    alpha = torch.where(torch.arange(20) % 3 == 0, 0.0, 0.7)
    for ent, k, cr in ((True, 5, True), (True, 3, False), (False, 0, False), (False, 1, True)):
        c = (ids, vals, alpha) if cr else (None, None, None)
        out = X.select_extras_triton(h, w, ent, k, *c, BN=16, BV=32, BD=16)
        ref = X.select_extras_reference(h.double(), w.double(), ent, k, ids if cr else None,
                                        vals.double() if cr else None, alpha.double() if cr else None,
                                        acc=torch.float64)
        assert set(out) == set(ref), (sorted(out), sorted(ref))
        if cr:                             # the credit flips tokens (else the check would be vacuous)
            assert (ref["tokens"] != ref["top1_ids"]).sum() >= 3, (dt, ent, k)
        same = out["tokens"] == ref["tokens"]
        assert same.float().mean() >= 0.9, (dt, ent, k, cr)
        for key in out:
            a, b = out[key], ref[key]
            if key in ("confidence", "logprob"):
                a, b = a[same], b[same]
            if a.is_floating_point():
                err = (a.double() - b.double()).abs().max().item()
                assert err < EXTRAS_ATOL[dt], (dt, ent, k, cr, key, err)
            else:
                assert (a == b).float().mean() >= 0.9, (dt, ent, k, cr, key)


def check_shard_stats(dt):
    """The per-shard statistics of the fused sweep (kernels/shard_logits.py; both kernels: plain, and extras
    for entropy / top-k) over two vocab shards vs the float64 ``vocab.shard_stats`` of each shard on the same
    (rounded) values, and the two shards merged (``vocab.merge``, the combine without its collective) vs the
    full-vocabulary float64 decode and vs TP=1's fused kernel over the whole head (same tiles: tokens equal).
    Tiles small enough that each shard's sweep crosses several tiles and vocab splits; the second shard starts
    at 352 = 11 x BV. Tolerance: EXTRAS_ATOL on logits, logsumexps, a / s and the merged floats; REL on the
    confidence vs TP=1's kernel."""
    from dlc.runtime.distributed.vocab import STATS, merge, shard_stats
    h, w = (torch.randn(4, 5, 48) * 0.5).to(dt), torch.randn(700, 48).to(dt)
    h[0, 0] = torch.randn(48).sign()                  # row 0's best logit, 96 exactly, tied at ids 100, 200
    w[100] = w[200] = w[500] = 2 * h[0, 0]            # (another split of shard 0) and 500 (shard 1): id 100
    rows, ar, one, z = h.reshape(20, 48), torch.arange(4), torch.ones(1, dtype=torch.float64), torch.zeros(4)
    shards = ((0, 352), (352, 700))
    for ent, k in ((False, 0), (False, 3), (True, 5)):                          # plain kernel, extras
        parts = []
        for v0, v1 in shards:
            st = S.shard_stats_triton(rows, w[v0:v1], v0, ent, k, BN=16, BV=32, BD=16)
            st = {key: v.view(4, 5, *v.shape[1:]) for key, v in st.items()}
            ref = shard_stats(h.double(), w[v0:v1].double(), v0, ar, ar, one, 0.0, z.long(), 700, topk=k,
                              entropy=ent)
            assert set(st) == set(ref), (sorted(st), sorted(ref))
            assert st["tok"].min() >= v0 and st["tok"].max() < v1                 # global ids of the shard
            same = st["tok"] == ref["tok"]
            assert same.float().mean() >= 0.9, (dt, ent, k, v0)
            lse, rlse = st["m"] + st["s"].log(), ref["m"] + ref["s"].log()
            errs = {"best": st["best"] - ref["best"], "bl": st["bl"] - ref["bl"], "m": st["m"] - ref["m"],
                    "lse": lse - rlse}
            if ent:
                errs["a/s"] = st["a"] / st["s"] - ref["a"] / ref["s"]
            if k:
                errs["tv"] = st["tv"] - ref["tv"]
                # the same ids per row (sorted: w's duplicated rows 100 / 200 tie exactly, in either order)
                same_ids = st["ti"].sort(-1).values == ref["ti"].sort(-1).values
                assert same_ids.float().mean() >= 0.9, (dt, ent, k, v0, "ti")
            for key, e in errs.items():
                e = e[same] if key in ("best", "bl") else e
                assert e.abs().max().item() < EXTRAS_ATOL[dt], (dt, ent, k, v0, key, e.abs().max().item())
            parts.append(st)
        ranks = torch.stack([torch.stack([p[key] for key in STATS]) for p in parts])     # [2, 6, 4, 5]
        tops = None
        if k:
            tops = (torch.cat([p["tv"] for p in parts], -1), torch.cat([p["ti"] for p in parts], -1))
        out = merge(ranks, k, tops)
        assert out["tokens"][0, 0] == 100 and parts[1]["tok"][0, 0] == 500, (dt, ent, k, "ties: lowest id")
        full = X.select_extras_reference(rows.double(), w.double(), True, k, acc=torch.float64)
        same = out["tokens"].reshape(-1) == full["tokens"]
        assert same.float().mean() >= 0.9, (dt, ent, k, "merged")
        assert len(set(full["tokens"].tolist())) > 5                              # rows decode differently
        keys = ("confidence", "logprob") + (("entropy",) if ent else ()) + (("topk_logprobs",) if k else ())
        for key in keys:
            e = (out[key].reshape(20, -1)[same] - full[key].reshape(20, -1)[same]).abs().max().item()
            assert e < EXTRAS_ATOL[dt], (dt, ent, k, key, e)
        tok1, conf1 = L.select_logits_triton(rows, w, BN=16, BV=32, BD=16)       # TP=1's fused decode
        assert torch.equal(out["tokens"].reshape(-1), tok1), (dt, ent, k, "vs TP=1 fused")
        assert rel(out["confidence"].reshape(-1), conf1) < REL[dt], (dt, ent, k, "confidence vs TP=1")


def check_filter_bisect():
    """The bisection's halving kernel (``filter_bisect._above_kernel``: mass and count above a threshold over
    order-preserving integer keys, vocab splits summed in order) vs the torch reference, for the key widths
    the bisection uses (bf16 16-bit, fp32, credit's float64; several splits and a ragged tail), then one
    sampled top-p + min-p decode through it: the eager sort's tokens."""
    from dlc.kernels.sampling import decode_rows_ext, filter_route
    for dt in (torch.bfloat16, torch.float32, torch.float64):
        keyed = (torch.randn(2, 3, 2 * FB.SPLIT + 77) * 3).to(dt)
        e = torch.rand(keyed.shape, dtype=torch.float64)
        u = keyed[..., 5].clone()
        got = FB.above_sums_triton(FB.key_of(keyed), e, FB.key_of(u), block=512)
        gt = keyed > u[..., None]
        assert torch.equal(got[1], gt.sum(-1).double()), dt
        want = torch.where(gt, e, 0.0).sum(-1)
        assert ((got[0] - want).abs() / want).max() < 1e-12, dt
    h, w = torch.randn(2, 3, 16).to(torch.bfloat16), (torch.randn(300, 16) * 2).to(torch.bfloat16)
    ar, one = torch.arange(2), torch.ones(1, dtype=torch.bfloat16)
    f = (torch.tensor([0, 100]), torch.tensor([0.7, 0.8], dtype=torch.float64),
         torch.tensor([0.02, 0.0], dtype=torch.float64))
    out = [decode_rows_ext(h, w, ar, ar, one, 0.9, ar + 5, vocab=300, chunk=128, filters=f, candidates=c,
                           logprobs=True) for c in (False, filter_route(*f))]
    assert torch.equal(out[0]["tokens"], out[1]["tokens"])     # the fused kernels (no sweep) vs the sort
    for key in ("confidence", "logprob"):
        assert (out[0][key] - out[1][key]).abs().max() < 1e-12, key


def check_smoothing():
    """``smoothing.split_stats`` (a smoothing step's selection and exponentials: two launches over (row,
    split))
    inside ``smooth_select`` against ``decode_rows_ext`` in float64; ties across splits take the first id.
    The interpreter truncates float32 -> bf16 (the GPU rounds to nearest): bf16 probabilities are within one
    bf16 step (2^-8 relative) instead of half of one."""
    from dlc.kernels import smoothing as SM
    from dlc.kernels.sampling import decode_rows_ext
    for dt, tol in ((torch.bfloat16, 8e-3), (torch.float32, 1e-5)):
        d, V = 32, 3000
        h = (torch.randn(2, 5, d) * 0.5).to(dt)
        w, we = torch.randn(V + 3, d).to(dt), torch.randn(V + 3, d).to(dt)
        ar = torch.arange(2)
        for chunk in (V, 1100):                                         # one chunk; three, the last short
            ref = decode_rows_ext(h, w, ar, ar, torch.ones(1, dtype=dt), 0.0, torch.zeros_like(ar), vocab=V,
                                  chunk=chunk, soft=(we, 1.0), acc=torch.float64)
            out = SM.smooth_select(h, w, we, vocab=V, chunk=chunk)
            assert torch.equal(out["tokens"], ref["tokens"]), (dt, chunk)
            assert rel(out["confidence"].double(), ref["confidence"]) < tol, (dt, chunk)
            assert (out["soft"].double() - ref["soft"]).abs().max() < 2 * tol, (dt, chunk)
        l = torch.randn(3, 2500).to(dt)
        l[0, [5, 700]] = 9.0                                            # one split, two lanes
        l[1, [100, 2400]] = 9.0                                         # two splits
        l[2, [SM.SPLIT_MIN - 1, SM.SPLIT_MIN]] = 8.0
        m, i, s, e = SM.split_stats(l.clone())
        assert torch.equal(i, l.max(-1)[1]) and i.tolist() == [5, 100, SM.SPLIT_MIN - 1], i
        assert torch.equal(m, l.float().max(-1)[0])
        assert rel(s.double(), torch.exp(l.double() - m.double()[:, None]).sum(-1)) < tol


def credit_case(R: int, M: int, V: int, dev="cpu"):
    """A sweep's result and credit inputs for ``credit_correction``: duplicates, the raw top-1 among the prior
    ids, padding entries (value 0), rows with alpha 0; credit large enough to flip tokens."""
    l = torch.randn(R, V, dtype=torch.float64, device=dev) * 3
    lse, (l1, t) = torch.logsumexp(l, -1), l.max(-1)
    out = {"tokens": t, "confidence": torch.exp(l1 - lse).float(), "logprob": (l1 - lse).float(),
           "_lse": lse.float(), "_best": l1.float()}
    ids = torch.randint(0, V, (R, M), device=dev)
    ids[:, 0] = l.topk(2, -1).indices[:, 1]                           # the runner-up, with a large credit
    ids[:, 2] = ids[:, 0]                                             # a duplicate (they add)
    ids[: R // 2, 3] = t[: R // 2]                                    # the raw top-1 with prior credit
    vals = torch.rand(R, M, dtype=torch.float64, device=dev) * 3
    vals[:, 0] = 20.0
    vals[R // 3: R // 2, 1:] = 0.0                                    # padding entries
    alpha = torch.where(torch.arange(R, device=dev) % 3 == 0, 0.0, 0.7).double()
    return out, l.gather(1, ids).float(), ids, vals, alpha


def check_credit_correction():
    """``select_extras.credit_correction_triton`` (one program a row) == the torch reference: tokens and top-1
    identical, floats within float64 summation order (the interpreter's log1p / expm1 are log(1 + x) /
    exp(x) - 1: 1e-9)."""
    from dlc.kernels import select_extras as X
    for R, M in ((12, 5), (9, 7)):
        args = credit_case(R, M, 300)
        ref = X.credit_correction_reference(*args)
        got = X.credit_correction_triton(*args)
        assert (ref["tokens"] != ref["top1_ids"]).sum() >= 2                 # credit decides
        for key in ("tokens", "top1_ids"):
            assert torch.equal(got[key], ref[key]), key
        for key in ("confidence", "logprob", "top1_prob"):
            assert got[key].dtype == ref[key].dtype, key
            assert (got[key].double() - ref[key].double()).abs().max() < 1e-6, key


def main():
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    for dt in (torch.float32, torch.float16):
        h, w = torch.randn(20, 48).to(dt), torch.randn(700, 48).to(dt)
        for T, noise in ((0.0, None), (0.9, None), (1.0, torch.rand(20, 700))):
            tok, conf = L.select_logits_triton(h, w, T, 5, noise, BN=16, BV=32, BD=16)
            rt, rc = L.select_logits_reference(h, w, T, 5, noise, chunk=100)
            assert (tok == rt).float().mean() >= 0.9, (dt, T, tok, rt)
            same = tok == rt
            assert rel(conf[same], rc[same]) < REL[dt], (dt, T)
        # 2 requests
        keys = L.row_key(torch.tensor([3, 9]).repeat_interleave(10), torch.arange(10).repeat(2))
        for T in (0.0, 0.9):                                  # graph form: tensor temperature, per-row keys
            tt = torch.tensor([T], dtype=torch.float64)
            tok, conf = L.select_logits_triton(h, w, temperature_t=tt, row_keys=keys, BN=16, BV=32, BD=16)
            rt, rc = L.select_logits_reference(h, w, temperature_t=tt, row_keys=keys, chunk=100)
            assert (tok == rt).float().mean() >= 0.9, (dt, T, "graph form", tok, rt)
            same = tok == rt
            assert rel(conf[same], rc[same]) < REL[dt], (dt, T, "graph form")
            st, _ = L.select_logits_triton(h, w, T, 0, BN=16, BV=32, BD=16) if T == 0 else \
                (torch.cat([L.select_logits_triton(h[:10], w, T, 3, BN=16, BV=32, BD=16)[0],
                            L.select_logits_triton(h[10:], w, T, 9, BN=16, BV=32, BD=16)[0]]), None)
            assert torch.equal(tok, st), (dt, T, "graph form vs one call per request", tok, st)
        q = torch.randn(2, 4, 5, 16).to(dt)
        k, v = torch.randn(2, 2, 40, 16).to(dt), torch.randn(2, 2, 40, 16).to(dt)
        kb, vb = torch.randn(2, 2, 5, 16).to(dt), torch.randn(2, 2, 5, 16).to(dt)
        idx = torch.randint(0, 40, (2, 2, 20))
        idx[0, 1, 3:7] = -1
        for ix in (idx, None):
            out = A.sparse_attention_triton(q, k, v, kb, vb, ix, BK=16)
            ref = A.sparse_attention_reference(q.float(), k.float(), v.float(), kb.float(), vb.float(), ix)
            assert rel(out, ref) < REL[dt], (dt, ix is None, rel(out, ref))
        check_extras(dt)
        check_shard_stats(dt)
    kc, vc = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    kc2, vc2 = kc.clone(), vc.clone()
    kn, vn = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    start, rows = torch.tensor([0, 35]), torch.tensor([2, 0])
    C.kv_write_triton(kc, vc, kn, vn, start, rows)
    C.kv_write_reference(kc2, vc2, kn, vn, start, rows)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    check_filter_bisect()
    check_smoothing()
    check_credit_correction()
    print("interpret-ok")


if __name__ == "__main__":
    main()
