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
from typing import Annotated

import typer
from rich.console import Console

from ghostify.errors import ConfigError, GhostifyError

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
SUBCOMMANDS = ("convert", "report")
console = Console(stderr=False)
err_console = Console(stderr=True)


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


def _report_conversion(original, result, name, shape, latency, repeats, warmup, threads, json_path):  # noqa: ANN001
    """Measure original vs converted (interleaved), print the report, write --json; return the report."""
    from ghostify.analysis import build_report
    from ghostify.report import render, write_json

    with err_console.status("Measuring params, MACs and latency (original and converted, interleaved)..."):
        report = build_report(
            original,
            result,
            model_name=name,
            input_shape=shape,
            latency=latency,
            repeats=repeats,
            warmup=warmup,
            threads=threads,
        )
    render(report, console)
    if json_path is not None:
        write_json(report, json_path)
    return report


@app.command("convert")
def convert_cmd(
    model: Annotated[
        str, typer.Argument(help="resnet50 | torchvision:NAME | timm:NAME | path/file.py:factory")
    ],
    mode: Annotated[str, typer.Option(help="c-ghost (CPU), g-ghost (GPU) or both.")] = "c-ghost",
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
    weights: Annotated[
        str, typer.Option(help="default | pretrained | none | path to a state_dict file.")
    ] = "default",
    num_classes: Annotated[int | None, typer.Option(help="Classifier size of the source model.")] = None,
    input_size: Annotated[
        str | None, typer.Option(help="C,H,W (or one size) for analysis; default: the model's.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output folder [default: ghostify-out/NAME-MODE-sRATIO].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    latency: Annotated[bool, typer.Option(help="Measure CPU latency before/after.")] = True,
    batch_size: Annotated[int, typer.Option(help="Batch size for the latency measurement.")] = 1,
    threads: Annotated[int | None, typer.Option(help="Torch threads for latency [default: torch's].")] = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per model (median reported).")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per model.")] = 5,
) -> None:
    """Convert MODEL, report params / MACs / measured latency before and after, and save the result.

    Example: ghostify resnet50 --mode c-ghost --ratio 2
    """
    import torch

    from ghostify.config import ConvertConfig
    from ghostify.io import check_output_dir, make_recipe, save
    from ghostify.models import load_model
    from ghostify.report import to_markdown
    from ghostify.rewrite import convert_model

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
    )
    if batch_size < 1 or repeats < 1 or warmup < 0:
        raise ConfigError("--batch-size and --repeats must be >= 1, --warmup >= 0.")
    size = _parse_input_size(input_size)
    if out is not None:
        check_output_dir(out, force=force)

    with err_console.status(f"Loading {model}..."):
        loaded = load_model(model, weights=weights, num_classes=num_classes, input_size=size)
    for note in loaded.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    out = out if out is not None else _default_out(loaded.name, config.mode, config.ratio)
    # random, not zeros: G-Ghost fits its cheap path on the example's features
    example = torch.randn(batch_size, *loaded.input_size, generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    with err_console.status(f"Converting {loaded.name} ({config.mode}, ratio {config.ratio})..."):
        result = convert_model(loaded.model, config, example_inputs=example[:1])
    err_console.print(
        f"converted {len(result.sites)} sites in {time.perf_counter() - start:.1f} s", highlight=False
    )
    report = _report_conversion(
        loaded.model, result, model, tuple(example.shape), latency, repeats, warmup, threads, json_path
    )
    recipe = make_recipe(
        _spec_for_recipe(model), config, loaded.num_classes, loaded.input_size, source_weights=loaded.weights
    )

    extra = {"report.json": json.dumps(report.to_dict(), indent=2) + "\n", "report.md": to_markdown(report)}
    save(result.model, out, recipe, extra_files=extra, force=force)
    console.print(f"saved to {out}  (load it with ghostify.load({str(out)!r}))", highlight=False)


@app.command("report")
def report_cmd(
    target: Annotated[str, typer.Argument(help="A ghostify output folder, or a model spec.")],
    weights: Annotated[
        str, typer.Option(help="For a model spec: default | pretrained | none | FILE.")
    ] = "none",
    num_classes: Annotated[int | None, typer.Option(help="For a model spec: classifier size.")] = None,
    input_size: Annotated[str | None, typer.Option(help="C,H,W (or one size); default: the model's.")] = None,
    latency: Annotated[bool, typer.Option(help="Measure CPU latency.")] = True,
    batch_size: Annotated[int, typer.Option(help="Batch size for the latency measurement.")] = 1,
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

    size = _parse_input_size(input_size)
    if Path(target).is_dir() or (Path(target) / RECIPE_FILE).exists():
        with err_console.status(f"Loading {target}..."):
            source, result, recipe = replay(target)
        shape = (batch_size, *(size or recipe.input_size))
        _report_conversion(source, result, recipe.model_spec, shape, latency, repeats, 5, threads, json_path)
        return
    with err_console.status(f"Loading {target}..."):
        loaded = load_model(target, weights=weights, num_classes=num_classes, input_size=size)
    with err_console.status("Measuring params, MACs and latency..."):
        stats = analyze(
            loaded.model,
            input_shape=(batch_size, *loaded.input_size),
            latency=latency,
            repeats=repeats,
            threads=threads,
        )
    render_stats(stats, loaded.name, console)
    if json_path is not None:
        from ghostify.report import atomic_write_text

        atomic_write_text(json_path, json.dumps(stats.to_dict(), indent=2) + "\n")


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
