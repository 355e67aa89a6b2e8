import torch

from dlc.runtime.decoding import FactorRule, ScheduleRule, ThresholdRule, num_transfer_tokens

NEG = float("-inf")


def test_schedule_remainder_first():
    assert num_transfer_tokens(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_schedule_rule_picks_top_k_masked():
    conf = torch.tensor([[0.1, 0.9, NEG, 0.5]], dtype=torch.float64)
    masked = torch.tensor([[True, True, False, True]])
    assert ScheduleRule().select(conf, masked, torch.tensor([2])).tolist() == [[False, True, False, True]]


def test_threshold_rule():
    conf = torch.tensor([[0.95, 0.2, 0.91, NEG], [0.3, 0.4, NEG, NEG]], dtype=torch.float64)
    masked = torch.tensor([[True, True, True, False], [True, True, False, False]])
    sel = ThresholdRule(0.9).select(conf, masked, None)
    assert sel.tolist() == [[True, False, True, False], [False, True, False, False]]   # row 2: best only


def test_factor_rule_longest_prefix():
    # thresholds for n = 2, 3, 4 with factor 1: 1 - 1/3, 1 - 1/4, 1 - 1/5 = 0.667, 0.75, 0.8
    conf = torch.tensor([[0.99, 0.7, 0.76, 0.5]], dtype=torch.float64)   # sorted: 0.99, 0.76, 0.70, 0.5
    masked = torch.ones(1, 4, dtype=torch.bool)
    sel = FactorRule(1.0).select(conf, masked, None)
    assert sel.tolist() == [[True, False, True, False]]                  # 0.70 < 0.75 ends the prefix
    high = torch.tensor([[0.99, 0.7, 0.76, 0.81]], dtype=torch.float64)
    assert FactorRule(1.0).select(high, masked, None).tolist() == [[True, False, True, True]]
    low = torch.tensor([[0.3, 0.2, NEG, NEG]], dtype=torch.float64)
    assert FactorRule(1.0).select(low, torch.tensor([[True, True, False, False]]), None).sum() == 1
