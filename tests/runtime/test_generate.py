"""The decoding loop against a plain transcription of LLaDA's reference generate.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlc.models.loading import load_model
from dlc.runtime.generate import GenerationConfig, generate
from dlc.runtime.kv_cache import KVCacheManager
from dlc.runtime.step import build_batch

PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny-llada", seed=1).model


def reference_generate(model, prompt, steps, gen_length, block_length, cfg_scale=0.0, mask_id=257):
    """LLaDA generate.py transcribed step by step, for one prompt (batch 1, no padding)
    -> [1, P + gen_length]."""
    P = len(prompt)
    x = torch.tensor([prompt + [mask_id] * gen_length])
    pos, key_mask = torch.arange(x.shape[1])[None], torch.ones_like(x, dtype=torch.bool)
    prompt_index = (x != mask_id) & key_mask
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for nb in range(num_blocks):
        block_mask_index = x[:, P + nb * block_length:P + (nb + 1) * block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, rem = mask_num // steps, mask_num % steps
        ntt = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
        for i in range(mask_num.size(0)):
            ntt[i, :rem[i]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits = model.full_logits(torch.cat([x, un_x]), torch.cat([pos, pos]),
                                           torch.cat([key_mask] * 2))
                logits, un_logits = torch.chunk(logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model.full_logits(x, pos, key_mask)
            x0 = torch.argmax(logits.to(torch.float64).exp(), dim=-1)
            p = F.softmax(logits.to(torch.float64), dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, P + (nb + 1) * block_length:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, sel = torch.topk(confidence[j], k=int(ntt[j, i]))
                transfer[j, sel] = True
            x[transfer] = x0[transfer]
    return x


@pytest.mark.parametrize("gen_length,block_length,steps", [(16, 8, 8), (16, 4, 8), (12, 12, 5), (8, 8, 8)])
@pytest.mark.parametrize("batch", [1, 3])
def test_no_cache_matches_reference(model, gen_length, block_length, steps, batch):
    prompts = PROMPTS[:batch]
    cfg = GenerationConfig(gen_length=gen_length, block_length=block_length, steps=steps)
    ours = generate(model, prompts, cfg)
    for p, seq, toks in zip(prompts, ours.sequences, ours.token_ids):
        ref = reference_generate(model, p, steps, gen_length, block_length)[0]
        assert torch.equal(seq, ref) and ref[len(p):].tolist() == toks
    assert len({t for toks in ours.token_ids for t in toks}) > 3        # a decisive model: outputs vary


def test_cfg_matches_reference(model):
    cfg = GenerationConfig(gen_length=8, block_length=4, steps=4, cfg_scale=1.5)
    ours = generate(model, PROMPTS, cfg)
    for p, seq in zip(PROMPTS, ours.sequences):
        assert torch.equal(seq, reference_generate(model, p, 4, 8, 4, cfg_scale=1.5)[0])
    plain = generate(model, PROMPTS, GenerationConfig(gen_length=8, block_length=4, steps=4))
    assert plain.token_ids != ours.token_ids                            # guidance changes the output


def test_batch_equals_single(model):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16)
    batched = generate(model, PROMPTS, cfg).token_ids
    single = [generate(model, [p], cfg).token_ids[0] for p in PROMPTS]
    assert batched == single


@pytest.mark.parametrize("kv", ["prefix", "dual"])
def test_cache_with_refresh_every_step_equals_no_cache(model, kv):
    base = generate(model, PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16))
    forced = generate(model, PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache=kv,
                                                       refresh_every=1))
    assert forced.token_ids == base.token_ids
    assert forced.nfe == base.nfe


@pytest.mark.parametrize("kv", ["prefix", "dual"])
def test_cache_modes_refresh_once_per_block(model, kv):
    calls = {"refresh": 0, "reuse": 0, "full": 0}
    from dlc.runtime.runners.eager import EagerRunner

    class Counting(EagerRunner):
        def full(self, *a, **k):
            calls["full"] += 1
            return super().full(*a, **k)

        def refresh(self, *a, **k):
            calls["refresh"] += 1
            return super().refresh(*a, **k)

        def reuse(self, *a, **k):
            calls["reuse"] += 1
            return super().reuse(*a, **k)

    res = generate(Counting(model), PROMPTS,
                   GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache=kv))
    assert calls == {"refresh": 2, "reuse": 14, "full": 0}
    assert res.nfe == 16
    assert all(len(t) == 16 for t in res.token_ids)
    assert all(257 not in t for t in res.token_ids)


def test_reuse_rows_match_full_forward_when_cache_is_fresh(model):
    """A Reuse step over a cache made from the same token state decodes exactly what a full forward does."""
    from dlc.runtime.runners.eager import EagerRunner

    r = EagerRunner(model)
    states = [torch.tensor(p + [257] * 16) for p in PROMPTS]
    for x, p in zip(states, PROMPTS):
        x[len(p):len(p) + 3] = 65
    P = [len(p) for p in PROMPTS]
    a = [n + 8 for n in P]
    pool = KVCacheManager(r.config, max(len(x) for x in states), 1 << 40, torch.float32, "cpu", max_slots=3)
    slots = [(0,), (1,), (2,)]
    xf, cf = r.full(build_batch(r, "full", states, P, a, 8))
    r.refresh(build_batch(r, "refresh", states, P, P, 8, slots=slots, pool=pool))
    for spans in ([(n, n + 8) for n in a], [(n, len(x)) for n, x in zip(a, states)]):
        xr, cr = r.reuse(build_batch(r, "reuse", states, P, a, 8, spans, slots, pool))
        assert torch.equal(xr, xf)
        torch.testing.assert_close(cr, cf, rtol=1e-5, atol=1e-6)


def test_threshold_decodes_more_than_one_token_per_step_when_confident(model):
    cfg = GenerationConfig(gen_length=16, block_length=8, steps=16, threshold=1e-9)
    res = generate(model, PROMPTS[:1], cfg)
    assert res.nfe == 2                 # every masked position clears the threshold: one step per block
    assert 257 not in res.token_ids[0]


def test_threshold_one_falls_back_to_one_token_per_step(model):
    res = generate(model, PROMPTS[:1], GenerationConfig(gen_length=8, block_length=8, steps=8, threshold=1.0))
    assert res.nfe == 8


def test_temperature_sampling_is_seeded(model):
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8, temperature=1.0, remasking="random", seed=3)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    c = generate(model, PROMPTS, GenerationConfig(gen_length=8, block_length=8, steps=8, temperature=1.0,
                                                  remasking="random", seed=4))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_stop_at_eos_finishes_rows_and_cuts(model):
    eos = model.config.eos_id

    class EosRunner:
        """Predicts EOS everywhere with certainty: every row ends after its first block."""
        config, device, dtype, sparse_retention = model.config, torch.device("cpu"), torch.float32, None
        max_seq_len, max_batch_size = 1024, None

        def full(self, b):
            return torch.full((b.n_seqs, b.n_out), eos), torch.ones(b.n_seqs, b.n_out, dtype=torch.float64)

        refresh = reuse = full

    res = generate(EosRunner(), PROMPTS,
                   GenerationConfig(gen_length=16, block_length=8, steps=16, stop_at_eos=True))
    assert res.token_ids == [[], [], []]
    assert res.nfe == 8                       # second block never ran
    assert all((seq[-16:] == eos).all() for seq in res.sequences)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, block_length=4), "multiple of block_length"),
    (dict(gen_length=16, block_length=8, steps=3), "multiple of the number of blocks"),
    (dict(temperature=-1), "temperature"),
    (dict(kv_cache="paged"), "kv_cache"),
    (dict(remasking="entropy"), "remasking"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=0.9, factor=1.0), "either threshold or factor"),
    (dict(gen_length=16, block_length=8, steps=10 ** 30), r"steps must be in \[1, 16\]"),
    (dict(gen_length=16, block_length=8, steps=32), r"steps must be in \[1, 16\]"),
    (dict(seed=2 ** 64), r"seed must be in \[0, 9223372036854775807\]"),
    (dict(seed=-1), "seed must be in"),
    (dict(steps=True), "steps must be an integer"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(block_length=64, gen_length=32, steps=32), r"block_length must be in \[1, 32\]"),
])
def test_bad_generation_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_prompt_errors(model):
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=8)
    with pytest.raises(ValueError, match="mask token"):
        generate(model, [[1, 257]], cfg)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], cfg)
    with pytest.raises(ValueError, match="maximum sequence length"):
        generate(model, [[1] * 1020], cfg)


class _MaskPredictingRunner:
    """Predicts the mask id with certainty at even positions of the block, token 65 (conf 0.5) elsewhere."""

    dtype, sparse_retention, max_seq_len, max_batch_size = torch.float32, None, 1024, None

    def __init__(self, config):
        self.config, self.device = config, torch.device("cpu")

    def full(self, b):
        x0 = torch.full((b.n_seqs, b.n_out), 65)
        x0[:, ::2] = self.config.mask_id
        conf = torch.where(x0 == self.config.mask_id, 1.0, 0.5).to(torch.float64)
        return x0, conf

    refresh = reuse = full


@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(factor=1.0)])
def test_threshold_rules_never_accept_the_mask_id_and_end_a_stuck_block(model, rule):
    res = generate(_MaskPredictingRunner(model.config), PROMPTS[:2],
                   GenerationConfig(gen_length=8, block_length=4, steps=8, **rule))
    # odd positions decoded, even ones left masked once only the mask id is predicted
    for t in res.token_ids:
        assert t[1::2] == [65] * 4 and t[::2] == [257] * 4
    assert res.nfe <= 2 * 3     # per block: at most one step per decodable position, then one stuck step
