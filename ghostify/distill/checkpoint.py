"""Checkpoints of a recovery run, written so that a kill at any moment loses at most the last few steps.

An output folder under training holds, besides recipe.json:
    model.safetensors  the student's latest weights (so `ghostify.load(DIR)` works at every checkpoint)
    train_state.pt     everything needed to resume: phase, step, weights, optimizer, scheduler, history,
                       and a fingerprint of the model and options that produced it
Each file is written to a temporary name in the same folder and renamed over the old one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostify.atomic import atomic_write
from ghostify.errors import FormatError
from ghostify.io import WEIGHTS_FILE

__all__ = ["STATE_FILE", "fingerprint", "read_checkpoint", "write_checkpoint", "save_weights_atomic"]

STATE_FILE = "train_state.pt"


def save_weights_atomic(model: nn.Module, path: str | Path) -> None:
    """model.safetensors, replaced in one rename."""
    from safetensors.torch import save_model

    atomic_write(Path(path), lambda tmp: save_model(model, tmp, metadata={"format": "pt"}))


def model_signature(model: nn.Module) -> str:
    """A short hash of the state dict's names and shapes: the same architecture gives the same hash."""
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(model: nn.Module, options: dict[str, Any], world_size: int) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: architecture, run options, process count."""
    return {"architecture": model_signature(model), "options": options, "world_size": world_size}


def write_checkpoint(out_dir: str | Path, model: nn.Module, state: dict[str, Any]) -> None:
    """train_state.pt first (it alone is enough to resume), then the loadable model.safetensors."""
    out_dir = Path(out_dir)
    atomic_write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
    save_weights_atomic(model, out_dir / WEIGHTS_FILE)


def _difference(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    if saved.get("architecture") != current["architecture"]:
        return "a different model or conversion (the weights' names and shapes differ)"
    if saved.get("world_size") != current["world_size"]:
        return f"{saved.get('world_size')} processes, this run has {current['world_size']}"
    old, new = saved.get("options", {}), current["options"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"--{key.replace('_', '-')} {old.get(key)} (this run: {new.get(key)})"
    return None


def read_checkpoint(out_dir: str | Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The saved training state, or a FormatError saying why it cannot continue this run."""
    path = Path(out_dir) / STATE_FILE
    for leftover in Path(out_dir).glob(".*.tmp"):  # writes cut short by a kill
        leftover.unlink(missing_ok=True)
    if not path.is_file():
        raise FormatError(
            f"nothing to resume in {out_dir} (no {STATE_FILE}); run without --resume to start training."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same to the user
        raise FormatError(f"{path} is unreadable ({type(err).__name__}); remove it to start over.") from None
    why = _difference(state.get("fingerprint", {}), expected)
    if why is not None:
        raise FormatError(
            f"the checkpoint in {out_dir} is from another run: {why}; resume with the same model and "
            "options, or choose another --out."
        )
    return state
