"""The field's parallel decoders and the sampling controls on the one decoding core, each against a small
in-test transcription: hierarchical (dInfer's HierarchyDecoder), entropy-bounded (EB-sampler), credit
(dInfer's CreditThresholdParallelDecoder, stepped through whole blocks), iteration smoothing (dInfer's
IterationSmooth inside the block), and top-k / top-p / min-p sampling + logprobs (plain torch over full
logits)."""
import math

import pytest
import torch
import torch.nn.functional as F

from dlc.kernels.logits import decode_rows, uniform_noise
from dlc.kernels.sampling import decode_rows_ext
from dlc.runtime.decoding import (EntropyBoundRule, FieldError, GenerationConfig, HierarchicalRule,
                                  unmask_step)
from dlc.runtime.generate import generate

NEG = float("-inf")


# ------------------------------------------------------------------------------ selection rules, fixed inputs
def hierarchical_reference(conf, masked, low, high):
    """dInfer's HierarchyDecoder.get_transfer_index on one row, as plain Python loops."""
    K = len(conf)
    sel = [False] * K
    j = 0
    while j < K:
        if not masked[j]:
            j += 1
            continue
        e = j
        while e < K and masked[e]:
            e += 1
        best = max(conf[j:e])
        for i in range(j, e):
            if conf[i] == best and conf[i] > low:
                sel[i] = True
        j = e
    for i in range(K):
        if masked[i] and high is not None and conf[i] > high:
            sel[i] = True
    cands = [i for i in range(K) if masked[i]]
    if cands:
        sel[max(cands, key=lambda i: (conf[i], -i))] = True
    return sel


def entropy_reference(ent, masked, gamma):
    """EB-sampler: ascending entropy, largest prefix with sum - max <= gamma (at least one)."""
    order = sorted((i for i in range(len(ent)) if masked[i]), key=lambda i: (ent[i], i))
    take, total = [], 0.0
    for i in order:
        if take and total + ent[i] - ent[i] > gamma:     # sum of the prefix without its max (the newest)
            break
        take.append(i)
        total += ent[i]
    return [i in take for i in range(len(ent))]


@pytest.mark.parametrize("seed", range(6))
def test_hierarchical_matches_transcription(seed):
    g = torch.Generator().manual_seed(seed)
    K = 16
    conf = torch.rand(3, K, generator=g, dtype=torch.float64)
    masked = torch.rand(3, K, generator=g) < 0.7
    conf = torch.where(masked, conf, torch.full_like(conf, NEG))
    for low, high in ((0.3, 0.9), (0.5, None), (0.0, 0.6)):
        sel = HierarchicalRule(low, high).select(conf, masked, None)
        for b in range(3):
            assert sel[b].tolist() == hierarchical_reference(conf[b].tolist(), masked[b].tolist(), low, high)
    assert HierarchicalRule(0.3, 0.9).select(conf, masked, None).sum(-1).min() >= 1


def test_hierarchical_accepts_one_per_run_and_the_high_ones():
    conf = torch.tensor([[0.5, 0.4, NEG, 0.2, 0.35, NEG, 0.95, 0.91]], dtype=torch.float64)
    masked = torch.isfinite(conf)
    sel = HierarchicalRule(0.3, 0.9).select(conf, masked, None)
    # runs [0, 2), [3, 5), [6, 8): bests 0.5 and 0.35 (> 0.3) and 0.95; 0.91 > 0.9 as well
    assert sel.tolist() == [[True, False, False, False, True, False, True, True]]
    low = torch.tensor([[0.1, 0.2, NEG, 0.25]], dtype=torch.float64)
    assert HierarchicalRule(0.3, 0.9).select(low, torch.isfinite(low), None).tolist() == \
        [[False, False, False, True]]                                  # none above low: the best only


@pytest.mark.parametrize("seed", range(6))
def test_entropy_bound_matches_transcription(seed):
    g = torch.Generator().manual_seed(seed)
    ent = torch.rand(3, 12, generator=g, dtype=torch.float64) * 1.5
    masked = torch.rand(3, 12, generator=g) < 0.8
    conf = torch.rand(3, 12, generator=g, dtype=torch.float64)
    counts = set()
    for gamma in (0.0, 0.3, 1.0, 4.0):
        sel = EntropyBoundRule(gamma).select(conf, masked, None, ent)
        for b in range(3):
            assert sel[b].tolist() == entropy_reference(ent[b].tolist(), masked[b].tolist(), gamma)
        counts.add(int(sel.sum()))
    assert len(counts) > 2                                             # gamma decides how many


def test_entropy_bound_ties_and_empty_rows_as_the_transcription():
    """Equal entropies take the lower column first (the transcription's order); a row without masks takes
    nothing; a row whose candidates all exceed the bound still takes its best one."""
    g = torch.Generator().manual_seed(7)
    ent = (torch.rand(4, 16, generator=g, dtype=torch.float64) * 4).round() / 4      # many ties
    masked = torch.rand(4, 16, generator=g) < 0.7
    masked[1] = False
    ent[2] = 5.0
    conf = torch.zeros(4, 16, dtype=torch.float64)
    for gamma in (0.0, 0.25, 0.5, 2.0):
        sel = EntropyBoundRule(gamma).select(conf, masked, None, ent)
        for b in range(4):
            assert sel[b].tolist() == entropy_reference(ent[b].tolist(), masked[b].tolist(), gamma)
        assert not sel[1].any() and int(sel[2].sum()) == 1


def test_rules_never_accept_the_mask_id():
    mask_id = 9
    x0 = torch.tensor([[9, 4, 9, 5]])
    conf = torch.tensor([[0.99, 0.2, 0.98, 0.1]], dtype=torch.float64)
    masked = torch.ones(1, 4, dtype=torch.bool)
    ent = torch.tensor([[0.0, 2.0, 0.0, 3.0]], dtype=torch.float64)
    for rule in (HierarchicalRule(0.05, 0.5), EntropyBoundRule(10.0)):
        sel, stuck = unmask_step(rule, x0, conf, masked, torch.tensor([4]), mask_id, ent)
        assert not sel[x0 == mask_id].any() and sel.any() and not stuck.any()
    sel, stuck = unmask_step(EntropyBoundRule(1.0), torch.full((1, 4), 9), conf, masked, None, mask_id, ent)
    assert not sel.any() and stuck.all()


@pytest.mark.parametrize("kw,field", [(dict(low_threshold=0.95, threshold=0.9), "low_threshold"),
                                      (dict(low_threshold=-0.1), "low_threshold"),
                                      (dict(entropy_bound=-1.0), "entropy_bound"),
                                      (dict(entropy_bound=1.0, threshold=0.9), "entropy_bound"),
                                      (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_p=1.5), "top_p"), (dict(min_p=2.0), "min_p"),
                                      (dict(logprobs=21), "logprobs"), (dict(credit=1), "credit"),
                                      (dict(smoothing=True, cfg_scale=1.0), "smoothing"),
                                      (dict(smoothing_top_k=4), "smoothing_top_k"),
                                      (dict(smoothing=True, smoothing_top_k=0), "smoothing_top_k"),
                                      (dict(smoothing=True, smoothing_top_k=65), "smoothing_top_k"),
                                      (dict(smoothing=True, smoothing_top_k=2.5), "smoothing_top_k")])
def test_bad_rule_parameters_name_the_field(kw, field):
    with pytest.raises(FieldError) as e:
        GenerationConfig(gen_length=8, block_length=4, steps=8, **kw)
    assert e.value.field == field


# ------------------------------------------------------------------------------ the decode op's extras
@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(0)
    V, d = 50, 16
    h = torch.randn(3, 5, d, generator=g)                                        # [B, N, d]
    w = torch.randn(V, d, generator=g) * 0.6
    we = torch.randn(V, d, generator=g)
    return h, w, we, V


def _plain_logits(h, w):
    return F.linear(h, w).to(torch.float64)                                     # [B, N, V]


def _args(h):
    ar = torch.arange(h.shape[0])
    return ar, ar, torch.ones(1), torch.tensor([11, 22, 33])


def test_entropy_logprobs_and_soft_match_plain_torch(rows):
    h, w, we, V = rows
    cr, ur, cw, seeds = _args(h)
    l = _plain_logits(h, w)
    for chunk, tau in ((7, 0.7), (V, 0.7), (7, 1.0)):     # tau 1: the soft part reuses the selection's exp
        out = decode_rows_ext(h, w, cr, ur, cw, 0.0, seeds, vocab=V, chunk=chunk, topk=3, logprobs=True,
                              entropy=True, soft=(we, tau))
        lp = torch.log_softmax(l, -1)
        assert torch.equal(out["tokens"], l.argmax(-1))
        torch.testing.assert_close(out["confidence"], lp.exp().amax(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["entropy"], -(lp.exp() * lp).sum(-1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["logprob"], lp.amax(-1), rtol=1e-5, atol=1e-6)
        tv, ti = lp.topk(3, -1)
        assert torch.equal(out["topk_ids"], ti)
        torch.testing.assert_close(out["topk_logprobs"], tv, rtol=1e-5, atol=1e-6)
        soft = torch.softmax(l / tau, -1) @ we.to(torch.float64)
        torch.testing.assert_close(out["soft"].to(torch.float64), soft, rtol=1e-6, atol=1e-6)
    assert out["entropy"].std() > 0.05                                          # rows differ


@pytest.mark.parametrize("T", [0.0, 1.3])
def test_rows_without_a_feature_decode_as_decode_rows_bit_for_bit(rows, T):
    """Batch invariance: a row whose batch-mates ask for entropy / logprobs / credit / filters gets exactly
    the tokens and confidences decode_rows gives it (same shapes, same chunking)."""
    h, w, we, V = rows
    cr, ur, cw, seeds = _args(h)
    tok, conf = decode_rows(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=7, topk=0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (3, 5, 2), generator=g)
    ids[1, :, 0] = _plain_logits(h, w)[1].topk(2, -1).indices[:, 1]     # row 1: credit on the runner-up
    vals = torch.rand(3, 5, 2, generator=g, dtype=torch.float64) * 50
    alpha = torch.tensor([0.0, 0.7, 0.0], dtype=torch.float64)         # rows 0 and 2 take no credit
    keep_all = (torch.tensor([0, 3, 0]), torch.tensor([1.0, 0.5, 1.0], dtype=torch.float64),
                torch.zeros(3, dtype=torch.float64))
    for kw in (dict(entropy=True, logprobs=True, topk=2), dict(credit=(ids, vals, alpha)),
               dict(soft=(we, 1.0)), dict(filters=keep_all, credit=(ids, vals, alpha))):
        out = decode_rows_ext(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=7, **kw)
        for b in (0, 2):
            assert torch.equal(out["tokens"][b], tok[b]) and torch.equal(out["confidence"][b], conf[b]), kw
    assert not torch.equal(out["tokens"][1], tok[1])                   # the credited, filtered row differs


def credit_reference(l, prior, alpha, T, seeds, V):
    """dInfer's _apply_credit_fusion on dense credit [B, N, V] (prior already decayed) + Gumbel-max."""
    p = torch.softmax(l, -1)
    p1, t = p.max(-1)
    mat = prior.clone().scatter_add(-1, t[..., None], (p1 ** 0.2)[..., None])
    fused = l + alpha[:, None, None] * torch.log(mat + 1)
    score = fused
    if T > 0:
        score = fused - T * torch.log(-torch.log(uniform_noise(seeds, l.shape[1], 0, V, V, l.device)))
    tok = score.argmax(-1)
    conf = torch.softmax(fused, -1).gather(-1, tok[..., None])[..., 0]
    return tok, conf, t, p1


@pytest.mark.parametrize("T", [0.0, 1.3])
def test_credit_fusion_matches_dense_transcription(rows, T):
    h, w, _, V = rows
    cr, ur, cw, seeds = _args(h)
    l = _plain_logits(h, w)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (3, 5, 4), generator=g)
    # credit on the raw argmax, too (the correction path)
    ids[..., 0] = l.argmax(-1)
    ids[0, :, 0] = l[0].topk(2, -1).indices[:, 1]        # row 0: on the runner-up, so credit flips choices
    vals = torch.rand(3, 5, 4, generator=g, dtype=torch.float64) * 3
    vals[0, :, 0] = 40.0
    alpha = torch.tensor([0.7, 0.0, 0.7], dtype=torch.float64)
    prior = torch.zeros(3, 5, V, dtype=torch.float64).scatter_add(-1, ids, vals)
    ref_tok, ref_conf, t, p1 = credit_reference(l, prior, alpha, T, seeds, V)
    for chunk in (7, V):
        out = decode_rows_ext(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=chunk, credit=(ids, vals, alpha))
        assert torch.equal(out["tokens"], ref_tok)
        torch.testing.assert_close(out["confidence"], ref_conf, rtol=1e-5, atol=1e-6)
        assert torch.equal(out["top1_ids"], t)
        torch.testing.assert_close(out["top1_prob"], p1, rtol=1e-5, atol=1e-6)
    plain = decode_rows(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=V, topk=0)[0]
    assert torch.equal(out["tokens"][1], plain[1])                               # alpha 0: no credit
    assert not torch.equal(out["tokens"], plain)                                 # credit changes choices


def filter_reference(l, T, top_k, top_p, min_p, seeds, V):
    """vLLM / HF order on the tempered distribution: top-k, top-p (renormalised), min-p; Gumbel-max."""
    s = l / T
    keep = torch.ones_like(s, dtype=torch.bool)
    for b in range(s.shape[0]):
        for n in range(s.shape[1]):
            order = s[b, n].argsort(descending=True, stable=True).tolist()
            k = int(top_k[b]) or V
            kept = order[:k]
            probs = torch.softmax(s[b, n, kept], -1).tolist()
            acc, final = 0.0, []
            for i, pr in zip(kept, probs):
                if final and acc >= float(top_p[b]):
                    break
                final.append(i)
                acc += pr
            pmax = probs[0]
            final = [i for i, pr in zip(kept, probs) if i in final and pr >= float(min_p[b]) * pmax]
            keep[b, n] = False
            keep[b, n, final] = True
    g = torch.log(-torch.log(uniform_noise(seeds, l.shape[1], 0, V, V, l.device)))
    return torch.where(keep, l - T * g, torch.full_like(l, NEG)).argmax(-1)


def test_top_k_top_p_min_p_match_plain_torch_at_fixed_seeds(rows):
    h, w, _, V = rows
    cr, ur, cw, seeds = _args(h)
    l = _plain_logits(h, w)
    T = 1.7
    outs = []
    for top_k, top_p, min_p in (([3, 0, 1], [1.0, 0.5, 1.0], [0.0, 0.0, 0.0]),
                                ([0, 5, 0], [0.8, 1.0, 0.3], [0.2, 0.0, 0.5]),
                                ([0, 0, 0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])):
        f = (torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64), torch.tensor(min_p,
                                                                                      dtype=torch.float64))
        for chunk in (7, V):
            out = decode_rows_ext(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=chunk, filters=f, logprobs=True)
            assert torch.equal(out["tokens"], filter_reference(l, T, *f, seeds, V))
            lp = torch.log_softmax(l, -1).gather(-1, out["tokens"][..., None])[..., 0]
            torch.testing.assert_close(out["logprob"], lp, rtol=1e-5, atol=1e-6)
        outs.append(out["tokens"])
    unfiltered = decode_rows(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=V, topk=0)[0]
    assert torch.equal(outs[2], unfiltered)                  # filters that keep everything change nothing
    assert not torch.equal(outs[0], unfiltered) and not torch.equal(outs[1], unfiltered)
    assert torch.equal(outs[0][2], l[2].argmax(-1))          # top_k = 1 is greedy


def test_eager_runners_filters_take_the_bisection_not_the_sort(rows, monkeypatch):
    """The eager runner's (and a compiled engine's) row decoding of filters at T > 0 routes them as the graph
    runner's variants do (``filter_route``: the candidates, else the bisection), never the vocabulary sort:
    top-p alone takes a bisection plan; tokens equal the full-vocabulary transcription."""
    from dlc.kernels import sampling
    from dlc.runtime.runners import eager
    from dlc.runtime.step import StepBatch
    h, w, _, V = rows
    cr, ur, _, seeds = _args(h)
    B, N = h.shape[:2]
    routes = []
    real = eager.decode_rows_ext

    def spy(*a, **kw):
        routes.append(kw.get("candidates"))
        return real(*a, **kw)
    monkeypatch.setattr(eager, "decode_rows_ext", spy)
    monkeypatch.setattr(sampling, "_decode_full", None)                  # the sort must not run
    z = torch.zeros(B, 1, dtype=torch.long)
    T = 1.7
    for top_k, top_p, min_p in (([0, 0, 0], [0.8, 0.5, 0.9], [0.0, 0.0, 0.0]),
                                ([0, 0, 0], [1.0, 1.0, 1.0], [0.2, 0.05, 0.5]),
                                ([3, 0, 40], [0.9, 0.7, 1.0], [0.0, 0.1, 0.0])):
        f = (torch.tensor(top_k), torch.tensor(top_p, dtype=torch.float64), torch.tensor(min_p,
                                                                                      dtype=torch.float64))
        one = torch.ones(B, dtype=torch.long)
        batch = StepBatch("reuse", B, z, z, z.bool(), one, one * 0, N, cr * 0, None, None, N, None, None,
                          T, 0.0, seeds, cr, ur, top_k=f[0], top_p=f[1], min_p=f[2])
        out = eager.decode_step_extras(h, w, w, V, batch)
        assert torch.equal(out.x0, filter_reference(_plain_logits(h, w), T, *f, seeds, V))
    assert routes[0].startswith("bisect") and routes[1].startswith("bisect"), routes


@pytest.mark.parametrize("filtered_conf", [False, True])
def test_top_k_filters_over_candidates_match_plain_torch(monkeypatch, filtered_conf):
    """Top-k filters (k <= FILTER_CANDIDATES, with top-p / min-p on top) sample over the sweep's candidates,
    never forming [N, V] logits: tokens equal the full-vocabulary transcription, confidences and logprobs too;
    a row without filters is the plain Gumbel-max (not with filtered_conf: every row then filters)."""
    from dlc.kernels import sampling as S
    g = torch.Generator().manual_seed(4)
    V, d = 3000, 16
    h, w = torch.randn(4, 6, d, generator=g), torch.randn(V, d, generator=g) * 0.5
    cr, ur, cw, _ = _args(h)
    cr = ur = torch.arange(4)
    seeds = torch.tensor([11, 22, 33, 44])
    l, T = _plain_logits(h, w), 1.3
    f = (torch.tensor([S.FILTER_CANDIDATES, 5, 1, 0 if not filtered_conf else 40]),
         torch.tensor([0.6, 1.0, 1.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 0.1, 0.0, 0.0],
                                                                                dtype=torch.float64))
    assert S.candidates_cover(*f, filtered_conf) == ("filtered" if filtered_conf else "mixed")
    monkeypatch.setattr(S, "_decode_full", lambda *a, **k: pytest.fail("formed [N, V] logits"))
    out = decode_rows_ext(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=700, filters=f, logprobs=True, topk=2,
                          filtered_conf=filtered_conf)
    tok = filter_reference(l, T, *f, seeds, V)
    assert torch.equal(out["tokens"], tok)
    lsm = torch.log_softmax(l, -1)
    torch.testing.assert_close(out["logprob"], lsm.gather(-1, tok[..., None])[..., 0], rtol=0, atol=1e-12)
    if filtered_conf:                       # probability under the filtered, tempered distribution
        keep = S.filter_mask(l / T, *f)
        kept = torch.where(keep, l / T, torch.full_like(l, NEG))
        conf = torch.exp((l / T).gather(-1, tok[..., None])[..., 0] - torch.logsumexp(kept, -1))
    else:
        conf = lsm.exp().gather(-1, tok[..., None])[..., 0]
    torch.testing.assert_close(out["confidence"], conf, rtol=0, atol=1e-12)
    plain = decode_rows(h, w, cr, ur, cw, T, seeds, vocab=V, chunk=V, topk=0)[0]
    assert not torch.equal(tok[:3], plain[:3])                  # the filters decide
    assert filtered_conf or torch.equal(tok[3], plain[3])
    assert not S.candidates_cover(torch.tensor([0]), torch.tensor([0.9]), torch.tensor([0.0]))   # top-p alone


# ------------------------------------------------------------------------------ whole generations
@pytest.fixture(scope="module")
def model(decisive_tiny_llada):
    return decisive_tiny_llada


PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]


def _logits(model, x, embed_add=None):
    pos, km = torch.arange(x.shape[1])[None], torch.ones_like(x, dtype=torch.bool)
    h = model(x, pos, km, embed_add=embed_add)
    return F.linear(h, model.head_weight()).to(torch.float64)[0]               # [L, V]


def credit_generate_reference(model, prompt, gen_length, block_length, threshold, mask_id):
    """CreditThresholdParallelDecoder over whole blocks (no cache, T = 0), dense credit [K, V] per block."""
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    for b0 in range(P, P + gen_length, block_length):
        mat, it = None, 0
        while (x[0, b0:b0 + block_length] == mask_id).any():
            l = _logits(model, x)[b0:b0 + block_length]                       # [K, V]
            masked = x[0, b0:b0 + block_length] == mask_id
            if mat is None:
                mat = torch.zeros_like(l)
            if it > 0:
                mat *= 0.8
            p1, t = torch.softmax(l, -1).max(-1)
            mat.scatter_add_(-1, t[:, None], (p1 ** 0.2 * masked)[:, None])
            fused = l + 0.7 * torch.log(mat + 1)
            x0 = fused.argmax(-1)
            conf = torch.softmax(fused, -1).gather(-1, x0[:, None])[:, 0]
            cand = masked & (x0 != mask_id)
            conf = torch.where(cand, conf, torch.full_like(conf, NEG))
            sel = cand & ((conf >= threshold) | (torch.arange(len(conf)) == conf.argmax()))
            x[0, b0:b0 + block_length][sel] = x0[sel]
            it += 1
    return x[0, P:].tolist()


def smoothing_generate_reference(model, prompt, gen_length, block_length, threshold, mask_id):
    """dInfer's IterationSmooth inside the block (no cache, T = 0): the still-masked block positions take
    E[mask] + w * softmax(l / 1) @ W_e of the previous step, w = min(0.15 + 0.02 i, 0.3), i = forwards so
    far."""
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    we = model.embed.weight[:model.config.vocab_size].to(torch.float64)
    it = 0
    for b0 in range(P, P + gen_length, block_length):
        soft, w = None, 0.0
        while (x[0, b0:b0 + block_length] == mask_id).any():
            masked = x[0, b0:b0 + block_length] == mask_id
            add = None
            if soft is not None:
                add = torch.zeros(1, x.shape[1], we.shape[1])
                add[0, b0:b0 + block_length] = torch.where(masked[:, None], w * soft, 0.0).float()
            l = _logits(model, x, add)[b0:b0 + block_length]
            p = torch.softmax(l, -1)
            conf, x0 = p.max(-1)
            cand = masked & (x0 != mask_id)
            conf = torch.where(cand, conf, torch.full_like(conf, NEG))
            sel = cand & ((conf >= threshold) | (torch.arange(len(conf)) == conf.argmax()))
            x[0, b0:b0 + block_length][sel] = x0[sel]
            soft, w = p @ we, min(0.15 + 0.02 * it, 0.3)
            it += 1
    return x[0, P:].tolist()


def test_credit_generation_matches_transcription(model):
    mask_id = model.config.mask_id
    cfg = dict(gen_length=16, block_length=8, steps=16, threshold=0.6)
    ours = generate(model, PROMPTS, GenerationConfig(**cfg, credit=True)).token_ids
    plain = generate(model, PROMPTS, GenerationConfig(**cfg))
    for p, toks in zip(PROMPTS, ours):
        assert toks == credit_generate_reference(model, p, 16, 8, 0.6, mask_id)
    assert ours != plain.token_ids                                    # credit changes what is decoded
    assert len({t for toks in ours for t in toks}) > 3


def test_smoothing_generation_matches_transcription(model):
    mask_id = model.config.mask_id
    cfg = dict(gen_length=24, block_length=8, steps=24, threshold=0.95)
    ours = generate(model, PROMPTS, GenerationConfig(**cfg, smoothing=True)).token_ids
    plain = generate(model, PROMPTS, GenerationConfig(**cfg)).token_ids
    for p, toks in zip(PROMPTS, ours):
        assert toks == smoothing_generate_reference(model, p, 24, 8, 0.95, mask_id)
    assert ours != plain


@pytest.mark.parametrize("kw", [dict(threshold=0.9, low_threshold=0.3), dict(entropy_bound=1.0)])
def test_parallel_rules_take_fewer_forwards_than_one_token_per_step(model, kw):
    cfg = dict(gen_length=16, block_length=8, steps=16)
    exact = generate(model, PROMPTS, GenerationConfig(**cfg))
    fast = generate(model, PROMPTS, GenerationConfig(**cfg, **kw))
    assert sum(fast.steps_per_row) < sum(exact.steps_per_row)
    assert all(len(t) == 16 for t in fast.token_ids)


def test_logprobs_recorded_for_every_generated_token(model):
    """At T = 0 a token is its step's argmax: its logprob is the first alternative's, with that id."""
    from dlc.runtime.decoding import DecodeState
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.step import make_batch, run_batch
    cfg = GenerationConfig(gen_length=8, block_length=4, steps=8, threshold=0.6, logprobs=2)
    res = generate(model, PROMPTS[:1], cfg)
    st, r = DecodeState.new(PROMPTS[0], cfg, model.config), EagerRunner(model)
    st.advance(4)
    while st.phase is not None:
        out = run_batch(r, make_batch(r, [st]))
        st.apply(out.x0[0], out.conf[0], out.row(0))
        st.advance(4)
    gen = st.x[len(PROMPTS[0]):].tolist()
    assert gen == res.token_ids[0]
    for tok, (lp, ids, lps) in zip(gen, st.token_logprobs):
        assert ids[0] == tok and len(ids) == 2 and lps[0] >= lps[1]
        assert lp < 0 and math.isclose(lp, lps[0], rel_tol=1e-9)
    assert len({round(e[0], 6) for e in st.token_logprobs}) > 2            # they vary


# ------------------------------------------------------------------------------ the engine, mixed batches
RULES = [dict(), dict(threshold=0.6, low_threshold=0.3), dict(entropy_bound=1.0),
         dict(threshold=0.6, credit=True), dict(threshold=0.6, smoothing=True),
         dict(temperature=1.2, top_k=4, top_p=0.9, min_p=0.05, logprobs=2), dict(threshold=0.6, logprobs=0),
         dict(factor=1.0, credit=True, smoothing=True)]


def mixed_specs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i in range(n):
        prompt = torch.randint(0, 250, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        bl = (4, 8)[i % 2]
        specs.append((prompt, dict(gen_length=2 * bl, block_length=bl, steps=2 * bl,
                                   kv_cache=("none", "prefix", "dual")[i % 3], seed=100 + i,
                                   **RULES[i % len(RULES)])))
    return specs


@pytest.mark.parametrize("graphs", [False, True])
def test_engine_equals_generate_with_every_rule_in_mixed_batches(model, graphs):
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.session import Session
    sess = Session(EagerRunner(model), None, model.config, None, "tiny-llada")
    eng = Engine(sess, ServeConfig(model="tiny-llada", max_seq_len=64, kv_cache_mb=16, max_num_tokens=256,
                                   cuda_graphs=graphs, graph_decode="exact" if graphs else None))
    if graphs:                     # as with capture on a GPU: a mixed iteration is one call per group, so the
        eng.runner.mixes = False   # plain Reuse groups replay graphs beside the extras groups run eagerly
    specs = mixed_specs(12)
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    outs = set()
    for r, (p, params) in zip(reqs, specs):
        ref = generate(model, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert r.finish_reason in ("stop", "length") and r.output_ids == ref, params
        outs.add(tuple(r.output_ids))
    assert len(outs) > 6
    if graphs:       # every rule's Reuse steps replay captured variants (tests/runtime/test_graph_extras.py)
        assert eng.runner.stats["replays"] > 0 and eng.runner.stats["eager_reuse"] == 0


@pytest.mark.parametrize("rule", [dict(threshold=0.99, credit=True, smoothing=True, logprobs=1),
                                  dict(entropy_bound=0.05, temperature=0.9, top_k=5, seed=4)])
def test_preempted_requests_restart_their_rule_state(model, rule):
    """A preempted block rewinds its credit, soft embedding and smoothing weight with its tokens: the output
    still equals generate() alone (the scenario of test_engine's preemption test)."""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.kv_cache import slot_bytes
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.session import Session
    S = 160
    sess = Session(EagerRunner(model), None, model.config, None, "tiny-llada")
    two_slots = 2.5 * slot_bytes(model.config, S, torch.float32) / 2**20
    eng = Engine(sess, ServeConfig(max_seq_len=S, kv_cache_mb=two_slots, max_num_tokens=S, refresh_share=0.5,
                                   age_iters=2))
    p = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual", **rule)
    first = eng.make_request([7] * 4, p)
    eng.add_request(first)
    eng.step()
    long_prompt = list(range(100, 210))
    lp = {**p, "gen_length": 48, "steps": 48}
    long, short = eng.make_request(long_prompt, lp), eng.make_request([9, 8, 7], p)
    eng.add_request(long)
    eng.add_request(short)
    eng.run_until_done()
    assert eng.scheduler.preemptions >= 1
    for r, prompt, params in [(first, [7] * 4, p), (short, [9, 8, 7], p), (long, long_prompt, lp)]:
        ref = generate(model, [prompt], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert r.output_ids == ref


def test_restart_block_rewinds_the_rule_state():
    """Credit, the soft embedding and the smoothing weight's step count are block state: a restart rewinds
    them with the tokens, so the restarted block sends exactly what its first run sent."""
    from types import SimpleNamespace

    from dlc.runtime.decoding import DecodeState, smoothing_delta
    from dlc.runtime.step_output import StepOutput
    mc = SimpleNamespace(mask_id=9, eos_id=0, stop_ids=[0])
    gen = GenerationConfig(gen_length=8, block_length=4, steps=8, threshold=0.99, credit=True, smoothing=True)
    st = DecodeState.new([5, 6, 7], gen, mc)
    st.advance(4)
    first = st.needs()

    def step(tok):
        out = StepOutput(torch.full((4,), tok), torch.full((4,), 0.5, dtype=torch.float64),
                         top1_ids=torch.full((4,), tok), top1_prob=torch.full((4,), 0.5, dtype=torch.float64),
                         soft=torch.ones(4, 3))
        st.apply(out.x0, out.conf, out)
        st.advance(4)
    step(4)
    step(5)
    assert st.credit[0].shape == (4, 2) and st.soft is not None
    assert smoothing_delta([st], "cpu").abs().sum() > 0
    st.restart_block()
    st.advance(4)
    again = st.needs()
    assert st.step == 0 and st.iters == 0
    assert again["credit"][0].shape == first["credit"][0].shape == (4, 0) and again["soft"] == first["soft"]
    assert smoothing_delta([st], "cpu") is None                        # as at the block's first run


def test_block_decoders_start_each_block_without_the_last_ones_credit_or_soft_input():
    """Credit and smoothing's soft input are per block for block-diffusion decoders too (LLaDA2 / SDAR): a
    block's first step sends no credit (ids [K, 0]) and no soft input, as the first block's did; the credit
    of the finished block's positions must not land on the new block's positions."""
    from types import SimpleNamespace

    from dlc.runtime.decoding import DecodeState, smoothing_delta
    from dlc.runtime.step_output import StepOutput
    mc = SimpleNamespace(mask_id=9, eos_id=0, stop_ids=[0], block_diffusion=True, family="sdar")
    gen = GenerationConfig(gen_length=8, block_length=4, steps_per_block=4, threshold=0.99, decoder="llada2",
                           kv_cache="block", credit=True, smoothing=True)
    st = DecodeState.new([5, 6, 7, 8], gen, mc)                     # a prompt of one whole block
    assert st.attn_block == 4
    st.advance(4)
    first = st.needs()
    assert first["credit"][0].shape == (4, 0) and first["soft"] is not None

    def step(conf):                  # every masked position predicts 4; ``conf`` >= 0.99 accepts them all
        K = st.be - st.bs
        out = StepOutput(torch.full((K,), 4), torch.full((K,), conf, dtype=torch.float64),
                         top1_ids=torch.full((K,), 4), top1_prob=torch.full((K,), conf, dtype=torch.float64),
                         soft=torch.ones(K, 3))
        st.apply(out.x0, out.conf, out)
        st.advance(4)
    step(0.5)
    step(0.5)
    assert st.credit[0].shape == (4, 2) and smoothing_delta([st], "cpu").abs().sum() > 0
    start = st.bs
    step(1.0)                                                        # the block completes
    assert st.bs == start + 4                                        # the next block
    again = st.needs()
    assert again["credit"][0].shape == (4, 0)
    assert smoothing_delta([st], "cpu") is None


def test_graph_runner_keeps_replaying_the_rows_without_extras(model):
    """One request whose decoding no captured variant holds (classifier-free guidance) among plain ones:
    the engine gives it its own group (eager), the others still replay their captured Reuse steps; every
    output equals generate() alone. (Entropy, credit, logprobs, smoothing and top-k sampling replay variants
    of their own: tests/runtime/test_graph_extras.py.)"""
    from dlc.runtime.config import ServeConfig
    from dlc.runtime.engine import Engine
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.session import Session
    sess = Session(EagerRunner(model), None, model.config, None, "tiny-llada")
    eng = Engine(sess, ServeConfig(model="tiny-llada", max_seq_len=64, kv_cache_mb=16, max_num_tokens=512,
                                   cuda_graphs=True, graph_decode="exact"))
    base = dict(gen_length=16, block_length=8, steps=16, kv_cache="dual")
    guided = {"temperature": 0.7, "top_p": 0.8, "cfg_scale": 1.0}
    specs = [([5, 6, 7, i], {**base, **(guided if i == 0 else {})}) for i in range(4)]
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    st = eng.runner.stats
    assert st["replays"] >= st["eager_reuse"] > 0
    for r, (p, params) in zip(reqs, specs):
        assert r.output_ids == generate(model, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
