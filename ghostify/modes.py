"""Run modules in eval mode for a moment without losing anyone's training flag."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own training flag.

    Restoring module by module (not `model.train(old)`) keeps deliberately mixed states, e.g. a
    student in train mode with frozen BN layers.
    """
    flags = [(mod, mod.training) for model in models for mod in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for mod, training in flags:
            mod.training = training
