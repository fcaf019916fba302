"""load_model: spec forms, weight choices, weights files and the errors users see.

Nothing here downloads: an autouse fixture makes every host unreachable, points the torch hub and
Hugging Face caches at empty temporary folders, and makes any download attempt fail the test.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import pytest
import timm
import timm.models._hub
import torch
import torchvision
from safetensors.torch import save_file

from ghostify import models
from ghostify.errors import ConfigError, ModelLoadError
from ghostify.models import LoadedModel, list_model_names, load_model, load_weights_file

FIXTURE = Path(__file__).parent / "fixtures" / "user_model.py"
TINY = f"{FIXTURE}:tiny_net"


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every host unreachable, empty caches, downloads forbidden; returns the hosts probed."""
    probed: list[str] = []

    def unreachable(host: str, port: int = 443) -> bool:
        probed.append(host)
        return False

    def no_download(*args, **kwargs):
        raise AssertionError("tests must not download anything")

    monkeypatch.setattr(models, "_host_reachable", unreachable)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("GHOSTIFY_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download)
    return probed


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny_state(num_classes: int = 10) -> dict[str, torch.Tensor]:
    model = load_model(TINY, weights="none", num_classes=num_classes).model
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def write_py(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ spec forms


def test_bare_name_prefers_torchvision():
    loaded = load_model("resnet18", weights="none")
    assert isinstance(loaded, LoadedModel)
    assert (loaded.source, loaded.name, loaded.spec, loaded.weights) == (
        "torchvision",
        "resnet18",
        "resnet18",
        "none",
    )
    assert isinstance(loaded.model, torchvision.models.ResNet)
    assert loaded.input_size == (3, 224, 224)
    assert loaded.num_classes == 1000
    assert loaded.notes == []
    assert not loaded.model.training


def test_bare_name_falls_back_to_timm():
    loaded = load_model("resnet10t", weights="none")
    assert (loaded.source, loaded.name) == ("timm", "resnet10t")
    assert loaded.input_size == (3, 176, 176)  # timm's pretrained cfg
    assert loaded.num_classes == 1000
    assert not loaded.model.training


@pytest.mark.parametrize(
    ("spec", "source", "cls"),
    [
        ("torchvision:resnet18", "torchvision", torchvision.models.ResNet),
        ("timm:resnet18", "timm", timm.models.ResNet),
    ],
)
def test_prefixed_specs_pin_the_source(spec, source, cls):
    loaded = load_model(spec, weights="none")
    assert (loaded.source, loaded.name) == (source, "resnet18")
    assert isinstance(loaded.model, cls)


@pytest.mark.parametrize("factory", ["tiny_net", "TinyNet"])
def test_file_spec_function_or_class(factory):
    loaded = load_model(f"{FIXTURE}:{factory}")
    assert (loaded.source, loaded.name, loaded.weights) == ("file", factory, "none")
    assert loaded.notes == []  # no pretrained concept, so no note
    assert loaded.input_size == (3, 32, 32)  # module-level input_size
    assert loaded.num_classes == 10
    assert not loaded.model.training
    assert loaded.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_file_spec_can_import_its_siblings(tmp_path):
    write_py(tmp_path, "helpers_for_net.py", "import torch\nWIDTH = 4\n")
    path = write_py(
        tmp_path,
        "net.py",
        "import torch\nfrom helpers_for_net import WIDTH\n"
        "def build():\n    return torch.nn.Conv2d(3, WIDTH, 3)\n",
    )
    loaded = load_model(f"{path}:build")
    assert loaded.model.out_channels == 4
    assert loaded.input_size == (3, 224, 224)
    assert loaded.num_classes is None


@pytest.mark.parametrize("spec", ["resnet18", "timm:resnet10t", TINY])
def test_num_classes_is_honoured(spec):
    loaded = load_model(spec, weights="none", num_classes=7)
    assert loaded.num_classes == 7
    with torch.no_grad():
        assert loaded.model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_input_sizes():
    assert load_model("inception_v3", weights="none").input_size == (3, 299, 299)
    assert load_model(TINY, input_size=(3, 64, 64)).input_size == (3, 64, 64)
    assert load_model("resnet18", weights="none", input_size=[1, 96, 96]).input_size == (1, 96, 96)


def test_normalization_comes_from_the_models_own_data_config():
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    loaded = load_model("resnet18", weights="none")
    preset = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert (loaded.mean, loaded.std) == (tuple(preset.mean), tuple(preset.std)) == imagenet
    # torchvision's one model trained on other statistics, read from its weights enum (no model built)
    assert models._normalization("torchvision", "efficientnet_v2_l", None) == ((0.5,) * 3, (0.5,) * 3)
    mobilevit = load_model("timm:mobilevit_xxs", weights="none")  # timm: trained on unnormalised pixels
    assert (mobilevit.input_size, mobilevit.mean, mobilevit.std) == ((3, 256, 256), (0.0,) * 3, (1.0,) * 3)
    assert (load_model("timm:resnet10t", weights="none").mean, load_model(TINY).std) == imagenet
    assert models._normalization("timm", "x", torch.nn.Linear(2, 2)) == imagenet  # no data config


def test_list_model_names():
    names = list_model_names()
    assert "resnet50" in names and "resnet10t" in names
    assert len(names) == len(set(names))
    assert names.index("resnet50") < names.index("resnet10t")  # torchvision first


# --------------------------------------------------------------------------------- pretrained weights


def test_default_weights_offline_fall_back_to_random_with_a_note(offline):
    start = time.perf_counter()
    loaded = load_model("resnet50")
    assert time.perf_counter() - start < 3.0
    assert loaded.weights == "none"
    assert len(loaded.notes) == 1
    assert "pretrained weights for resnet50 could not be fetched (offline" in loaded.notes[0]
    assert loaded.notes[0].endswith("using random weights")
    weights_url = torchvision.models.get_model_weights("resnet50").DEFAULT.url
    assert offline == [urlparse(weights_url).hostname]  # the one host asked, the weights' own


def test_pretrained_weights_offline_raise(offline):
    with pytest.raises(
        ModelLoadError, match=r"pretrained weights for resnet18 could not be fetched \(offline"
    ):
        load_model("resnet18", weights="pretrained")


def test_ghostify_offline_skips_the_probe(monkeypatch, offline):
    monkeypatch.setenv("GHOSTIFY_OFFLINE", "1")
    loaded = load_model("resnet18")
    assert "GHOSTIFY_OFFLINE" in loaded.notes[0]
    assert offline == []


def test_failing_download_falls_back_or_raises(monkeypatch):
    def refused(*args, **kwargs):
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(models, "_host_reachable", lambda host, port=443: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refused)
    loaded = load_model("resnet18")
    assert loaded.weights == "none"
    assert "URLError" in loaded.notes[0] and "connection refused" in loaded.notes[0]
    with pytest.raises(ModelLoadError, match="could not be fetched.*URLError"):
        load_model("resnet18", weights="pretrained")


def test_cached_torchvision_checkpoint_is_loaded_without_network(monkeypatch, tmp_path):
    def must_not_probe(host, port=443):
        raise AssertionError("a cached checkpoint needs no network")

    monkeypatch.setattr(models, "_host_reachable", must_not_probe)
    source = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / Path(url).name)
    loaded = load_model("resnet18", weights="pretrained")
    assert loaded.weights == "pretrained" and loaded.notes == []
    assert same_weights(loaded.model, source)


def test_torchvision_pretrained_with_other_num_classes(offline):
    loaded = load_model("resnet18", num_classes=10)
    assert loaded.weights == "none"
    assert loaded.notes == [
        "pretrained weights skipped: num_classes=10 differs from the pretrained head (1000); "
        "using random weights"
    ]
    assert offline == []  # decided without the network
    with pytest.raises(ModelLoadError, match="1000-class head, not num_classes=10"):
        load_model("resnet18", weights="pretrained", num_classes=10)


def test_timm_offline(offline):
    loaded = load_model("timm:resnet10t")
    assert loaded.weights == "none"
    assert "could not be fetched (offline: cannot reach huggingface.co)" in loaded.notes[0]
    with pytest.raises(ModelLoadError, match="could not be fetched.*Hugging Face cache"):
        load_model("timm:resnet10t", weights="pretrained")


def test_cached_timm_checkpoint_is_loaded_without_network(monkeypatch, tmp_path):
    source = timm.create_model("resnet10t")
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))

    def cached(repo_id, filename, revision=None, **kwargs):
        return str(path) if (repo_id, filename) == ("timm/resnet10t.c3_in1k", "model.safetensors") else None

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", cached)
    loaded = load_model("timm:resnet10t", weights="pretrained")
    assert loaded.weights == "pretrained" and loaded.notes == []
    assert same_weights(loaded.model, source)

    loaded = load_model("timm:resnet10t", num_classes=7)  # timm adapts the head itself
    assert loaded.weights == "pretrained"
    assert loaded.model.fc.out_features == 7
    assert "classifier head re-initialised for num_classes=7" in loaded.notes[0]
    assert torch.equal(loaded.model.conv1[0].weight, source.conv1[0].weight)


def test_timm_model_without_pretrained_weights():
    loaded = load_model("timm:cs3darknet_s")
    assert loaded.weights == "none"
    assert loaded.notes == ["timm has no pretrained weights for cs3darknet_s; using random weights"]
    with pytest.raises(ModelLoadError, match="timm has no pretrained weights for cs3darknet_s"):
        load_model("timm:cs3darknet_s", weights="pretrained")


def test_pretrained_for_a_file_model_is_an_error():
    with pytest.raises(ModelLoadError, match="'pretrained' do not apply to a model file"):
        load_model(TINY, weights="pretrained")


# -------------------------------------------------------------------------------------- weights files


def _plain(state):
    return state


def _under_state_dict(state):
    return {"state_dict": state, "epoch": 3}


def _under_model(state):
    return {"model": state, "optimizer": {"lr": 0.1}}


def _ddp(state):
    return {"state_dict": {f"module.{k}": v for k, v in state.items()}}


@pytest.mark.parametrize("wrap", [_plain, _under_state_dict, _under_model, _ddp])
def test_weights_file_torch_save(tmp_path, wrap):
    state = tiny_state()
    path = tmp_path / "weights.pt"
    torch.save(wrap(state), path)
    loaded = load_model(TINY, weights=str(path))
    assert loaded.weights == str(path)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert not loaded.model.training


def test_weights_file_safetensors(tmp_path):
    state = tiny_state()
    path = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_model(TINY, weights=path)
    assert loaded.weights == str(path)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())


def test_weights_file_for_torchvision_with_num_classes(tmp_path):
    source = torchvision.models.resnet18(num_classes=5)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model("resnet18", weights=str(path), num_classes=5)
    assert loaded.notes == [] and loaded.num_classes == 5
    assert same_weights(loaded.model, source)


def test_load_weights_file_direct(tmp_path):
    state = tiny_state()
    path = tmp_path / "w.pt"
    torch.save(state, path)
    model = load_model(TINY).model
    load_weights_file(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_mismatching_num_classes_names_the_shapes(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_state(num_classes=10), path)
    with pytest.raises(ModelLoadError) as err:
        load_model(TINY, weights=str(path), num_classes=5)
    message = str(err.value)
    assert f"weights file {path} does not match model tiny_net" in message
    assert "2 shape mismatches (fc.weight: file [10, 64] vs model [5, 64], fc.bias" in message
    assert message.endswith("check --num-classes or the model spec.")


def test_mismatching_keys_are_listed_and_nothing_is_copied(tmp_path):
    state = tiny_state()
    del state["stem.0.weight"], state["fc.bias"]
    state["head.extra"] = torch.zeros(3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    model = load_model(TINY).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ModelLoadError, match=r"2 missing keys \(stem.0.weight, fc.bias\), 1 unexpected \(head.extra\)"
    ):
        load_weights_file(model, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_weights_file_missing_or_misspelt():
    with pytest.raises(ModelLoadError, match="weights file 'pretrianed' not found; pass weights 'default'"):
        load_model(TINY, weights="pretrianed")
    with pytest.raises(ModelLoadError, match="not found"):
        load_weights_file(torch.nn.Linear(2, 2), "/nonexistent/w.pt")


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("garbage.pt", b"this is not a checkpoint", "could not read weights file"),
        ("garbage.safetensors", b"\x00" * 32, "could not read weights file .* as safetensors"),
        ("objects.pt", {"state_dict": {}, "args": argparse.Namespace(lr=0.1)}, "holds Python objects"),
        ("epoch.pt", {"epoch": 3, "best": 0.5}, r"holds no state dict \(a dict with keys epoch, best\)"),
    ],
)
def test_unreadable_weights_files(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ModelLoadError, match=match):
        load_model(TINY, weights=str(path))


# --------------------------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            "resnet5O",
            r"unknown model 'resnet5O'; did you mean resnet50, .*See torchvision.models.list_models\(\)",
        ),
        ("timm:resnet5O", r"unknown model 'resnet5O'; did you mean resnet50.*See timm.list_models\(\)"),
        ("torchvision:resnt18", r"unknown model 'resnt18'; did you mean resnet18"),
        ("qqqqzzzz", r"unknown model 'qqqqzzzz'; see .* or use path/to/file.py:factory"),
        ("foo:bar", "unknown model source 'foo'"),
        ("timm:resnet50.no_such_tag", "has no weights tagged 'no_such_tag'; available tags: a1_in1k"),
    ],
)
def test_unknown_models_suggest_names(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec, weights="none")


def test_file_not_found():
    with pytest.raises(ModelLoadError, match="model file 'no/such/model.py' not found"):
        load_model("no/such/model.py:build")


def test_factory_not_found_lists_callables():
    with pytest.raises(ModelLoadError) as err:
        load_model(f"{FIXTURE}:tinynet")
    message = str(err.value)
    assert "has no callable 'tinynet'" in message
    assert all(name in message for name in ("TinyNet", "tiny_net", "not_a_module"))


def test_file_without_factory():
    with pytest.raises(ModelLoadError, match="names no factory; use .*:NAME with one of: .*tiny_net"):
        load_model(str(FIXTURE))


def test_factory_returning_something_else():
    with pytest.raises(
        ModelLoadError, match=r"not_a_module\(\) in .* returned builtins.dict, not an nn.Module"
    ):
        load_model(f"{FIXTURE}:not_a_module")


def test_file_raising_on_import(tmp_path):
    path = write_py(tmp_path, "broken.py", "import torch\nraise ValueError('boom')\n")
    with pytest.raises(ModelLoadError, match=r"importing .*broken.py failed at line 2: ValueError: boom"):
        load_model(f"{path}:build")
    path = write_py(tmp_path, "syntax.py", "def build(:\n")
    with pytest.raises(ModelLoadError, match="importing .*syntax.py failed at line 1: SyntaxError"):
        load_model(f"{path}:build")


def test_factory_raising(tmp_path):
    path = write_py(tmp_path, "raises.py", "def build(num_classes=10):\n    raise RuntimeError('no gpu')\n")
    with pytest.raises(ModelLoadError, match=r"calling build\(\) from .* failed: RuntimeError: no gpu"):
        load_model(f"{path}:build")


def test_factory_without_num_classes_notes_it(tmp_path):
    path = write_py(tmp_path, "fixed.py", "import torch\ndef build():\n    return torch.nn.Linear(4, 3)\n")
    loaded = load_model(f"{path}:build", num_classes=5)
    assert loaded.notes == ["build() takes no num_classes argument; num_classes=5 ignored"]
    assert loaded.num_classes == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": ""}, "model spec must be a non-empty string"),
        ({"spec": "resnet18", "num_classes": 0}, "num_classes must be a positive integer"),
        ({"spec": "resnet18", "num_classes": 2.5}, "num_classes must be a positive integer"),
        ({"spec": "resnet18", "input_size": (224, 224)}, "input_size must be three positive integers"),
        (
            {"spec": "resnet18", "weights": 3},
            "weights must be 'default', 'pretrained', 'none' or a file path",
        ),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_model(**kwargs)
