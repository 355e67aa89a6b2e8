"""Run the Triton kernels in Triton's interpreter on CPU tensors (tiny shapes) against the references.

Invoked by test_interpret.py in a subprocess with TRITON_INTERPRET=1 (the variable must be set before Triton
is imported). The interpreter lacks bfloat16 dot support, so float32 and float16 are checked here; bfloat16
runs in the GPU tests."""
import sys

import torch

from dlc.kernels import attention as A
from dlc.kernels import cache_write as C
from dlc.kernels import logits as L
from dlc.kernels import select_extras as X

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
    kc, vc = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    kc2, vc2 = kc.clone(), vc.clone()
    kn, vn = torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    start, rows = torch.tensor([0, 35]), torch.tensor([2, 0])
    C.kv_write_triton(kc, vc, kn, vn, start, rows)
    C.kv_write_reference(kc2, vc2, kn, vn, start, rows)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    print("interpret-ok")


if __name__ == "__main__":
    main()
