"""ghostify.atomic: a failed or interrupted write never replaces (or half-writes) the target."""

from __future__ import annotations

import os
import stat

import pytest

from ghostify.atomic import atomic_write, atomic_write_text


def test_text_is_written_with_ordinary_permissions(tmp_path) -> None:
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temp_file(tmp_path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_text("old")

    def half_write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_suffix_ends_the_temporary_name(tmp_path) -> None:
    seen = []
    atomic_write(tmp_path / "m.onnx", lambda tmp: (seen.append(tmp), open(tmp, "wb").close()), suffix=".onnx")
    assert seen[0].endswith(".onnx") and os.path.basename(seen[0]).startswith(".m.onnx.")
    assert (tmp_path / "m.onnx").is_file()
