"""Latency-aware selection (select="latency", mode "auto"): fake-timer decisions, cache, replay, report.

Every test but the two smoke tests replaces `ghostify.select.time_modules` with a fake that returns chosen
times, so what is kept is known in advance and nothing is actually timed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
from pathlib import Path

import pytest
import torch
from fixtures.residual import Block
from rich.console import Console
from torch import nn

import ghostify.select as select
from ghostify.analysis import build_report
from ghostify.config import ConvertConfig
from ghostify.errors import ConfigError, ConversionError
from ghostify.io import make_recipe, replay, save
from ghostify.modules.ghost_module import GhostModule
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.report import render, render_plain, to_markdown
from ghostify.rewrite import convert_model
from ghostify.select import MeasureOptions, choose, verdict

USER_MODEL = Path(__file__).resolve().parent / "fixtures" / "user_model.py"
_spec = importlib.util.spec_from_file_location("user_model", USER_MODEL)
user_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(user_model)

NO_CACHE = MeasureOptions(cache=False)


class ResNet(nn.Module):
    """stem -> stage1 (2 blocks, not a G-Ghost stage) -> stage2 (4 blocks, 32 ch) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stage1 = nn.Sequential(Block(16, 16), Block(16, 16))
        self.stage2 = nn.Sequential(Block(16, 32, 2), *[Block(32, 32) for _ in range(3)])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def _example(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return user_model.TinyNet().eval()


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet().eval()


class FakeTimer:
    """Stands in for `time_modules`: times per (site, form), else a default per form; counts calls."""

    def __init__(self, times: dict[tuple[str, str], float] | None = None, **default: float) -> None:
        self.times = times or {}
        self.default = {"original": 1.0, "c-ghost": 0.5, "g-ghost": 0.5, "both": 0.5, **default}
        self.calls: list[str] = []

    def __call__(self, site, modules, input_shape, target, options):
        self.calls.append(site)
        return {k: self.times.get((site, k), self.default[k]) for k in modules}


def _no_timing(*args, **kwargs):
    raise AssertionError("nothing may be timed here")


@pytest.fixture(autouse=True)
def _cache_dir_and_one_thread(tmp_path, monkeypatch):
    """A fresh cache per test; one thread, so that a busy machine does not stall torch's thread pool."""
    monkeypatch.setenv("GHOSTIFY_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_keep_and_revert_follow_the_measured_ratio(monkeypatch) -> None:
    timer = FakeTimer(
        {
            ("layer1.0", "original"): 2.0,  # 2x faster: kept
            ("layer1.0", "c-ghost"): 1.0,
            ("block.conv1", "c-ghost"): 1.1,  # slower: reverted
            ("block.conv2", "original"): 1.02,  # faster, but under min_speedup: reverted
            ("block.conv2", "c-ghost"): 1.0,
            ("layer2.0", "original"): 1.05,  # exactly min_speedup: kept
            ("layer2.0", "c-ghost"): 1.0,
        }
    )
    monkeypatch.setattr(select, "time_modules", timer)
    model = _tiny()
    result = convert_model(
        model, ConvertConfig(mode="c-ghost", select="latency"), _example(), measure=NO_CACHE
    )

    by_name = {d.name: d for d in result.decisions}
    assert sorted(timer.calls) == sorted(by_name) == ["block.conv1", "block.conv2", "layer1.0", "layer2.0"]
    assert by_name["layer1.0"].reason == "kept: 2.00x faster"
    assert by_name["block.conv1"].reason == "reverted: 0.91x (slower)"
    assert by_name["block.conv2"].reason == "reverted: 1.02x < --min-speedup 1.05"
    assert by_name["layer2.0"].reason == "kept: 1.05x faster"
    assert [s.name for s in result.sites] == ["layer1.0", "layer2.0"]
    assert isinstance(result.model.layer1[0], GhostModule) and isinstance(result.model.block.conv1, nn.Conv2d)
    d = by_name["layer1.0"]
    assert (d.unit, d.choice, d.input_shape, d.ms_before, d.ms_after) == (
        "conv",
        "c-ghost",
        [1, 16, 32, 32],
        2,
        1,
    )
    assert d.macs_before == 16 * 32 * 9 * 16 * 16 and 0 < d.macs_after < d.macs_before
    assert result.config.decided == {n: d.choice for n, d in by_name.items()}
    assert result.config.target == "cpu"
    skipped = dict(result.skipped)
    assert skipped["block.conv1"] == "latency selection, reverted: 0.91x (slower)"
    assert any("kept 2 of 4 timed sites" in n for n in result.notes)


@pytest.mark.parametrize(
    ("min_speedup", "kept"),
    [(1.5, ["layer1.0"]), (1.0, ["layer1.0", "block.conv2", "layer2.0"]), (0.9, None)],
)
def test_min_speedup_sets_the_bar(monkeypatch, min_speedup, kept) -> None:
    timer = FakeTimer(
        {
            ("layer1.0", "original"): 2.0,
            ("block.conv1", "c-ghost"): 1.1,
            ("block.conv2", "original"): 1.02,
            ("layer2.0", "original"): 1.05,
        },
        **{"c-ghost": 1.0},
    )
    monkeypatch.setattr(select, "time_modules", timer)
    cfg = ConvertConfig(select="latency", min_speedup=min_speedup)
    result = convert_model(_tiny(), cfg, _example(), measure=NO_CACHE)
    names = [s.name for s in result.sites]
    if kept is None:  # below 1: a slower replacement within the margin is kept, and the reason says so
        assert len(names) == 4
        reason = next(d.reason for d in result.decisions if d.name == "block.conv1")
        assert reason == "kept: 0.91x >= --min-speedup 0.9"
    else:
        assert names == kept


def test_nothing_faster_leaves_the_model_unchanged(monkeypatch) -> None:
    monkeypatch.setattr(select, "time_modules", FakeTimer(**{"c-ghost": 3.0}))
    model = _tiny()
    result = convert_model(model, ConvertConfig(select="latency"), _example(), measure=NO_CACHE)
    assert result.sites == [] and result.model is not model
    assert "no replacement was faster on cpu; the model is unchanged" in result.notes
    assert all(d.choice == "original" for d in result.decisions) and len(result.decisions) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(result.model.state_dict()[key], value)
    # the same config without selection still refuses a model it cannot convert, as before
    with pytest.raises(ConversionError):
        convert_model(model, ConvertConfig(include="nothing-matches"), _example())


AUTO_CASES = {
    "g-ghost fastest": ({"original": 10.0, "g-ghost": 5.0, "c-ghost": 8.0, "both": 7.0}, "g-ghost"),
    "c-ghost fastest": ({"original": 10.0, "g-ghost": 9.0, "c-ghost": 6.0, "both": 7.0}, "c-ghost"),
    "both fastest": ({"original": 10.0, "g-ghost": 6.0, "c-ghost": 8.0, "both": 4.0}, "both"),
    "nothing faster": ({"original": 10.0, "g-ghost": 12.0, "c-ghost": 11.0, "both": 13.0}, "original"),
    "tie, fewer changes": ({"original": 10.0, "g-ghost": 5.0, "c-ghost": 5.0, "both": 5.0}, "g-ghost"),
}


@pytest.mark.parametrize("case", list(AUTO_CASES))
def test_auto_chooses_per_stage(monkeypatch, case) -> None:
    stage_times, expected = AUTO_CASES[case]
    timer = FakeTimer({("stage2", k): t for k, t in stage_times.items()})  # every conv alone: 2x faster
    monkeypatch.setattr(select, "time_modules", timer)
    result = convert_model(_resnet(), ConvertConfig(mode="auto"), _example(2), measure=NO_CACHE)

    by_name = {d.name: d for d in result.decisions}
    stage = by_name["stage2"]
    assert (stage.unit, stage.choice) == ("stage", expected)
    assert set(stage.times_ms) == {"original", "g-ghost", "c-ghost", "both"}
    stage2 = result.model.stage2
    assert isinstance(stage2, GGhostStage) == (expected in ("g-ghost", "both"))
    assert result.config.decided["stage2"] == ("g-ghost" if expected == "both" else expected)
    # convs of the original stage, and convs inside its G-Ghost form, each timed alone
    in_original = [d for n, d in by_name.items() if n.startswith("stage2.") and n[7].isdigit()]
    in_g_ghost = [
        d for n, d in by_name.items() if n.startswith(("stage2.base.", "stage2.layers.", "stage2.end."))
    ]
    assert in_original and in_g_ghost
    assert all(d.choice == ("c-ghost" if expected == "c-ghost" else "original") for d in in_original)
    assert all(d.choice == ("c-ghost" if expected == "both" else "original") for d in in_g_ghost)
    if expected == "c-ghost":
        assert isinstance(stage2[0].conv1, GhostModule)
    elif expected == "original":
        assert isinstance(stage2[0].conv1, nn.Conv2d)
    else:
        assert isinstance(stage2.base.conv1, GhostModule if expected == "both" else nn.Conv2d)
    # outside stages (stage1 has 2 blocks: no G-Ghost stage) each conv decides alone: all kept here
    assert isinstance(result.model.stage1[0].conv1, GhostModule)
    assert by_name["stage1.0.conv1"].reason == "kept: 2.00x faster"
    if expected == "g-ghost":
        assert by_name["stage2.1.conv1"].reason == "reverted: its stage stage2 went G-Ghost"
        assert by_name["stage2.base.conv1"].reason == "reverted: its stage stage2 went G-Ghost alone"
    if case == "g-ghost fastest":
        assert stage.reason == "kept: G-Ghost 2.00x faster (G-Ghost + C-Ghost 1.43x, C-Ghost 1.25x)"
    if case == "nothing faster":
        assert stage.reason.startswith("reverted: best C-Ghost 0.91x (slower) (G-Ghost 0.83x")
    if case == "both fastest":  # a stage's convs are timed twice in auto: no totals row adds them up
        report = build_report(_resnet(), result, "resnet", input_shape=(1, 3, 32, 32), latency=False)
        assert "each timed alone" not in render_plain(report)
    # the saved decisions rebuild the same architecture without timing
    monkeypatch.setattr(select, "time_modules", _no_timing)
    again = convert_model(_resnet(), result.config, _example(2))
    assert _shapes(again.model) == _shapes(result.model)


def test_auto_builds_the_g_ghost_model_once(monkeypatch) -> None:
    timer = FakeTimer({("stage2", k): t for k, t in AUTO_CASES["g-ghost fastest"][0].items()})
    monkeypatch.setattr(select, "time_modules", timer)
    built, convert_sites = [], select.convert_sites

    def counting(model, cfg, example):
        result = convert_sites(model, cfg, example)
        if cfg.mode == "g-ghost":
            built.append(sorted(s.name for s in result.sites))
        return result

    monkeypatch.setattr(select, "convert_sites", counting)
    convert_model(_resnet(), ConvertConfig(mode="auto"), _example(2), measure=NO_CACHE)
    assert built == [["stage2"]]  # the stage forms and the model searched for inner convs are one


def test_choose_and_verdict() -> None:
    assert verdict(1.0, 1.0, 1.05) == (False, "reverted: 1.00x < --min-speedup 1.05")
    times = {"original": 10.0, "g-ghost": 5.02, "c-ghost": 5.0}  # within 1%: the smaller change wins
    assert choose(times, {"g-ghost": 1, "c-ghost": 6}, 1.05)[0] == "g-ghost"
    assert choose({**times, "g-ghost": 6.0}, {"g-ghost": 1, "c-ghost": 6}, 1.05)[0] == "c-ghost"
    assert choose({"original": 1.0, "c-ghost": 0.0}, {}, 1.05)[0] == "original"  # an untimed 0 never wins


def test_second_run_reads_the_cache(monkeypatch, tmp_path) -> None:
    timer = FakeTimer({("layer1.0", "c-ghost"): 2.0})
    monkeypatch.setattr(select, "time_modules", timer)
    model = _tiny()
    first = convert_model(model, ConvertConfig(select="latency"), _example())
    assert len(timer.calls) == 4 and not any(d.cached for d in first.decisions)
    cache = json.loads((tmp_path / "cache" / "latency.json").read_text())
    assert cache["version"] == 1 and len(cache["entries"]) == 4
    key = next(iter(cache["entries"]))
    assert (
        key.startswith("cpu | ") and f"torch {torch.__version__}" in key and key.count(" | 1 thread | ") == 1
    )

    monkeypatch.setattr(select, "time_modules", _no_timing)
    second = convert_model(model, ConvertConfig(select="latency"), _example())
    assert all(d.cached for d in second.decisions)
    assert [(d.name, d.choice, d.ms_after) for d in second.decisions] == [
        (d.name, d.choice, d.ms_after) for d in first.decisions
    ]
    assert any("4 timings from the cache" in n for n in second.notes)
    # more repeats than were cached, or another thread count, measure again
    with pytest.raises(AssertionError, match="nothing may be timed"):
        convert_model(model, ConvertConfig(select="latency"), _example(), measure=MeasureOptions(repeats=30))
    with pytest.raises(AssertionError, match="nothing may be timed"):
        threads = torch.get_num_threads() + 1  # 2
        convert_model(
            model, ConvertConfig(select="latency"), _example(), measure=MeasureOptions(threads=threads)
        )


def test_damaged_cache_is_ignored(monkeypatch, tmp_path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "latency.json").write_text("{not json")
    monkeypatch.setattr(select, "time_modules", FakeTimer())
    result = convert_model(_tiny(), ConvertConfig(select="latency"), _example())
    assert len(result.sites) == 4
    assert len(json.loads((tmp_path / "cache" / "latency.json").read_text())["entries"]) == 4


@pytest.mark.parametrize("mode", ["c-ghost", "g-ghost", "both", "auto"])
def test_replay_rebuilds_the_decided_architecture_without_timing(monkeypatch, mode) -> None:
    timer = FakeTimer(
        {
            ("stage1.0.conv1", "c-ghost"): 2.0,  # reverted
            ("stage2", "g-ghost"): 0.4,  # G-Ghost wins stage2
            ("stage2.base.conv2", "c-ghost"): 2.0,  # mode both: a nested conv reverted
        }
    )
    monkeypatch.setattr(select, "time_modules", timer)
    model = _resnet()
    cfg = ConvertConfig(mode=mode, select="latency")
    result = convert_model(model, cfg, _example(2), measure=NO_CACHE)
    decided = result.config.decided
    if mode in ("g-ghost", "both", "auto"):
        assert decided["stage2"] == "g-ghost" and isinstance(result.model.stage2, GGhostStage)
    if mode == "both":  # C-Ghost was timed on the convs of the G-Ghost stage, under their new names
        assert decided["stage2.base.conv1"] == "c-ghost" and decided["stage2.base.conv2"] == "original"
        assert isinstance(result.model.stage2.base.conv1, GhostModule)
    if mode != "g-ghost":
        assert decided["stage1.0.conv1"] == "original" and decided["stage1.0.conv2"] == "c-ghost"

    monkeypatch.setattr(select, "time_modules", _no_timing)
    saved = json.loads(json.dumps(result.config.to_dict()))
    again = convert_model(model, ConvertConfig.from_dict({**saved, "weight_init": "random"}), _example(1))
    assert again.decisions == [] and _shapes(again.model) == _shapes(result.model)
    assert [s.name for s in again.sites] == [s.name for s in result.sites]


def test_saved_selection_loads_back(monkeypatch, tmp_path, user_model_file) -> None:
    """The recipe holds the decisions: `replay` rebuilds the model with the same weights, untimed."""
    monkeypatch.setattr(select, "time_modules", FakeTimer({("block.conv1", "c-ghost"): 2.0}))
    spec = f"{user_model_file}:tiny_net"
    model = _tiny()
    result = convert_model(model, ConvertConfig(select="latency"), _example(), measure=NO_CACHE)
    out = save(result.model, tmp_path / "out", make_recipe(spec, result.config, 10, (3, 32, 32)))

    monkeypatch.setattr(select, "time_modules", _no_timing)
    _, loaded, _ = replay(out)
    assert isinstance(loaded.model.block.conv1, nn.Conv2d) and isinstance(
        loaded.model.block.conv2, GhostModule
    )
    x = _example()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(x), result.model.eval()(x))


def test_options_are_checked() -> None:
    assert ConvertConfig(mode="auto").select == "latency"
    assert ConvertConfig(mode="both").select == "all"
    old = ConvertConfig.from_dict({"mode": "c-ghost", "ratio": 2, "dw_size": 3, "mix": True})
    assert (old.select, old.target, old.min_speedup, old.decided) == ("all", None, 1.05, None)
    assert ConvertConfig.from_dict(ConvertConfig(mode="auto").to_dict()) == ConvertConfig(mode="auto")
    assert ConvertConfig(decided=[("a", "c-ghost")]).decided == {"a": "c-ghost"}
    bad = [
        ({"select": "fast"}, "select must be one of all, latency"),
        ({"target": "tpu"}, "target must be one of cpu, cuda, onnxruntime"),
        ({"min_speedup": 0}, "min-speedup must be > 0"),
        ({"min_speedup": "1.1"}, "min-speedup must be a number"),
        ({"min_speedup": math.nan}, "min-speedup must be a number"),
        ({"min_speedup": True}, "min-speedup must be a number"),
        ({"mode": "auto", "select": "all"}, "mode auto chooses each site by measured latency"),
        ({"mode": "fast"}, "mode must be one of c-ghost, g-ghost, both, auto"),
        ({"decided": {"a": "maybe"}}, "each site's choice is one of c-ghost, g-ghost, original"),
        ({"decided": 3}, "decided must map site names to a choice"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            ConvertConfig(**kwargs)
    with pytest.raises(ConversionError, match="pass example_inputs"):
        convert_model(_tiny(), ConvertConfig(select="latency"))
    with pytest.raises(ConfigError, match="MeasureOptions|repeats >= 1"):
        MeasureOptions(repeats=0)


def test_unavailable_targets_are_refused(monkeypatch) -> None:
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="target cuda needs a CUDA GPU"):
            convert_model(_tiny(), ConvertConfig(select="latency", target="cuda"), _example())
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(ConfigError, match="target onnxruntime needs onnxruntime.*: pip install onnxruntime"):
        convert_model(_tiny(), ConvertConfig(select="latency", target="onnxruntime"), _example())


def test_report_shows_the_decisions(monkeypatch) -> None:
    monkeypatch.setattr(select, "time_modules", FakeTimer({("block.conv1", "c-ghost"): 2.0}))
    model = _tiny()
    result = convert_model(model, ConvertConfig(select="latency"), _example(), measure=NO_CACHE)
    report = build_report(model, result, "tiny", input_shape=(1, 3, 32, 32), latency=False)
    assert len(report.decisions) == 4

    plain = render_plain(report)
    assert "latency selection: 3 of 4 timed sites kept" in plain
    line = next(ln for ln in plain.splitlines() if ln.startswith("block.conv1"))
    assert "1.000 -> 2.000 ms" in line and "reverted: 0.50x (slower)" in line and "original" in line
    assert "|" not in plain
    # The totals add the sites up: 4.0 ms before; as chosen 0.5 + 1.0 (reverted) + 0.5 + 0.5.
    total = next(ln for ln in plain.splitlines() if ln.startswith("total (4 convs"))
    assert "4.000 -> 2.500 ms" in total and "chosen 1.60x; every candidate 1.14x" in total

    md = to_markdown(report)
    assert "| **total (4 convs, each timed alone)** | **conv** |" in md
    assert "### Latency selection: 3 of 4 timed sites kept" in md
    assert "| block.conv1 | conv | original |" in md

    data = json.loads(json.dumps(report.to_dict()))
    assert [d["name"] for d in data["decisions"]] == [d.name for d in result.decisions]
    assert data["decisions"][0]["speedup"] == 2.0 and data["config"]["decided"]["block.conv1"] == "original"

    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    render(report, console=console)
    text = console.file.getvalue()
    assert "latency selection: 3 of 4 timed sites kept" in text and "reverted: 0.50x (slower)" in text
    assert "chosen 1.60x; every candidate 1.14x" in text


def test_real_timing_smoke() -> None:
    """Real timing on a tiny CNN: whatever wins, every site is decided and the report shows it."""
    model = _tiny()
    measure = MeasureOptions(repeats=3, warmup=1, threads=1, cache=False)
    result = convert_model(model, ConvertConfig(select="latency"), _example(), measure=measure)
    assert [d.name for d in result.decisions] == ["layer1.0", "block.conv1", "block.conv2", "layer2.0"]
    assert all(d.ms_before > 0 and d.ms_after > 0 for d in result.decisions)
    report = build_report(model, result, "tiny", input_shape=(1, 3, 32, 32), latency=False)
    assert "latency selection:" in render_plain(report)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_onnxruntime_target_smoke() -> None:
    measure = MeasureOptions(repeats=2, warmup=1, threads=1, cache=False)
    cfg = ConvertConfig(select="latency", target="onnxruntime", include="block.conv1")
    result = convert_model(_tiny(), cfg, _example(), measure=measure)
    (decision,) = result.decisions
    assert decision.ms_before > 0 and decision.ms_after > 0 and result.config.target == "onnxruntime"
