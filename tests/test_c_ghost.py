"""The C-Ghost rewriter on small models: what is replaced, what is left alone, and why."""

import pytest
import torch
import torchvision
from torch import nn

import ghostify
from ghostify.config import ConvertConfig
from ghostify.errors import ConfigError, ConversionError
from ghostify.modules import GhostModule
from ghostify.rewrite import convert_model


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this, its children still can be converted."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        if x.sum() > 0:  # data-dependent
            x = x * 1.0
        return self.body(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.odd = Untraceable()
        self.act = nn.SiLU()
        self.head = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.head(self.act(self.odd(self.stem(x))))


def _tv(name, **kw):
    return getattr(torchvision.models, name)(weights=None, **kw).eval()


def test_resnet18_sites_absorb_bn_and_keep_shared_relu():
    model = _tv("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = convert_model(model, ConvertConfig(ratio=2))
    names = [s.name for s in result.sites]
    assert "conv1" not in names  # the stem
    assert ("conv1", "stem (the first conv); --convert-stem (skip_stem=False) converts it") in result.skipped
    assert len(names) == 19  # 16 block convs + 3 downsample convs
    block = result.model.layer1[0]
    assert isinstance(block.conv1, GhostModule) and isinstance(block.bn1, nn.Identity)
    assert isinstance(block.relu, nn.ReLU)  # shared by the block: stays, copied into the ghost (idempotent)
    assert isinstance(block.conv1.primary_conv[2], nn.ReLU)
    assert isinstance(block.conv2.primary_conv[2], nn.Identity)  # bn2 is followed by the residual add
    # the input model is untouched: same types, same values
    assert type(model.layer1[0].conv1) is nn.Conv2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 64, 64)
    assert result.model(x).shape == model(x).shape


def test_public_convert_returns_a_new_module():
    model = _tv("resnet18")
    converted = ghostify.convert(model, mode="c-ghost", ratio=2)
    assert converted is not model and isinstance(converted.layer1[0].conv1, GhostModule)


def test_converted_equals_original_on_intrinsic_channels_without_fit_noise():
    """With the cheap ops zeroed, conv1+bn1+relu of a block is reproduced on its intrinsic channels."""
    torch.manual_seed(0)
    model = _tv("resnet18")
    result = convert_model(model, ConvertConfig(ratio=2))
    ghost = result.model.layer1[0].conv1
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        want = model.layer1[0].relu(model.layer1[0].bn1(model.layer1[0].conv1(x)))
        got = ghost(x)
    intrinsic = (ghost.out_index < ghost.init_chs).nonzero().flatten()
    assert len(intrinsic) == 32
    torch.testing.assert_close(got[:, intrinsic], want[:, intrinsic], rtol=1e-5, atol=1e-5)


def test_non_idempotent_shared_activation_is_not_absorbed():
    class SharedSiLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(self.b2(self.c2(self.act(self.b1(self.c1(x))))))

    result = convert_model(SharedSiLU(), ConvertConfig(ratio=2))
    site = result.sites[0]
    assert site.name == "c2" and site.absorbed == ["b2"]
    assert isinstance(result.model.c2.primary_conv[2], nn.Identity)
    assert isinstance(result.model.act, nn.SiLU)


def test_grouped_and_depthwise_convs_are_left_alone():
    model = _tv("mobilenet_v2")
    result = convert_model(model, ConvertConfig(ratio=2))
    reasons = dict(result.skipped)
    assert reasons["features.1.conv.0.0"].startswith("depthwise conv")
    assert all(type(model.get_submodule(s.name)) is nn.Conv2d for s in result.sites)
    assert all(model.get_submodule(s.name).groups == 1 for s in result.sites)


def test_include_exclude_and_stem():
    model = _tv("resnet18")
    only = convert_model(model, ConvertConfig(include=r"^layer4\."))
    assert only.sites and all(s.name.startswith("layer4.") for s in only.sites)
    without = convert_model(model, ConvertConfig(exclude=r"downsample"))
    assert not any("downsample" in s.name for s in without.sites)
    stem = convert_model(model, ConvertConfig(skip_stem=False, include="^conv1$"))
    assert [s.name for s in stem.sites] == ["conv1"]


def test_untraceable_submodule_falls_back_and_says_so():
    model = Net().eval()
    result = convert_model(model, ConvertConfig(ratio=2))
    names = {s.name for s in result.sites}
    assert "odd.body.0" in names and "head" in names
    assert "odd.conv" in names  # seen only as a module: converted alone, its BN stays outside
    assert isinstance(result.model.odd.bn, nn.BatchNorm2d)
    assert any("not traceable" in note for note in result.notes)
    x = torch.randn(2, 3, 16, 16)
    assert result.model(x).shape == model(x).shape


def test_fit_starts_closer_to_the_original_than_the_naive_swap():
    torch.manual_seed(0)
    model = _tv("resnet18")
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
    errors = {}
    for init in ("fit", "random"):
        torch.manual_seed(0)
        converted = convert_model(model, ConvertConfig(ratio=2, include=r"^layer1\.", weight_init=init)).model
        with torch.no_grad():
            got = converted.layer1(converted.maxpool(converted.relu(converted.bn1(converted.conv1(x)))))
        errors[init] = ((got - want).norm() / want.norm()).item()
    assert errors["fit"] < errors["random"]


@pytest.mark.parametrize("ratio", [1, 0, 2.5, -2, "2"])
def test_bad_ratio_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match="ratio must be an integer >= 2"):
        ConvertConfig(ratio=ratio)


@pytest.mark.parametrize("dw", [0, 2, 4, -1])
def test_bad_dw_size_is_a_config_error(dw):
    with pytest.raises(ConfigError, match="dw-size must be an odd integer"):
        ConvertConfig(dw_size=dw)


def test_bad_regex_and_mode():
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        ConvertConfig(include="(")
    with pytest.raises(ConfigError, match="mode must be one of"):
        ConvertConfig(mode="ghost")


def test_model_without_eligible_conv_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(ConversionError, match="no ordinary conv"):
        convert_model(mlp, ConvertConfig())
    only_stem = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ConversionError, match="no eligible site to convert: 1 stem"):
        convert_model(only_stem, ConvertConfig())
    with pytest.raises(ConversionError, match="excluded by --include/--exclude"):
        convert_model(_tv("resnet18"), ConvertConfig(include="nothing-matches"))


def test_ratio_and_dw_size_shape_the_modules():
    result = convert_model(_tv("resnet18"), ConvertConfig(ratio=4, dw_size=5))
    ghost = result.model.layer2[0].conv2
    assert ghost.ratio == 4 and ghost.init_chs == 32 and ghost.cheap_operation[0].kernel_size == (5, 5)
