"""Latency benchmark: original vs C-Ghost vs G-Ghost vs both vs Torch-Pruning, side by side.

For each model it builds the variants, counts MACs and parameters, and times every variant of one model
interleaved in one `ghostify.analysis.compare_latency` call per (runtime, batch size), so that machine
noise hits them all alike. The peer is Torch-Pruning (L2 group magnitude, channels rounded to 8 by default,
uniform per-layer ratio, final classifier left alone; `--peer-include` limits it to some convs' output
channels), pruned by bisection on its ratio until its MACs match ghostify's C-Ghost result (`--peer-at`:
one peer per ghost variant named, each at that variant's MACs). Latency and MACs do not depend on weight
values, so models start from random weights (no download).

    python benchmarks/latency.py --models resnet50 --batch-sizes 1,16
    python benchmarks/latency.py --models resnet50,mobilenet_v2 --onnx --markdown

Needs the benchmark-only extras: torch-pruning (the peer) and, for --onnx, onnx + onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

import ghostify
from ghostify.analysis import compare_latency, count_macs, count_params
from ghostify.config import MODES, ConvertConfig
from ghostify.deploy import deploy_form
from ghostify.models import load_model
from ghostify.select import cpu_name

ALL_MODELS = "resnet18,resnet50,resnet101,vgg16_bn,mobilenet_v2,regnet_x_3_2gf,efficientnet_b0"

# ----------------------------------------------------------------------------------------- options


class OneLineErrors(argparse.ArgumentParser):
    """Bad options: one line saying what is wrong (argparse would print the long usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


parser = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="resnet50", help=f"comma-separated model specs; 'all' = {ALL_MODELS}")
parser.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes to time")
parser.add_argument("--input-size", type=int, default=224, help="input height = width")
parser.add_argument("--threads", type=int, default=2, help="intra-op CPU threads (PyTorch and ONNX Runtime)")
parser.add_argument("--repeats", type=int, default=20, help="timed rounds per (runtime, batch size)")
parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
parser.add_argument("--ratio", type=int, default=2, help="the paper's s for every ghost variant")
parser.add_argument(
    "--weight-init",
    default=ConvertConfig.weight_init,
    choices=["fit", "random"],
    help="ghostify's weight inheritance; it can change the layout (fit may permute Ghost outputs)",
)
parser.add_argument("--no-peer", action="store_true", help="skip the Torch-Pruning peers")
parser.add_argument(
    "--peer-include",
    default=None,
    help="regex on module names: the peer prunes only the output channels of the matching convs (every "
    "other layer is ignored); for models whose residual width Torch-Pruning cannot follow, e.g. the CIFAR "
    "ResNets' option-A shortcuts: --peer-include 'layer\\d\\.\\d+\\.conv1$'",
)
parser.add_argument(
    "--peer-round-to",
    type=int,
    default=8,
    help="the peer keeps channel counts a multiple of this (Torch-Pruning's round_to; 1 = no rounding)",
)
parser.add_argument(
    "--peer-at",
    default=None,
    help=f"comma-separated ghost modes ({', '.join(MODES)}): one peer per mode, at that variant's MACs "
    "[default: c-ghost]",
)
parser.add_argument(
    "--form",
    default="deploy",
    choices=["deploy", "eager"],
    help="time every variant (the original included) in ghostify's deploy form (BN folded, Ghost copies "
    "folded away) or as built",
)
parser.add_argument("--onnx", action="store_true", help="also time every variant in ONNX Runtime")
parser.add_argument("--markdown", action="store_true", help="print Markdown tables (for the README)")
args = parser.parse_args()
if args.peer_round_to < 1:
    parser.error(f"--peer-round-to must be >= 1 (got {args.peer_round_to})")
if args.peer_include is not None:
    try:
        re.compile(args.peer_include)
    except re.error as err:
        parser.error(f"--peer-include is not a valid regex ({err})")

if args.peer_at is not None and args.no_peer:
    parser.error("--peer-at and --no-peer exclude each other: drop one")
peer_modes = list(dict.fromkeys(m.strip() for m in (args.peer_at or "c-ghost").split(",") if m.strip()))
if not peer_modes or any(m not in MODES for m in peer_modes):
    parser.error(f"--peer-at takes ghost modes from {', '.join(MODES)} (got {args.peer_at!r})")
try:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
except ValueError:
    batch_sizes = []
if not batch_sizes or min(batch_sizes) < 1:
    parser.error(f"--batch-sizes takes comma-separated positive integers (got {args.batch_sizes!r})")

models_arg = ALL_MODELS if args.models == "all" else args.models
model_names = [m.strip() for m in models_arg.split(",") if m.strip()]
torch.set_num_threads(args.threads)
torch.manual_seed(0)
warnings.filterwarnings("ignore")  # exporter / tracer chatter; failures are reported per variant below

# ghost variants: every mode ghostify knows; "auto" times its sites here, on this machine
GHOST_VARIANTS = {mode: {"c-ghost": "C-Ghost", "g-ghost": "G-Ghost"}.get(mode, mode) for mode in MODES}
PEER = "Torch-Pruning"


def peer_label(mode: str) -> str:
    """The row of the peer pruned to the MACs of `mode`'s variant."""
    return f"{PEER} (= {GHOST_VARIANTS[mode]} MACs)"


# ----------------------------------------------------------------------------------------- progress line


class Progress:
    """One status line on stderr: a rich spinner on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self.status = None
        self.start = time.perf_counter()
        if sys.stderr.isatty():
            from rich.console import Console

            self.status = Console(stderr=True).status("starting")
            self.status.start()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.0f}s] {message}"
        if self.status is not None:
            self.status.update(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()


progress = Progress()

# ----------------------------------------------------------------------------------------- machine


try:
    usable_cores = len(os.sched_getaffinity(0))
except AttributeError:
    usable_cores = os.cpu_count()
try:
    load = "load avg {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
except OSError:
    load = "load avg n/a"

try:
    import torch_pruning as tp
except ImportError as err:
    tp = None
    peer_missing = f"torch-pruning not installed ({err})"
else:
    peer_missing = None

ort = None
onnx_missing = None
if args.onnx:
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime as ort
    except ImportError as err:
        onnx_missing = f"ONNX Runtime skipped: {err}"

versions = [f"torch {torch.__version__}", f"ghostify {ghostify.__version__}"]
if tp is not None:
    versions.append(f"torch-pruning {tp.__version__}")
if ort is not None:
    versions.append(f"onnxruntime {ort.__version__}")
machine = (
    f"# {cpu_name()}, {os.cpu_count()} cores ({usable_cores} usable, {load}); {', '.join(versions)}; "
    f"{args.threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); "
    f"{platform.python_implementation()} {platform.python_version()}; "
    f"{datetime.datetime.now().isoformat(timespec='minutes')}"
)
print(machine, file=sys.stderr)

# ----------------------------------------------------------------------------------------- helpers


def one_line(err: BaseException, limit: int = 110) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, ghostify.GhostifyError):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def final_classifier(model: nn.Module) -> list[nn.Module]:
    """The last nn.Linear (or 1x1 conv when there is no Linear): the output layer the peer must keep."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return [linears[-1]]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1:]


def peer_ignored(model: nn.Module, include: str | None) -> list[nn.Module]:
    """Layers the peer leaves alone: the classifier and, with `include`, every linear and unmatched conv."""
    ignored = final_classifier(model)
    if include is not None:
        ignored += [
            m
            for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and not re.search(include, name)))
            and m not in ignored
        ]
    return ignored


def prune_to_macs(model: nn.Module, example: torch.Tensor, target: int, steps: int = 14, tol: float = 0.005):
    """Torch-Pruning with one uniform ratio, bisected on measured MACs until they match `target`.

    Returns (pruned model, pruning ratio, MACs); the closest of all the ratios tried.
    """
    base_macs = count_macs(model, example)[0]

    def prune(ratio: float) -> tuple[nn.Module, int]:
        pruned = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(
            pruned,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio,
            global_pruning=False,
            ignored_layers=peer_ignored(pruned, args.peer_include),  # from the copy: TP matches by identity
            round_to=args.peer_round_to if args.peer_round_to > 1 else None,
        )
        pruner.step()
        return pruned, count_macs(pruned, example)[0]

    lo, hi = 0.0, 0.95
    ratio = min(max(1.0 - (target / base_macs) ** 0.5, 0.01), 0.9)  # MACs ~ (1 - ratio)^2: a good first probe
    best = None
    for _ in range(steps):
        pruned, macs = prune(ratio)
        progress(f"  Torch-Pruning ratio {ratio:.4f} -> {macs / 1e9:.3f} GMACs (target {target / 1e9:.3f})")
        if best is None or abs(macs - target) < abs(best[2] - target):
            best = (pruned, ratio, macs)
        if abs(macs - target) <= tol * target:
            break
        lo, hi = (ratio, hi) if macs > target else (lo, ratio)
        if hi - lo < 1e-3:  # whole (rounded) channel counts make MACs a step function of the ratio
            break
        ratio = (lo + hi) / 2
    return best


class OrtModel(nn.Module):
    """An ONNX Runtime session behind nn.Module's call, so `compare_latency` can time it."""

    def __init__(self, path: str, threads: int) -> None:
        super().__init__()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # idle sessions must not spin on the cores while the others are being timed
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """torch.onnx.export with a dynamic batch axis; the TorchScript exporter when the dynamo one can't run."""
    kwargs = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)

        dynamo = True
    except ImportError:
        dynamo = False
    with torch.no_grad():
        if dynamo:
            shapes = {"x": {0: "batch"}}
            torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=shapes, **kwargs)
        else:
            torch.onnx.export(model, (example,), path, dynamo=False, **kwargs)


def latency_cells(stats, baseline) -> tuple[str, str]:
    """'median [p10-p90]' in ms, and the speed-up original median / variant median."""
    if stats is None:
        return "n/a", ""
    cell = f"{stats.median_ms:.1f} [{stats.p10_ms:.1f}-{stats.p90_ms:.1f}]"
    speedup = f"{baseline.median_ms / stats.median_ms:.2f}x" if baseline is not None else ""
    return cell, speedup


def render(title: str, headers: list[str], rows: list[list[str]], notes: list[str]) -> str:
    """A plain-text table (right-aligned numbers) or, with --markdown, a Markdown one."""
    if args.markdown:
        rule = "|" + "|".join(["---"] + ["--:"] * (len(headers) - 1)) + "|"
        lines = [f"**{title}**", "", "| " + " | ".join(headers) + " |", rule]
        lines += ["| " + " | ".join(row + [""] * (len(headers) - len(row))) + " |" for row in rows]
        lines += [""] + [f"- {n}" for n in notes]
        return "\n".join(lines)
    full = [r for r in rows if len(r) == len(headers)]  # n/a rows are [label, reason]
    widths = [max(len(h), *(len(r[i]) for r in full)) for i, h in enumerate(headers)]

    def fmt(row: list[str]) -> str:
        if len(row) != len(headers):
            return row[0].ljust(widths[0]) + "  " + " ".join(row[1:])
        return "  ".join(
            (c.ljust(w) if i == 0 else c.rjust(w)) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    lines = [title, fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(row) for row in rows]
    lines += [f"  * {n}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- the run

runtimes = ["eager"] + (["onnxruntime"] if args.onnx and ort is not None else [])
lead = "" if args.markdown else "# "  # Markdown: plain paragraphs, not headings
print(machine.replace("# ", lead, 1) + ("  " if args.markdown else ""))
print(
    f"{lead}ratio s={args.ratio}, weight_init={args.weight_init}, input {args.input_size}x{args.input_size}, "
    f"random weights, {args.form} form; latency cells = median [p10-p90] ms of {args.repeats} interleaved "
    f"rounds after {args.warmup} warm-up rounds; speed-up = original median / variant median "
    "(same runtime, batch)"
)
if onnx_missing:
    print(f"{lead}{onnx_missing}")
print()

for name in model_names:
    notes: list[str] = []
    progress(f"{name}: building")
    try:
        loaded = load_model(name, weights="none")
    except ghostify.GhostifyError as err:
        print(f"{name}: n/a ({one_line(err)})\n")
        continue
    original = loaded.model.eval()
    example = torch.randn(1, 3, args.input_size, args.input_size, generator=torch.Generator().manual_seed(0))

    # --- the variants: name -> module, or the reason it does not apply
    variants: dict[str, nn.Module | str] = {"original": original}
    for mode, label in GHOST_VARIANTS.items():
        progress(f"{name}: converting ({label})")
        t0 = time.perf_counter()
        try:
            config = ConvertConfig(mode=mode, ratio=args.ratio, weight_init=args.weight_init)
            variants[label] = ghostify.convert_model(original, config, example_inputs=example).model.eval()
        except Exception as err:  # does not apply (ConversionError) or breaks: a row saying why
            variants[label] = one_line(err)
        progress(f"{name}: {label} done in {time.perf_counter() - t0:.0f}s")

    matched_convs = args.peer_include is None or any(
        isinstance(m, nn.Conv2d) and re.search(args.peer_include, n) for n, m in original.named_modules()
    )
    peer_scope = (
        f"only the output channels of convs matching '{args.peer_include}'"
        if args.peer_include is not None
        else "every layer"
    )
    for mode in [] if args.no_peer else peer_modes:
        label, ghost = peer_label(mode), GHOST_VARIANTS[mode]
        if peer_missing:
            variants[label] = peer_missing
        elif not isinstance(variants.get(ghost), nn.Module):
            variants[label] = f"no {ghost} result to match"
        elif not matched_convs:
            variants[label] = f"--peer-include '{args.peer_include}' matches no conv of this model"
        else:
            progress(f"{name}: Torch-Pruning to {ghost}'s MACs")
            target = count_macs(variants[ghost], example)[0]
            try:
                pruned, ratio, macs = prune_to_macs(original, example, target)
                variants[label] = pruned.eval()
                notes.append(
                    f"{label}: MetaPruner, GroupMagnitudeImportance(p=2), round_to={args.peer_round_to}, "
                    f"final classifier kept, {peer_scope}, "
                    f"uniform pruning_ratio={ratio:.4f} (bisected; MACs step with whole channels): "
                    f"{macs / 1e9:.3f} GMACs vs {ghost} {target / 1e9:.3f} ({(macs - target) / target:+.1%})"
                )
            except Exception as err:
                variants[label] = one_line(err)

    models = {k: v for k, v in variants.items() if isinstance(v, nn.Module)}
    static = {k: (count_macs(m, example)[0], count_params(m)) for k, m in models.items()}
    if args.form == "deploy":  # every variant in its own best inference form, the original included
        for label in list(models):
            progress(f"{name}: deploy form of {label}")
            try:
                models[label] = deploy_form(models[label], example)
            except Exception as err:
                notes.append(f"deploy form of {label}: n/a, timed as built ({one_line(err)})")

    # --- latency: every variant of this model in one interleaved call per (runtime, batch size)
    timed: dict[tuple[str, int], dict] = {}
    runnable: dict[str, dict[str, nn.Module]] = {"eager": models}
    if "onnxruntime" in runtimes:
        sessions: dict[str, nn.Module] = {}
        tmp = tempfile.mkdtemp(prefix="ghostify-bench-")  # removed after this model's timings
        for i, (label, model) in enumerate(models.items()):
            progress(f"{name}: exporting {label} to ONNX")
            path = os.path.join(tmp, f"variant{i}.onnx")  # not the label: it may hold spaces and brackets
            try:
                export_onnx(model, example, path)
                session = OrtModel(path, args.threads)
                with torch.inference_mode():
                    for b in batch_sizes:  # check every batch size runs, and the round trip
                        x = torch.randn(b, *example.shape[1:])
                        got, want = session(x), model(x)
                        rel = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                notes.append(f"ONNX {label}: exported; max |ORT - eager| / max |eager| = {rel:.1e}")
                sessions[label] = session
            except Exception as err:
                notes.append(f"ONNX {label}: n/a ({one_line(err)})")
        runnable["onnxruntime"] = sessions
    for runtime in runtimes:
        for b in batch_sizes:
            if not runnable[runtime]:
                continue
            progress(f"{name}: timing {len(runnable[runtime])} variants, {runtime}, batch {b}")
            x = torch.randn(b, *example.shape[1:])
            timed[(runtime, b)] = compare_latency(
                runnable[runtime], x, repeats=args.repeats, warmup=args.warmup, threads=args.threads
            )

    if "onnxruntime" in runtimes:  # the exports can be GBs per model (VGG-16: ~2 GB): do not keep them
        runnable["onnxruntime"].clear()
        shutil.rmtree(tmp, ignore_errors=True)

    # --- the table
    headers = ["variant", "GMACs", "MACs x", "params M"]
    for runtime in runtimes:
        for b in batch_sizes:
            headers += [f"{runtime} b{b} ms", "speed-up"]
    rows = []
    base_macs = static["original"][0]
    for label, v in variants.items():
        if isinstance(v, str):
            rows.append([label, f"n/a ({v})"])
            continue
        macs, params = static[label]
        row = [label, f"{macs / 1e9:.3f}", f"{base_macs / macs:.2f}x", f"{params / 1e6:.2f}"]
        for runtime in runtimes:
            for b in batch_sizes:
                stats = timed.get((runtime, b), {})
                row += list(latency_cells(stats.get(label), stats.get("original")))
        rows.append(row)
    title = f"{name} ({args.input_size}x{args.input_size}, {args.threads} threads)"
    print(render(title, headers, rows, notes + loaded.notes))
    print(flush=True)

progress.stop()
