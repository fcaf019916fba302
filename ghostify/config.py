"""Configuration dataclasses, validated on construction and serialisable to plain dicts."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ghostify.errors import ConfigError

MODES = ("c-ghost", "g-ghost", "both", "auto")
WEIGHT_INITS = ("fit", "random")
SELECTS = ("all", "latency")
TARGETS = ("cpu", "cuda", "onnxruntime")
CHOICES = ("c-ghost", "g-ghost", "original")


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
            "both" (G-Ghost stages first, then C-Ghost on the convs that remain ordinary), or "auto"
            (per residual stage the fastest of original / G-Ghost / C-Ghost, per other conv original or
            C-Ghost, by measured latency; see `ghostify.select`).
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
        select: "all" replaces every eligible site; "latency" times each site before and after (in deploy
            form, with its real input shape, on `target`) and keeps only the replacements that are faster.
            Default: "latency" for mode "auto", "all" for the explicit modes.
        target: where latency is measured: "cpu", "cuda" (torch eager) or "onnxruntime" (CPU). Default
            (None): "cuda" when the model's parameters are on CUDA, else "cpu".
        min_speedup: with select "latency", keep a replacement only when time before / time after is at
            least this (a margin over measurement noise).
        decided: the outcome of a latency selection, {site name: "c-ghost" | "g-ghost" | "original"}. When
            set, conversion follows it without measuring anything (this is what a saved recipe replays);
            sites not named stay original.
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
    select: str | None = None
    target: str | None = None
    min_speedup: float = 1.05
    decided: dict[str, str] | None = None
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
        self._check_selection()

    def _check_selection(self) -> None:
        if self.select is None:
            self.select = "latency" if self.mode == "auto" else "all"
        if self.select not in SELECTS:
            raise ConfigError(f"select must be one of {', '.join(SELECTS)} (got {self.select!r}).")
        if self.mode == "auto" and self.select != "latency" and self.decided is None:
            raise ConfigError(
                "mode auto chooses each site by measured latency: use select 'latency' (--select latency), "
                "or an explicit mode (c-ghost, g-ghost, both) with select 'all'."
            )
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(f"target must be one of {', '.join(TARGETS)} (got {self.target!r}).")
        speedup = self.min_speedup
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not math.isfinite(speedup):
            raise ConfigError(f"min-speedup must be a number such as 1.05 (got {speedup!r}).")
        if speedup <= 0:
            raise ConfigError(f"min-speedup must be > 0 (got {speedup!r}); 1.05 keeps a site 5% faster.")
        self.min_speedup = float(speedup)
        if self.decided is not None:
            self.decided = _check_decided(self.decided)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def selects(self, name: str, use_decided: bool = True) -> bool:
        """Whether a module name passes --include / --exclude and, when set, names a replaced site in
        `decided` (the rewriters see `decided` cut to their own kind; see `convert_model`)."""
        if self.include is not None and not re.search(self.include, name):
            return False
        if self.exclude is not None and re.search(self.exclude, name):
            return False
        if use_decided and self.decided is not None and self.decided.get(name, "original") == "original":
            return False
        return True


def _check_decided(decided: Any) -> dict[str, str]:
    """`decided` as {site: choice}; a list of (site, choice) pairs is accepted too."""
    try:
        pairs = list(decided.items()) if isinstance(decided, dict) else [tuple(p) for p in decided]
    except TypeError:
        pairs = None
    if pairs is None or any(len(p) != 2 or not isinstance(p[0], str) for p in pairs):
        raise ConfigError(f"decided must map site names to a choice (got {decided!r}).")
    bad = sorted({str(c) for _, c in pairs if c not in CHOICES})
    if bad:
        raise ConfigError(
            f"decided holds {', '.join(bad)}; each site's choice is one of {', '.join(CHOICES)}."
        )
    return dict(pairs)
