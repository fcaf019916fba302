"""ghostify.analysis: params, MACs, latency and the before/after report, checked against real numbers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from ghostify import analysis
from ghostify.analysis import (
    ConversionReport,
    LatencyStats,
    ModelStats,
    analyze,
    build_report,
    compare_latency,
    count_macs,
    count_params,
    measure_latency,
    set_accuracy,
)
from ghostify.config import ConvertConfig
from ghostify.errors import ConversionError
from ghostify.evaluate import EvalResult
from ghostify.report import render_plain, to_markdown
from ghostify.rewrite.result import ConversionResult, SiteRecord


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _leaf_names(model: nn.Module) -> set[str]:
    return {name for name, mod in model.named_modules() if name and not list(mod.children())}


def test_tiny_conv_macs_by_hand() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    total, per_module = count_macs(nn.Sequential(conv), torch.randn(2, 4, 10, 10))
    # Output 2 x 6 x 5 x 5; each output element needs (4 / 2) * 3 * 3 MACs; the bias is not counted.
    assert total == 2 * 6 * 5 * 5 * 2 * 3 * 3
    assert per_module == {"0": total}


def test_tiny_net_per_module_macs_and_params() -> None:
    model = TinyNet()
    total, per_module = count_macs(model, torch.randn(1, 3, 8, 8))
    conv1 = 3 * 8 * 9 * 64
    conv2 = 8 * 16 * 9 * 64
    fc = 16 * 10
    assert per_module == {"conv1": conv1, "conv2": conv2, "fc": fc}
    assert total == conv1 + conv2 + fc
    assert count_params(model) == 3 * 8 * 9 + 2 * 8 + 8 * 16 * 9 + 2 * 16 + 16 * 10 + 10


def test_count_macs_restores_training_mode() -> None:
    model = TinyNet().train()
    model.bn2.eval()
    count_macs(model, torch.randn(1, 3, 8, 8))
    assert model.training and model.bn1.training and not model.bn2.training


def test_shared_module_gets_its_canonical_name() -> None:
    conv = nn.Conv2d(2, 2, 1, bias=False)
    model = nn.Sequential(conv, nn.ReLU(), conv)  # the same conv under "0" and "2", called twice
    total, per_module = count_macs(model, torch.randn(1, 2, 4, 4))
    assert total == 2 * (2 * 2 * 16)
    assert per_module == {"0": total}


def test_resnet18_matches_published_figures() -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = torchvision.models.resnet18(weights=None)
    stats = analyze(model, (1, 3, 224, 224), latency=False, device="meta")
    assert stats.params == pytest.approx(11.69e6, rel=0.01)
    assert stats.macs == pytest.approx(1.82e9, rel=0.01)
    assert stats.latency is None
    assert stats.input_shape == (1, 3, 224, 224)
    # The per-module breakdown uses named_modules() names, and the leaves add up to the total.
    names = {name for name, _ in model.named_modules()}
    assert set(stats.module_macs) <= names and "" not in stats.module_macs
    assert "layer1.0.conv1" in stats.module_macs and "fc" in stats.module_macs
    assert sum(v for k, v in stats.module_macs.items() if k in _leaf_names(model)) == stats.macs
    assert stats.module_macs["layer1.0.conv1"] == 64 * 64 * 9 * 56 * 56
    assert stats.module_params["layer1"] == count_params(model.layer1)
    assert "" not in stats.module_params


def test_resnet50_matches_published_figures() -> None:
    with torch.device("meta"):  # shapes only: no memory, no compute
        model = torchvision.models.resnet50(weights=None)
    stats = analyze(model, (1, 3, 224, 224), latency=False, device="meta")
    assert stats.params == pytest.approx(25.56e6, rel=0.01)
    assert stats.macs == pytest.approx(4.09e9, rel=0.01)
    assert sum(v for k, v in stats.module_macs.items() if k in _leaf_names(model)) == stats.macs


def test_fx_graph_module_names_match() -> None:
    # A GraphModule calls the leaves directly; its never-called containers get their submodules' sum.
    with torch.device("meta"):
        model = torchvision.models.resnet18(weights=None)
        x = torch.randn(1, 3, 64, 64)
    traced = torch.fx.symbolic_trace(model)
    assert count_macs(traced, x) == count_macs(model, x)
    layer2 = count_macs(model.layer2, torch.randn(1, 64, 16, 16, device="meta"))[0]
    assert count_macs(traced, x)[1]["layer2"] == layer2


def test_measure_latency_is_sane_and_restores_threads() -> None:
    model = TinyNet().train()
    threads_before = torch.get_num_threads()
    stats = measure_latency(model, torch.randn(2, 3, 16, 16), warmup=1, repeats=7, threads=1)
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 7 and stats.warmup == 1
    assert stats.batch_size == 2 and stats.threads == 1 and stats.device == "cpu"
    assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == threads_before
    assert model.training


def test_measure_latency_min_time_adds_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter(range(10_000))  # a fake perf_counter: every run takes exactly 1 ms
    monkeypatch.setattr(analysis, "perf_counter", lambda: next(clock) / 1000)
    stats = measure_latency(TinyNet(), torch.randn(1, 3, 16, 16), warmup=0, repeats=2, min_time_s=0.0105)
    assert stats.runs == 11
    assert stats.median_ms == pytest.approx(1.0)


def test_compare_latency_times_each_model() -> None:
    models = {"a": TinyNet(), "b": nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten())}
    threads_before = torch.get_num_threads()
    out = compare_latency(models, torch.randn(1, 3, 16, 16), repeats=4, warmup=1, threads=1)
    assert list(out) == ["a", "b"]
    for stats in out.values():
        assert stats.runs == 4 and stats.warmup == 1 and stats.threads == 1
        assert 0 < stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == threads_before


def test_meta_device_refuses_latency() -> None:
    with pytest.raises(ValueError, match="meta"):
        analyze(TinyNet(), (1, 3, 8, 8), latency=True, device="meta")


def test_analyze_with_latency() -> None:
    stats = analyze(TinyNet(), (1, 3, 16, 16), latency=True, warmup=1, repeats=3, threads=1)
    assert isinstance(stats, ModelStats)
    assert stats.latency is not None and stats.latency.runs == 3
    assert stats.macs == 3 * 8 * 9 * 256 + 8 * 16 * 9 * 256 + 160


def _fake_conversion(original: TinyNet) -> ConversionResult:
    """conv2 (3x3) replaced by a 1x1 conv under the same name; bn2 absorbed into it."""
    converted = copy.deepcopy(original)
    converted.conv2 = nn.Conv2d(8, 16, 1, bias=False)
    converted.bn2 = nn.Identity()
    site = SiteRecord(name="conv2", kind="c-ghost", detail="Conv2d 8->16 k3x3 s1 +bn+relu", absorbed=["bn2"])
    return ConversionResult(
        model=converted,
        config=ConvertConfig(),
        sites=[site],
        skipped=[("conv1", "stem")],
        notes=["fake conversion for tests"],
    )


def test_build_report_site_rows_and_ratios() -> None:
    original = TinyNet()
    result = _fake_conversion(original)
    report = build_report(original, result, "tiny", (1, 3, 16, 16), latency=True, repeats=3, warmup=1)
    assert isinstance(report, ConversionReport)
    hw = 16 * 16
    (row,) = report.sites
    assert (row.name, row.kind) == ("conv2", "c-ghost")
    assert row.macs_before == 8 * 16 * 9 * hw
    assert row.macs_after == 8 * 16 * 1 * hw
    assert row.params_before == 8 * 16 * 9 + 2 * 16  # the conv plus the absorbed BN's weight and bias
    assert row.params_after == 8 * 16
    assert row.macs_ratio == pytest.approx(9.0)

    macs_before = 3 * 8 * 9 * hw + 8 * 16 * 9 * hw + 160
    macs_after = 3 * 8 * 9 * hw + 8 * 16 * hw + 160
    assert report.before.macs == macs_before and report.after.macs == macs_after
    assert report.macs_ratio == pytest.approx(macs_before / macs_after)
    assert report.params_ratio == pytest.approx(count_params(original) / count_params(result.model))
    assert report.before.latency is not None and report.after.latency is not None
    assert report.latency_speedup == pytest.approx(
        report.before.latency.median_ms / report.after.latency.median_ms
    )
    assert report.skipped == [("conv1", "stem")]
    assert report.config == ConvertConfig().to_dict()
    # The original is left as it was.
    assert isinstance(original.conv2, nn.Conv2d) and original.conv2.kernel_size == (3, 3)


def test_build_report_times_eager_and_deploy_forms_at_two_batches() -> None:
    original = TinyNet()
    result = _fake_conversion(original)
    report = build_report(
        original, result, "tiny", (1, 3, 16, 16), latency=True, repeats=4, warmup=1, large_batch=8
    )
    assert [(r.form, r.batch_size, r.before.runs) for r in report.latencies] == [
        ("eager", 1, 4),
        ("deploy", 1, 4),
        ("eager", 8, 3),  # a quarter of the rounds at the larger batch, at least 3
        ("deploy", 8, 3),
    ]
    assert report.latencies[0].before is report.before.latency  # the summary row is eager at batch 1
    assert all(r.before.batch_size == r.after.batch_size == r.batch_size for r in report.latencies)
    data = json.loads(json.dumps(report.to_dict()))
    assert [r["form"] for r in data["latencies"]] == ["eager", "deploy", "eager", "deploy"]
    assert data["latencies"][3]["speedup"] == pytest.approx(report.latencies[3].speedup)

    plain = render_plain(report)
    assert "latency by form and batch" in plain
    assert next(ln for ln in plain.splitlines() if ln.startswith("deploy  8")).split()[2] == "3"
    assert "| deploy | 8 | 3 |" in to_markdown(report)


def test_build_report_notes_a_model_without_a_deploy_form(monkeypatch) -> None:
    import ghostify.deploy

    def no_deploy_form(model, example_inputs=None):
        raise ConversionError("the deploy form does not reproduce the model's outputs")

    monkeypatch.setattr(ghostify.deploy, "deploy_form", no_deploy_form)
    original = TinyNet()
    report = build_report(original, _fake_conversion(original), "tiny", (1, 3, 8, 8), repeats=2, warmup=0)
    assert [r.form for r in report.latencies] == ["eager"]
    assert any(n.startswith("deploy-form latency not measured: ConversionError") for n in report.notes)
    assert "latency by form and batch" not in render_plain(report)  # one row: the summary says it all


def test_report_to_dict_is_json_able() -> None:
    original = TinyNet()
    report = build_report(original, _fake_conversion(original), "tiny", (1, 3, 8, 8), latency=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["macs_ratio"] == pytest.approx(report.macs_ratio)
    assert data["latency_speedup"] is None
    assert "FLOPs / 2" in data["conventions"]["macs"]
    assert data["sites"][0]["macs_before"] == report.sites[0].macs_before
    assert data["before"]["input_shape"] == [1, 3, 8, 8]


def test_set_accuracy_goes_into_to_dict() -> None:
    original = TinyNet()
    report = build_report(original, _fake_conversion(original), "tiny", (1, 3, 8, 8), latency=False)
    assert report.accuracy == {} and report.to_dict()["accuracy"] == {}
    set_accuracy(report, "original", EvalResult(top1=76.0, top5=93.0, images=100, seconds=2.0))
    set_accuracy(report, "converted", EvalResult(top1=1.0, top5=5.0, images=100, seconds=2.0))
    set_accuracy(report, "original", EvalResult(top1=76.5, top5=93.5, images=200, seconds=2.0))  # replaced
    data = json.loads(json.dumps(report.to_dict()))
    assert list(data["accuracy"]) == ["original", "converted"]
    assert data["accuracy"]["original"] == {"top1": 76.5, "top5": 93.5, "images": 200}
