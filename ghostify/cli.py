"""The `ghostify` command: a thin typer layer over convert / analyze / save / load.

The one place that catches GhostifyError: it prints one red line and exits non-zero. Set
GHOSTIFY_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from ghostify.errors import ConfigError, GhostifyError

if TYPE_CHECKING:
    from ghostify.distill.config import DistillConfig

HELP = """Make a CNN cheaper with GhostNet's C-Ghost / G-Ghost ideas, and show what it gained.

Examples:

  ghostify resnet50 --mode c-ghost --ratio 2

  ghostify timm:resnet50d --mode g-ghost --ratio 2 --out runs/r50d

  ghostify my_models.py:build_net --num-classes 10 --input-size 3,32,32 --weights net.pt

  ghostify report ghostify-out/resnet50-c-ghost-s2
"""

app = typer.Typer(
    help=HELP,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
SUBCOMMANDS = ("convert", "report", "distill", "export")
console = Console(stderr=False)
err_console = Console(stderr=True)
LARGE_BATCH = 16  # the report's second latency batch: throughput, beside batch-1 latency


# ------------------------------------------------------------------ options shared by convert and distill
DataOpt = Annotated[
    Path | None,
    typer.Option(help="Image folder with train/ and val/ (or test/): calibrate + distil + accuracy."),
]
TeacherEpochsOpt = Annotated[
    float,
    typer.Option(help="First fine-tune a copy of the teacher on the labelled data (epochs; 0 = as given)."),
]
TeacherStepsOpt = Annotated[int | None, typer.Option(help="Teacher steps (overrides --teacher-epochs).")]
EpochsOpt = Annotated[float, typer.Option(help="End-to-end distillation epochs (0 skips).")]
StepsOpt = Annotated[int | None, typer.Option(help="End-to-end steps (overrides --epochs).")]
BlockEpochsOpt = Annotated[float, typer.Option(help="Block-wise distillation epochs (0 skips).")]
BlockStepsOpt = Annotated[int | None, typer.Option(help="Block-wise steps (overrides --blockwise-epochs).")]
BlockInputsOpt = Annotated[
    str, typer.Option(help="Block-wise: feed each block the student's own input (student) or the teacher's.")
]
BlockLrOpt = Annotated[float, typer.Option(help="Block-wise peak learning rate (AdamW).")]
CalibOpt = Annotated[int, typer.Option(help="Batches for the closed-form calibration (0 skips).")]
BatchOpt = Annotated[int, typer.Option(help="Training / evaluation batch size (per process).")]
LrOpt = Annotated[float | None, typer.Option(help="Peak lr [default: 0.05 sgd / 1e-3 adamw, x batch/128].")]
OptimOpt = Annotated[str, typer.Option(help="sgd or adamw (end-to-end phase).")]
WdOpt = Annotated[float | None, typer.Option(help="Weight decay [default: 5e-4 sgd / 0.05 adamw].")]
TempOpt = Annotated[float, typer.Option(help="KD temperature T.")]
KdOpt = Annotated[float, typer.Option(help="Weight of the KL term on softened logits.")]
CeOpt = Annotated[float, typer.Option(help="Weight of the cross-entropy on labels.")]
FeatOpt = Annotated[float, typer.Option(help="Weight of the feature MSE at converted sites (0 = off).")]
ClipOpt = Annotated[float | None, typer.Option(help="Clip the gradient norm to this.")]
CkptOpt = Annotated[int, typer.Option(help="Write a checkpoint every N steps.")]
WorkersOpt = Annotated[int, typer.Option(help="Data-loading worker processes.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for data order and subsets.")]
AmpOpt = Annotated[str, typer.Option(help="CUDA mixed precision: auto, bf16, fp16 or off.")]
LimitTrainOpt = Annotated[int | None, typer.Option(help="Train on a fixed subset of this many images.")]
LimitValOpt = Annotated[int | None, typer.Option(help="Evaluate on a fixed subset of this many images.")]
MeanOpt = Annotated[str | None, typer.Option(help="Normalisation mean, e.g. 0.485,0.456,0.406.")]
StdOpt = Annotated[str | None, typer.Option(help="Normalisation std, e.g. 0.229,0.224,0.225.")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the interrupted run in the output folder.")]
DeviceOpt = Annotated[str | None, typer.Option(help="cpu or cuda [default: cuda when available].")]


def _distill_config(options: dict) -> DistillConfig:
    """The DistillConfig named by a command's options (its other options are ignored)."""
    import dataclasses

    from ghostify.distill.config import DistillConfig

    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    return DistillConfig(**{k: v for k, v in options.items() if k in fields})


def _parse_input_size(text: str | None) -> tuple[int, int, int] | None:
    """'224' -> (3, 224, 224); '3,32,32' -> (3, 32, 32)."""
    if text is None:
        return None
    tokens = re.split(r"[,x]", text.strip())
    parts = [int(t) for t in tokens] if all(t.strip().isdigit() for t in tokens) else []
    if len(parts) == 1:
        parts = [3, parts[0], parts[0]]
    if len(parts) != 3 or min(parts) < 1:
        raise ConfigError(f"--input-size {text!r} is not C,H,W or a single size; try --input-size 3,224,224.")
    return tuple(parts)  # type: ignore[return-value]


def _default_out(name: str, mode: str, ratio: int) -> Path:
    """ghostify-out/<name>-<mode>-s<ratio>, with -2, -3... when taken (re-running never clobbers)."""
    stem = Path("ghostify-out") / f"{name.replace('/', '_').replace(':', '_')}-{mode}-s{ratio}"
    candidate, i = stem, 2
    while candidate.exists() and any(candidate.iterdir()):
        candidate, i = stem.with_name(f"{stem.name}-{i}"), i + 1
    return candidate


def _spec_for_recipe(spec: str) -> str:
    """File specs are stored with an absolute path so `load` works from any directory."""
    path, sep, factory = spec.rpartition(":")
    if sep and path.endswith(".py") and Path(path).is_file():
        return f"{Path(path).resolve()}:{factory}"
    return spec


def _report_conversion(
    original,
    result,
    name,
    shape,
    latency,
    repeats,
    warmup,
    threads,
    json_path,
    outcome=None,
    large_batch=LARGE_BATCH,
):  # noqa: ANN001, E501
    """Measure original vs converted (interleaved), print the report, write --json; return the report.

    Latency: eager and deploy form, at the batch of `shape` and at `large_batch` (0: not).
    `outcome` (a DistillResult) adds the accuracy of each stage of a distillation run.
    """
    from ghostify.analysis import build_report, set_accuracy
    from ghostify.recovery import REPORT_STAGES
    from ghostify.report import render, write_json

    batches = f"batch {shape[0]}" + (f" and {large_batch}" if large_batch not in (0, shape[0]) else "")
    what = f"params, MACs and latency (eager and deploy form, {batches})" if latency else "params and MACs"
    with err_console.status(f"Measuring {what}..."):
        report = build_report(
            original,
            result,
            model_name=name,
            input_shape=shape,
            latency=latency,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
            large_batch=large_batch or None,
        )
    for stage, label in REPORT_STAGES.items():
        if outcome is not None and stage in outcome.accuracy:
            set_accuracy(report, label, outcome.accuracy[stage])
    render(report, console)
    if json_path is not None:
        write_json(report, json_path)
    return report


@app.command("convert")
def convert_cmd(
    model: Annotated[
        str, typer.Argument(help="resnet50 | torchvision:NAME | timm:NAME | path/file.py:factory")
    ],
    mode: Annotated[
        str,
        typer.Option(help="c-ghost (CPU), g-ghost (GPU), both, or auto (per stage, the fastest measured)."),
    ] = "c-ghost",
    ratio: Annotated[float, typer.Option(help="The paper's s: integer >= 2.")] = 2,
    dw_size: Annotated[int, typer.Option(help="C-Ghost cheap depthwise kernel (odd).")] = 3,
    include: Annotated[
        str | None, typer.Option(help="Only convert modules whose name matches this regex.")
    ] = None,
    exclude: Annotated[str | None, typer.Option(help="Leave modules whose name matches this regex.")] = None,
    convert_stem: Annotated[bool, typer.Option(help="Also convert the first conv (the stem).")] = False,
    stages: Annotated[
        str | None, typer.Option(help="G-Ghost: comma-separated stage names to restructure (default: all).")
    ] = None,
    mix: Annotated[bool, typer.Option(help="G-Ghost: use the mix (information enhancement) branch.")] = True,
    init: Annotated[str, typer.Option(help="fit (inherit weights) or random (naive baseline).")] = "fit",
    select: Annotated[
        str | None,
        typer.Option(
            help="all, or latency: time each site in deploy form, keep only faster ones "
            "[default: latency for auto, else all]."
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="Where --select latency times sites: cpu, cuda or onnxruntime.")
    ] = None,
    min_speedup: Annotated[
        float, typer.Option(help="--select latency keeps a site only if this much faster.")
    ] = 1.05,
    weights: Annotated[
        str, typer.Option(help="default | pretrained | none | path to a state_dict file.")
    ] = "default",
    num_classes: Annotated[int | None, typer.Option(help="Classifier size of the source model.")] = None,
    input_size: Annotated[
        str | None, typer.Option(help="C,H,W (or one size) for analysis and data; default: the model's.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder [default: ghostify-out/NAME-MODE-sRATIO].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    latency: Annotated[bool, typer.Option(help="Measure CPU latency before/after.")] = True,
    latency_batch: Annotated[int, typer.Option(help="Batch size for the latency measurement.")] = 1,
    large_batch: Annotated[
        int, typer.Option(help="Also time at this larger batch (fewer runs); 0 = only --latency-batch.")
    ] = LARGE_BATCH,
    threads: Annotated[int | None, typer.Option(help="Torch threads for latency [default: torch's].")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per model (median reported).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per model.")] = 5,
    data: DataOpt = None,
    teacher_epochs: TeacherEpochsOpt = 0.0,
    teacher_steps: TeacherStepsOpt = None,
    epochs: EpochsOpt = 1.0,
    steps: StepsOpt = None,
    blockwise_epochs: BlockEpochsOpt = 1.0,
    blockwise_steps: BlockStepsOpt = None,
    blockwise_inputs: BlockInputsOpt = "student",
    blockwise_lr: BlockLrOpt = 1e-3,
    calib_batches: CalibOpt = 8,
    batch_size: BatchOpt = 128,
    lr: LrOpt = None,
    optimizer: OptimOpt = "sgd",
    weight_decay: WdOpt = None,
    temperature: TempOpt = 4.0,
    kd_weight: KdOpt = 1.0,
    ce_weight: CeOpt = 1.0,
    feature_weight: FeatOpt = 0.0,
    clip_grad: ClipOpt = 5.0,
    checkpoint_every: CkptOpt = 200,
    workers: WorkersOpt = 2,
    seed: SeedOpt = 0,
    amp: AmpOpt = "auto",
    limit_train: LimitTrainOpt = None,
    limit_val: LimitValOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
) -> None:
    """Convert MODEL, report params / MACs / measured latency before and after, and save the result.

    With --data DIR it then wins the accuracy back: calibration, block-wise and end-to-end distillation
    from the original model, with checkpoints in the output folder and accuracy in the report.

    Example: ghostify resnet50 --mode c-ghost --ratio 2
    """
    import torch

    from ghostify.config import ConvertConfig
    from ghostify.distill.distributed import init_world
    from ghostify.io import RECIPE_FILE, check_output_dir, make_recipe, read_recipe, replay, save
    from ghostify.models import load_model
    from ghostify.report import to_markdown
    from ghostify.rewrite import convert_model
    from ghostify.select import MeasureOptions

    config = ConvertConfig(
        mode=mode,
        ratio=ratio,
        dw_size=dw_size,
        include=include,
        exclude=exclude,
        skip_stem=not convert_stem,
        weight_init=init,
        mix=mix,
        stages=[s.strip() for s in stages.split(",")] if stages else None,
        select=select,
        target=target,
        min_speedup=min_speedup,
    )
    if latency_batch < 1 or repeats < 1 or warmup < 0 or large_batch < 0:
        raise ConfigError("--latency-batch and --repeats must be >= 1, --warmup and --large-batch >= 0.")
    size = _parse_input_size(input_size)
    distill_config = None
    if data is not None:
        distill_config = _distill_config(locals())
    elif resume:
        raise ConfigError("--resume continues a distillation run: give --data DIR as well.")
    if resume and out is None:
        raise ConfigError("--resume needs --out DIR: the folder of the run to continue.")
    resuming = resume and out is not None and (out / RECIPE_FILE).is_file()
    if out is not None and not resuming:
        check_output_dir(out, force=force)
    world = init_world(device) if data is not None else None
    main_rank = world is None or world.is_main

    with err_console.status(f"Loading {model}..."):
        loaded = load_model(model, weights=weights, num_classes=num_classes, input_size=size)
    if main_rank:
        for note in loaded.notes:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    train_data = _open_data(loaded, data, distill_config, world, mean, std) if world is not None else None
    out = out if out is not None else _default_out(loaded.name, config.mode, config.ratio)
    # random, not zeros: G-Ghost fits its cheap path on the example's features
    example = torch.randn(latency_batch, *loaded.input_size, generator=torch.Generator().manual_seed(0))
    shape = tuple(example.shape)

    if resuming:
        _, result, recipe = replay(out)
        _check_same_run(recipe, _spec_for_recipe(model), config, out)
        err_console.print(f"resuming the run in {out}", highlight=False)
    else:
        start = time.perf_counter()
        if not main_rank and config.select == "latency":
            world.barrier()  # rank 0 measures and saves; the others rebuild its decisions, timing nothing
            config = ConvertConfig.from_dict(read_recipe(out).convert)
        what = "timing sites, " if config.select == "latency" and config.decided is None else ""
        with err_console.status(f"Converting {loaded.name} ({config.mode}, ratio {config.ratio}, {what})..."):
            measure = MeasureOptions(threads=threads)
            result = convert_model(loaded.model, config, example_inputs=example[:1], measure=measure)
        recipe = make_recipe(  # from the result's config: it holds the latency decisions for replay
            _spec_for_recipe(model), result.config, loaded.num_classes, loaded.input_size,
            source_weights=loaded.weights,
        )  # fmt: skip
        if main_rank:
            err_console.print(
                f"converted {len(result.sites)} sites in {time.perf_counter() - start:.1f} s", highlight=False
            )
            report = _report_conversion(
                loaded.model,
                result,
                model,
                shape,
                latency,
                repeats,
                warmup,
                threads,
                json_path,
                large_batch=large_batch,
            )
            extra = {
                "report.json": json.dumps(report.to_dict(), indent=2) + "\n",
                "report.md": to_markdown(report),
            }
            save(result.model, out, recipe, extra_files=extra, force=force)
            console.print(f"saved to {out}  (load it with ghostify.load({str(out)!r}))", highlight=False)
        if world is not None and (main_rank or config.select != "latency"):
            world.barrier()
    if data is None or world is None or distill_config is None:
        return
    try:
        _distill_into(out, loaded, result, recipe, train_data, data, distill_config, world, resume,
                      (shape, latency, repeats, warmup, threads, json_path, large_batch))  # fmt: skip
    finally:
        world.close()


def _check_same_run(recipe, spec: str, config, out: Path) -> None:  # noqa: ANN001
    """--resume must name the model and options the folder was converted with."""
    from ghostify.errors import FormatError

    measured = ("decided", "target")  # filled in by the latency selection of the saved run
    saved = {k: v for k, v in recipe.convert.items() if k not in measured}
    asked = {k: v for k, v in config.to_dict().items() if k not in measured}
    if recipe.model_spec != spec or saved != asked:
        what = "model" if recipe.model_spec != spec else "conversion options"
        raise FormatError(
            f"{out} holds a run of another {what} ({recipe.model_spec}, {recipe.convert.get('mode')} "
            f"ratio {recipe.convert.get('ratio')}); resume with the same MODEL and options, or choose "
            "another --out."
        )


def _open_data(loaded, data_dir, config, world, mean, std):  # noqa: ANN001, ANN202
    """The training / validation data as the model expects it; checked before any conversion work."""
    from ghostify.data import data_config, parse_floats
    from ghostify.recovery import open_data

    size, mean3, std3 = data_config(
        loaded,
        input_size=loaded.input_size,
        mean=parse_floats(mean, "--mean") if mean else None,
        std=parse_floats(std, "--std") if std else None,
    )
    data, notes = open_data(data_dir, loaded.model, size, mean3, std3, config, world)
    if world.is_main:
        for note in notes:
            err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    return data


def _distill_into(out, loaded, result, recipe, data, data_dir, config, world, resume, report_args):  # noqa: ANN001
    """Distil with checkpoints in `out`, then (rank 0) write the report with accuracy."""
    import torch

    from ghostify.recovery import recipe_entry, recover, write_results

    outcome = recover(out, loaded.model, result, recipe, data, config, world, resume=resume)
    if not world.is_main:
        return
    for note in outcome.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    shape, latency, repeats, warmup, threads, json_path, large_batch = report_args
    for m in (loaded.model, result.model):  # the report measures CPU latency, in the default layout
        m.cpu().to(memory_format=torch.contiguous_format)
    report = _report_conversion(loaded.model, result, recipe.model_spec, shape, latency, repeats, warmup,
                                threads, None, outcome=outcome, large_batch=large_batch)  # fmt: skip
    write_results(Path(out), report, recipe, recipe_entry(config, outcome, data_dir))
    if json_path is not None:
        from ghostify.report import write_json

        write_json(report, json_path)
    from ghostify.data import skipped_images

    skipped = skipped_images(data.train) + (skipped_images(data.val) if data.val is not None else 0)
    if skipped:
        err_console.print(f"[yellow]note:[/] skipped {skipped} unreadable images", highlight=False)
    minutes = outcome.seconds / 60
    console.print(
        f"distilled in {minutes:.1f} min; saved to {out} (history.json, history.png)", highlight=False
    )


@app.command("report")
def report_cmd(
    target: Annotated[str, typer.Argument(help="A ghostify output folder, or a model spec.")],
    weights: Annotated[
        str, typer.Option(help="For a model spec: default | pretrained | none | FILE.")
    ] = "none",
    num_classes: Annotated[int | None, typer.Option(help="For a model spec: classifier size.")] = None,
    input_size: Annotated[str | None, typer.Option(help="C,H,W (or one size); default: the model's.")] = None,
    latency: Annotated[bool, typer.Option(help="Measure CPU latency.")] = True,
    latency_batch: Annotated[int, typer.Option(help="Batch size for the latency measurement.")] = 1,
    large_batch: Annotated[
        int,
        typer.Option(help="For a saved output: also time at this larger batch (fewer runs); 0 = not."),
    ] = LARGE_BATCH,
    threads: Annotated[int | None, typer.Option(help="Torch threads for latency.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per model.")] = 20,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
) -> None:
    """Report a saved ghostify output (original vs converted) or a model's own params / MACs / latency.

    Example: ghostify report ghostify-out/resnet50-c-ghost-s2
    """
    from ghostify.analysis import analyze
    from ghostify.io import RECIPE_FILE, replay
    from ghostify.models import load_model
    from ghostify.report import render_stats

    if large_batch < 0:
        raise ConfigError("--large-batch must be >= 0 (0: time only at --latency-batch).")
    size = _parse_input_size(input_size)
    if Path(target).is_dir() or (Path(target) / RECIPE_FILE).exists():
        with err_console.status(f"Loading {target}..."):
            source, result, recipe = replay(target)
        shape = (latency_batch, *(size or recipe.input_size))
        _report_conversion(source, result, recipe.model_spec, shape, latency, repeats, 5, threads, json_path,
                           large_batch=large_batch)  # fmt: skip
        return
    with err_console.status(f"Loading {target}..."):
        loaded = load_model(target, weights=weights, num_classes=num_classes, input_size=size)
    with err_console.status("Measuring params, MACs and latency..."):
        stats = analyze(
            loaded.model,
            input_shape=(latency_batch, *loaded.input_size),
            latency=latency,
            repeats=repeats,
            threads=threads,
        )
    render_stats(stats, loaded.name, console)
    if json_path is not None:
        from ghostify.atomic import atomic_write_text

        atomic_write_text(json_path, json.dumps(stats.to_dict(), indent=2) + "\n")


@app.command("distill")
def distill_cmd(
    target: Annotated[
        Path, typer.Argument(help="A ghostify output folder (from `ghostify MODEL --out DIR`).")
    ],
    data: Annotated[Path, typer.Option(help="Image folder with train/ and val/ (or test/).")],
    teacher_weights: Annotated[
        str | None, typer.Option(help="Weights of the original model [default: those it was converted from].")
    ] = None,
    teacher_epochs: TeacherEpochsOpt = 0.0,
    teacher_steps: TeacherStepsOpt = None,
    epochs: EpochsOpt = 1.0,
    steps: StepsOpt = None,
    blockwise_epochs: BlockEpochsOpt = 1.0,
    blockwise_steps: BlockStepsOpt = None,
    blockwise_inputs: BlockInputsOpt = "student",
    blockwise_lr: BlockLrOpt = 1e-3,
    calib_batches: CalibOpt = 8,
    batch_size: BatchOpt = 128,
    lr: LrOpt = None,
    optimizer: OptimOpt = "sgd",
    weight_decay: WdOpt = None,
    temperature: TempOpt = 4.0,
    kd_weight: KdOpt = 1.0,
    ce_weight: CeOpt = 1.0,
    feature_weight: FeatOpt = 0.0,
    clip_grad: ClipOpt = 5.0,
    checkpoint_every: CkptOpt = 200,
    workers: WorkersOpt = 2,
    seed: SeedOpt = 0,
    amp: AmpOpt = "auto",
    limit_train: LimitTrainOpt = None,
    limit_val: LimitValOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resume: ResumeOpt = False,
    device: DeviceOpt = None,
    latency: Annotated[bool, typer.Option(help="Measure CPU latency for the final report.")] = True,
    latency_batch: Annotated[int, typer.Option(help="Batch size for the latency measurement.")] = 1,
    threads: Annotated[int | None, typer.Option(help="Torch threads for latency.")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per model.")] = 20,
) -> None:
    """Calibrate and distil a saved ghost model in place, with its original model as teacher.

    Example: ghostify distill ghostify-out/resnet50-c-ghost-s2 --data ~/imagenet --epochs 1
    """
    from ghostify.distill.distributed import init_world
    from ghostify.io import replay
    from ghostify.models import load_model

    config = _distill_config(locals())
    with err_console.status(f"Loading {target}..."):
        _, result, recipe = replay(target)
    source_weights = teacher_weights or recipe.source_weights
    if source_weights in ("none", "unknown", "random"):
        raise ConfigError(
            f"{target} was converted from a model without trained weights ({recipe.source_weights}); "
            "give the original's weights with --teacher-weights FILE."
        )
    with err_console.status(f"Loading the teacher {recipe.model_spec}..."):
        loaded = load_model(
            recipe.model_spec,
            weights=source_weights,
            num_classes=recipe.num_classes,
            input_size=recipe.input_size,
        )
    world = init_world(device)
    shape = (latency_batch, *recipe.input_size)
    try:
        train_data = _open_data(loaded, data, config, world, mean, std)
        _distill_into(target, loaded, result, recipe, train_data, data, config, world, resume,
                      (shape, latency, repeats, 2, threads, None, LARGE_BATCH))  # fmt: skip
    finally:
        world.close()


@app.command("export")
def export_cmd(
    target: Annotated[Path, typer.Argument(help="A ghostify output folder.")],
    format: Annotated[str, typer.Option("--format", help="onnx or exported-program.")] = "onnx",
    out: Annotated[
        Path | None, typer.Option(help="Output file [default: TARGET/model.onnx or TARGET/model.pt2].")
    ] = None,
    deploy: Annotated[bool, typer.Option(help="Export the deploy form (BN folded, fewer copies).")] = True,
    verify: Annotated[bool, typer.Option(help="Check the file's outputs against the eager model.")] = True,
) -> None:
    """Export a saved ghost model for inference (deploy form: every BN folded into its conv).

    Example: ghostify export ghostify-out/resnet50-c-ghost-s2 --format onnx
    """
    import torch

    from ghostify.export import FORMATS, export, verify_export
    from ghostify.io import read_recipe, replay

    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    recipe = read_recipe(target)
    with err_console.status(f"Loading {target}..."):
        model = replay(target)[1].model
    example = torch.randn(2, *recipe.input_size, generator=torch.Generator().manual_seed(0))
    path = out if out is not None else target / f"model{FORMATS[format]}"
    if path.suffix and path.suffix != FORMATS[format]:
        raise ConfigError(f"--out {path} does not end in {FORMATS[format]}, the suffix of {format} files.")
    with err_console.status(f"Exporting to {path} ({format})..."):
        written = export(model, path, format=format, example_inputs=example[:1], deploy=deploy)
    line = f"exported {written}"
    if verify:
        import importlib.util

        if format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            line += "  (not checked: pip install onnxruntime to check it)"
        else:
            with torch.no_grad():
                scale = model(example).abs().max().item()
            diff = verify_export(written, model, example, atol=1e-3 * max(scale, 1.0))
            line += f"  (max |difference| from the eager model at batch 2: {diff:.2g})"
    console.print(line, highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `ghostify MODEL ...` is `ghostify convert MODEL ...`; errors become one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in SUBCOMMANDS and not args[0].startswith("-"):
        args.insert(0, "convert")
    try:
        app(args=args, prog_name="ghostify", standalone_mode=False)
    except GhostifyError as err:
        if os.environ.get("GHOSTIFY_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        raise SystemExit(130) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except Exception as err:  # click usage errors carry their own exit code and message
        import click

        if isinstance(err, click.ClickException):
            err.show()
            raise SystemExit(err.exit_code) from None
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
