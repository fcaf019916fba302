"""Top-1 / top-5 accuracy of a classifier over a DataLoader of (images, labels) batches."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ghostify.modes import eval_mode

__all__ = ["EvalResult", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    """Accuracy over the images seen.

    Attributes:
        top1: top-1 accuracy in percent (0-100).
        top5: top-5 accuracy in percent (top-k with k = number of classes when there are fewer than 5).
        images: how many images were scored.
        seconds: wall time of the whole pass, data loading included.
    """

    top1: float
    top5: float
    images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )


def _total(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_batches: int | None = None,
) -> EvalResult:
    """Score `model` on every (images, labels) batch of `loader`, in eval mode and inference mode.

    The model is moved to `device`; every module's train/eval flag is restored afterwards. Batches that
    are None (every image unreadable) are ignored.

    Args:
        model: a classifier returning logits of shape (N, num_classes).
        loader: yields (images, labels) pairs, e.g. from `ghostify.data.build_eval_loader`.
        device: where to run the model.
        progress: show a transient rich progress bar.
        max_batches: stop after this many batches (for quick checks).
    """
    device = torch.device(device)
    model.to(device)
    correct1 = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    images = 0
    total = _total(loader, max_batches)
    bar = _progress() if progress else None
    task = bar.add_task("evaluate", total=total) if bar is not None else None
    start = time.perf_counter()
    try:
        if bar is not None:
            bar.start()
        with eval_mode(model), torch.inference_mode():
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                if batch is None:
                    continue
                inputs, labels = batch[0], batch[1]
                inputs = inputs.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                logits = model(inputs)
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                hits = top == labels.unsqueeze(-1)
                correct1 += hits[:, 0].sum()
                correct5 += hits.any(dim=-1).sum()
                images += labels.shape[0]
                if bar is not None:
                    bar.advance(task)
        top1, top5 = correct1.item(), correct5.item()  # waits for the device
    finally:
        if bar is not None:
            bar.stop()
    seconds = time.perf_counter() - start
    if images == 0:
        return EvalResult(top1=0.0, top5=0.0, images=0, seconds=seconds)
    return EvalResult(top1=100.0 * top1 / images, top5=100.0 * top5 / images, images=images, seconds=seconds)
