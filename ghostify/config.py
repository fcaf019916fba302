"""Configuration dataclasses, validated on construction and serialisable to plain dicts."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ghostify.errors import ConfigError

MODES = ("c-ghost", "g-ghost", "both")
WEIGHT_INITS = ("fit", "random")


def _check_regex(name: str, pattern: str | None) -> None:
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"--{name} {pattern!r} is not a valid regular expression ({err}).") from None


def check_ratio(ratio: Any) -> int:
    """Return `ratio` as an int, or raise: the paper's ratio s is an integer >= 2."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio != int(ratio) or ratio < 2:
        raise ConfigError(f"ratio must be an integer >= 2 (got {ratio!r}); try --ratio 2.")
    return int(ratio)


@dataclass
class ConvertConfig:
    """What to convert and how.

    Attributes:
        mode: "c-ghost" (swap convs for C-Ghost modules), "g-ghost" (restructure residual stages),
            or "both" (G-Ghost stages first, then C-Ghost on the convs that remain ordinary).
        ratio: the paper's s. C-Ghost: the primary conv makes ceil(n/s) of n channels. G-Ghost: the
            middle blocks of a stage keep 1/s of the channels, the rest come from cheap operations.
        dw_size: kernel of the C-Ghost cheap depthwise operation (odd, >= 1).
        include: regex on module names; only matching convs / stages are converted.
        exclude: regex on module names; matching convs / stages are left alone.
        skip_stem: leave the first ordinary conv of the network (the stem) as it is.
        weight_init: "fit" inherits weights from the original (intrinsic channels exact, cheap ops
            fitted by least squares); "random" is the naive swap (first filters kept, cheap ops
            randomly initialised), kept as a baseline for comparisons.
        stages: G-Ghost only: names of the stage containers to restructure (default: every eligible one).
        mix: G-Ghost only: use the paper's mix ("information enhancement") branch.
    """

    mode: str = "c-ghost"
    ratio: int = 2
    dw_size: int = 3
    include: str | None = None
    exclude: str | None = None
    skip_stem: bool = True
    weight_init: str = "fit"
    stages: list[str] | None = None
    mix: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)} (got {self.mode!r}).")
        self.ratio = check_ratio(self.ratio)
        dw = self.dw_size
        if isinstance(dw, bool) or not isinstance(dw, int) or dw < 1 or dw % 2 == 0:
            raise ConfigError(f"dw-size must be an odd integer >= 1 (got {dw!r}); try --dw-size 3.")
        if self.weight_init not in WEIGHT_INITS:
            raise ConfigError(
                f"weight_init must be one of {', '.join(WEIGHT_INITS)} (got {self.weight_init!r})."
            )
        _check_regex("include", self.include)
        _check_regex("exclude", self.exclude)
        if self.stages is not None:
            self.stages = list(self.stages)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def selects(self, name: str) -> bool:
        """Whether a module name passes --include / --exclude."""
        if self.include is not None and not re.search(self.include, name):
            return False
        if self.exclude is not None and re.search(self.exclude, name):
            return False
        return True
