"""dlc.tiny.train: batch layout, the masked-diffusion loss, and a tiny end-to-end run in the HF layout."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dlc.models import build_model
from dlc.models.common import attention_override
from dlc.models.loading import init_weights, load_model
from dlc.models.presets import PRESETS
from dlc.tiny import tasks
from dlc.tiny.tokenizer import EOS_ID, MASK_ID, encode_chat, encode_text
from dlc.models.sparse_heads import gather_heads, head_scores, keep_columns
from dlc.tiny import train as train_mod
from dlc.tiny.train import (diffusion_loss, make_batch, sparse_block, sparse_reuse_attention, tiny_config,
                            train)

ATOL = 1e-5
SMALL = dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden=64)
PAIRS = [("47+38", "85"), ("sort 73914", "13479"), ("rev abc", "cba")]


def test_make_batch_left_pads_like_the_decoding_loop():
    ids, pos, key_mask, resp = make_batch(PAIRS, 8)                          # [B, L]
    P = max(len(encode_chat(p)) for p, _ in PAIRS)
    assert ids.shape == (3, P + 8)
    for i, (p, a) in enumerate(PAIRS):
        prompt = encode_chat(p)
        assert ids[i, P - len(prompt):P].tolist() == prompt
        # answer, then EOS to the end
        assert ids[i, P:].tolist() == encode_text(a) + [EOS_ID] * (8 - len(a))
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


def _qkv_gqa(B=3, H=4, Hkv=2, L=14, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :3] = False                                                       # a left-padded row
    block = torch.tensor([8, 9, 10, 11]).expand(B, -1)                            # [B, T]
    return q, k, v, key_mask, block


@pytest.mark.parametrize("retention", [0.25, 0.5])
def test_sparse_training_attention_is_the_reuse_steps_attention(retention):
    """Block rows see what the compiled Reuse step attends to (the pass's score, keep_columns, gather_heads +
    SDPA); every other row attends densely."""
    q, k, v, key_mask, block = _qkv_gqa()
    group = q.shape[1] // k.shape[1]
    # as self_attention passes them
    ke, ve = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    attn_mask = key_mask[:, None, None, :]
    # [B, H, L, D]
    got = sparse_reuse_attention(block, retention, k.shape[1])(q, ke, ve, attn_mask=attn_mask)
    keep = keep_columns(head_scores(q, k, v, key_mask, block, group), block, retention)
    assert keep.shape[-1] == 4 + math.ceil(retention * 10) < 14
    ks, vs, mask = gather_heads(k, v, key_mask, keep, group)
    qb = q[:, :, 8:12]
    want_block = F.scaled_dot_product_attention(qb, ks, vs, attn_mask=mask)
    dense = F.scaled_dot_product_attention(q, ke, ve, attn_mask=attn_mask)
    torch.testing.assert_close(got[:, :, 8:12], want_block, atol=ATOL, rtol=0)
    assert (got[:, :, 8:12] - dense[:, :, 8:12]).abs().max() > 1e-3             # the block rows did change
    others = torch.tensor([i for i in range(14) if not 8 <= i < 12])
    torch.testing.assert_close(got[:, :, others], dense[:, :, others], atol=ATOL, rtol=0)


def test_sparse_training_attention_at_retention_one_is_dense():
    q, k, v, key_mask, block = _qkv_gqa(seed=1)
    ke, ve = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    attn_mask = key_mask[:, None, None, :]
    got = sparse_reuse_attention(block, 1.0, 2)(q, ke, ve, attn_mask=attn_mask)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, ke, ve, attn_mask=attn_mask), atol=ATOL,
                               rtol=0)


def test_attention_override_routes_the_model_and_restores():
    model = build_model(tiny_config(**SMALL))
    init_weights(model, 0)
    ids, pos, key_mask, resp = make_batch(PAIRS, 8)
    calls = []

    def spy(q, k, v, attn_mask=None):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with torch.no_grad():
        ref = model(ids, pos, key_mask)
        with attention_override(spy):
            got = model(ids, pos, key_mask)
        after = model(ids, pos, key_mask)
    assert len(calls) == SMALL["n_layers"] and torch.equal(got, ref)
    assert torch.equal(after, ref) and len(calls) == SMALL["n_layers"]


def test_sparse_block_is_one_decoded_block_of_the_response():
    _, _, _, resp = make_batch(PAIRS, 16)
    P = int((~resp[0]).sum())
    import random
    starts = {int(sparse_block(resp, random.Random(i))[0, 0]) for i in range(40)}
    assert starts == {P, P + 4, P + 8, P + 12}
    b = sparse_block(resp, random.Random(0))
    assert b.shape == (3, 4) and torch.equal(b[:, 1:] - b[:, :-1], torch.ones(3, 3, dtype=torch.long))


def test_sparse_aware_batches_train_through_the_sparse_attention(tmp_path, monkeypatch):
    seen = []
    real = train_mod.sparse_reuse_attention

    def counting(block, retention, n_kv):
        seen.append(retention)
        return real(block, retention, n_kv)
    monkeypatch.setattr(train_mod, "sparse_reuse_attention", counting)
    kw = dict(steps=4, batch=8, eval_every=0, eval_n=4, log=lambda s: None, **SMALL)
    train(str(tmp_path / "s"), seed=3, sparse_aware=1.0, **kw)
    assert len(seen) == 4 and all(train_mod.SPARSE_RETENTION[0] <= r <= train_mod.SPARSE_RETENTION[1]
                                  for r in seen)
    seen.clear()
    train(str(tmp_path / "d"), seed=3, sparse_aware=0.0, **kw)
    assert seen == []
    with pytest.raises(ValueError, match="sparse_aware must be in"):
        train(str(tmp_path / "e"), sparse_aware=1.5)
