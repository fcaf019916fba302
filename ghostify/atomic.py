"""Write files so that a reader (or a run killed mid-write) sees the old file or the whole new one.

Every output ghostify writes -- reports, recipes, checkpoints, plots, exported models -- goes through
`atomic_write`: the bytes go to a temporary file in the same folder, which is then renamed over the
target in one step. A failed write removes its temporary file; a kill -9 may leave one behind, named
`.NAME.*.tmp` (or `.NAME.*SUFFIX` for a writer that asked for a suffix); checkpoint reading sweeps up
the `.tmp` ones.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | Path, write: Callable[[str], None], suffix: str = ".tmp") -> None:
    """Call `write(temp_path)`, then rename the temporary file to `path` (its folder is created).

    The file gets ordinary permissions (0666 less the umask), not mkstemp's private 0600.
    `suffix` ends the temporary name, for writers that look at the extension.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` of UTF-8 text, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
