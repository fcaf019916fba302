"""Save / load by replay: round trip, atomic writes, and the folders `load` refuses."""

import json

import pytest
import torch

import ghostify
from ghostify.config import ConvertConfig
from ghostify.errors import FormatError, GhostifyError
from ghostify.io import FORMAT_VERSION, RECIPE_FILE, check_output_dir, make_recipe, save
from ghostify.models import load_model
from ghostify.rewrite import convert_model


@pytest.fixture
def tiny_spec(user_model_file):
    return f"{user_model_file}:tiny_net"


def _save_converted(spec, path, mode="c-ghost"):
    loaded = load_model(spec, weights="none")
    config = ConvertConfig(mode=mode, ratio=2)
    example = torch.randn(1, *loaded.input_size)
    result = convert_model(loaded.model, config, example_inputs=example)
    save(result.model, path, make_recipe(spec, config, loaded.num_classes, loaded.input_size))
    return result.model


def test_round_trip_gives_identical_outputs(tmp_path, tiny_spec):
    model = _save_converted(tiny_spec, tmp_path / "out").eval()
    loaded = ghostify.load(tmp_path / "out")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors", RECIPE_FILE]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_refuses_non_empty_folder_without_force(tmp_path, tiny_spec):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user's work")
    with pytest.raises(GhostifyError, match="not empty; pass --force"):
        _save_converted(tiny_spec, out)
    assert (out / "keep.txt").read_text() == "user's work"


def test_force_replaces_whole_folder(tmp_path, tiny_spec):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    model = convert_model(load_model(tiny_spec, weights="none").model, ConvertConfig()).model
    save(model, out, make_recipe(tiny_spec, ConvertConfig(), 10, (3, 32, 32)), force=True)
    assert not (out / "old.txt").exists() and (out / RECIPE_FILE).exists()


def test_failed_save_leaves_nothing_behind(tmp_path, tiny_spec, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    model = convert_model(load_model(tiny_spec, weights="none").model, ConvertConfig()).model
    with pytest.raises(OSError, match="disk full"):
        save(model, tmp_path / "out", make_recipe(tiny_spec, ConvertConfig(), 10, (3, 32, 32)))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(GhostifyError, match="exists and is not a folder"):
        check_output_dir(target)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        import os

        if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(GhostifyError, match="permission denied"):
            check_output_dir(locked / "out")
    finally:
        locked.chmod(0o700)


def test_load_refuses_foreign_and_newer_folders(tmp_path, tiny_spec):
    with pytest.raises(FormatError, match="is not a folder"):
        ghostify.load(tmp_path / "missing")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hi")
    with pytest.raises(FormatError, match="is not a ghostify output"):
        ghostify.load(tmp_path / "random")
    _save_converted(tiny_spec, tmp_path / "newer")
    recipe = json.loads((tmp_path / "newer" / RECIPE_FILE).read_text())
    recipe["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "newer" / RECIPE_FILE).write_text(json.dumps(recipe))
    with pytest.raises(FormatError, match="written by a newer ghostify"):
        ghostify.load(tmp_path / "newer")
    (tmp_path / "newer" / RECIPE_FILE).write_text("{not json")
    with pytest.raises(FormatError, match="unreadable"):
        ghostify.load(tmp_path / "newer")


def test_g_ghost_round_trip(tmp_path):
    spec = "torchvision:resnet50"
    loaded = load_model(spec, weights="none", input_size=(3, 64, 64))
    config = ConvertConfig(mode="g-ghost", ratio=2, stages=["layer3"])
    result = convert_model(loaded.model, config, example_inputs=torch.randn(1, 3, 64, 64))
    save(result.model, tmp_path / "g", make_recipe(spec, config, 1000, (3, 64, 64)))
    again = ghostify.load(tmp_path / "g")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), result.model.eval()(x))
