"""Batch invariance of the mode's Triton kernels in Triton's interpreter on CPU tensors (tiny shapes).

Invoked by test_batch_invariant_kernels.py in a subprocess with TRITON_INTERPRET=1. The property checked is
bitwise identity of a row's result across batch sizes (that IS batch invariance: a row computed inside a
batch of 1, 5 or 37 must give the very same bits), plus closeness to torch at stated tolerances. torch's own
kernels are allowed to differ across batch sizes; nothing here relies on them being equal. Each check is a
function; ``main`` runs those named on the command line (all by default) and prints ``<name>-ok``."""
import sys

import torch

from dlc.kernels import logits as L
from dlc.kernels import matmul as MM
from dlc.kernels import pool_attn as PA
from dlc.kernels import reduce as RD
from dlc.kernels._registry import set_invariant

REL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def check_matmul():
    """Rows of a [37, K] batch equal (bitwise) the same rows computed in batches of 1 and 5, with split-K 2
    (partials combined in split order) and without; close to float64 torch."""
    for dt in (torch.float32, torch.float16):
        w = torch.randn(48, 96).to(dt)                       # nn.Linear weight [N, K]; the GEMM reads w.t()
        bias = torch.randn(48).to(dt)
        x = torch.randn(37, 96).to(dt)
        ref = (x.double() @ w.double().t() + bias.double())
        for split in (1, 2):
            cfg = dict(BM=16, BN=16, BK=16, split=split, k_per=96 // split, num_warps=4, num_stages=2)
            full = MM.matmul_triton(x[None], w.t()[None], bias, cfg=cfg)[0]          # [37, 48]
            assert rel(full, ref) < REL[dt], (dt, split, rel(full, ref))
            for M in (1, 5):
                for r0 in (0, 20):                           # rows at the start and inside the batch
                    part = MM.matmul_triton(x[None, r0:r0 + M], w.t()[None], bias, cfg=cfg)[0]
                    assert torch.equal(part, full[r0:r0 + M]), (dt, split, M, r0)
        xl, wl = torch.randn(37, 1024).to(dt), torch.randn(48, 1024).to(dt)  # through plan: split-K > 1
        assert MM.plan(48, 1024, dt, 4)["split"] > 1
        full = MM.matmul_triton(xl[None], wl.t()[None], sms=4)[0]
        assert rel(full, xl.double() @ wl.double().t()) < REL[dt]
        for M in (1, 5):
            assert torch.equal(MM.matmul_triton(xl[None, 30:30 + M], wl.t()[None], sms=4)[0], full[30:30 + M])
        zb = torch.randn(3, 37, 96).to(dt)                   # bmm: per batch entry the same invariance
        wb = torch.randn(3, 96, 40).to(dt)
        cfg = dict(BM=16, BN=16, BK=16, split=2, k_per=48, num_warps=4, num_stages=2)
        full = MM.matmul_triton(zb, wb, cfg=cfg)
        assert rel(full, zb.double() @ wb.double()) < REL[dt]
        assert torch.equal(MM.matmul_triton(zb[:, 3:4], wb, cfg=cfg), full[:, 3:4])
    # the plan reads N, K, dtype and the SM count only: the same for any M (M is not even an argument)
    p = MM.plan(4096, 4096, torch.bfloat16, 132)
    assert p["split"] > 1 and p["BN"] == 64, p            # M = 1 decode fills the SMs through split-K
    assert MM.plan(126464, 4096, torch.bfloat16, 132)["split"] == 1


def check_row_sum():
    """A row's sum / mean is bitwise the same inside R = 1 and R = 9 rows; close to torch (float32 tol)."""
    x = torch.randn(9, 3000)
    full = RD.row_sum_triton(x)
    assert rel(full, x.double().sum(1)) < 1e-6
    for r in (0, 4, 8):
        assert torch.equal(RD.row_sum_triton(x[r:r + 1]), full[r:r + 1])
    b = x > 0.3
    assert RD.row_sum_triton(b).tolist() == b.sum(1).tolist()            # bool -> int64 counts
    m = RD.sum_dims(x.view(9, 30, 100), [-1, 1], keepdim=True, mean=True)
    torch.testing.assert_close(m, x.view(9, 30, 100).mean((1, 2), keepdim=True), rtol=1e-5, atol=1e-6)


def check_logits():
    """The fused selected-row logits in the invariant mode: a row's (token, confidence) identical inside
    N = 1 and N = 150 rows (3 row tiles by default), at T = 0 and seeded T > 0 (per-row keys). The default
    plan splits the vocab by N (a batch-1 call uses more splits), so without the mode the same row may round
    differently."""
    n = 150
    h, w = torch.randn(n, 32), torch.randn(600, 32) * 2     # wide logits: split sums round apart by default
    sms = L._sm_count(h.device)
    assert L.plan(1, 600, sms, BV=32)[2] != L.plan(n, 600, sms, BV=32)[2]                   # default: by N
    assert L.plan(1, 600, sms, BV=32, invariant=True) == L.plan(n, 600, sms, BV=32, invariant=True)
    prev = set_invariant(True)
    try:
        for T in (0.0, 0.9):
            keys = L.row_key(7, torch.arange(n))
            kw = dict(temperature_t=torch.tensor([T]), BV=32, BD=16)
            tok, conf = L.select_logits_triton(h, w, row_keys=keys, **kw)
            rt, rc = L.select_logits_reference(h, w, temperature_t=torch.tensor([T]), row_keys=keys, chunk=64)
            assert (tok == rt).float().mean() >= 0.9
            for r in range(0, n, 15):
                t1, c1 = L.select_logits_triton(h[r:r + 1], w, row_keys=keys[r:r + 1], **kw)
                assert torch.equal(t1, tok[r:r + 1]) and torch.equal(c1, conf[r:r + 1]), (T, r)
    finally:
        set_invariant(prev)


def check_pool_attention():
    """Pool attention in the invariant mode: a row's output identical alone and inside a batch of 3 (the
    split count is the one of a batch of one); the default split count depends on the batch."""
    assert PA.n_splits(1, 4, 1, 256, 8, 16) != PA.n_splits(3, 4, 1, 256, 8, 16)
    q = torch.randn(3, 4, 5, 16)
    k, v = torch.randn(4, 2, 256, 16), torch.randn(4, 2, 256, 16)
    rows, lens = torch.tensor([2, 0, 3]), torch.tensor([200, 37, 256])
    prev = set_invariant(True)
    try:
        full = PA.pool_attention_triton(q, k, v, rows, lens, BK=16)
        assert rel(full, PA.pool_attention_reference(q, k, v, rows, lens)) < 1e-5
        for b in range(3):
            one = PA.pool_attention_triton(q[b:b + 1], k, v, rows[b:b + 1], lens[b:b + 1], BK=16)
            assert torch.equal(one, full[b:b + 1]), b
    finally:
        set_invariant(prev)


def _aten_calls(x: torch.Tensor) -> list:
    return [x.sum(-1), x.sum((0, 2)), x.mean(1, keepdim=True), x.sum(1, dtype=torch.float64), (x > 0).sum(-1),
            torch.tensor(3.0).sum(0), x.sum((-1, -2), keepdim=True), torch.mm(x[0], x[1].t()),
            torch.addmm(x[0, 0, :5], x[0], x[1].t()), torch.addmm(x[0, :, :5], x[0], x[1].t(), beta=0.5),
            torch.mm(x[0].double(), x[1].t().double()), torch.bmm(x, x.transpose(1, 2)),
            torch.nn.functional.linear(x, x[0], x[0, :, 0]), torch.logsumexp(x, -1),
            torch.logsumexp(x, (0, 2), keepdim=True)]


def check_mode():
    """The whole mode on a tiny model (aten overrides registered for CPU here, kernels interpreted): the
    overridden ops keep torch's results (dtype, shape, values at float32 tolerance); a padded row's hidden
    states inside a batch of 3 equal (bitwise) those of the row alone, and the mode's forward is close to the
    default one (float32)."""
    from dlc.runtime.batch_invariant import batch_invariant_mode
    x = torch.randn(4, 5, 6)
    with batch_invariant_mode(keys=("CPU",)):
        got = _aten_calls(x)
    for i, (a, b) in enumerate(zip(got, _aten_calls(x))):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, msg=f"call {i}")
    from dlc.runtime.session import open_model
    m = open_model("tiny-llada", progress=False).runner.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (3, 12), generator=g)
    lens = torch.tensor([12, 7, 9])
    km = torch.arange(12)[None] < lens[:, None]                                   # [3, 12] prefix masks
    with torch.no_grad():
        ref = m(ids, key_mask=km)                                                 # [3, 12, d]
        with batch_invariant_mode(keys=("CPU",)):
            h3 = m(ids, key_mask=km)
            h1 = m(ids[1:2, :7], key_mask=km[1:2, :7])
            lg3, lg1 = m.logits(h3[:, :4]), m.logits(h1[:, :4])                   # the LM head's GEMM
    assert len({tuple(r) for r in h3[:, 0, :4].tolist()}) == 3                    # rows really differ
    assert torch.equal(h1[0], h3[1, :7])
    assert torch.equal(lg1[0], lg3[1])
    torch.testing.assert_close(h3, ref, rtol=1e-4, atol=1e-4)


CHECKS = {"matmul": check_matmul, "row_sum": check_row_sum, "logits": check_logits,
          "pool_attention": check_pool_attention, "mode": check_mode}


def main():
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    for name in sys.argv[2:] or list(CHECKS):
        CHECKS[name]()
        print(f"{name}-ok", flush=True)


if __name__ == "__main__":
    main()
