"""Block-diffusion decoding (LLaDA2.0 / LLaDA2.1 / SDAR) in the one decoding core, against in-test
transcriptions of the public reference loops, token for token:

* LLaDA2.0: ``LLaDA2MoeModelLM.generate`` of the release's modeling_llada2_moe.py (canvas rounded up to whole
  blocks, blocks aligned to column 0, a forward over everything up to the current block end each step, the
  threshold rule with the schedule's minimum, eos early stop, stop after the block holding an eos);
* SDAR: ``block_diffusion_generate`` of github JetAstra/SDAR generate.py (prefill of the prompt's complete
  blocks into a KV cache, denoising forwards over the block against it, one extra forward storing the finished
  block), greedy as argmax with the full-vocabulary probability as confidence;
* LLaDA2.1: SGLang's ``JointThreshold`` (mask-to-token + token-to-token edits, post-edit steps) inside the
  same block loop.

The transcriptions run the dlc model's own forward (its numerics against the modeling code are tested in
tests/models/test_block_numerics.py) with the references' masks and caches; dlc runs through generate() / the
Engine with its exact block cache or without a cache."""
import dataclasses

import pytest
import torch

from dlc.models import KVCache, build_model
from dlc.models.loading import TINY_INIT_STD, init_weights
from dlc.models.presets import preset_config
from dlc.runtime.config import ServeConfig
from dlc.runtime.decoding import DecodeState, FieldError
from dlc.runtime.engine import Engine
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.step import block_key_mask

# per model, a token it predicts now and then (not always): eos handling is exercised on some prompts only
EOS_OF = {"tiny-llada2": 72, "tiny-sdar": 25}


@pytest.fixture(scope="module", params=["tiny-llada2", "tiny-sdar"])
def model(request):
    c = preset_config(request.param)
    eos = EOS_OF[request.param]
    c = dataclasses.replace(c, eos_id=eos, pad_id=eos, stop_ids=[eos])
    torch.manual_seed(0)
    m = build_model(c)
    init_weights(m, 0, TINY_INIT_STD)
    return m.eval()


def _prompts(n, seed=0, lo=2, hi=14):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 250, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _forward_logits(model, cur, block_length):
    """The references' forward over the window: positions arange, block-causal mask of the window."""
    pos = torch.arange(cur.shape[1])[None]
    keys = block_key_mask(torch.ones_like(cur, dtype=torch.bool), pos, block_length)
    with torch.no_grad():
        return model.logits(model(cur, pos, keys)).float()


def _greedy(logits):
    p = torch.softmax(logits, -1)
    x0 = logits.argmax(-1)
    return x0, p.gather(-1, x0[..., None])[..., 0]


def _schedule(block_length, steps):
    base, rem = block_length // steps, block_length % steps
    n = torch.full((steps,), base, dtype=torch.int64)
    n[:rem] += 1
    return n


# ----------------------------------------------------------------------------------- reference transcriptions
def _window(prompt, gen_length: int, block_length: int, mask_id: int):
    """The references' token window: the prompt then masks up to whole blocks from column 0 -> (x [1, T],
    prompt length P, number of blocks nb)."""
    P = len(prompt)
    nb = (P + gen_length + block_length - 1) // block_length
    x = torch.full((1, nb * block_length), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    return x, P, nb


def ref_llada2(model, prompt, gen_length, block_length, steps, threshold, eos_early_stop=False):
    """LLaDA2.0's generate (greedy). Returns (generated ids up to and including the first eos, forwards)."""
    EOS = model.config.eos_id
    mask_id = model.config.mask_id
    steps = min(steps, gen_length)                                # minimal_topk = 1
    x, P, nb = _window(prompt, gen_length, block_length, mask_id)
    sched = _schedule(block_length, steps)
    fwd = 0
    for b in range(P // block_length, nb):
        end = (b + 1) * block_length
        cur = x[:, :end]
        for step in range(steps):
            active = cur[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = _forward_logits(model, cur, block_length)
            fwd += 1
            x0, p = _greedy(logits[:, -block_length:])
            n = int(sched[step])
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            conf = torch.where(active, p, -torch.inf)
            high = conf[0] > threshold
            if int(high.sum()) >= n:
                transfer[0] = high
            else:
                transfer[0, torch.topk(conf[0], k=min(n, int(active.sum()))).indices] = True
            cur[:, -block_length:][transfer] = x0[transfer]
            if eos_early_stop and (x0[transfer] == EOS).any():
                e = (cur[0] == EOS).nonzero()
                if len(e) and (cur[0, P:int(e[0])] != mask_id).all():
                    return x[0, P:int(e[0]) + 1].tolist(), fwd
        x[:, :end] = cur
        if (x[0, P:end] == EOS).any():
            break
    out = x[0, P:P + gen_length]
    e = (out == EOS).nonzero()
    return out[: int(e[0]) + 1 if len(e) else gen_length].tolist(), fwd


def ref_sdar(model, prompt, gen_length, block_length, steps, threshold):
    """JetAstra/SDAR block_diffusion_generate with its KV cache flow (prefill, denoise reading the cache, one
    extra forward storing the finished block); low_confidence_dynamic, or _static with threshold None.
    Returns (generated ids cut before the first stop id, forwards)."""
    EOS = model.config.eos_id
    mask_id = model.config.mask_id
    x, P, nb = _window(prompt, gen_length, block_length, mask_id)
    T = x.shape[1]
    cache = KVCache.empty(model.config, 1, T, torch.float32, "cpu")
    ones = torch.ones(1, T, dtype=torch.bool)
    pos = torch.arange(T)[None]
    fwd = 0

    def run(ids, s):
        q = pos[:, s:s + ids.shape[1]]
        with torch.no_grad():
            return model(ids, q, block_key_mask(ones, q, block_length), cache=cache, start=s)

    pre = P // block_length * block_length
    if pre:
        run(x[:, :pre], 0)
        fwd += 1
    sched = _schedule(block_length, steps)
    for b in range(P // block_length, nb):
        s, e = b * block_length, (b + 1) * block_length
        cur = x[:, s:e].clone()
        for step in range(steps + 1):
            mask_index = cur == mask_id
            if mask_index.sum() == 0 or step == steps:              # (masks left after every step: committed
                # mask-id predictions; the reference would
                run(cur, s)
                fwd += 1                                             # index past its schedule; dlc moves on)
                break
            with torch.no_grad():
                logits = model.logits(run(cur, s)).float()
            fwd += 1
            x0, p = _greedy(logits)
            conf = torch.where(mask_index, p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            n = int(sched[step])
            high = conf[0] > threshold if threshold is not None else torch.zeros_like(conf[0],
                                                                                      dtype=torch.bool)
            if threshold is not None and int(high.sum()) >= n:
                transfer[0] = high
            else:
                transfer[0, torch.topk(conf[0], n).indices] = True
            cur[transfer] = x0[transfer]
        x[:, s:e] = cur
        if (x[0, P:] == EOS).any():
            break
    out = x[0, P:P + gen_length].tolist()
    return (out[:out.index(EOS)] if EOS in out else out), fwd


def ref_llada21(model, prompt, gen_length, block_length, threshold, edit_threshold, max_post,
                tokens_per_step=1):
    """SGLang's JointThreshold in LLaDA2's block loop (no cache: a forward over the window each step)."""
    EOS = model.config.eos_id
    mask_id = model.config.mask_id
    x, P, nb = _window(prompt, gen_length, block_length, mask_id)
    fwd = 0
    for b in range(P // block_length, nb):
        s, e = b * block_length, (b + 1) * block_length
        prompt_mask = torch.arange(s, e) < P
        post = 0
        for _ in range(block_length + max_post + 1):
            logits = _forward_logits(model, x[:, :e], block_length)
            fwd += 1
            x0, p = _greedy(logits[0, s:e])
            blk = x[0, s:e]
            mask_index = blk == mask_id
            m2t = torch.zeros_like(mask_index)
            if mask_index.any():
                conf = torch.where(mask_index, p, -torch.inf)
                m2t = conf > threshold
                if int(m2t.sum()) < tokens_per_step:
                    m2t[torch.topk(conf, k=min(tokens_per_step, int(mask_index.sum()))).indices] = True
            else:
                post += 1
                if post > max_post:
                    break
            edit = ~mask_index & ~prompt_mask & (p > edit_threshold) & (blk != x0)
            t = m2t | edit
            if not t.any():
                break
            blk[t] = x0[t]
        if (x[0, P:e] == EOS).any():
            break
    out = x[0, P:P + gen_length].tolist()
    return (out[:out.index(EOS)] if EOS in out else out), fwd


def _cut(ids, eos):
    return ids[:ids.index(eos)] if eos in ids else ids


# ------------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kv,threshold,block,steps", [("none", None, 4, 4), ("block", None, 8, 3),
                                                     ("none", 0.15, 8, 3), ("block", 0.15, 4, 4)])
def test_llada2_matches_reference(model, kv, threshold, block, steps):
    prompts = _prompts(5, seed=block + steps)
    cfg = GenerationConfig(gen_length=13, block_length=block, steps_per_block=steps, threshold=threshold,
                           kv_cache=kv, decoder="llada2")
    res = generate(model, prompts, cfg)
    outs, multi = [], 0
    for i, p in enumerate(prompts):
        ref, fwd = ref_llada2(model, p, 13, block, steps, 1.0 if threshold is None else threshold)
        assert res.token_ids[i] == _cut(ref, model.config.eos_id), (i, kv)
        assert res.steps_per_row[i] == fwd                      # no extra forward for the block cache
        outs.append(tuple(res.token_ids[i]))
    assert len(set(outs)) > 1                                   # decisive: outputs vary with the prompt
    if threshold is not None:
        multi = sum(len(t) for t in res.token_ids) / max(1, sum(res.steps_per_row))
        assert multi > 0                                        # tokens per forward reported


def test_threshold_commits_several_tokens_per_step(model):
    """The threshold rule is exercised: a low threshold decodes in fewer forwards than the static schedule."""
    prompts = _prompts(4, seed=3)
    base = dict(gen_length=16, block_length=8, steps_per_block=8, kv_cache="block")
    slow = generate(model, prompts, GenerationConfig(**base))
    fast = generate(model, prompts, GenerationConfig(**base, threshold=0.05))
    assert sum(fast.steps_per_row) < sum(slow.steps_per_row)
    for i, p in enumerate(prompts):
        assert fast.token_ids[i] == _cut(ref_llada2(model, p, 16, 8, 8, 0.05)[0], model.config.eos_id)


def test_eos_early_stop_matches_reference(model):
    prompts = _prompts(6, seed=11)
    cfg = GenerationConfig(gen_length=24, block_length=8, steps_per_block=8, threshold=0.2, kv_cache="block",
                           eos_early_stop=True)
    res = generate(model, prompts, cfg)
    stopped = 0
    for i, p in enumerate(prompts):
        ref, fwd = ref_llada2(model, p, 24, 8, 8, 0.2, eos_early_stop=True)
        assert res.token_ids[i] == _cut(ref, model.config.eos_id)
        assert res.steps_per_row[i] == fwd
        stopped += model.config.eos_id in ref
    assert stopped >= 1                                         # the early stop happened


def test_sdar_reference_with_its_extra_store_forward(model):
    """SDAR's loop (with its extra KV-store forward per block) vs dlc's exact cache (no extra forward)."""
    prompts = _prompts(5, seed=7)
    for thr in (None, 0.2):
        res = generate(model, prompts, GenerationConfig(gen_length=14, block_length=4, steps_per_block=4,
                                                        threshold=thr, kv_cache="block"))
        for i, p in enumerate(prompts):
            ref, fwd = ref_sdar(model, p, 14, 4, 4, thr)
            assert res.token_ids[i] == ref, (i, thr)
            blocks = -(-(len(p) + 14) // 4) - len(p) // 4
            assert res.steps_per_row[i] < fwd <= res.steps_per_row[i] + blocks + 1


@pytest.mark.parametrize("kv,thr,edit,post", [("block", 0.3, 0.2, 4), ("none", 0.1, 0.0, 2),
                                              ("block", 0.5, 1.0, 0)])
def test_llada21_editing_matches_reference(model, kv, thr, edit, post):
    prompts = _prompts(4, seed=5)
    cfg = GenerationConfig(gen_length=12, block_length=4, decoder="llada2.1", threshold=thr,
                           edit_threshold=edit, max_post_edit_steps=post, kv_cache=kv)
    res = generate(model, prompts, cfg)
    for i, p in enumerate(prompts):
        ref, fwd = ref_llada21(model, p, 12, 4, thr, edit, post)
        assert res.token_ids[i] == ref, (i, kv)
        assert res.steps_per_row[i] == fwd


def test_llada21_edits_change_tokens(model):
    """Editing is exercised: with edits on, some output differs from the same decoding without edits."""
    prompts = _prompts(6, seed=9)
    base = dict(gen_length=12, block_length=4, decoder="llada2.1", threshold=0.3, kv_cache="block")
    on = generate(model, prompts, GenerationConfig(**base, edit_threshold=0.0, max_post_edit_steps=4))
    off = generate(model, prompts, GenerationConfig(**base, edit_threshold=1.0, max_post_edit_steps=0))
    assert on.token_ids != off.token_ids


def test_block_alignment_prompt_tail_shares_the_first_block(model):
    """Blocks start at absolute multiples of block_length: a 6-token prompt with block 4 decodes columns 6, 7
    in the first block (with prompt columns 4, 5), and the canvas is rounded up past gen_length."""
    st = DecodeState.new([1, 2, 3, 4, 5, 6],
                         GenerationConfig(gen_length=5, block_length=4, steps_per_block=2), model.config)
    assert st.L == 12 and st.attn_block == 4
    st.advance(4)
    assert (st.bs, st.be) == (4, 8)
    assert st.sched.tolist() == [2, 2]                          # whole-block schedule, not rescaled


def test_logprobs_over_a_canvas_rounded_past_gen_length(model):
    """Block decoders with logprobs where the canvas overhangs gen_length (prompts of 5 and 7 tokens, block 4,
    gen 10: canvases of 16 and 20 columns): the same tokens as without logprobs, and every generated token
    has the logprob of the step that unmasked it, equal to its own top-1 alternative at T = 0. (The overhang's
    columns, decoded and dropped, used to raise IndexError.)"""
    from dlc.runtime.runners.eager import EagerRunner
    runner = EagerRunner(model)
    prompts = [[5, 9, 14, 3, 8], [7, 1, 2, 60, 33, 21, 4]]
    cfg = GenerationConfig(gen_length=10, block_length=4, steps_per_block=2)
    plain = generate(runner, prompts, cfg)
    got = generate(runner, prompts, dataclasses.replace(cfg, logprobs=2))
    assert got.token_ids == plain.token_ids
    for toks, rec in zip(got.token_ids, got.logprobs):
        assert len(rec) == 10 and toks
        for t, (lp, ids, lps) in zip(toks, rec):
            assert lp <= 0 and ids[0] == t and abs(lp - lps[0]) < 1e-6


def test_block_cache_restart_equals_uninterrupted(model):
    """Preemption rewinds the block and forgets the slot's K/V (kv_upto 0): same output."""
    from dlc.runtime.kv_cache import KVCacheManager
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.step import make_batch, run_batch
    runner = EagerRunner(model)
    cfg = GenerationConfig(gen_length=12, block_length=4, steps_per_block=4, kv_cache="block")
    prompt = _prompts(1, seed=2)[0]
    want = generate(model, [prompt], cfg).token_ids[0]
    pool = KVCacheManager(model.config, 64, 1 << 30, torch.float32, "cpu", max_slots=2)
    st, slot = DecodeState.new(prompt, cfg, model.config), pool.allocate_n(1)
    out, n = st.advance(4), 0
    while st.phase is not None:
        res = run_batch(runner, make_batch(runner, [st], [slot], pool))           # a StepOutput
        st.apply(res.x0[0], res.conf[0])
        n += 1
        if n == 5:                                              # mid-second block: cache lost
            pool.k[0].normal_()
            st.restart_block()
        out += st.advance(4)
    assert out == want


def test_engine_mixed_block_requests_match_generate(model):
    """llada2 / llada2.1, thresholds, caches, early stop and prompt lengths in one engine batch."""
    from dlc.runtime.session import Session
    from dlc.runtime.runners.eager import EagerRunner
    session = Session(EagerRunner(model), None, model.config, False, "test")
    eng = Engine(session, ServeConfig(max_seq_len=96, kv_cache_mb=8, max_num_tokens=400))
    assert eng.gen_defaults["kv_cache"] == "block" and eng.gen_defaults["decoder"] == "llada2"
    specs = []
    for i, p in enumerate(_prompts(8, seed=21)):
        params = dict(gen_length=(10, 16)[i % 2], block_length=(4, 8)[i % 2] if i % 3 else 4,
                      kv_cache=("block", "none")[i % 4 == 3], threshold=(None, 0.2, 0.1)[i % 3])
        params["steps_per_block"] = params["block_length"]
        if i % 4 == 1:
            params.update(decoder="llada2.1", threshold=0.3, edit_threshold=0.2, steps_per_block=None)
        if i % 5 == 2:
            params["eos_early_stop"] = True
        specs.append((p, params))
    reqs = [eng.make_request(p, params) for p, params in specs]
    for r in reqs:
        eng.add_request(r)
    eng.run_until_done()
    for r, (p, params) in zip(reqs, specs):
        want = generate(model, [p], GenerationConfig(**params, stop_at_eos=True)).token_ids[0]
        assert r.output_ids == want, params
    assert eng.kv.num_used == 0


def test_bad_block_configs_name_the_field(model):
    cases = [(dict(decoder="llada2", kv_cache="dual"), "kv_cache"),
             (dict(decoder="llada2", steps_per_block=0, block_length=32), "steps_per_block"),
             (dict(decoder="llada2", cfg_scale=1.0), "cfg_scale"),
             (dict(decoder="llada2", edit_threshold=0.5), "edit_threshold"),
             (dict(decoder="llada3"), "decoder"),
             (dict(kv_cache="block", gen_length=16, block_length=8, steps=16, decoder="llada"), "kv_cache")]
    for kw, field in cases:
        with pytest.raises(FieldError) as e:
            GenerationConfig(**kw)
        assert e.value.field == field, kw
    with pytest.raises(FieldError) as e:                         # a full-attention decoder on a block model
        DecodeState.new([1, 2], GenerationConfig(gen_length=8, block_length=4, steps=8, decoder="llada"),
                        model.config)
    assert e.value.field == "decoder"


def test_block_decoders_report_the_tempered_probability(model):
    """At T > 0 LLaDA2 / SDAR take the probability under softmax(logits / T) as confidence (their sampler's
    ``token_prob``); LLaDA's decoders keep the untempered one. The sampled tokens are the same draw."""
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.step import build_batch, run_batch
    runner = EagerRunner(model)
    x = torch.tensor(_prompts(1, seed=4)[0] + [model.config.mask_id] * 8)
    P, T = len(x) - 8, 0.7
    bs = P // 4 * 4
    out = {}
    for tempered in (False, True):
        b = build_batch(runner, "full", [x], [P], [bs], 4, temperature=T, seeds=[123], block_size=4,
                        tempered_conf=tempered)
        res = run_batch(runner, b)
        out[tempered] = (res.x0, res.conf)
    assert torch.equal(out[False][0], out[True][0])
    logits = _forward_logits(model, x[None], 4)[0, bs:bs + 4].double()
    tok = out[True][0][0]
    want = torch.softmax(logits / T, -1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(out[True][1][0], want, rtol=1e-4, atol=1e-6)
    plain = torch.softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    torch.testing.assert_close(out[False][1][0], plain, rtol=1e-4, atol=1e-6)
    assert (want - plain).abs().max() > 1e-3


# ------------------------------------------------------------------ sampling filters with block decoders
def test_filtered_tempered_confidence_of_block_decoders(model):
    """LLaDA2's / SDAR's top-k / top-p samplers: the token is drawn from softmax(filtered(logits / T)) and its
    confidence is its probability there (renormalised over the survivors). The eager runner scales the rows by
    1 / T and decodes the filters with ``filtered_conf``; checked against that formula on the head's
    logits."""
    from dlc.kernels.sampling import filter_mask
    from dlc.runtime.runners.eager import EagerRunner
    from dlc.runtime.step import build_batch
    runner, T = EagerRunner(model), 0.7
    x = torch.tensor(_prompts(1, seed=5)[0] + [model.config.mask_id] * 8)
    P = x.shape[0] - 8
    batch = build_batch(runner, "full", [x], [P], [P], 8, temperature=T, seeds=[123], tempered_conf=True,
                        block_size=8)
    batch.top_k = torch.tensor([4])
    batch.top_p = torch.tensor([0.9], dtype=torch.float64)
    batch.min_p = torch.tensor([0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(1, 8, model.config.d_model, generator=g) * 3                    # [1, N, d]
    out = runner.decode(rows, batch)
    l = (rows.double() @ model.head_weight().double().T)[..., :model.config.vocab_size]   # [1, N, V]
    keep = filter_mask(l / T, batch.top_k, batch.top_p, batch.min_p)
    assert bool(keep.gather(-1, out.x0[..., None]).all())                              # a survivor drawn
    kept = torch.where(keep, l / T, torch.full_like(l, float("-inf")))
    want = torch.softmax(kept, -1).gather(-1, out.x0[..., None])[..., 0]
    torch.testing.assert_close(out.conf, want, rtol=1e-4, atol=1e-7)        # fp32 logits vs a float64 oracle
    unfiltered = torch.softmax(l / T, -1).gather(-1, out.x0[..., None])[..., 0]
    assert not torch.allclose(out.conf, unfiltered)                                    # the filters count


def test_block_decoders_sample_with_filters(model):
    """Seeded T > 0 with top-k / top-p on a block decoder: reproducible, and the filters change the output."""
    prompts = _prompts(2, seed=7)
    base = dict(gen_length=16, block_length=8, temperature=0.9, seed=11, kv_cache="block")
    a = generate(model, prompts, GenerationConfig(**base, top_k=3, top_p=0.8)).token_ids
    b = generate(model, prompts, GenerationConfig(**base, top_k=3, top_p=0.8)).token_ids
    c = generate(model, prompts, GenerationConfig(**base)).token_ids
    assert a == b and a != c and any(a)


def ref_llada2_parallel(model, prompt, gen_length, block_length, select):
    """LLaDA2.0's block loop (greedy, no cache) with another rule's selection: ``select(p [K], entropy [K],
    candidates [K]) -> [K] bool``, applied until the block has no mask (the field's parallel decoders fix no
    step count). Returns (generated ids up to and including the first eos, forwards)."""
    EOS, mask_id = model.config.eos_id, model.config.mask_id
    x, P, nb = _window(prompt, gen_length, block_length, mask_id)
    fwd = 0
    for b in range(P // block_length, nb):
        end = (b + 1) * block_length
        cur = x[:, :end]
        while bool((cur[0, -block_length:] == mask_id).any()):
            logits = _forward_logits(model, cur, block_length)[0, -block_length:].double()
            fwd += 1
            x0, p = _greedy(logits)
            logp = torch.log_softmax(logits, -1)
            ent = -(logp.exp() * logp).sum(-1)                             # [K]
            cand = (cur[0, -block_length:] == mask_id) & (x0 != mask_id)
            assert cand.any()
            sel = select(p, ent, cand) & cand
            cur[0, -block_length:][sel] = x0[sel]
        x[:, :end] = cur
        if (x[0, P:end] == EOS).any():
            break
    out = x[0, P:P + gen_length]
    e = (out == EOS).nonzero()
    return out[: int(e[0]) + 1 if len(e) else gen_length].tolist(), fwd


def _eb_select(gamma):
    """EB-sampler: ascending entropy, the largest prefix with sum - max <= gamma, at least one."""
    def select(p, ent, cand):
        idx = [int(i) for i in cand.nonzero()[:, 0]]
        idx.sort(key=lambda i: float(ent[i]))
        take, total = [], 0.0
        for i in idx:
            if take and total > gamma:            # sum - max of the prefix with i (i: its max)
                break
            total += float(ent[i])
            take.append(i)
        sel = torch.zeros_like(cand)
        sel[take] = True
        return sel
    return select


def _hier_select(low, high):
    """dInfer's hierarchical decoding: per contiguous run of candidates its best above ``low``, every
    candidate above ``high``, the block's best."""
    def select(p, ent, cand):
        sel = cand & (p > high)
        j = 0
        while j < len(cand):
            if cand[j]:
                k = j
                while k < len(cand) and cand[k]:
                    k += 1
                best = j + int(p[j:k].argmax())
                sel[best] |= bool(p[best] > low)
                j = k
            else:
                j += 1
        best = int(torch.where(cand, p, torch.full_like(p, -1.0)).argmax())
        sel[best] = True
        return sel
    return select


@pytest.mark.parametrize("kv", ["none", "block"])
def test_parallel_decoders_run_over_llada2_blocks(model, kv):
    """entropy_bound and low_threshold (hierarchical) decode LLaDA2's blocks with their own selection (dInfer
    runs its parallel decoders on LLaDA2), token for token as a transcription of the rule inside LLaDA2's
    block loop, and in fewer forwards than one token per step."""
    prompts = _prompts(5, seed=21)
    base = dict(gen_length=16, block_length=8, kv_cache=kv, decoder="llada2")
    one = generate(model, prompts, GenerationConfig(**base, steps_per_block=8))
    for fields, select in [(dict(entropy_bound=2.0), _eb_select(2.0)),
                           (dict(low_threshold=0.05, threshold=0.5), _hier_select(0.05, 0.5))]:
        res = generate(model, prompts, GenerationConfig(**base, **fields))
        outs = []
        for i, p in enumerate(prompts):
            ref, fwd = ref_llada2_parallel(model, p, 16, 8, select)
            assert res.token_ids[i] == _cut(ref, model.config.eos_id), (fields, i)
            assert res.steps_per_row[i] == fwd, (fields, i)
            outs.append(tuple(res.token_ids[i]))
        assert len(set(outs)) > 1                                    # decisive: outputs vary with the prompt
        assert sum(res.steps_per_row) < sum(one.steps_per_row), fields


def test_token_editing_refuses_the_parallel_decoders():
    for name, value in (("entropy_bound", 1.0), ("low_threshold", 0.3)):
        with pytest.raises(FieldError) as e:
            GenerationConfig(gen_length=8, block_length=4, decoder="llada2.1", **{name: value}).rule()
        assert e.value.field == name


def test_block_decoders_validate_the_rule_fields():
    for kw, field in [(dict(entropy_bound=-1.0), "entropy_bound"), (dict(low_threshold=1.5), "low_threshold"),
                      (dict(credit="yes"), "credit")]:
        with pytest.raises(FieldError) as e:
            GenerationConfig(gen_length=8, block_length=4, decoder="llada2", **kw)
        assert e.value.field == field, kw
