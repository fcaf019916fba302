"""Save and load converted models by replay: recipe (spec + options) + weights (safetensors).

A ghostify output folder holds:
    recipe.json        source model spec, conversion options, versions, format version
    model.safetensors  the converted model's state dict
    report.json / report.md   what the conversion gained (when a report was made)
`load(dir)` rebuilds the source model (without downloading weights), replays the conversion and loads
the weights; torch.fx GraphModules are never pickled. Folders are written next to their destination
and renamed into place, so an interrupted save never leaves a half-written output.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostify.config import ConvertConfig
from ghostify.errors import FormatError, GhostifyError
from ghostify.rewrite.result import ConversionResult

FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class Recipe:
    """Everything needed to rebuild a converted model except its weights."""

    model_spec: str
    convert: dict[str, Any]
    num_classes: int | None = None
    input_size: tuple[int, int, int] = (3, 224, 224)
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    source_weights: str = "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model_spec": self.model_spec,
            "num_classes": self.num_classes,
            "source_weights": self.source_weights,
            "input_size": list(self.input_size),
            "convert": self.convert,
            "versions": self.versions,
            "created": self.created,
            "history": self.history,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(
            model_spec=data["model_spec"],
            convert=data["convert"],
            num_classes=data.get("num_classes"),
            input_size=tuple(data.get("input_size", (3, 224, 224))),
            format_version=int(data["format_version"]),
            versions=data.get("versions", {}),
            created=data.get("created", ""),
            history=data.get("history", []),
            source_weights=data.get("source_weights", "unknown"),
        )


def current_versions() -> dict[str, str]:
    import torchvision

    from ghostify import __version__

    return {
        "ghostify": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def make_recipe(
    model_spec: str,
    config: ConvertConfig,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] = (3, 224, 224),
    source_weights: str = "unknown",
) -> Recipe:
    return Recipe(
        source_weights=source_weights,
        model_spec=model_spec,
        convert=config.to_dict(),
        num_classes=num_classes,
        input_size=tuple(input_size),
        versions=current_versions(),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def check_output_dir(path: str | Path, force: bool = False) -> Path:
    """Fail early (before any work) when `path` cannot become a ghostify output folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GhostifyError(f"output path {path} exists and is not a folder; choose another --out.")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise GhostifyError(
            f"output folder {path} is not empty; pass --force to replace it or choose another --out."
        )
    parent = path.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise GhostifyError(f"cannot write to {probe} (permission denied); choose another --out.")
    return path


def save(
    model: nn.Module,
    path: str | Path,
    recipe: Recipe,
    extra_files: dict[str, str | bytes] | None = None,
    force: bool = False,
) -> Path:
    """Write model weights, recipe and any extra files (e.g. reports) atomically into folder `path`."""
    from safetensors.torch import save_model

    path = check_output_dir(path, force=force)
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes 0700; the output is an ordinary folder
    try:
        save_model(model, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            target = staging / name
            target.write_bytes(content if isinstance(content, bytes) else content.encode())
        _swap_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _swap_into_place(staging: Path, path: Path) -> None:
    """Rename the finished folder onto `path`; an existing folder is removed only after that succeeded."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_recipe(path: str | Path) -> Recipe:
    """The recipe of a ghostify output folder, or a FormatError saying why it is not one."""
    path = Path(path)
    recipe_file = path / RECIPE_FILE
    if not path.is_dir():
        raise FormatError(f"{path} is not a folder; give the folder written by `ghostify MODEL --out DIR`.")
    if not recipe_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FormatError(
            f"{path} is not a ghostify output (no {RECIPE_FILE} / {WEIGHTS_FILE}); "
            "give the folder written by `ghostify MODEL --out DIR`."
        )
    try:
        data = json.loads(recipe_file.read_text())
        version = int(data["format_version"])
    except (ValueError, KeyError, TypeError) as err:
        raise FormatError(
            f"{recipe_file} is unreadable ({err}); the folder is damaged, convert again."
        ) from None
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path} was written by a newer ghostify (format {version}, this one reads <= {FORMAT_VERSION}); "
            "upgrade ghostify (pip install -U ghostify)."
        )
    return Recipe.from_dict(data)


def replay(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ConversionResult, Recipe]:
    """Rebuild (source model with random weights, conversion result with the saved weights, recipe)."""
    from safetensors.torch import load_file

    from ghostify.models import load_model
    from ghostify.rewrite import convert_model

    recipe = read_recipe(path)
    source = load_model(
        recipe.model_spec, weights="none", num_classes=recipe.num_classes, input_size=recipe.input_size
    ).model
    config = ConvertConfig.from_dict(recipe.convert)
    replay_config = ConvertConfig.from_dict({**recipe.convert, "weight_init": "random"})
    example = torch.zeros(1, *recipe.input_size)
    result = convert_model(source, replay_config, example_inputs=example)
    result.config = config
    state = load_file(str(Path(path) / WEIGHTS_FILE), device=str(map_location))
    try:
        result.model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise FormatError(
            f"weights in {path} do not fit the replayed model ({detail[:200]}); "
            "was it saved by another version?"
        ) from None
    result.model.to(map_location).eval()
    return source, result, recipe


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a converted model from a ghostify output folder (replay + weights), in eval mode."""
    return replay(path, map_location)[1].model
