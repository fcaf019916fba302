"""Calibration: closed-form refit of C-Ghost modules and G-Ghost stages on data (fast tests)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.distill import CalibrationReport, calibrate, refresh_bn_stats
from ghostify.modules.ghost_module import GhostModule
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite import convert_model


class Block(nn.Module):
    """conv-bn-relu-conv-bn + shortcut, relu (a CIFAR-style basic block)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.proj is None else self.proj(x)))


class Net(nn.Module):
    def __init__(self, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage = nn.Sequential(*[Block(width, width) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(self.stage(self.stem(x)).mean((2, 3)))


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with non-trivial BN statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average: statistics that match the data
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
        model.train()
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return model.eval()


def _loader(n_batches: int = 3, batch: int = 8, seed: int = 1, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.zeros(batch)) for _ in range(n_batches)]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return _trained_like(Net())


def test_c_ghost_calibration_lowers_every_site_error(teacher):
    result = convert_model(teacher, ConvertConfig(mode="c-ghost", ratio=2))
    student = result.model
    shapes = _shapes(student)
    report = calibrate(student, teacher, _loader(), result, batches=3, progress=False)
    assert isinstance(report, CalibrationReport)
    assert report.refitted == len([s for s in result.sites if s.kind == "c-ghost"]) == 6
    assert report.images == 24 and report.seconds > 0 and not report.skipped
    assert [s.name for s in report.sites] == [s.name for s in result.sites]  # forward order
    for site in report.sites:
        assert site.error_after < site.error_before, site
    assert _shapes(student) == shapes  # save/load by replay sees the same keys and shapes
    assert not student.training
    out = student(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert "sites refitted" in report.summary()


def test_calibration_brings_outputs_closer_to_the_teacher(teacher):
    result = convert_model(teacher, ConvertConfig(mode="c-ghost", ratio=2))
    x = _loader(2, 16, seed=7)[0][0]
    with torch.no_grad():
        before = (result.model(x) - teacher(x)).norm()
        calibrate(result.model, teacher, _loader(4, 16), result, batches=4, progress=False)
        after = (result.model(x) - teacher(x)).norm()
    assert after < before


@pytest.mark.parametrize(
    "options", [{"primary": "bn"}, {"primary": "none"}, {"repair": False}, {"bn_refresh": "before"}]
)
def test_calibration_variants_run(teacher, options):
    result = convert_model(teacher, ConvertConfig(mode="c-ghost", ratio=2))
    report = calibrate(result.model, teacher, _loader(), result, progress=False, **options)
    assert all(s.error_after < s.error_before for s in report.sites)


def test_teacher_is_left_unchanged(teacher):
    state = copy.deepcopy(teacher.state_dict())
    result = convert_model(teacher, ConvertConfig(mode="c-ghost", ratio=2))
    calibrate(result.model, teacher, _loader(), result, progress=False)
    after = teacher.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert not teacher.training


class Exact(nn.Module):
    """stem -> conv (no BN, no activation) whose last channels are depthwise 3x3 images of the first ones."""

    def __init__(self, c: int = 6, m: int = 4, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.conv = nn.Conv2d(c, 2 * m, 3, padding=1, bias=False)
        with torch.no_grad():
            a = torch.randn(m, c, generator=g)  # 1x1 intrinsic kernels, put at the centre tap
            d = 0.1 * torch.randn(m, 3, 3, generator=g)  # the cheap kernels (small: ghosts have low norm)
            w = torch.zeros(2 * m, c, 3, 3)
            w[:m, :, 1, 1] = a
            w[m:] = d[:, None] * a[:, :, None, None]
            perm = torch.randperm(2 * m, generator=g)  # intrinsic and ghost channels interleaved
            self.conv.weight.copy_(w[perm])

    def forward(self, x):
        return self.conv(self.stem(x))


def test_exactly_representable_ghosts_reach_zero_error():
    teacher = Exact().eval()
    result = convert_model(teacher, ConvertConfig(mode="c-ghost", ratio=2))
    ghost = result.model.conv
    assert isinstance(ghost, GhostModule)
    with torch.no_grad():  # spoil the cheap op and the pairing: calibration must find both again
        ghost.cheap_operation[0].weight.normal_()
        index = ghost.out_index.clone()
        ghost_slots = torch.nonzero(index >= ghost.init_chs).flatten()
        index[ghost_slots] = index[ghost_slots.roll(1)]
        ghost.set_out_index(index)
    report = calibrate(result.model, teacher, _loader(2, 8), result, batches=2, progress=False)
    (site,) = report.sites
    assert site.error_before > 0.1
    assert site.error_after < 1e-4
    assert site.repaired > 0
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), teacher(x), atol=1e-4, rtol=1e-4)


def test_g_ghost_stage_calibration_runs(teacher):
    example = torch.randn(1, 3, 16, 16)
    result = convert_model(teacher, ConvertConfig(mode="g-ghost", ratio=2), example_inputs=example)
    stage = result.model.stage
    assert isinstance(stage, GGhostStage)
    shapes = _shapes(result.model)
    with torch.no_grad():  # a non-zero mix branch: the refit must account for what it adds
        stage.merge[-1].weight.fill_(0.1)
    report = calibrate(result.model, teacher, _loader(), result, batches=3, progress=False)
    (site,) = report.sites
    assert site.kind == "g-ghost" and site.name == "stage"
    assert site.error_after < site.error_before
    assert _shapes(result.model) == shapes
    assert not result.model.training


def test_both_modes_calibrate_the_sites_they_can_match(teacher):
    example = torch.randn(1, 3, 16, 16)
    result = convert_model(teacher, ConvertConfig(mode="both", ratio=2), example_inputs=example)
    report = calibrate(result.model, teacher, _loader(), result, progress=False)
    kinds = {s.kind for s in report.sites}
    assert "g-ghost" in kinds
    assert report.refitted + len(report.skipped) == len(result.sites)
    assert all(s.error_after <= s.error_before + 1e-6 for s in report.sites)


def test_bn_refresh_leaves_eval_mode_and_recomputes_statistics(teacher):
    model = copy.deepcopy(teacher).train()
    bn = model.stem[1]
    momentum = bn.momentum
    batches = [x for x, _ in _loader(2, 8)]
    refreshed = refresh_bn_stats(model, batches)
    assert refreshed == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(m.training for m in model.modules())
    assert bn.momentum == momentum
    with torch.no_grad():  # the running mean is the average of the batch means seen
        feats = [model.stem[0](x) for x in batches]
    expected = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, expected, atol=1e-5, rtol=1e-4)


def test_bad_arguments(teacher):
    result = convert_model(teacher, ConvertConfig(mode="c-ghost", ratio=2))
    with pytest.raises(ValueError, match="bn_refresh"):
        calibrate(result.model, teacher, _loader(), result, bn_refresh="sometimes", progress=False)
    with pytest.raises(ValueError, match="no images"):
        calibrate(result.model, teacher, [], result, progress=False)
