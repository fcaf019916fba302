"""G-Ghost: stage detection, narrowing, the GGhostStage module and apply_g_ghost (fast tests)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torchvision
from fixtures.residual import Block
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.errors import ConfigError, ConversionError
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite.g_ghost import apply_g_ghost
from ghostify.rewrite.narrow import narrow_block, round_raw
from ghostify.rewrite.result import ConversionResult
from ghostify.rewrite.stages import find_stages


class Net(nn.Module):
    def __init__(self, n: int = 4, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stage1 = nn.Sequential(Block(16, 16), Block(16, 16))
        self.stage2 = nn.Sequential(Block(16, width, 2), *[Block(width, width) for _ in range(n - 1)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(x.mean((2, 3)))


class ChannelShuffleBlock(Block):
    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y = y.flip(1)  # not a per-channel op: the block cannot be narrowed
        return torch.relu(y + x)


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=g) * 0.1
            m.running_mean = torch.randn(m.num_features, generator=g) * 0.1
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
    return model.eval()


def _convert(model, **kw):
    cfg = ConvertConfig(mode="g-ghost", **kw)
    out = copy.deepcopy(model)
    result = ConversionResult(model=out, config=cfg)
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    apply_g_ghost(out, cfg, example, result)
    return out, result


def test_ghost_stage_shapes_and_fx():
    base, end = Block(16, 32, 2), Block(32, 32)
    stage = GGhostStage(base, [Block(16, 16), Block(16, 16)], end, channels=32, raw=16)
    x = torch.randn(2, 16, 8, 8)
    assert stage(x).shape == (2, 32, 4, 4)
    assert stage.merge[1].in_channels == 32 + 2 * 16 and stage.merge[1].out_channels == 16
    gm = fx.symbolic_trace(stage)
    stage.eval()
    torch.testing.assert_close(gm(x), stage(x))
    assert "raw=16" in repr(stage) and "mix=on" in repr(stage)
    no_mix = GGhostStage(base, [Block(16, 16)], end, channels=32, raw=16, mix=False)
    assert no_mix.merge is None and "mix=off" in repr(no_mix)


def test_ghost_stage_with_identity_middle_is_the_original():
    """With zero residual branches every block is relu(x); the G-Ghost stage must then equal the stage."""
    blocks = [Block(16, 32, 2)] + [Block(32, 32) for _ in range(3)]
    for b in blocks[1:-1]:
        nn.init.zeros_(b.bn2.weight)
        nn.init.zeros_(b.bn2.bias)
    seq = nn.Sequential(*blocks).eval()
    keep = torch.tensor([1, 3, 4, 8, 9, 20, 30, 31])
    middle = [narrow_block(b, (1, 32, 4, 4), keep) for b in blocks[1:-1]]
    stage = GGhostStage(blocks[0], middle, blocks[-1], 32, 8, raw_index=keep).eval()
    x = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(stage(x), seq(x), atol=1e-5, rtol=1e-5)


def test_narrowing_with_every_channel_kept_is_exact():
    for block, shape in [
        (_randomise_bn(Block(32, 32)), (1, 32, 8, 8)),
        (_randomise_bn(torchvision.models.resnet50().layer3[1]), (1, 1024, 4, 4)),
        (_randomise_bn(torchvision.models.resnext50_32x4d().layer2[1]), (1, 512, 4, 4)),
        (_randomise_bn(torchvision.models.regnet_y_400mf().trunk_output.block3[1]), (1, 208, 4, 4)),
    ]:
        new = narrow_block(block, shape, torch.arange(shape[1]))
        x = torch.randn(*shape)
        torch.testing.assert_close(new(x), block(x))


def test_narrowing_equals_slicing():
    block = _randomise_bn(Block(32, 32))
    keep = torch.tensor([0, 2, 5, 7, 11, 13, 17, 19, 23, 29])
    new = narrow_block(block, (1, 32, 8, 8), keep)
    assert new.conv1.weight.shape == (10, 10, 3, 3)
    inner = new_inner(block, new)  # inner channels are picked by importance: recover which
    assert torch.equal(inner, torch.sort(inner).values)
    torch.testing.assert_close(new.conv1.weight, block.conv1.weight[inner][:, keep])
    torch.testing.assert_close(new.conv2.weight, block.conv2.weight[keep][:, inner])
    torch.testing.assert_close(new.bn2.running_var, block.bn2.running_var[keep])


def new_inner(block: Block, new: Block) -> torch.Tensor:
    """The inner channels `new` kept: match its bn1 running means against the original's."""
    return torch.tensor([int((block.bn1.running_mean == v).nonzero()[0]) for v in new.bn1.running_mean])


def test_grouped_narrowing_keeps_group_width():
    block = torchvision.models.resnext50_32x4d().layer3[1]  # conv2: 512 -> 512, 32 groups of 16
    new = narrow_block(block, (1, 1024, 4, 4), torch.arange(0, 1024, 2))
    assert new.conv2.groups == 16 and new.conv2.in_channels == 256
    assert new.conv2.in_channels // new.conv2.groups == 16
    assert new(torch.randn(1, 512, 4, 4)).shape == (1, 512, 4, 4)


def test_round_raw():
    assert round_raw(256, 2, []) == 128
    assert round_raw(432, 2, [48]) == 192  # 216 / 48 = 4.5: ties round down
    assert round_raw(20, 2, []) == 8


def test_detects_user_stage_and_reports_the_others():
    stages = {s.name: s for s in find_stages(Net(), torch.randn(1, 3, 32, 32))}
    assert set(stages) == {"stage1", "stage2"}
    assert stages["stage2"].eligible and stages["stage2"].blocks[0] == "stage2.0"
    assert not stages["stage1"].eligible and "fewer than 3" in stages["stage1"].why


def test_user_model_converts_and_trains():
    net = _randomise_bn(Net(n=5))
    out, result = _convert(net)
    assert [s.name for s in result.sites] == ["stage2"]
    assert result.sites[0].extra["raw"] == 16 and result.sites[0].extra["blocks"] == 5
    assert result.sites[0].extra["macs_after"] < result.sites[0].extra["macs_before"]
    assert ("stage1", "fewer than 3 blocks (2)") in result.skipped
    assert isinstance(out.stage2, GGhostStage)
    x = torch.randn(2, 3, 32, 32)
    out.train()
    out(x).sum().backward()
    assert all(p.grad is not None for p in out.parameters())
    out.eval()
    fx.symbolic_trace(out)  # mode "both" runs C-Ghost on the result: it must still trace


def test_mix_on_and_off():
    net = _randomise_bn(Net(n=4))
    with_mix, r1 = _convert(net, mix=True)
    without, r2 = _convert(net, mix=False)
    assert with_mix.stage2.merge is not None and without.stage2.merge is None
    assert "mix on" in r1.sites[0].detail and "mix off" in r2.sites[0].detail
    # The mix branch starts at zero (last BN scale 0): both start from the same function.
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(with_mix.eval()(x), without.eval()(x))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(with_mix) > n(without)


def test_torchvision_resnet50_stages():
    model = torchvision.models.resnet50(zero_init_residual=True).eval()
    cfg = ConvertConfig(mode="g-ghost", stages=["layer3"])
    out = copy.deepcopy(model)
    result = ConversionResult(model=out, config=cfg)
    x = torch.randn(1, 3, 64, 64)
    apply_g_ghost(out, cfg, x, result)
    assert [s.name for s in result.sites] == ["layer3"]
    assert ("layer2", "not in --stages") in result.skipped
    assert out.layer3.raw == 512 and len(out.layer3.layers) == 4
    # zero-init residual branches: the middle blocks are identities on post-ReLU input, so exact.
    torch.testing.assert_close(out(x), model(x))


def test_regnet_stage_raw_is_a_multiple_of_the_group_width():
    model = torchvision.models.regnet_x_400mf().eval()  # group width 16
    out, result = _convert(model)
    names = [s.name for s in result.sites]
    assert "trunk_output.block3" in names
    for site in result.sites:
        assert site.extra["raw"] % 16 == 0


def test_error_no_stage():
    with pytest.raises(ConversionError, match=r"no residual stage.*layer1 \(2 blocks\)"):
        _convert(torchvision.models.resnet18())


def test_error_ratio_too_high():
    with pytest.raises(ConfigError, match="ratio 8 leaves 4 raw channels in stage stage2"):
        _convert(Net(n=4), ratio=8)


def test_error_cannot_narrow():
    net = Net(n=4)
    net.stage2[2] = ChannelShuffleBlock(32, 32)
    with pytest.raises(ConversionError, match=r"stage stage2 cannot be narrowed: block stage2.2 uses flip"):
        _convert(net)


def test_error_unknown_stage_name():
    with pytest.raises(ConversionError, match=r"--stages names layer9.*stage1 \(2 blocks\), stage2"):
        _convert(Net(), stages=["layer9"])


def test_error_stage_not_eligible():
    with pytest.raises(ConversionError, match="stage stage1 cannot be restructured: fewer than 3"):
        _convert(Net(), stages=["stage1"])


def test_include_exclude():
    with pytest.raises(ConversionError, match="no residual stage left"):
        _convert(Net(), exclude="stage2")
