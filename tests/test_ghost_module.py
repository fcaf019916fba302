"""The C-Ghost module itself: shapes, channel bookkeeping, tracing, repr."""

import pytest
import torch
import torch.fx
from torch import nn

from ghostify.modules import GhostModule


@pytest.mark.parametrize("out_chs,ratio", [(64, 2), (63, 2), (65, 3), (10, 4)])
def test_output_shape_and_intrinsic_count(out_chs, ratio):
    g = GhostModule(16, out_chs, 3, 1, 1, ratio=ratio)
    assert g.init_chs == -(-out_chs // ratio)
    assert g.primary_conv[0].out_channels == g.init_chs
    assert g.cheap_operation[0].out_channels == g.init_chs * (ratio - 1)
    assert g.cheap_operation[0].groups == g.init_chs
    assert g(torch.randn(2, 16, 9, 9)).shape == (2, out_chs, 9, 9)


def test_stride_dilation_and_cheap_same_padding():
    g = GhostModule(8, 16, 3, stride=2, padding=2, dilation=2, dw_size=5)
    assert g(torch.randn(1, 8, 17, 17)).shape == (1, 16, 9, 9)
    assert g.cheap_operation[0].padding == (2, 2)


def test_activation_is_copied_per_branch():
    act = nn.ReLU()
    g = GhostModule(4, 8, 1, act_layer=act)
    assert isinstance(g.primary_conv[2], nn.ReLU) and isinstance(g.cheap_operation[2], nn.ReLU)
    assert g.primary_conv[2] is not act and g.cheap_operation[2] is not g.primary_conv[2]
    assert (g(torch.randn(1, 4, 5, 5)) >= 0).all()


def test_out_index_permutes_and_survives_state_dict_round_trip():
    g = GhostModule(4, 6, 1, ratio=2, norm=False).eval()
    x = torch.randn(1, 4, 3, 3)
    plain = g(x)
    perm = torch.tensor([3, 4, 5, 0, 1, 2])
    g.set_out_index(perm)
    assert g.permuted
    assert torch.equal(g(x), plain[:, perm])
    fresh = GhostModule(4, 6, 1, ratio=2, norm=False).eval()
    assert not fresh.permuted
    fresh.load_state_dict(g.state_dict())
    assert fresh.permuted and torch.equal(fresh(x), g(x))


def test_fx_traceable_and_equal():
    g = GhostModule(8, 12, 3, 1, 1, ratio=3, act_layer=nn.ReLU()).eval()
    g.set_out_index(torch.arange(12).flip(0))
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(torch.fx.symbolic_trace(g)(x), g(x))


def test_repr_names_the_paper_parts():
    text = repr(GhostModule(16, 32, 3, ratio=2, dw_size=3))
    assert "16 -> 32 (intrinsic 16)" in text and "ratio=2" in text and "dw_size=3" in text
    assert "primary_conv" in text and "cheap_operation" in text
