"""The accuracy half of `ghostify MODEL --data DIR` and `ghostify distill OUT --data DIR`.

Given a converted model already saved in an output folder: open the data the way the model expects it,
run `ghostify.distill` (calibration, block-wise, end-to-end, with checkpoints in the folder), then write
the final report, with accuracy beside params / MACs / latency, and note the run in recipe.json.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostify.analysis import ConversionReport
from ghostify.atomic import atomic_write_text
from ghostify.data import build_eval_loader, build_train_loader, check_num_classes, find_split
from ghostify.distill.config import DistillConfig
from ghostify.distill.distributed import World
from ghostify.distill.trainer import DistillData, DistillResult, check_data, distill
from ghostify.errors import DataError
from ghostify.io import RECIPE_FILE, Recipe
from ghostify.modes import eval_mode
from ghostify.report import to_markdown
from ghostify.rewrite.result import ConversionResult

__all__ = ["REPORT_STAGES", "open_data", "recipe_entry", "recover", "write_results"]

# accuracy stages of a run, as the report names them
REPORT_STAGES = {
    "teacher": "original",
    "teacher-adapted": "original, adapted",
    "converted": "converted",
    "calibrated": "calibrated",
    "blockwise": "block-wise",
    "distilled": "distilled",
}


def _output_classes(model: nn.Module, input_size: Sequence[int]) -> int | None:
    device = next(model.parameters(), torch.empty(0)).device
    with eval_mode(model), torch.no_grad():
        out = model(torch.zeros(1, *input_size, device=device))
    return int(out.shape[-1]) if isinstance(out, torch.Tensor) and out.ndim == 2 else None


def open_data(
    root: str | Path,
    teacher: nn.Module,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    config: DistillConfig,
    world: World,
) -> tuple[DistillData, list[str]]:
    """Training loader from `root/train` (or `root` itself), validation from `root/val` or `root/test`.

    Returns the data and notes for the user (e.g. that no accuracy can be reported). Data the run cannot
    use is refused here, before anything is converted or written.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist; give --data a folder holding train/ (and val/ or test/)."
        )
    notes = []
    train_dir = find_split(root, ("train",)) or root
    common = dict(
        input_size=input_size,
        mean=mean,
        std=std,
        batch_size=config.batch_size,
        workers=config.workers,
        seed=config.seed,
    )
    train = build_train_loader(
        train_dir, limit=config.limit_train, world_size=world.world_size, rank=world.rank, **common
    )
    classes = _output_classes(teacher, input_size)
    if classes is not None:
        check_num_classes(train, classes)
    val_dir = find_split(root, ("val", "test"))
    val = None
    if val_dir is None:
        notes.append(
            f"no val/ or test/ split under {root}: no accuracy will be reported "
            f"(add {root}/val/<class>/<image> to get one)"
        )
    elif train_dir != root:
        val = build_eval_loader(val_dir, limit=config.limit_val, **common)
        if classes is not None:
            check_num_classes(val, classes)
    data = DistillData(train, val)
    check_data(data, config, world)
    return data, notes


def recipe_entry(config: DistillConfig, outcome: DistillResult, data_dir: str | Path) -> dict[str, Any]:
    return {
        "step": "distill",
        "data": str(Path(data_dir).expanduser().resolve()),
        "config": config.to_dict(),
        "steps": outcome.steps,
        "accuracy": {k: v.to_dict() for k, v in outcome.accuracy.items()},
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(out_dir: Path, report: ConversionReport, recipe: Recipe, entry: dict[str, Any]) -> None:
    """report.json / report.md (with accuracy), and the run appended to recipe.json (each file atomic)."""
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", to_markdown(report))
    recipe.history.append(entry)
    atomic_write_text(out_dir / RECIPE_FILE, json.dumps(recipe.to_dict(), indent=2) + "\n")


def recover(
    out_dir: str | Path,
    teacher: nn.Module,
    result: ConversionResult,
    recipe: Recipe,
    data: DistillData,
    config: DistillConfig,
    world: World,
    resume: bool = False,
    progress: bool = True,
) -> DistillResult:
    """Distil `result.model` from `teacher` with checkpoints in `out_dir` (the run must match `recipe`)."""
    run_options = {"model_spec": recipe.model_spec, "convert": recipe.convert}
    return distill(
        result,
        teacher,
        data,
        config,
        out_dir=out_dir,
        resume=resume,
        run_options=run_options,
        world=world,
        progress=progress,
    )
