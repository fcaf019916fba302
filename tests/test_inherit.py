"""Data-free weight inheritance: intrinsic channels exact, cheap ops fitted, channel order kept."""

import torch
from torch import nn

from ghostify.modules import GhostModule
from ghostify.rewrite.inherit import (
    assign_ghosts,
    choose_intrinsic,
    effective_affine,
    fit_cheap_kernels,
    inherit_weights,
)


def _conv_bn(n=12, c=5, k=3, stride=1, dilation=1, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(c, n, k, stride, padding=dilation * (k // 2), dilation=dilation, bias=False)
    bn = nn.BatchNorm2d(n)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    bn.bias.data.uniform_(-1, 1)
    return conv.eval(), bn.eval()


def _ghost_for(conv, bn, ratio=2, dw=3, act=None):
    return GhostModule(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        ratio=ratio,
        dw_size=dw,
        norm=bn is not None,
        act_layer=act,
        bias=conv.bias is not None,
    ).eval()


def test_intrinsic_channels_reproduced_exactly_in_original_order():
    conv, bn = _conv_bn(n=13, c=6, k=3, stride=2)
    ghost = _ghost_for(conv, bn, ratio=3, act=nn.ReLU())
    inherit_weights(ghost, conv, bn)
    x = torch.randn(2, 6, 11, 11)
    with torch.no_grad():
        want = torch.relu(bn(conv(x)))
        got = ghost(x)
    kernels, _ = effective_affine(conv, bn)
    intrinsic = choose_intrinsic(kernels, ghost.init_chs)
    assert len(intrinsic) == 5
    torch.testing.assert_close(got[:, intrinsic], want[:, intrinsic], rtol=1e-5, atol=1e-5)


def test_intrinsic_choice_is_largest_effective_norm():
    kernels = torch.zeros(4, 1, 1, 1, dtype=torch.float64)
    kernels[:, 0, 0, 0] = torch.tensor([0.1, 3.0, -5.0, 1.0])
    assert choose_intrinsic(kernels, 2).tolist() == [1, 2]


def test_ghosts_pair_with_most_similar_intrinsic_within_capacity():
    base = torch.eye(3, dtype=torch.float64).view(3, 3, 1, 1) * 10
    ghosts = torch.tensor([[0.9, 0.1, 0], [0.1, 0, 1.0], [0, 1.0, 0.2]], dtype=torch.float64).view(3, 3, 1, 1)
    kernels = torch.cat([base, ghosts])
    assignment = assign_ghosts(kernels, torch.arange(3), capacity=1)
    assert {g: k for g, (k, _) in assignment.items()} == {3: 0, 4: 2, 5: 1}
    crowded = assign_ghosts(torch.cat([base, ghosts[:1].repeat(3, 1, 1, 1)]), torch.arange(3), capacity=2)
    # two fit on channel 0, the third goes elsewhere
    assert sorted(k for k, _ in crowded.values()).count(0) == 2
    assert len({(k, r) for k, r in crowded.values()}) == 3  # no slot used twice


def test_composable_filters_are_recovered_exactly():
    """When each ghost filter IS a depthwise kernel applied to an intrinsic one, the fit is exact."""
    torch.manual_seed(1)
    c, m = 64, 3  # wide enough that unrelated filters are nearly orthogonal
    intrinsic = torch.zeros(m, c, 3, 3)
    intrinsic[:, :, 1, 1] = torch.randn(m, c) * 3  # centre-tap filters keep the composition inside 3x3
    cheap = torch.randn(m, 3, 3)
    ghosts = torch.stack([cheap[i].view(1, 3, 3) * intrinsic[i, :, 1, 1].view(c, 1, 1) for i in range(m)])
    conv = nn.Conv2d(c, 2 * m, 3, padding=1, bias=False)  # (a bias would make the borders differ)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([intrinsic, ghosts * 0.1]))  # ghosts smaller: the intrinsic ones win
    ghost = _ghost_for(conv, None)
    inherit_weights(ghost, conv, None)
    x = torch.randn(2, c, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ghost(x), conv(x), rtol=1e-4, atol=1e-4)


def test_fit_solves_least_squares_for_strided_and_dilated_convs():
    torch.manual_seed(2)
    primary = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    truth = torch.randn(6, 3, 3, dtype=torch.float64)
    for stride, dilation in [((1, 1), (1, 1)), ((2, 2), (1, 1)), ((1, 1), (2, 2))]:
        # target = composition restricted to where the original kernel lives; LS must beat the true D there
        fitted = fit_cheap_kernels(primary, primary, 3, stride, dilation)
        assert fitted.shape == truth.shape
        centre = torch.zeros(3, 3, dtype=torch.float64)
        centre[1, 1] = 1
        # fitting a kernel to itself: the identity depthwise kernel is the exact answer
        torch.testing.assert_close(fitted, centre.expand(6, 3, 3), rtol=1e-5, atol=1e-5)


def test_fit_beats_random_cheap_ops():
    conv, bn = _conv_bn(n=32, c=16, k=3)
    x = torch.randn(4, 16, 12, 12)
    with torch.no_grad():
        want = bn(conv(x))
    errors = {}
    for fit in (True, False):
        torch.manual_seed(0)
        ghost = _ghost_for(conv, bn)
        inherit_weights(ghost, conv, bn, fit=fit)
        with torch.no_grad():
            errors[fit] = ((ghost(x) - want).norm() / want.norm()).item()
    assert errors[True] < 0.9 * errors[False]
