"""evaluate(): top-1 / top-5 arithmetic, modes, limits."""

from __future__ import annotations

import torch
from torch import nn

from ghostify.evaluate import EvalResult, evaluate


class Oracle(nn.Module):
    """Reads the label hidden in the input (first pixel) and scores it highest; `shift` moves it down."""

    def __init__(self, num_classes: int = 10, shift: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.shift = shift
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = x[:, 0, 0, 0].long()
        # logits: the label gets rank `shift` (0 = best), the other classes follow in order
        ranks = (torch.arange(self.num_classes) - labels[:, None] + self.shift) % self.num_classes
        return -ranks.float() + self.dummy


def _batches(labels: list[int], batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    y = torch.tensor(labels)
    x = torch.zeros(len(labels), 3, 2, 2)
    x[:, 0, 0, 0] = y.float()
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(labels), batch_size)]


LABELS = [i % 10 for i in range(22)]


def test_perfect_model_scores_100():
    result = evaluate(Oracle(), _batches(LABELS), progress=False)
    assert isinstance(result, EvalResult)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert result.images == 22
    assert result.seconds >= 0


def test_label_in_second_place_is_top5_not_top1():
    result = evaluate(Oracle(shift=1), _batches(LABELS), progress=False)
    assert result.top1 == 0.0 and result.top5 == 100.0


def test_label_in_sixth_place_misses_top5():
    result = evaluate(Oracle(shift=5), _batches(LABELS), progress=False)
    assert result.top1 == 0.0 and result.top5 == 0.0


def test_partial_accuracy():
    class Zero(nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 10)
            logits[:, 0] = 1
            return logits

    result = evaluate(Zero(), _batches([0, 0, 0, 1, 2, 3, 4, 5]), progress=False)
    assert result.top1 == 37.5
    assert result.images == 8


def test_fewer_than_five_classes():
    result = evaluate(Oracle(num_classes=3, shift=2), _batches([0, 1, 2, 1]), progress=False)
    assert result.top1 == 0.0 and result.top5 == 100.0


def test_max_batches_none_batches_and_empty():
    result = evaluate(Oracle(), _batches(LABELS), progress=False, max_batches=2)
    assert result.images == 8
    result = evaluate(Oracle(), [None, *_batches([1, 2]), None], progress=False)
    assert result.images == 2 and result.top1 == 100.0
    assert evaluate(Oracle(), [], progress=False).images == 0


def test_restores_training_mode_and_runs_without_grad():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Dropout(0.5))
    model.train()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append((m.training, torch.is_grad_enabled())))
    evaluate(model, _batches(LABELS), progress=False)
    assert model.training
    assert seen and all(mode is False and grad is False for mode, grad in seen)


def test_progress_bar_runs():
    result = evaluate(Oracle(), _batches(LABELS), progress=True)
    assert result.top1 == 100.0
