"""The decoding core's batched apply (``decoding.apply_batch``: one selection per rule over a runner call's
[B, K] rows, issue 18's host cost) against an in-test transcription of each rule (positions accepted per step
on fixed confidence / entropy inputs) and against one ``apply`` per state: rules mixed in one batch, random
remasking, mask-id predictions, the extras' state (credit, smoothing, logprobs), a bad row failing alone;
and StepOutput.to_host's packed copies."""
import copy
from types import SimpleNamespace

import torch

from dlc.runtime.decoding import CREDIT_DECAY, DecodeState, GenerationConfig, apply_batch
from dlc.kernels.sampling import CREDIT_GAMMA
from dlc.runtime.step_output import StepOutput

MC = SimpleNamespace(mask_id=99, eos_id=0, stop_ids=[0])
K = 16
SPECS = [dict(), dict(threshold=0.9), dict(threshold=0.6), dict(factor=1.0),
         dict(low_threshold=0.3, threshold=0.9), dict(low_threshold=0.5), dict(entropy_bound=0.1),
         dict(entropy_bound=1.5), dict(threshold=0.8), dict(), dict(entropy_bound=0.1), dict(factor=0.5),
         dict(entropy_bound=0.5)]                      # its row's entropies: 0.25 each, a bound met exactly


# ------------------------------------------------------------------------ the rules, transcribed for one row
def _best(conf, cand):
    return max(cand, key=lambda i: (conf[i], -i))


def reference(spec, conf, ent, cand, n):
    """Columns the rule of ``spec`` accepts among ``cand`` (masked, not predicting the mask id)."""
    if not cand:
        return set()
    if "entropy_bound" in spec:
        take, total = [], 0.0
        for i in sorted(cand, key=lambda i: (ent[i], i)):
            if take and total > spec["entropy_bound"]:        # sum of the prefix without its newest (max)
                break
            take.append(i)
            total += ent[i]
        return set(take)
    if "low_threshold" in spec:
        out, high = set(), spec.get("threshold")
        runs, cur = [], []
        for i in range(len(conf)):
            if i in cand:
                cur.append(i)
            elif cur:
                runs, cur = runs + [cur], []
        runs += [cur] if cur else []
        for r in runs:
            m = max(conf[i] for i in r)
            out |= {i for i in r if conf[i] == m and conf[i] > spec["low_threshold"]}
        out |= {i for i in cand if high is not None and conf[i] > high}
        return out | {_best(conf, cand)}
    if "threshold" in spec:
        return {i for i in cand if conf[i] >= spec["threshold"]} | {_best(conf, cand)}
    if "factor" in spec:
        order = sorted(cand, key=lambda i: (-conf[i], i))
        take = [i for n_, i in enumerate(order) if all(conf[j] >= 1 - spec["factor"] / (m + 2)
                                                        for m, j in enumerate(order[:n_ + 1]) if m)]
        return set(take) | {order[0]}
    return set(sorted(cand, key=lambda i: (-conf[i], i))[:n])         # the schedule: top n


def _states(specs, seed=0, **common):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, spec in enumerate(specs):
        gen = GenerationConfig(gen_length=2 * K, block_length=K, steps=2 * K, seed=i, **{**common, **spec})
        st = DecodeState.new(torch.randint(1, 50, (3 + i,), generator=g).tolist(), gen, MC)
        st.advance(K)
        st.x[st.bs + torch.randperm(K, generator=g)[:i % 4]] = 7          # some columns already decoded
        out.append(st)
    return out


def _inputs(B, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(1, 50, (B, K), generator=g)
    x0[torch.rand(B, K, generator=g) < 0.1] = MC.mask_id                # predictions of the mask id
    conf = torch.rand(B, K, generator=g, dtype=torch.float64)
    conf[:, :4] = 0.95 + 0.04 * torch.rand(B, 4, generator=g, dtype=torch.float64)     # some above 0.9
    ent = torch.rand(B, K, generator=g, dtype=torch.float64) * 0.3
    return x0, conf, ent


def test_apply_batch_matches_each_rules_transcription():
    """Fixed confidences / entropies, twelve states of eight rule kinds in one call: each row unmasks exactly
    the columns its rule's transcription accepts (schedule n, thresholds, factor, hierarchical runs, the
    entropy bound), never a mask-id prediction; the rules accept different counts."""
    counts = set()
    for seed in range(4):
        states = _states(SPECS, seed)
        x0, conf, ent = _inputs(len(states), seed)
        ent[-1] = 0.25                                                # sum - max of 3 is 0.5 <= 0.5: 3 pass
        blocks = [st.x[st.bs:st.be].clone() for st in states]
        ns = [st.n_now for st in states]
        errs = apply_batch(states, x0, conf, StepOutput(x0, conf, entropy=ent))
        assert errs == [None] * len(states)
        for b, (st, spec) in enumerate(zip(states, SPECS)):
            masked = [i for i in range(K) if blocks[b][i] == MC.mask_id]
            cand = [i for i in masked if x0[b, i] != MC.mask_id] if spec else masked
            want = reference(spec, conf[b].tolist(), ent[b].tolist(), cand, ns[b])
            got = {i for i in range(K) if st.x[st.bs + i] != blocks[b][i]}
            want = {i for i in want if x0[b, i] != MC.mask_id}           # (the schedule may pick one: no-op)
            assert got == want, (spec, sorted(got), sorted(want))
            assert st.step == 1 and st.forwards == 1
            counts.add(len(want))
    assert len(counts) >= 5                                           # decisive inputs: the rules differ


def test_apply_batch_equals_one_apply_per_state():
    """The same states applied one by one (``apply``) and in one batch: identical tokens, stuck flags, and
    random remasking draws from each state's own generator either way."""
    specs = SPECS + [dict(remasking="random"), dict(threshold=0.5, remasking="random")]
    for seed in range(3):
        states = _states(specs, seed)
        solo = copy.deepcopy(states)
        x0, conf, ent = _inputs(len(states), 10 + seed)
        x0[3] = MC.mask_id                                            # a row that can only predict the mask
        out = StepOutput(x0, conf, entropy=ent)
        assert apply_batch(states, x0, conf, out) == [None] * len(states)
        for b, st in enumerate(solo):
            st.apply(x0[b], conf[b], out.row(b))
        for a, s in zip(states, solo):
            assert torch.equal(a.x, s.x) and a.stuck == s.stuck
        assert states[3].stuck                                        # threshold rules skip mask-id rows


def test_apply_batch_keeps_the_extras_state_as_apply():
    """Credit (the prior decayed once, this step's p1 ** 0.2 where still masked), smoothing's soft inputs and
    weight, and each unmasked token's logprob with its alternatives: batch == one apply per state."""
    specs = [dict(threshold=0.9, credit=True), dict(credit=True, smoothing=True, logprobs=2),
             dict(entropy_bound=0.2, logprobs=3), dict(threshold=0.7, smoothing=True), dict(logprobs=0)]
    states = _states(specs, 3)
    g = torch.Generator().manual_seed(7)
    for step in range(2):
        B = len(states)
        x0, conf, ent = _inputs(B, 20 + step)
        out = StepOutput(x0, conf, entropy=ent, logprob=-torch.rand(B, K, generator=g, dtype=torch.float64),
                         topk_ids=torch.randint(0, 50, (B, K, 5), generator=g),
                         topk_logprobs=-torch.rand(B, K, 5, generator=g, dtype=torch.float64),
                         top1_ids=torch.randint(0, 50, (B, K), generator=g),
                         top1_prob=torch.rand(B, K, generator=g, dtype=torch.float64),
                         soft=torch.randn(B, K, 6, generator=g))
        solo = copy.deepcopy(states)
        prior = [None if s.credit is None else s.credit[1].clone() for s in states]
        was_masked = [s.x[s.bs:s.be] == MC.mask_id for s in states]                  # [K] before the step
        assert apply_batch(states, x0, conf, out) == [None] * B
        for b, st in enumerate(solo):
            st.apply(x0[b], conf[b], out.row(b))
        for b, (a, s) in enumerate(zip(states, solo)):
            assert torch.equal(a.x, s.x)
            assert (a.credit is None) == (s.credit is None) and (a.soft is None) == (s.soft is None)
            if a.credit is not None:
                assert all(torch.equal(u, v) for u, v in zip(a.credit, s.credit))
                if prior[b] is not None:                              # the prior, decayed once
                    assert torch.allclose(a.credit[1][:, :-1], prior[b] * CREDIT_DECAY)
                # this step's column: the raw top-1 id, p1 ** gamma where still masked (0 elsewhere), decayed
                want = torch.where(was_masked[b], out.top1_prob[b] ** CREDIT_GAMMA, 0.0) * CREDIT_DECAY
                assert torch.equal(a.credit[0][:, -1], out.top1_ids[b])
                assert torch.allclose(a.credit[1][:, -1], want, rtol=1e-15, atol=0)
                assert a.credit[0].shape[1] == step + 1 and bool((want > 0).any())
            if a.soft is not None:
                assert torch.equal(a.soft, s.soft) and a.soft_w == s.soft_w
            assert a.token_logprobs == s.token_logprobs
        assert sum(t is not None for t in states[2].token_logprobs) > 0
        lp = next(t for t in states[1].token_logprobs if t is not None)
        assert len(lp[1]) == 2 and len(lp[2]) == 2                    # the request's k alternatives
        assert all(t is None or t[1] == [] for t in states[4].token_logprobs)


def test_apply_batch_fails_a_bad_row_alone():
    """A state whose block does not match the call's width gets its own error; the others apply."""
    states = _states([dict(), dict(threshold=0.9), dict()], 1)
    states[1].be -= 1                                                 # its block is K - 1 wide now
    x0, conf, _ = _inputs(3, 5)
    before = [st.x.clone() for st in states]
    errs = apply_batch(states, x0, conf)
    assert errs[0] is None and errs[2] is None
    assert isinstance(errs[1], ValueError) and "block columns" in str(errs[1])
    assert torch.equal(states[1].x, before[1]) and states[1].step == 0
    assert not torch.equal(states[0].x, before[0]) and not torch.equal(states[2].x, before[2])


def test_step_output_to_host_packs_the_copies_losslessly():
    """``to_host(pack=True)`` (the GPU default: every field in ONE copy, floats as their float64 bits) gives
    the fields ``pack=False`` gives, bit for bit, in their shapes and dtypes; ``soft`` stays where it is."""
    g = torch.Generator().manual_seed(1)
    out = StepOutput(torch.randint(0, 2 ** 40, (3, 4), generator=g), torch.rand(3, 4, generator=g),
                     entropy=torch.rand(3, 4, generator=g, dtype=torch.float64),
                     logprob=-torch.rand(3, 4, generator=g),
                     topk_ids=torch.randint(0, 9, (3, 4, 2), generator=g),
                     topk_logprobs=-torch.rand(3, 4, 2, generator=g), top1_ids=torch.randint(0, 9, (3, 4)),
                     soft=torch.randn(3, 4, 5, generator=g))
    a, b = out.to_host(pack=True), out.to_host(pack=False)
    for f in ("x0", "conf", "entropy", "logprob", "topk_ids", "topk_logprobs", "top1_ids"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f
    assert a.conf.dtype == torch.float64 and a.top1_prob is None and a.soft is out.soft
    ptrs = {getattr(a, f).untyped_storage().data_ptr() for f in ("x0", "conf", "entropy", "topk_ids")}
    assert len(ptrs) == 1                                   # one host buffer: the fields came in one copy
    assert a.conf.unique().numel() > 1                      # varied values (the comparison can fail)


def test_to_device_many_packs_ints_and_floats_in_one_copy_exactly():
    """``step._to_device_many(pack=True)`` (the GPU path: one pinned int64 copy, floats as their bits) returns
    each tensor bit for bit, in its shape, as int64 / float64 (a float32 widened exactly)."""
    from dlc.runtime.step import _to_device_many
    g = torch.Generator().manual_seed(2)
    ts = [torch.randint(-2 ** 60, 2 ** 60, (2, 3, 4), generator=g),
          torch.randn(2, 3, 4, generator=g, dtype=torch.float64) * 1e-300,
          torch.randn(5, generator=g, dtype=torch.float64), torch.randn(3, generator=g)]
    got = _to_device_many(ts, torch.device("cpu"), pack=True)
    want = [ts[0], ts[1], ts[2], ts[3].double()]
    for x, y in zip(got, want):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    assert got[1].abs().max() > 0 and len({t.untyped_storage().data_ptr() for t in got}) == 1


def test_make_batch_credit_rows_stack_equal_widths_and_pad_the_others():
    """``step._credit_rows``: rows of one credit width stack as they are; rows of other widths or without
    credit go into a zero-padded [B, N, M] with alpha 0 for the latter (neutral rows); a block's first step
    (width 0) sends one zero column."""
    from dlc.runtime.step import _credit_rows
    g = torch.Generator().manual_seed(3)
    N = 4

    def cred(m, alpha=0.7):
        return (torch.randint(1, 50, (N, m), generator=g), torch.rand(N, m, generator=g, dtype=torch.float64),
                alpha)
    a, b = cred(3), cred(3)
    ids, vals, alpha = _credit_rows([a, b], N)
    assert torch.equal(ids, torch.stack([a[0], b[0]])) and torch.equal(vals, torch.stack([a[1], b[1]]))
    assert alpha.tolist() == [0.7, 0.7]
    c = cred(1)
    ids, vals, alpha = _credit_rows([a, None, c], N)
    assert ids.shape == vals.shape == (3, N, 3) and alpha.tolist() == [0.7, 0.0, 0.7]
    assert torch.equal(ids[0], a[0]) and torch.equal(vals[2, :, :1], c[1])
    assert not ids[1].any() and not vals[1].any() and not vals[2, :, 1:].any()
    ids, vals, alpha = _credit_rows([cred(0), cred(0)], N)
    assert ids.shape == (2, N, 1) and not vals.any()


def test_smoothing_delta_is_each_states_weighted_soft_on_its_still_masked_columns():
    """``decoding.smoothing_delta`` (one call's [B, K, d] at once) row by row: w * soft where the state's
    block is still masked, 0 elsewhere, 0 for a row without a soft embedding yet; None when no row has one."""
    from dlc.runtime.decoding import smoothing_delta
    states = _states([dict(smoothing=True), dict(threshold=0.7, smoothing=True), dict(smoothing=True)], 0)
    assert smoothing_delta(states, "cpu") is None                    # a block's first step: nothing yet
    g = torch.Generator().manual_seed(5)
    for j, s in enumerate(states[:2]):
        s.x[s.bs + 2 * j:s.bs + 2 * j + 3] = 7                          # some columns decoded already
        s.soft, s.soft_w = torch.randn(K, 6, generator=g), 0.15 + 0.1 * j
    delta = smoothing_delta(states, "cpu")
    assert delta.shape == (3, K, 6)
    for s, d in zip(states[:2], delta):
        still = (s.x[s.bs:s.be] == MC.mask_id)[:, None]
        assert 0 < int(still.sum()) < K
        assert torch.equal(d, torch.where(still, s.soft_w * s.soft, torch.zeros_like(s.soft)))
    assert not delta[2].any()


def test_to_device_pins_host_tensors_only(monkeypatch):
    """``step_output.to_device`` pins a host tensor before its copy to a GPU, and moves a tensor that is on a
    device already as it is: a compiled engine's runner names its device ``cuda`` while its tensors say
    ``cuda:0``, and pinning such a tensor (smoothing's soft input) failed every smoothing request over a
    compiled engine on a GPU ("cannot pin 'torch.cuda.DoubleTensor'"). The copy itself is stubbed here (no
    GPU on this machine): the test checks which tensors get pinned."""
    from dlc.runtime.step_output import to_device
    pinned, moved = [], []

    def pin(t):
        if t.device.type != "cpu":
            raise RuntimeError(f"cannot pin a tensor on {t.device}")
        pinned.append(t)
        return t
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, dev, non_blocking=False: moved.append(dev) or t)
    host = torch.ones(3, dtype=torch.float64)
    on_device = torch.empty(3, dtype=torch.float64, device="meta")     # stands in for a GPU tensor
    assert to_device(host, torch.device("cuda")) is host and pinned == [host]
    assert to_device(on_device, torch.device("cuda")) is on_device and pinned == [host]
    assert to_device(host, torch.device("cpu")) is host and len(pinned) == 1
    assert moved == [torch.device("cuda")] * 2 + [torch.device("cpu")]
