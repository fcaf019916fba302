"""What a conversion did: the sites it replaced, those it left alone and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ghostify.config import ConvertConfig


@dataclass
class SiteRecord:
    """One replaced place in the model.

    Attributes:
        name: qualified module name of the replaced module (the new module sits under the same name).
        kind: "c-ghost" (a conv became a C-Ghost module) or "g-ghost" (a stage became a G-Ghost stage).
        detail: short human description of the original, e.g. "Conv2d 64->256 k1x1 s1 +bn+relu".
        absorbed: names of modules folded into the replacement (BN, activation) and set to Identity.
    """

    name: str
    kind: str
    detail: str
    absorbed: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ConversionResult:
    """The converted model plus an account of the conversion, for reports and save/load."""

    model: nn.Module
    config: ConvertConfig
    sites: list[SiteRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (module name, why it was left alone)
    notes: list[str] = field(default_factory=list)
    decisions: list[Any] = field(default_factory=list)  # ghostify.select.SiteDecision, one per timed site

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "sites": [asdict(s) for s in self.sites],
            "skipped": [{"name": n, "why": w} for n, w in self.skipped],
            "notes": list(self.notes),
            **({"decisions": [d.to_dict() for d in self.decisions]} if self.decisions else {}),
        }
