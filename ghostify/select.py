"""Latency-aware selection: keep a Ghost replacement only where it is measured to be faster.

Fewer MACs is not lower latency: depthwise convs do little work per byte moved, and concatenation and
gathers copy memory, so a Ghost swap can make a site (and a model, e.g. MobileNetV2) slower. With
`ConvertConfig(select="latency")` every candidate site is converted, then timed alone, before and after:

- in deploy form (`ghostify.deploy`: BN folded, Ghost layouts simplified), the form one ships, so that
  the BN the replacement adds is not counted against it;
- at its real input shape, recorded with forward hooks on the example input (batch = the example's);
- on the target: torch eager on "cpu" or "cuda", or an ONNX Runtime session ("onnxruntime");
- before and after interleaved run by run (`ghostify.analysis.compare_latency`).

A replacement is kept when time before / time after >= `min_speedup`. Mode "auto" also chooses, per
residual stage, the fastest of the original stage, its G-Ghost form, the stage with its kept C-Ghost
convs and the G-Ghost form with its kept inner C-Ghost convs ("both"), among those that exist. The
outcome goes into `result.config.decided`, so a saved recipe replays the same architecture without
measuring anything. Measurements are cached on disk (see `LatencyCache`), keyed by what decides a
timing (target, device, torch version, threads, the deploy-form module's structure and input shape), so a
second run on the same machine is fast.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import hashlib
import io
import json
import os
import platform
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ghostify.analysis import compare_latency, count_macs
from ghostify.config import ConvertConfig
from ghostify.deploy import deploy_form
from ghostify.errors import ConfigError, ConversionError, GhostifyError
from ghostify.modes import eval_mode
from ghostify.rewrite import LEFT_BY_SELECTION, convert_sites
from ghostify.rewrite.c_ghost import apply_c_ghost
from ghostify.rewrite.result import ConversionResult, SiteRecord
from ghostify.rewrite.stages import call_model, find_stages

CACHE_VERSION = 1
CACHE_FILE = "latency.json"
LABELS = {"original": "original", "c-ghost": "C-Ghost", "g-ghost": "G-Ghost", "both": "G-Ghost + C-Ghost"}
TIE = 0.01  # mode auto: times within 1% of the fastest count as a tie, won by the smaller change


@dataclass
class MeasureOptions:
    """How the selection times each site.

    Attributes:
        repeats: timed rounds per site (before and after interleaved, one run each per round).
        warmup: untimed rounds first.
        threads: intra-op CPU threads (torch, or ONNX Runtime's session); default: torch's current setting.
        cache: read and write the on-disk cache (see `LatencyCache`).
    """

    repeats: int = 15
    warmup: int = 3
    threads: int | None = None
    cache: bool = True

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise ConfigError("selection timing needs repeats >= 1, warmup >= 0 and threads >= 1.")


@dataclass
class SiteDecision:
    """What the latency selection measured at one site and what it chose.

    Attributes:
        name: qualified module name (a conv, or a stage container).
        unit: "conv" (original conv+BN+act vs its C-Ghost module) or "stage" (a residual stage).
        choice: "c-ghost", "g-ghost" or "original" (the replacement was reverted); a stage in mode auto
            may also go "both" (G-Ghost, with the C-Ghost convs inside it that were faster alone).
        candidate: the replacement the "after" figures describe: the choice, or when reverted the best
            replacement measured.
        reason: e.g. "kept: 1.32x faster", "reverted: 0.91x (slower)", "reverted: 1.02x < --min-speedup 1.05".
        input_shape: the input the site was timed with (batch first).
        ms_before: median time of the original, in milliseconds.
        ms_after: median time of `candidate`, in milliseconds.
        macs_before: MACs of the original at batch 1.
        macs_after: MACs of `candidate` at batch 1.
        times_ms: median time of every measured form ("original" first), in milliseconds.
        cached: the times came from the cache, not from this run.
    """

    name: str
    unit: str
    choice: str
    candidate: str
    reason: str
    input_shape: list[int]
    ms_before: float
    ms_after: float
    macs_before: int
    macs_after: int
    times_ms: dict[str, float] = field(default_factory=dict)
    cached: bool = False

    @property
    def speedup(self) -> float | None:
        """ms_before / ms_after (> 1 means the candidate is faster), or None when it was not timed."""
        return self.ms_before / self.ms_after if self.ms_after > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "speedup": self.speedup}


class Unmeasurable(GhostifyError):
    """A site cannot be timed on the target (e.g. it does not export to ONNX); it stays original."""


# ------------------------------------------------------------------------------------------- timing


def resolve_target(target: str | None, model: nn.Module) -> str:
    """The target to time on: as given, else "cuda" when the model's parameters are on CUDA, else "cpu"."""
    if target is not None:
        return target
    param = next(model.parameters(), None)
    return "cuda" if param is not None and param.is_cuda else "cpu"


def check_target(target: str) -> None:
    """Raise a ConfigError when `target` cannot run here (no GPU, ONNX Runtime not installed)."""
    if target == "cuda" and not torch.cuda.is_available():
        raise ConfigError("target cuda needs a CUDA GPU and none is visible; use --target cpu.")
    if target == "onnxruntime":
        import importlib.util

        missing = [p for p in ("onnxruntime", "onnx") if importlib.util.find_spec(p) is None]
        if missing:
            raise ConfigError(
                f"target onnxruntime needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                "(or choose --target cpu)."
            )


def cpu_name() -> str:
    """The CPU's model name (part of the cache key, and printed beside every timing)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_key(target: str, threads: int) -> str:
    """What decides a timing besides the module itself: target, device, library versions, threads."""
    parts = [target]
    if target == "cuda":
        parts += [torch.cuda.get_device_name(), f"cuda {torch.version.cuda}"]
    else:
        parts.append(cpu_name())
    if target == "onnxruntime":
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    parts += [f"torch {torch.__version__}", f"{threads} thread{'s' if threads != 1 else ''}"]
    return " | ".join(parts)


def module_signature(module: nn.Module) -> str:
    """A short hash of a deploy-form module's structure: layer types and hyper-parameters (channels,
    kernel, stride, groups, ratio...) and, for a traced module, its code (the ops and their order)."""
    return hashlib.sha1(str(module).encode()).hexdigest()[:16]


def _dtype(module: nn.Module) -> torch.dtype:
    param = next((p for p in module.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32


class _OrtModule(nn.Module):
    """An ONNX Runtime session behind nn.Module's call, so `compare_latency` can time it."""

    def __init__(self, module: nn.Module, example: torch.Tensor, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        buffer = io.BytesIO()
        try:
            with eval_mode(module), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=17)
        except Exception as err:  # noqa: BLE001 - whatever the exporter rejects cannot be timed
            raise Unmeasurable(f"it does not export to ONNX ({str(err).splitlines()[0][:80]})") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle while others run
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> Any:
        return self.session.run(None, {self.input_name: x.numpy()})


def time_modules(
    site: str,
    modules: Mapping[str, nn.Module],
    input_shape: tuple[int, ...],
    target: str,
    options: MeasureOptions,
) -> dict[str, float]:
    """Median milliseconds of each deploy-form module on a random input of `input_shape`, interleaved.

    `site` names what is timed (for messages; tests replace this function with a fake timer).
    """
    del site
    threads = options.threads or torch.get_num_threads()
    device = torch.device("cuda" if target == "cuda" else "cpu")
    first = next(iter(modules.values()))
    example = torch.randn(input_shape, dtype=_dtype(first), device=device)
    runnable: dict[str, nn.Module] = {}
    for name, module in modules.items():
        module = module.to(device)
        runnable[name] = _OrtModule(module, example, threads) if target == "onnxruntime" else module
    stats = compare_latency(
        runnable, example, repeats=options.repeats, warmup=options.warmup, threads=threads
    )
    return {name: s.median_ms for name, s in stats.items()}


def cache_path() -> Path:
    """$GHOSTIFY_CACHE_DIR/latency.json, else ~/.cache/ghostify/latency.json."""
    root = os.environ.get("GHOSTIFY_CACHE_DIR")
    return Path(root) / CACHE_FILE if root else Path.home() / ".cache" / "ghostify" / CACHE_FILE


class LatencyCache:
    """Site timings on disk (JSON), written atomically; a damaged or unwritable file only costs speed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = self._read()
        self.new: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            return {}
        entries = data.get("entries")
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str, names: list[str], repeats: int) -> dict[str, float] | None:
        entry = self.entries.get(key)
        if not isinstance(entry, dict) or int(entry.get("runs", 0)) < repeats:
            return None
        times = entry.get("ms", {})
        if not isinstance(times, dict) or sorted(times) != sorted(names):
            return None
        return {name: float(times[name]) for name in names}

    def put(self, key: str, times: dict[str, float], repeats: int) -> None:
        when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.entries[key] = self.new[key] = {"ms": dict(times), "runs": repeats, "when": when}

    def flush(self) -> str | None:
        """Merge this run's timings into the file; returns a note when the file cannot be written."""
        if not self.new:
            return None
        from ghostify.atomic import atomic_write_text

        merged = {**self._read(), **self.new}
        try:
            atomic_write_text(self.path, json.dumps({"version": CACHE_VERSION, "entries": merged}, indent=1))
        except OSError as err:
            return f"the latency cache {self.path} could not be written ({err.strerror or err})"
        self.new = {}
        return None


class SiteTimer:
    """Times sites in deploy form on one target, through the cache."""

    def __init__(self, target: str, options: MeasureOptions) -> None:
        check_target(target)
        self.target = target
        self.options = options
        self.threads = options.threads or torch.get_num_threads()
        self.env = environment_key(target, self.threads)
        self.cache = LatencyCache(cache_path()) if options.cache else None
        self.measured = 0
        self.from_cache = 0

    def compare(
        self, site: str, modules: Mapping[str, nn.Module], input_shape: tuple[int, ...]
    ) -> tuple[dict[str, float], bool]:
        """(median ms of each module's deploy form at `input_shape`, whether it came from the cache)."""
        deployed = {name: deploy_form(module) for name, module in modules.items()}
        dtype = str(_dtype(next(iter(deployed.values())))).replace("torch.", "")
        shape = "x".join(str(d) for d in input_shape)
        signatures = ", ".join(f"{name} {module_signature(m)}" for name, m in deployed.items())
        key = f"{self.env} | {dtype} {shape} | {signatures}"
        names = list(deployed)
        if self.cache is not None:
            hit = self.cache.get(key, names, self.options.repeats)
            if hit is not None:
                self.from_cache += 1
                return hit, True
        times = time_modules(site, deployed, tuple(input_shape), self.target, self.options)
        self.measured += 1
        if self.cache is not None:
            self.cache.put(key, times, self.options.repeats)
        return {name: float(times[name]) for name in names}, False

    def flush(self) -> str | None:
        return self.cache.flush() if self.cache is not None else None

    def describe(self) -> str:
        if self.target == "cuda":
            return f"cuda ({torch.cuda.get_device_name()})"
        return f"{self.target} ({cpu_name()}, {self.threads} thread{'s' if self.threads != 1 else ''})"


# ---------------------------------------------------------------------------------------- deciding


def verdict(before: float, after: float, min_speedup: float) -> tuple[bool, str]:
    """(keep?, reason) for one replacement timed `before` -> `after` ms."""
    speedup = before / after if after > 0 else float("inf")
    if speedup >= min_speedup:
        if speedup < 1:
            return True, f"kept: {speedup:.2f}x >= --min-speedup {min_speedup:g}"
        return True, f"kept: {speedup:.2f}x faster"
    if speedup < 1:
        return False, f"reverted: {speedup:.2f}x (slower)"
    return False, f"reverted: {speedup:.2f}x < --min-speedup {min_speedup:g}"


def choose(times: dict[str, float], changes: dict[str, int], min_speedup: float) -> tuple[str, str, str]:
    """(choice, replacement shown, reason) among "original" and the replacements timed in `times`.

    A replacement qualifies when original / its time >= min_speedup. The fastest qualifying one wins,
    except that one within TIE of it with fewer `changes` (modules replaced) wins a tie.
    """
    base = times["original"]
    others = sorted((t, k) for k, t in times.items() if k != "original")
    qualified = [(t, k) for t, k in others if t > 0 and base / t >= min_speedup]
    choice = "original"
    if qualified:
        fastest = qualified[0][0]
        choice = min((changes.get(k, 1), t, k) for t, k in qualified if t <= fastest * (1 + TIE))[2]
    shown = others[0][1] if choice == "original" else choice
    _, reason = verdict(base, times[shown], min_speedup)
    if len(others) == 1:
        return choice, shown, reason
    head, _, tail = reason.partition(": ")
    rest = ", ".join(f"{LABELS[k]} {base / t:.2f}x" for t, k in others if k != shown)
    best = "" if choice != "original" else "best "
    return choice, shown, f"{head}: {best}{LABELS[shown]} {tail} ({rest})"


def record_inputs(model: nn.Module, names: list[str], example_inputs: Any) -> dict[str, tuple[int, ...]]:
    """The input shape of each named module on one eval-mode forward of `example_inputs`."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple, _name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(_name, tuple(args[0].shape))

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    """MACs of one forward at batch 1, counted on fake tensors (no compute) where the ops allow it."""
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *shape[1:], dtype=_dtype(module), device=device)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
            return count_macs(module, fake_mode.from_tensor(x))[0]
    except Exception:  # noqa: BLE001 - some ops have no fake kernel: count on a real forward
        return count_macs(module, x)[0]


def _conv_unit(base: nn.Module, site: SiteRecord, ghost: nn.Module) -> nn.Module:
    """What a C-Ghost module stands in for: the original conv, its absorbed BN, the activation it holds."""
    parts = [base.get_submodule(site.name)]
    parts += [
        base.get_submodule(n) for n in site.absorbed if isinstance(base.get_submodule(n), nn.BatchNorm2d)
    ]
    act = ghost.primary_conv[2]
    if not isinstance(act, nn.Identity):
        parts.append(copy.deepcopy(act))
    return nn.Sequential(*parts)


def _revert(decision: SiteDecision, why: str) -> None:
    decision.choice, decision.reason = "original", f"reverted: {why}"


class _Selection:
    """One latency selection: the phases of each mode, and the decisions they make."""

    def __init__(
        self, model: nn.Module, config: ConvertConfig, example_inputs: Any, timer: SiteTimer
    ) -> None:
        self.model = model
        self.config = config
        self.example = example_inputs
        self.timer = timer
        self.notes: list[str] = []

    def _plain(self, mode: str, decided: dict[str, str] | None = None) -> ConvertConfig:
        return dataclasses.replace(self.config, mode=mode, select="all", decided=decided)

    def _measure(
        self, name: str, unit: str, forms: dict[str, nn.Module], shape: tuple[int, ...] | None, changes: dict
    ) -> SiteDecision:
        """Time `forms` ("original" first) at `shape` and decide; unmeasurable sites stay original."""
        macs = {k: _macs(m, shape) for k, m in forms.items()} if shape is not None else {k: 0 for k in forms}
        best = next(k for k in forms if k != "original")
        if shape is None:
            why = "reverted: its input was not seen on the example forward, so it was not timed"
            return SiteDecision(name, unit, "original", best, why, [], 0.0, 0.0, macs["original"], macs[best])
        try:
            times, cached = self.timer.compare(name, forms, shape)
        except Unmeasurable as err:
            why = f"reverted: not measurable on {self.timer.target}: {err}"
            return SiteDecision(
                name, unit, "original", best, why, list(shape), 0.0, 0.0, macs["original"], macs[best]
            )
        choice, shown, reason = choose(times, changes, self.config.min_speedup)
        return SiteDecision(
            name=name,
            unit=unit,
            choice=choice,
            candidate=shown,
            reason=reason,
            input_shape=list(shape),
            ms_before=times["original"],
            ms_after=times[shown],
            macs_before=macs["original"],
            macs_after=macs[shown],
            times_ms=dict(times),
            cached=cached,
        )

    def stages_alone(self) -> list[SiteDecision]:
        """G-Ghost stages, each timed against the original stage."""
        candidate = convert_sites(self.model, self._plain("g-ghost"), self.example)
        sites = [s for s in candidate.sites if s.kind == "g-ghost"]
        shapes = record_inputs(self.model, [s.name for s in sites], self.example)
        return [
            self._measure(
                s.name,
                "stage",
                {
                    "original": self.model.get_submodule(s.name),
                    "g-ghost": candidate.model.get_submodule(s.name),
                },
                shapes.get(s.name),
                {},
            )
            for s in sites
        ]

    def convs(self, base: nn.Module, within: list[str] | None = None) -> list[SiteDecision]:
        """C-Ghost sites of `base` (only those inside the modules `within`, when given), each timed
        against the conv (+BN +activation) it replaces."""
        cfg = self._plain("c-ghost", decided=None)
        candidate = ConversionResult(model=copy.deepcopy(base), config=cfg)
        apply_c_ghost(candidate.model, cfg, candidate)
        sites = candidate.sites
        if within is not None:
            sites = [s for s in sites if s.name.startswith(tuple(n + "." for n in within))]
        shapes = record_inputs(base, [s.name for s in sites], self.example)
        decisions = []
        for site in sites:
            ghost = candidate.model.get_submodule(site.name)
            forms = {"original": _conv_unit(base, site, ghost), "c-ghost": ghost}
            decisions.append(self._measure(site.name, "conv", forms, shapes.get(site.name), {}))
        return decisions

    def both(self) -> list[SiteDecision]:
        """Mode "both": stages first; then the convs of the model with the kept stages (nested ones too)."""
        stages = self.stages_alone()
        kept = {d.name: "g-ghost" for d in stages if d.choice == "g-ghost"}
        base = (
            convert_sites(self.model, self._plain("g-ghost", kept), self.example).model
            if kept
            else self.model
        )
        return stages + self.convs(base)

    def auto(self) -> list[SiteDecision]:
        """Mode "auto": each conv alone first, in the original and inside each G-Ghost stage; then per
        stage, the fastest of original, G-Ghost, the stage with its kept C-Ghost convs, and G-Ghost with
        its kept inner C-Ghost convs ("both"); convs outside stages keep their own decisions."""
        convs = self.convs(self.model)
        g_forms, g_model = self._g_ghost_forms()
        g_stages = {name: "g-ghost" for name, form in g_forms.items() if form is not None}
        if g_stages and g_model is None:  # some stage had no G-Ghost form: a model with the others
            g_model = self._converted("g-ghost", g_stages)
        inner = self.convs(g_model, within=list(g_stages)) if g_stages else []
        kept_convs = {d.name: "c-ghost" for d in convs if d.choice == "c-ghost"}
        kept_inner = {d.name: "c-ghost" for d in inner if d.choice == "c-ghost"}
        c_model = both_model = None  # built on first use: the model with every kept conv, per kind
        shapes = record_inputs(self.model, list(g_forms), self.example)
        stages = []
        by_name = {d.name: d for d in (*convs, *inner)}
        for name, g_stage in g_forms.items():
            inside = [n for n in kept_convs if n.startswith(name + ".")]
            inside_g = [n for n in kept_inner if n.startswith(name + ".")]
            forms = {"original": self.model.get_submodule(name)}
            if g_stage is not None:
                forms["g-ghost"] = g_stage
            if inside:
                if c_model is None:
                    c_model = self._converted("c-ghost", kept_convs)
                forms["c-ghost"] = c_model.get_submodule(name)
            if inside_g:
                if both_model is None:
                    both_model = self._converted("both", {**g_stages, **kept_inner})
                forms["both"] = both_model.get_submodule(name)
            if len(forms) == 1:
                continue
            changes = {"g-ghost": 1, "c-ghost": len(inside), "both": 1 + len(inside_g)}
            decision = self._measure(name, "stage", forms, shapes.get(name), changes)
            stages.append(decision)
            choice = decision.choice
            went = "is faster left original" if choice == "original" else f"went {LABELS[choice]}"
            for conv in inside if choice != "c-ghost" else []:
                _revert(by_name[conv], f"its stage {name} {went}")
            for conv in inside_g if choice != "both" else []:
                _revert(by_name[conv], f"its stage {name} {went}" + (" alone" if choice == "g-ghost" else ""))
        return stages + convs + inner

    def _converted(self, mode: str, decided: dict[str, str]) -> nn.Module:
        return convert_sites(self.model, self._plain(mode, decided), self.example).model

    def _g_ghost_forms(self) -> tuple[dict[str, nn.Module | None], nn.Module | None]:
        """Eligible stage -> its G-Ghost form, or None where G-Ghost cannot restructure it (noted); and
        the model with every stage converted, when they all converted together (else None)."""
        cfg = self.config
        infos = find_stages(self.model, self.example)
        missing = [n for n in cfg.stages or [] if n not in {s.name for s in infos}]
        if missing:
            raise ConversionError(
                f"--stages names {', '.join(missing)}, which is not a residual stage of this model."
            )
        names = [
            s.name
            for s in infos
            if s.eligible and (cfg.stages is None or s.name in cfg.stages) and cfg.selects(s.name, False)
        ]
        if not names:
            return {}, None
        try:
            candidate = convert_sites(
                self.model, dataclasses.replace(self._plain("g-ghost"), stages=names), self.example
            )
            return {n: candidate.model.get_submodule(n) for n in names}, candidate.model
        except (ConversionError, ConfigError):
            pass
        forms: dict[str, nn.Module | None] = {}
        for name in names:  # one stage failed: convert one at a time to keep the others
            try:
                one = convert_sites(
                    self.model, dataclasses.replace(self._plain("g-ghost"), stages=[name]), self.example
                )
                forms[name] = one.model.get_submodule(name)
            except (ConversionError, ConfigError) as err:
                forms[name] = None
                self.notes.append(f"auto: stage {name} has no G-Ghost form ({err})")
        return forms, None

    def run(self) -> list[SiteDecision]:
        mode = self.config.mode
        if mode == "c-ghost":
            decisions = self.convs(self.model)
        elif mode == "g-ghost":
            decisions = self.stages_alone()
        elif mode == "both":
            decisions = self.both()
        else:
            decisions = self.auto()
        if not decisions:  # nothing to time: fail as the plain conversion does, saying why
            convert_sites(self.model, self._plain("c-ghost" if mode == "auto" else mode), self.example)
        return decisions


def select_by_latency(
    model: nn.Module, config: ConvertConfig, example_inputs: Any, options: MeasureOptions | None = None
) -> ConversionResult:
    """Convert `model` keeping only the replacements measured to be faster (see the module docstring).

    Returns the conversion with `result.decisions` (one per timed site) and `result.config.decided` set,
    so that `convert_model(model, result.config)` rebuilds the same architecture without timing.

    Raises:
        ConversionError: no example inputs, or no eligible site at all (as the plain conversion would).
        ConfigError: the target cannot run here (no GPU, ONNX Runtime not installed).
    """
    if example_inputs is None:
        raise ConversionError(
            "latency selection times each site at its real input shape: pass example_inputs "
            "(a batch the model accepts)."
        )
    options = options or MeasureOptions()
    target = resolve_target(config.target, model)
    timer = SiteTimer(target, options)
    selection = _Selection(model, config, example_inputs, timer)
    try:
        decisions = selection.run()
    finally:
        cache_note = timer.flush()
    # a stage that went "both" is a G-Ghost stage; its kept inner convs are decisions of their own
    decided = {d.name: "g-ghost" if d.choice == "both" else d.choice for d in decisions}
    final = dataclasses.replace(config, target=target, decided=decided)
    result = convert_sites(model, final, example_inputs)
    result.decisions = decisions
    reasons = {d.name: d.reason for d in decisions}
    result.skipped = [
        (n, f"latency selection, {reasons[n]}" if n in reasons and why == LEFT_BY_SELECTION else why)
        for n, why in result.skipped
    ]
    kept = sum(d.choice != "original" for d in decisions)
    batch = next((d.input_shape[0] for d in decisions if d.input_shape), 1)
    result.notes += selection.notes
    result.notes.append(
        f"latency selection on {timer.describe()}, batch {batch}: kept {kept} of {len(decisions)} timed "
        f"sites (time before / after >= {config.min_speedup:g}); each site timed alone in deploy form, "
        f"median of {options.repeats} interleaved runs after {options.warmup} warm-up"
        + (f"; {timer.from_cache} timings from the cache" if timer.from_cache else "")
    )
    if cache_note:
        result.notes.append(cache_note)
    return result


__all__ = [
    "LatencyCache",
    "MeasureOptions",
    "SiteDecision",
    "SiteTimer",
    "cache_path",
    "choose",
    "record_inputs",
    "resolve_target",
    "select_by_latency",
    "time_modules",
    "verdict",
]
