"""The dlc ops survive torch.export: one node each in the graph, and the exported program runs like eager."""
import pytest
import torch

import dlc.kernels as K


class _Step(torch.nn.Module):
    """A toy Reuse step: write the block's K/V, attend sparsely, decode with the fused head."""

    def __init__(self, vocab=300, d=16):
        super().__init__()
        self.head = torch.nn.Parameter(torch.randn(vocab, d))

    def forward(self, hid, q, kb, vb, kc, vc, start, idx):
        K.kv_write_(kc, vc, kb, vb, start)
        a = K.sparse_attention(q, kc, vc, kb, vb, idx)                # [B, H, T, D]
        tok, conf = K.fused_select_logits(hid + a.mean(), self.head)
        return tok, conf, a


def _inputs(B=2, H=2, T=4, S=12, D=16):
    return (torch.randn(5, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D),
            torch.randn(B, H, S, D), torch.randn(B, H, S, D), torch.tensor([0, 8]),
            torch.randint(0, S, (B, H, 6)))


def test_ops_survive_export_and_run():
    m = _Step()
    args = _inputs()
    ep = torch.export.export(m, tuple(a.clone() for a in args))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"} | \
              {str(a) for n in ep.graph.nodes for a in n.args if "dlc" in str(a)}
    for name in ("dlc.fused_select_logits", "dlc.sparse_attention", "dlc.kv_write"):
        assert any(name in t for t in targets), (name, targets)
    eager_args = tuple(a.clone() for a in args)
    exp_args = tuple(a.clone() for a in args)
    want = m(*eager_args)
    got = ep.module()(*exp_args)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(exp_args[4], eager_args[4])            # the cache was written in place
    assert not torch.equal(exp_args[4], args[4])


def test_ops_survive_export_with_functional_decomposition():
    ep = torch.export.export(_Step(), _inputs()).run_decompositions()
    text = str(ep.graph)
    assert "dlc.kv_write" in text and "dlc.fused_select_logits" in text and "dlc.sparse_attention" in text


@pytest.mark.slow
def test_exported_ops_lower_into_aotinductor(tmp_path):
    """AOTInductor compiles the exported step (CPU: the ops' reference bodies) and the package runs like
    eager."""
    m = _Step()
    args = _inputs()
    ep = torch.export.export(m, tuple(a.clone() for a in args))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "step.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    a_aoti, a_eager = tuple(a.clone() for a in args), tuple(a.clone() for a in args)
    got, want = runner(*a_aoti), m(*a_eager)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(a_aoti[4], a_eager[4])                  # the K/V write happened in place
