"""One exception family for everything ghostify refuses to do.

Every message is one line that says what failed, why, and what to do. The CLI catches
`GhostifyError` and prints the message alone; anything else is a bug and keeps its traceback.
"""


class GhostifyError(Exception):
    """Base class: a user-facing failure with a one-line, actionable message."""


class ConfigError(GhostifyError, ValueError):
    """An option has a value ghostify cannot use (e.g. ratio 2.5, an even dw-size)."""


class ModelLoadError(GhostifyError):
    """A model spec, factory or weights file could not be turned into a model."""


class ConversionError(GhostifyError):
    """The model cannot be converted as asked (no eligible site, a block that cannot be narrowed...)."""


class DataError(GhostifyError):
    """A data folder is missing, empty or does not match the model."""


class FormatError(GhostifyError):
    """A folder is not a ghostify output, or was written by a newer format version."""


class TrainingError(GhostifyError):
    """Training cannot go on (e.g. the loss became NaN); the last good checkpoint is kept."""
