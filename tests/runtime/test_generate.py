"""The decoding loop against a plain transcription of LLaDA's reference generate.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlc.models.loading import load_model
from dlc.runtime.generate import GenerationConfig, generate, pad_prompts

PROMPTS = [[5, 17, 99, 3], [42, 8], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return load_model("tiny-llada", seed=1).model


def reference_generate(model, x, pos, key_mask, P, steps, gen_length, block_length, temperature=0.0,
                       cfg_scale=0.0, mask_id=257):
    """LLaDA generate.py transcribed step by step (left-padded batch; pads excluded by the key mask)."""
    x = x.clone()
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
                logits = model.full_logits(torch.cat([x, un_x]), torch.cat([pos, pos]), torch.cat([key_mask] * 2))
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
    x, pos, km, P = pad_prompts(prompts, gen_length, 257, 256, "cpu")
    ref = reference_generate(model, x, pos, km, P, steps, gen_length, block_length)
    assert torch.equal(ours.sequences, ref)
    assert [r[P:].tolist() for r in ref] == ours.token_ids


def test_cfg_matches_reference(model):
    cfg = GenerationConfig(gen_length=8, block_length=4, steps=4, cfg_scale=1.5)
    ours = generate(model, PROMPTS, cfg)
    x, pos, km, P = pad_prompts(PROMPTS, 8, 257, 256, "cpu")
    ref = reference_generate(model, x, pos, km, P, 4, 8, 4, cfg_scale=1.5)
    assert torch.equal(ours.sequences, ref)


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
    from dlc.runtime.model_runner import EagerRunner

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

    res = generate(Counting(model), PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16, kv_cache=kv))
    assert calls == {"refresh": 2, "reuse": 14, "full": 0}
    assert res.nfe == 16
    assert all(len(t) == 16 for t in res.token_ids)
    assert all(257 not in t for t in res.token_ids)


def test_reuse_rows_match_full_forward_when_cache_is_fresh(model):
    """A Reuse step over a cache made from the same token state decodes exactly what a full forward does."""
    from dlc.runtime.model_runner import EagerRunner
    from dlc.runtime.sampling import Sampling

    r = EagerRunner(model)
    x, pos, km, P = pad_prompts(PROMPTS, 16, 257, 256, "cpu")
    x[:, P:P + 3] = 65
    s = Sampling()
    xf, cf = r.full(x, pos, km, (P + 8, P + 16), s)
    _, _, cache = r.refresh(x, pos, km, (P, P + 8), s)
    for q in [(P + 8, P + 16), (P, x.shape[1])]:
        xr, cr = r.reuse(cache, x, pos, km, q, (P + 8, P + 16), s)
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
        config = model.config
        device = torch.device("cpu")

        def full(self, x, pos, km, out, s, pm=None):
            n = out[1] - out[0]
            return torch.full((x.shape[0], n), eos), torch.ones(x.shape[0], n, dtype=torch.float64)

        refresh = reuse = None

    res = generate(EosRunner(), PROMPTS, GenerationConfig(gen_length=16, block_length=8, steps=16, stop_at_eos=True))
    assert res.token_ids == [[], [], []]
    assert res.nfe == 8                       # second block never ran
    assert (res.sequences[:, -16:] == eos).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, block_length=4), "multiple of block_length"),
    (dict(gen_length=16, block_length=8, steps=3), "multiple of the number of blocks"),
    (dict(temperature=-1), "temperature"),
    (dict(kv_cache="paged"), "kv_cache"),
    (dict(remasking="entropy"), "remasking"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=0.9, factor=1.0), "either threshold or factor"),
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
    with pytest.raises(ValueError, match="max sequence"):
        generate(model, [[1] * 1020], cfg)


class _MaskPredictingRunner:
    """Predicts the mask id with certainty at even positions of the block, token 65 (conf 0.5) elsewhere."""

    def __init__(self, config):
        self.config, self.device = config, torch.device("cpu")

    def full(self, x, pos, km, out, s, pm=None):
        n = out[1] - out[0]
        x0 = torch.full((x.shape[0], n), 65)
        x0[:, ::2] = self.config.mask_id
        conf = torch.where(x0 == self.config.mask_id, 1.0, 0.5).to(torch.float64)
        return x0, conf

    refresh = reuse = None


@pytest.mark.parametrize("rule", [dict(threshold=0.9), dict(factor=1.0)])
def test_threshold_rules_never_accept_the_mask_id_and_end_a_stuck_block(model, rule):
    res = generate(_MaskPredictingRunner(model.config), PROMPTS[:2],
                   GenerationConfig(gen_length=8, block_length=4, steps=8, **rule))
    for t in res.token_ids:     # odd positions decoded, even ones left masked once only the mask id is predicted
        assert t[1::2] == [65] * 4 and t[::2] == [257] * 4
    assert res.nfe <= 2 * 3     # per block: at most one step per decodable position, then one stuck step
