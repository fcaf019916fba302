"""The end-to-end distillation loss: softened-logit KL, label cross-entropy, optional feature MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_kl", "distill_loss"]


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KL(teacher || student) on logits softened by T, times T^2 (gradient scale kept)."""
    t = temperature
    log_p = F.log_softmax(student_logits.float() / t, dim=-1)
    log_q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    feature_terms: list[torch.Tensor] | None = None,
    feature_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts (as floats, for the history).

    Labels equal to -1 (unlabelled images) are left out of the cross-entropy; with no labelled image in
    the batch the term is absent.
    """
    total = torch.zeros((), device=student_logits.device)
    parts: dict[str, float] = {}
    if kd_weight > 0:
        kl = kd_kl(student_logits, teacher_logits, temperature)
        total = total + kd_weight * kl
        parts["kd"] = float(kl.detach())
    if ce_weight > 0 and labels is not None:
        known = labels >= 0
        if bool(known.any()):
            ce = F.cross_entropy(student_logits[known].float(), labels[known])
            total = total + ce_weight * ce
            parts["ce"] = float(ce.detach())
    if feature_weight > 0 and feature_terms:
        feat = torch.stack([term.float() for term in feature_terms]).mean()
        total = total + feature_weight * feat
        parts["feature"] = float(feat.detach())
    if not parts:  # e.g. only cross-entropy asked for, and no labelled image in this batch
        total = student_logits.sum() * 0.0  # a zero that keeps the graph (and DDP's reducer) intact
    return total, parts
