"""bench/floors.py (the one home of the benches' step floors): byte and FLOP counts of Reuse, Refresh and the
end-to-end schedule for known configs, counted by hand here."""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from dlc.models.presets import preset_config

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def fl():
    spec = importlib.util.spec_from_file_location("floors_under_test", BENCH / "floors.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                                      # its dataclass resolves its module
    spec.loader.exec_module(mod)
    return mod


# tiny-llada: d 64, 2 layers, 4 heads of 16 (MHA), MLP 128, vocab = embedding = 262
TINY_LAYERS = 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64          # + final norm: 82240
TINY_HEAD = 262 * 64                                                  # 16768
# LLaDA-8B: d 4096, 32 layers, 32 heads of 128, MLP 12288, vocab = embedding = 126464
L8_LAYERS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 12288 + 2 * 4096) + 4096
L8_HEAD = 126464 * 4096


def test_parameter_split(fl):
    cfg = preset_config("tiny-llada")
    assert (fl.layer_params(cfg), fl.head_params(cfg), fl.embed_params(cfg)) == (82240, 16768, 16768)
    big = preset_config("llada-8b")
    assert fl.layer_params(big) == L8_LAYERS and fl.head_params(big) == L8_HEAD
    assert fl.layer_params(big) + fl.head_params(big) + fl.embed_params(big) == big.num_parameters()


def test_reuse_reads_layers_head_and_cached_kv_not_the_embedding_table(fl):
    cfg = preset_config("tiny-llada")
    c = fl.reuse_cost(cfg, B=1, T=32, S=768)                          # bf16
    weights = (TINY_LAYERS + TINY_HEAD) * 2
    kv = 2 * 2 * 1 * 4 * 768 * 16 * 2                          # K and V, layers, rows, heads, cols, dim
    assert c.bytes == weights + kv + 32 * 64 * 2                      # + the 32 gathered embedding rows
    attn = 4 * 2 * 1 * 32 * 768 * 4 * 16                              # q.k and p.v, 32 queries over 768 keys
    assert c.flops == 2 * (TINY_LAYERS + TINY_HEAD) * 32 + attn
    bigger_table = dataclasses.replace(cfg, embedding_size=10 * cfg.embedding_size)
    assert fl.reuse_cost(bigger_table, 1, 32, 768) == c              # the table itself is never read
    assert fl.reuse_cost(cfg, 4, 32, 768).bytes - c.bytes == 3 * (kv + 32 * 64 * 2)   # K/V per row


def test_refresh_multiplies_layers_over_l_and_the_head_over_decoded_rows(fl):
    cfg = preset_config("tiny-llada")
    c = fl.refresh_cost(cfg, B=2, L=768, n_out=32)
    attn = 4 * 2 * 2 * 768 * 768 * 4 * 16
    assert c.flops == 2 * TINY_LAYERS * 2 * 768 + 2 * TINY_HEAD * 2 * 32 + attn
    assert fl.refresh_cost(cfg, 2, 768, 33).flops - c.flops == 2 * TINY_HEAD * 2     # one more decoded row
    kv = 2 * 2 * 2 * 4 * 768 * 16 * 2
    assert c.bytes == (TINY_LAYERS + TINY_HEAD) * 2 + kv + 2 * 768 * 64 * 2


def test_llada_8b_floors_on_the_h100_rates(fl):
    """REFERENCE.md section 10's H100: 3.02 TB/s copy, 783 TFLOP/s bf16. Reuse at B=1 is bandwidth-bound
    (15.4 GB: weights without the embedding table + 0.4 GB of K/V), Refresh compute-bound."""
    cfg, bw, rate = preset_config("llada-8b"), 3.02e12, 783e12
    reuse = fl.reuse_cost(cfg, 1, 32, 768)
    assert reuse.bytes == (L8_LAYERS + L8_HEAD) * 2 + 2 * 32 * 32 * 768 * 128 * 2 + 32 * 4096 * 2
    assert reuse.seconds(bw, rate) == reuse.bytes / bw
    assert 5.0e-3 < reuse.seconds(bw, rate) < 5.2e-3
    refresh = fl.refresh_cost(cfg, 1, 768, 32)
    assert refresh.seconds(bw, rate) == refresh.flops / rate
    assert 14.0e-3 < refresh.seconds(bw, rate) < 14.6e-3                # 2 x 6.98e9 x 768 + head x 32 + attn
    # the fixed schedule: 8 blocks of (1 Refresh + 31 Reuse), and its ceiling in tokens/s
    t = fl.e2e_floor_s(cfg, 1, 512, 256, 32, 32, bw, rate)
    assert t == pytest.approx(8 * (refresh.seconds(bw, rate) + 31 * reuse.seconds(bw, rate)), rel=1e-12)
    assert fl.e2e_ceiling_tok_s(cfg, 1, 512, 256, 32, 32, bw, rate) == pytest.approx(256 / t, rel=1e-12)
    assert fl.e2e_floor_s(cfg, 1, 512, 256, 32, 8, bw, rate) < t / 3          # 4 tokens per step
