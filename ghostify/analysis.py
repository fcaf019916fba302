"""Measure what a conversion bought: parameters, MACs, measured latency, and a per-site diff.

Everything here returns data (dataclasses whose field names carry their units); rendering lives in
`ghostify.report`.

Conventions:
    - MACs are multiply-accumulates, counted as FLOPs / 2 by `torch.utils.flop_counter.FlopCounterMode`
      on one real forward pass. Only the matrix-multiply-like ops it knows are counted (convolutions,
      linear/matmul, attention); batch norm, activations, pooling, element-wise adds, concatenation and
      slicing count as 0. Biases are not counted. This is the convention of the GhostNet papers, whose
      "FLOPs" are MACs.
    - Parameters are unique `nn.Parameter` elements (shared parameters count once); buffers are not counted.
    - Latency is wall-clock time of one forward pass under `torch.inference_mode()` in eval mode, taken with
      `time.perf_counter` (synchronising CUDA around the timer), after warm-up runs. We report the median
      and the 10th/90th percentiles. Before/after comparisons interleave the models run by run
      (`compare_latency`) so that machine noise falls on all of them alike.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from time import perf_counter
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ghostify.evaluate import EvalResult
from ghostify.modes import eval_mode
from ghostify.rewrite.result import ConversionResult

ExampleInputs = torch.Tensor | tuple[Any, ...] | list[Any]

CONVENTIONS = {
    "macs": "MACs = FLOPs / 2 from torch.utils.flop_counter.FlopCounterMode (one forward pass); "
    "convolutions and matmuls only: batch norm, activations, pooling, adds and concatenation count 0; "
    "biases not counted.",
    "params": "unique nn.Parameter elements; buffers (e.g. BN running stats) not counted.",
    "latency": "wall-clock time of one forward pass (torch.inference_mode, eval mode, time.perf_counter, "
    "CUDA synchronised around the timer); median and p10/p90 of N timed runs at batch B with T threads "
    "after W warm-up runs; before/after runs interleaved run by run.",
}


@dataclass
class LatencyStats:
    """Measured forward-pass latency of one model.

    Attributes:
        median_ms: median over the timed runs, in milliseconds.
        p10_ms: 10th percentile, in milliseconds.
        p90_ms: 90th percentile, in milliseconds.
        runs: number of timed runs.
        warmup: number of untimed warm-up runs before them.
        batch_size: leading dimension of the first input tensor.
        threads: intra-op CPU threads (torch.get_num_threads()) during the measurement.
        device: "cpu" or "cuda" (the device type the model ran on).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    device: str


@dataclass
class ModelStats:
    """Size and cost of one model at one input shape.

    Attributes:
        params: parameter count.
        macs: multiply-accumulates of one forward pass (see the module docstring for what counts).
        input_shape: shape of the (first) input, e.g. (1, 3, 224, 224).
        latency: measured latency, or None when not measured.
        module_macs: MACs per qualified module name, as in `model.named_modules()` (the root "" is left out;
            so are modules with no counted MACs). A module's figure includes its submodules'; a container
            that is never called itself (as in an fx.GraphModule) gets the sum of its submodules'.
        module_params: parameters per qualified module name (recursive; the root "" is left out).
    """

    params: int
    macs: int
    input_shape: tuple[int, ...]
    latency: LatencyStats | None = None
    module_macs: dict[str, int] = field(default_factory=dict)
    module_params: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data


def count_params(model: nn.Module) -> int:
    """Number of parameter elements; a parameter shared by several modules counts once."""
    return sum(p.numel() for p in model.parameters())


def module_param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per qualified module name, each including its submodules' (root "" left out)."""
    return {name: count_params(mod) for name, mod in model.named_modules() if name}


def _as_tuple(example_inputs: ExampleInputs) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _first_tensor(inputs: tuple[Any, ...]) -> torch.Tensor | None:
    return next((x for x in inputs if isinstance(x, torch.Tensor)), None)


def _to_device(inputs: tuple[Any, ...], device: torch.device) -> tuple[Any, ...]:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_macs(model: nn.Module, example_inputs: ExampleInputs) -> tuple[int, dict[str, int]]:
    """Count MACs (FLOPs / 2) of one forward pass, in total and per module.

    Args:
        model: the model; run once in eval mode under `torch.inference_mode()` (its modes are restored).
        example_inputs: a tensor or a tuple of positional inputs, on the model's device.

    Returns:
        (total MACs, MACs per qualified module name as in `model.named_modules()`, root excluded).
    """
    inputs = _as_tuple(example_inputs)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.inference_mode(), counter:
        model(*inputs)
    total = counter.get_total_flops() // 2

    # FlopCounterMode names modules "<RootClass>.<path>" (its ModuleTracker names each module by the
    # first path it sees); map each back to the module object, then to its canonical named_modules() name.
    canonical = {id(mod): name for name, mod in model.named_modules()}
    root_prefix = type(model).__name__ + "."
    per_module: dict[str, int] = {}
    for key, by_op in counter.get_flop_counts().items():
        if not key.startswith(root_prefix):
            continue  # "Global", the root itself, or a module outside the model's tree
        try:
            mod = model.get_submodule(key[len(root_prefix) :])
        except AttributeError:
            continue
        name = canonical.get(id(mod))
        if name:
            per_module[name] = per_module.get(name, 0) + sum(by_op.values()) // 2
    _fill_uncalled_containers(per_module, canonical.values())
    return total, per_module


def _fill_uncalled_containers(per_module: dict[str, int], names: Iterable[str]) -> None:
    """Give containers that were never called (e.g. in an fx.GraphModule) the sum of their submodules'."""
    children: dict[str, list[str]] = {}
    for name in names:
        if name:
            children.setdefault(name.rpartition(".")[0], []).append(name)
    for name in sorted(children, key=lambda n: n.count(".") if n else -1, reverse=True):
        if name and name not in per_module:
            total = sum(per_module.get(child, 0) for child in children[name])
            if total:
                per_module[name] = total


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of already sorted values; q in [0, 100]."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _stats(times_s: list[float], warmup: int, inputs: tuple[Any, ...], device: torch.device) -> LatencyStats:
    ms = sorted(t * 1000.0 for t in times_s)
    first = _first_tensor(inputs)
    batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    return LatencyStats(
        median_ms=_percentile(ms, 50),
        p10_ms=_percentile(ms, 10),
        p90_ms=_percentile(ms, 90),
        runs=len(ms),
        warmup=warmup,
        batch_size=batch,
        threads=torch.get_num_threads(),
        device=device.type,
    )


def _timed_run(model: nn.Module, inputs: tuple[Any, ...], device: torch.device) -> float:
    sync = device.type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = perf_counter()
    model(*inputs)
    if sync:
        torch.cuda.synchronize(device)
    return perf_counter() - start


def measure_latency(
    model: nn.Module,
    example_inputs: ExampleInputs,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
    min_time_s: float = 0.0,
) -> LatencyStats:
    """Time forward passes of `model` on `example_inputs`.

    Runs `warmup` untimed passes, then at least `repeats` timed ones, and keeps going until the timed
    passes add up to `min_time_s`. Eval mode and `torch.inference_mode()`; training flags and the
    thread count are restored afterwards.

    Args:
        model: the model, already on the device to measure.
        example_inputs: a tensor or a tuple of positional inputs (moved to the model's device).
        warmup: untimed runs first.
        repeats: minimum number of timed runs (>= 1).
        threads: intra-op CPU threads during the measurement (default: leave torch's setting).
        min_time_s: minimum total timed duration, in seconds.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats}).")
    device = _model_device(model)
    inputs = _to_device(_as_tuple(example_inputs), device)
    warmup = max(warmup, 0)
    times: list[float] = []
    total_s = 0.0
    with _num_threads(threads), eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            _timed_run(model, inputs, device)
        while len(times) < repeats or total_s < min_time_s:
            times.append(_timed_run(model, inputs, device))
            total_s += times[-1]
        return _stats(times, warmup, inputs, device)


def compare_latency(
    models: Mapping[str, nn.Module],
    example_inputs: ExampleInputs,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
) -> dict[str, LatencyStats]:
    """Time several models side by side, interleaved run by run, so machine noise hits all alike.

    Each round runs every model once (the starting model rotates from round to round, so none is
    always first); warm-up rounds are interleaved the same way. Use this for before/after latency.

    Args:
        models: name -> model, each already on the device to measure.
        example_inputs: a tensor or a tuple of positional inputs (moved to each model's device).
        repeats: timed rounds (>= 1).
        warmup: untimed rounds first.
        threads: intra-op CPU threads during the measurement (default: leave torch's setting).

    Returns:
        name -> LatencyStats, in the order of `models`.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats}).")
    names = list(models)
    devices = {name: _model_device(models[name]) for name in names}
    base = _as_tuple(example_inputs)
    inputs = {name: _to_device(base, devices[name]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    warmup = max(warmup, 0)
    with _num_threads(threads), eval_mode(*models.values()), torch.inference_mode():
        for round_idx in range(warmup + repeats):
            shift = round_idx % max(len(names), 1)
            for name in names[shift:] + names[:shift]:
                elapsed = _timed_run(models[name], inputs[name], devices[name])
                if round_idx >= warmup:
                    times[name].append(elapsed)
        return {name: _stats(times[name], warmup, inputs[name], devices[name]) for name in names}


def analyze(
    model: nn.Module,
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    latency: bool = True,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
    device: str | torch.device = "cpu",
) -> ModelStats:
    """Parameters, MACs (total and per module) and, optionally, measured latency of `model`.

    The model is left as it is: when it is not on `device`, a copy is moved there. `device="meta"` with a
    model built on the meta device counts params and MACs without allocating or computing anything
    (latency must then be off).

    Args:
        model: the model to measure.
        input_shape: shape of a random input, batch first.
        latency: also measure latency (see `measure_latency`).
        warmup: untimed latency runs.
        repeats: timed latency runs.
        threads: intra-op CPU threads for the latency runs.
        device: where to run ("cpu", "cuda", "cuda:1", "meta").
    """
    target = torch.device(device)
    if latency and target.type == "meta":
        raise ValueError("latency cannot be measured on the meta device; pass latency=False.")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    if _model_device(model) != target:
        model = copy.deepcopy(model).to(target)
    shape = tuple(int(d) for d in input_shape)
    example = torch.randn(shape, device=_model_device(model))
    macs, module_macs = count_macs(model, example)
    stats = measure_latency(model, example, warmup, repeats, threads) if latency else None
    return ModelStats(
        params=count_params(model),
        macs=macs,
        input_shape=shape,
        latency=stats,
        module_macs=module_macs,
        module_params=module_param_counts(model),
    )


@dataclass
class SiteRow:
    """One replaced site, before and after.

    Attributes:
        name: qualified module name of the site (the same in both models).
        kind: "c-ghost" or "g-ghost".
        detail: short description of the original module.
        macs_before: MACs of the original module, plus those of the modules it absorbed.
        macs_after: MACs of the replacement.
        params_before: parameters of the original module, plus those of the modules it absorbed.
        params_after: parameters of the replacement.
    """

    name: str
    kind: str
    detail: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int

    @property
    def macs_ratio(self) -> float | None:
        """macs_before / macs_after, or None when the replacement has no MACs."""
        return _ratio(self.macs_before, self.macs_after)

    @property
    def params_ratio(self) -> float | None:
        """params_before / params_after, or None when the replacement has no parameters."""
        return _ratio(self.params_before, self.params_after)


def _ratio(before: float, after: float) -> float | None:
    return before / after if after else None


@dataclass
class LatencyRow:
    """Whole-model latency of the original and the result in one form at one batch size, interleaved.

    Attributes:
        form: "eager" (the modules as they are) or "deploy" (`ghostify.deploy_form`: BN folded, copies
            folded; each model in its own deploy form, so the original is not handicapped).
        batch_size: leading dimension of the input.
        before: the original's latency.
        after: the result's latency.
    """

    form: str
    batch_size: int
    before: LatencyStats
    after: LatencyStats

    @property
    def speedup(self) -> float | None:
        """before median / after median (> 1 means faster)."""
        return _ratio(self.before.median_ms, self.after.median_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "speedup": self.speedup}


@dataclass
class ConversionReport:
    """Before/after figures of one conversion, ready to render (see `ghostify.report`).

    Attributes:
        model: the model spec or name.
        config: the conversion config, as `ConvertConfig.to_dict()`.
        before: stats of the original model.
        after: stats of the converted model.
        sites: one row per replaced site, in conversion order.
        skipped: (module name, why it was left alone).
        notes: free-form remarks from the conversion.
        accuracy: measured accuracy per stage, in the order measured ("original", "converted",
            "calibrated", "distilled"...), each {"top1": %, "top5": %, "images": n}; empty when no labelled
            data was given (see `set_accuracy`).
        decisions: with a latency selection (`select="latency"`), one `ghostify.select.SiteDecision` per
            timed site: MACs and time before -> after and why it was kept or reverted; else empty.
        latencies: whole-model latency per (form, batch size), the eager one at the report's batch first
            (the same figures as `before.latency` / `after.latency`); empty when latency was not measured.
    """

    model: str
    config: dict[str, Any]
    before: ModelStats
    after: ModelStats
    sites: list[SiteRow] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    decisions: list[Any] = field(default_factory=list)
    latencies: list[LatencyRow] = field(default_factory=list)

    @property
    def macs_ratio(self) -> float | None:
        """before.macs / after.macs (> 1 means fewer MACs), or None when after has none."""
        return _ratio(self.before.macs, self.after.macs)

    @property
    def params_ratio(self) -> float | None:
        """before.params / after.params (> 1 means fewer parameters), or None when after has none."""
        return _ratio(self.before.params, self.after.params)

    @property
    def latency_speedup(self) -> float | None:
        """before median / after median (> 1 means faster), or None when latency was not measured."""
        if self.before.latency is None or self.after.latency is None:
            return None
        return _ratio(self.before.latency.median_ms, self.after.latency.median_ms)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: everything above plus the ratios and the measurement conventions."""
        return {
            "model": self.model,
            "config": dict(self.config),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "macs_ratio": self.macs_ratio,
            "params_ratio": self.params_ratio,
            "latency_speedup": self.latency_speedup,
            "sites": [{**asdict(s), "macs_ratio": s.macs_ratio} for s in self.sites],
            "skipped": [{"name": n, "why": w} for n, w in self.skipped],
            "notes": list(self.notes),
            "accuracy": {stage: dict(acc) for stage, acc in self.accuracy.items()},
            **({"decisions": [d.to_dict() for d in self.decisions]} if self.decisions else {}),
            **({"latencies": [row.to_dict() for row in self.latencies]} if self.latencies else {}),
            "conventions": {**CONVENTIONS, "latency_conditions": self._latency_conditions()},
        }

    def _latency_conditions(self) -> str | None:
        lat = self.before.latency or self.after.latency
        if lat is None:
            return None
        return (
            f"median of {lat.runs} runs at batch {lat.batch_size} with {lat.threads} threads "
            f"on {lat.device} after {lat.warmup} warm-up runs"
        )


def set_accuracy(report: ConversionReport, stage: str, result: EvalResult) -> None:
    """Record `result` as the accuracy of `stage` ("original", "converted", "calibrated", "distilled"...).

    Stages are shown in the order they were first set; setting one again replaces its figures in place.
    """
    report.accuracy[stage] = {"top1": result.top1, "top5": result.top5, "images": result.images}


def _site_row(site: Any, before: ModelStats, after: ModelStats) -> SiteRow:
    prefix = site.name + "."
    extra = [a for a in site.absorbed if a != site.name and not a.startswith(prefix)]
    return SiteRow(
        name=site.name,
        kind=site.kind,
        detail=site.detail,
        macs_before=before.module_macs.get(site.name, 0) + sum(before.module_macs.get(a, 0) for a in extra),
        macs_after=after.module_macs.get(site.name, 0),
        params_before=before.module_params.get(site.name, 0)
        + sum(before.module_params.get(a, 0) for a in extra),
        params_after=after.module_params.get(site.name, 0),
    )


def _top_level_sites(sites: list[Any]) -> list[Any]:
    """Sites not nested in another site (mode "both": a G-Ghost stage's row covers the C-Ghost convs in it,
    whose names do not exist in the original)."""
    prefixes = tuple(s.name + "." for s in sites)
    return [s for s in sites if not s.name.startswith(prefixes)]


def build_report(
    original: nn.Module,
    result: ConversionResult,
    model_name: str,
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    latency: bool = True,
    repeats: int = 20,
    warmup: int = 5,
    threads: int | None = None,
    deploy: bool = True,
    large_batch: int | None = None,
) -> ConversionReport:
    """Measure the original and the converted model and diff them site by site.

    Both models run where they are (the input follows each model's device). Latency, when asked for,
    is measured side by side with `compare_latency`: eager at the input's batch, then (with `deploy`)
    both models in their deploy forms, then (with `large_batch`) both forms again at that batch, with a
    quarter of the rounds since each run is longer. A model without a deploy form gets a note instead.

    Args:
        original: the model before conversion (left untouched).
        result: what `convert` returned.
        model_name: the model spec or name, for the report's title.
        input_shape: shape of a random input, batch first.
        latency: measure before/after latency.
        repeats: timed latency rounds.
        warmup: untimed latency rounds.
        threads: intra-op CPU threads for the latency runs.
        deploy: also time both models in deploy form.
        large_batch: also time at this batch size (None or the input's batch: not again).
    """
    shape = tuple(int(d) for d in input_shape)
    example = torch.randn(shape)
    before = _static_stats(original, example)
    after = _static_stats(result.model, example)
    report = ConversionReport(
        model=model_name,
        config=result.config.to_dict(),
        before=before,
        after=after,
        sites=[_site_row(site, before, after) for site in _top_level_sites(result.sites)],
        skipped=[(str(n), str(w)) for n, w in result.skipped],
        notes=list(result.notes),
        decisions=list(getattr(result, "decisions", [])),
    )
    if latency:
        forms = {"eager": (original, result.model)}
        if deploy:
            forms.update(_deploy_forms(original, result.model, example, report.notes))
        batches = [(shape[0], repeats, warmup)]
        if large_batch and large_batch != shape[0]:
            batches.append((large_batch, max(3, repeats // 4), min(warmup, 1)))
        models = {
            f"{form} {side}": m for form, pair in forms.items() for side, m in zip(SIDES, pair, strict=True)
        }
        for batch, rounds, warm in batches:  # every model of every form interleaved in one call
            timed = compare_latency(models, torch.randn(batch, *shape[1:]), rounds, warm, threads)
            for form in forms:
                row = LatencyRow(form, batch, timed[f"{form} before"], timed[f"{form} after"])
                report.latencies.append(row)
        before.latency, after.latency = report.latencies[0].before, report.latencies[0].after
    return report


SIDES = ("before", "after")


def _deploy_forms(
    original: nn.Module, converted: nn.Module, example: torch.Tensor, notes: list[str]
) -> dict[str, tuple[nn.Module, nn.Module]]:
    """{"deploy": (original, converted) in deploy form}, or {} with a note when one has none."""
    from ghostify.deploy import deploy_form  # deploy imports the module library; keep analysis light

    try:
        pair = tuple(deploy_form(m, example.to(_model_device(m))) for m in (original, converted))
    except Exception as err:  # noqa: BLE001 - a report must not fail on a form it only measures
        notes.append(f"deploy-form latency not measured: {type(err).__name__}: {err}")
        return {}
    return {"deploy": pair}


def _static_stats(model: nn.Module, example: torch.Tensor) -> ModelStats:
    macs, module_macs = count_macs(model, example.to(_model_device(model)))
    return ModelStats(
        params=count_params(model),
        macs=macs,
        input_shape=tuple(example.shape),
        latency=None,
        module_macs=module_macs,
        module_params=module_param_counts(model),
    )
