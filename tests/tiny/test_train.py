"""dlc.tiny.train: batch layout, the masked-diffusion loss, and a tiny end-to-end run in the HF layout."""
import json

import pytest
import torch
import torch.nn.functional as F

from dlc.models import build_model
from dlc.models.loading import init_weights, load_model
from dlc.models.presets import PRESETS
from dlc.tiny import tasks
from dlc.tiny.tokenizer import EOS_ID, MASK_ID, encode_chat, encode_text
from dlc.tiny.train import diffusion_loss, make_batch, tiny_config, train

SMALL = dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)
PAIRS = [("47+38", "85"), ("sort 73914", "13479"), ("rev abc", "cba")]


def test_make_batch_left_pads_like_the_decoding_loop():
    ids, pos, key_mask, resp = make_batch(PAIRS, 8)                          # [B, L]
    P = max(len(encode_chat(p)) for p, _ in PAIRS)
    assert ids.shape == (3, P + 8)
    for i, (p, a) in enumerate(PAIRS):
        prompt = encode_chat(p)
        assert ids[i, P - len(prompt):P].tolist() == prompt
        assert ids[i, P:].tolist() == encode_text(a) + [EOS_ID] * (8 - len(a))    # answer, then EOS to the end
        assert key_mask[i].tolist() == [False] * (P - len(prompt)) + [True] * (len(prompt) + 8)
        assert pos[i, P - len(prompt):].tolist() == list(range(len(prompt) + 8))
    assert resp[:, P:].all() and not resp[:, :P].any()


class Recorder(torch.nn.Module):
    """Wraps a model and keeps the noisy input it was fed."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, pos, key_mask):
        self.seen = ids.clone()
        return self.model(ids, pos, key_mask)

    def logits(self, h):
        return self.model.logits(h)


def test_loss_masks_only_the_response_and_weights_by_one_over_t():
    torch.manual_seed(0)
    model = build_model(tiny_config(**SMALL))
    init_weights(model, 0)
    batch = make_batch(tasks.sample("train", 16, 0), 8)
    ids, pos, key_mask, resp = batch
    rec = Recorder(model)
    loss = diffusion_loss(rec, *batch, torch.Generator().manual_seed(5))
    masked = rec.seen == MASK_ID
    assert not (masked & ~resp).any(), "a prompt position was masked"
    assert masked.any() and (rec.seen[~masked] == ids[~masked]).all()
    # Recompute the estimator by hand from the same draws: t_i = (u + i/B) mod 1, mask ~ Bernoulli(t_i).
    g = torch.Generator().manual_seed(5)
    u = torch.rand(1, generator=g)
    t = ((u + torch.arange(16) / 16) % 1.0).clamp(min=1e-3)
    assert torch.equal(masked, (torch.rand(ids.shape, generator=g) < t[:, None]) & resp)
    logits = model.full_logits(rec.seen, pos, key_mask)                        # [B, L, V]
    ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")       # [B, L]
    want = (ce * masked / t[:, None]).sum() / resp.sum()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_tiny_run_is_seeded_and_saves_a_loadable_checkpoint(tmp_path):
    kw = dict(steps=3, batch=8, eval_every=0, eval_n=4, log=lambda s: None, **SMALL)
    a = train(str(tmp_path / "a"), seed=7, **kw)
    b = train(str(tmp_path / "b"), seed=7, **kw)
    lm = load_model(str(a), progress=False)
    assert lm.chat and lm.tokenizer.chat_template and lm.config.family == "llada"
    sa, sb = lm.model.state_dict(), load_model(str(b), progress=False).model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert json.loads((a / "generation_config.json").read_text())["gen_length"] == 8
    with pytest.raises(ValueError, match="steps must be > 0"):
        train(str(tmp_path / "c"), steps=0)


def test_bundled_checkpoint_layout():
    from pathlib import Path

    path = Path(PRESETS["dlc-tiny"]["path"])
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size <= 20 * 2**20
    hf = json.loads((path / "config.json").read_text())
    assert hf["model_type"] == "llada" and hf["architectures"] == ["LLaDAModelLM"]
    assert {"d_model", "n_layers", "n_heads", "mlp_hidden_size", "mask_token_id", "eos_token_id"} <= set(hf)
    lm = load_model("dlc-tiny", progress=False)
    assert 1e6 < lm.config.num_parameters() < 5e6
    assert lm.config.num_parameters() == sum(p.numel() for p in lm.model.parameters())
