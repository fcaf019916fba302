"""Turn a model spec string into the nn.Module that conversion starts from (the teacher).

A spec is one plain string, so the CLI, saved recipes (replayed on load) and scripts all name a model
the same way, wherever it comes from:

- ``resnet50``: a bare name; torchvision's classification models first, then timm.
- ``torchvision:NAME`` or ``timm:NAME``: pin the source (``timm:resnet50.a1_in1k`` picks a weight tag).
- ``path/to/file.py:factory``: your own model; ``factory`` is a function or an nn.Module subclass in
  that file, called with ``num_classes`` when it accepts it.

Weights are a separate choice: ``"default"`` (pretrained when they can be fetched, otherwise random with
a note), ``"pretrained"`` (fail when they cannot be fetched), ``"none"`` (random init), or the path of a
state-dict file (``.pt``/``.pth``/``.bin`` or ``.safetensors``). Before any download a cache lookup and a
one-second reachability probe decide whether fetching can work, so an offline machine falls back at
once instead of waiting on retries; ``GHOSTIFY_OFFLINE=1`` skips downloads altogether.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import inspect
import os
import pickle
import re
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from ghostify.errors import ConfigError, ModelLoadError

WEIGHT_CHOICES = ("default", "pretrained", "none")
DEFAULT_INPUT_SIZE = (3, 224, 224)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
PROBE_TIMEOUT_S = 1.0
# torchvision models whose weight init is slow (scipy truncnorm) and skippable when not pretrained.
_TV_SKIP_INIT = ("inception_v3", "googlenet")
_NAMES_HINT = "See torchvision.models.list_models() or timm.list_models()"


@dataclass
class LoadedModel:
    """A model ready to convert, with what was loaded and the input it expects.

    Attributes:
        model: the module, in eval() mode.
        spec: the spec as given, e.g. "resnet50", "timm:resnet50d", "path/x.py:factory".
        source: "torchvision", "timm" or "file".
        name: the resolved model name (the factory name for file models).
        weights: what was loaded: "pretrained", "none" or the path of a weights file.
        input_size: (C, H, W) the model expects by default.
        num_classes: classifier outputs, None when unknown.
        notes: one-line notes for the user (fallbacks, skipped options).
        mean: per-channel normalisation mean (on the [0, 1] scale) the model was trained with: from timm's
            data config or torchvision's weights transforms; ImageNet's for file models.
        std: the matching normalisation std.
    """

    model: nn.Module
    spec: str
    source: str
    name: str
    weights: str
    input_size: tuple[int, int, int]
    num_classes: int | None
    notes: list[str] = field(default_factory=list)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# ----------------------------------------------------------------------------------------- public API


def load_model(
    spec: str,
    weights: str = "default",
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> LoadedModel:
    """Build the model a spec names and load its weights.

    Args:
        spec: "NAME", "torchvision:NAME", "timm:NAME" or "path/to/file.py:factory".
        weights: "default", "pretrained", "none" or the path of a state-dict file.
        num_classes: classifier outputs; None keeps the model's default.
        input_size: (C, H, W) to record instead of the model's default (timm models with a fixed
            input size are built for it).

    Returns:
        The model in eval() mode, with what was loaded and notes for the user.

    Raises:
        ModelLoadError: unknown name, bad file or factory, weights unavailable or mismatching.
        ConfigError: num_classes, input_size or weights of the wrong kind.
    """
    weights_mode, weights_path = _check_weights_arg(weights)
    num_classes = _check_num_classes(num_classes)
    input_size = _check_input_size(input_size)
    source, name = _resolve_spec(spec)
    build_mode = weights_mode if weights_path is None else "none"
    notes: list[str] = []
    if source == "torchvision":
        loaded = _load_torchvision(name, build_mode, num_classes, notes)
    elif source == "timm":
        loaded = _load_timm(name, build_mode, num_classes, input_size, notes)
    else:
        loaded = _load_file_model(spec, name, build_mode, num_classes, notes)
    model, name, pretrained, default_size, classes = loaded
    if weights_path is not None:
        _load_weights(model, weights_path, name)
    model.eval()
    mean, std = _normalization(source, name, model)
    return LoadedModel(
        model=model,
        spec=spec,
        source=source,
        name=name,
        weights=str(weights_path) if weights_path is not None else ("pretrained" if pretrained else "none"),
        input_size=input_size or default_size,
        num_classes=classes,
        notes=notes,
        mean=mean,
        std=std,
    )


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a state-dict file into `model`, strictly.

    Reads ``torch.save`` files (with ``weights_only=True``) and ``.safetensors`` files. The state dict may
    sit under a "state_dict", "model" or "model_state_dict" key; "module." (DDP) and "_orig_mod."
    (torch.compile) prefixes are stripped. Nothing is copied when keys or shapes do not match.

    Raises:
        ModelLoadError: the file is missing, unreadable, holds no state dict or does not match.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"weights file '{path}' not found; pass weights 'default', 'pretrained', 'none' "
            "or the path of a state-dict file (.pt, .pth, .bin, .safetensors)."
        )
    _load_weights(model, path, type(model).__name__)


def list_model_names() -> list[str]:
    """torchvision classification model names, then timm names (for suggestions)."""
    return list(_all_names())


# ------------------------------------------------------------------------------------- spec parsing


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


@functools.lru_cache(maxsize=1)
def _all_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(_torchvision_names() + _timm_names()))


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _resolve_spec(spec: str) -> tuple[str, str]:
    """(source, name); for file specs the name is the whole spec, parsed again when loading."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"model spec must be a non-empty string (got {spec!r}); e.g. resnet50.")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "torchvision":
        if rest not in _torchvision_names():
            raise ModelLoadError(
                _unknown_name(rest, _torchvision_names(), "torchvision.models.list_models()")
            )
        return "torchvision", rest
    if sep and prefix == "timm":
        if not _is_timm_model(rest):
            raise ModelLoadError(_unknown_name(rest, _timm_names(), "timm.list_models()"))
        return "timm", rest
    if _is_file_spec(spec):
        return "file", spec
    if sep:
        raise ModelLoadError(
            f"unknown model source '{prefix}' in '{spec}'; use NAME, torchvision:NAME, timm:NAME "
            "or path/to/file.py:factory."
        )
    if spec in _torchvision_names():
        return "torchvision", spec
    if _is_timm_model(spec):
        return "timm", spec
    raise ModelLoadError(_unknown_name(spec, _all_names(), _NAMES_HINT))


def _is_file_spec(spec: str) -> bool:
    path, sep, _ = spec.rpartition(":")
    if not sep:
        return spec.endswith(".py")
    return path.endswith(".py") or "/" in path or "\\" in path or spec.endswith(".py")


def _unknown_name(name: str, candidates: tuple[str, ...], where: str) -> str:
    by_lower: dict[str, str] = {}
    for candidate in candidates:
        by_lower.setdefault(candidate.lower(), candidate)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    if close:
        suggestions = ", ".join(by_lower[c] for c in close)
        return f"unknown model '{name}'; did you mean {suggestions}? {_see(where)}."
    return (
        f"unknown model '{name}'; {_see(where).lower()}, or use path/to/file.py:factory for your own model."
    )


def _see(where: str) -> str:
    return where if where.startswith("See ") else f"See {where}"


# -------------------------------------------------------------------------------- argument checks


def _check_weights_arg(weights: Any) -> tuple[str, Path | None]:
    if isinstance(weights, os.PathLike):
        weights = os.fspath(weights)
    if not isinstance(weights, str) or not weights.strip():
        raise ConfigError(
            f"weights must be 'default', 'pretrained', 'none' or a file path (got {weights!r})."
        )
    if weights.strip().lower() in WEIGHT_CHOICES:
        return weights.strip().lower(), None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"weights file '{weights}' not found; pass weights 'default', 'pretrained', 'none' "
            "or the path of a state-dict file (.pt, .pth, .bin, .safetensors)."
        )
    return "file", path


def _check_num_classes(num_classes: Any) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"num_classes must be a positive integer (got {num_classes!r}); e.g. --num-classes 10."
        )
    return num_classes


def _as_input_size(value: Any) -> tuple[int, int, int] | None:
    """(C, H, W) from a 3-sequence, or (3, H, W) from an (H, W) pair; None if it is neither."""
    if not isinstance(value, (tuple, list)) or len(value) not in (2, 3):
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        return None
    return (3, *value) if len(value) == 2 else tuple(value)  # type: ignore[return-value]


def _check_input_size(input_size: Any) -> tuple[int, int, int] | None:
    if input_size is None:
        return None
    size = _as_input_size(input_size)
    if size is None or len(input_size) != 3:
        raise ConfigError(
            f"input_size must be three positive integers C, H, W (got {input_size!r}); e.g. 3 224 224."
        )
    return size


# ------------------------------------------------------------------------- fetching pretrained weights


@dataclass
class _WeightsSource:
    """Where a pretrained checkpoint lives: a URL (torch hub cache) or a Hugging Face Hub repo."""

    url: str | None = None
    hf_repo: str | None = None
    hf_revision: str | None = None
    hf_filenames: tuple[str, ...] = ()

    @property
    def host(self) -> str:
        if self.hf_repo is not None:
            from huggingface_hub import constants

            return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
        return urlparse(self.url or "").hostname or ""

    @property
    def cache_hint(self) -> str:
        if self.url is not None:
            return f"at {_torch_hub_file(self.url)}"
        return f"in the Hugging Face cache (repo {self.hf_repo})"


def _torch_hub_file(url: str) -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _cached_path(source: _WeightsSource) -> str | None:
    """The local copy of a checkpoint, if a previous download left one."""
    if source.hf_repo is not None:
        from huggingface_hub import try_to_load_from_cache

        for filename in source.hf_filenames:
            found = try_to_load_from_cache(source.hf_repo, filename, revision=source.hf_revision)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    path = _torch_hub_file(source.url or "")
    return path if os.path.isfile(path) else None


def _offline_forced(source: _WeightsSource) -> str | None:
    if os.environ.get("GHOSTIFY_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "offline: GHOSTIFY_OFFLINE is set"
    if source.hf_repo is not None and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true"):
        return "offline: HF_HUB_OFFLINE is set"
    return None


@functools.cache
def _host_reachable(host: str, port: int = 443) -> bool:
    """Whether a TCP connection to host opens within PROBE_TIMEOUT_S (DNS included); True behind a proxy."""
    if any(os.environ.get(v) for v in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return True
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo ignores socket timeouts
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def _fetch_blocker(source: _WeightsSource) -> str | None:
    """Why a download cannot work now, or None (cached, or the host answers)."""
    if _cached_path(source) is not None:
        return None
    forced = _offline_forced(source)
    if forced:
        return forced
    if not _host_reachable(source.host):
        return f"offline: cannot reach {source.host}"
    return None


# Download failures: URLError/HTTPError/hub and socket errors are OSErrors; a hash mismatch or truncated
# file is a RuntimeError.
_FETCH_ERRORS = (OSError, RuntimeError)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class _NoPretrained(Exception):
    """Pretrained weights cannot be used; carries the note ("default") and the error ("pretrained")."""

    def __init__(self, note: str, error: str) -> None:
        super().__init__(error)
        self.note = note
        self.error = error


def _unfetchable(name: str, reason: str, source: _WeightsSource | None) -> _NoPretrained:
    where = f", put the checkpoint {source.cache_hint}" if source is not None else ""
    return _NoPretrained(
        note=f"pretrained weights for {name} could not be fetched ({reason}); using random weights",
        error=(
            f"pretrained weights for {name} could not be fetched ({reason}); connect to the internet{where}, "
            "or use weights 'none' or a weights file."
        ),
    )


def _fall_back(err: _NoPretrained, weights_mode: str, notes: list[str]) -> None:
    if weights_mode == "pretrained":
        raise ModelLoadError(err.error) from None
    notes.append(err.note)


# ------------------------------------------------------------------------------------------ data config


def _normalization(source: str, name: str, model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's own data config names, read locally; ImageNet's when it names none.

    A model trained on other statistics (timm's mean 0.5 ViTs, mean 0 / std 1 MobileViTs) sees shifted
    inputs otherwise, and its accuracy drops before ghostify changes anything.
    """
    mean: Any = None
    std: Any = None
    try:
        if source == "torchvision":
            preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
            mean, std = preset.mean, preset.std
        elif source == "timm":
            import timm.data

            config = timm.data.resolve_data_config({}, model=model)
            mean, std = config.get("mean"), config.get("std")
    except (ValueError, KeyError, AttributeError, TypeError):
        pass
    mean3, std3 = _stats3(mean), _stats3(std)
    if mean3 is None or std3 is None or min(std3) <= 0:
        return IMAGENET_MEAN, IMAGENET_STD
    return mean3, std3


def _stats3(value: Any) -> tuple[float, float, float] | None:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return None
    try:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ torchvision


def _load_torchvision(
    name: str, weights_mode: str, num_classes: int | None, notes: list[str]
) -> tuple[nn.Module, str, bool, tuple[int, int, int], int | None]:
    tvm = torchvision.models
    try:
        default_weights = tvm.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        default_weights = None
    head = len(default_weights.meta["categories"]) if default_weights is not None else None
    input_size = _torchvision_input_size(default_weights)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}

    model = None
    if weights_mode in ("default", "pretrained"):
        try:
            model = _torchvision_pretrained(name, default_weights, head, num_classes, kwargs)
        except _NoPretrained as err:
            _fall_back(err, weights_mode, notes)
    pretrained = model is not None
    if model is None:
        extra = {"init_weights": False} if name in _TV_SKIP_INIT else {}
        model = tvm.get_model(name, weights=None, **kwargs, **extra)
    classes = num_classes if num_classes is not None else (head or _head_size(model))
    return model, name, pretrained, input_size, classes


def _torchvision_pretrained(
    name: str, default_weights: Any, head: int | None, num_classes: int | None, kwargs: dict[str, Any]
) -> nn.Module:
    if default_weights is None:
        raise _NoPretrained(
            note=f"torchvision has no pretrained weights for {name}; using random weights",
            error=f"torchvision has no pretrained weights for {name}; use weights 'none' or a weights file.",
        )
    if num_classes is not None and num_classes != head:
        raise _NoPretrained(
            note=f"pretrained weights skipped: num_classes={num_classes} differs from the pretrained head "
            f"({head}); using random weights",
            error=f"pretrained weights for {name} have a {head}-class head, not num_classes={num_classes}; "
            "drop --num-classes, or use weights 'default' (random init) or 'none'.",
        )
    source = _WeightsSource(url=default_weights.url)
    reason = _fetch_blocker(source)
    if reason is None:
        try:
            return torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
        except _FETCH_ERRORS as err:
            reason = _one_line(err)
    raise _unfetchable(name, reason, source)


def _torchvision_input_size(default_weights: Any) -> tuple[int, int, int]:
    if default_weights is None:
        return DEFAULT_INPUT_SIZE
    try:
        crop = default_weights.transforms().crop_size
    except (AttributeError, TypeError):
        return DEFAULT_INPUT_SIZE
    crop = crop[0] if isinstance(crop, (list, tuple)) else crop
    return (3, int(crop), int(crop)) if isinstance(crop, int) else DEFAULT_INPUT_SIZE


# ------------------------------------------------------------------------------------------------ timm


def _load_timm(
    name: str,
    weights_mode: str,
    num_classes: int | None,
    input_size: tuple[int, int, int] | None,
    notes: list[str],
) -> tuple[nn.Module, str, bool, tuple[int, int, int], int | None]:
    import timm

    cfg = _timm_pretrained_cfg(name)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if input_size is not None and cfg is not None and cfg.fixed_input_size:
        if tuple(input_size[1:]) != tuple(cfg.input_size[1:]):
            kwargs["img_size"] = tuple(input_size[1:])

    model = None
    if weights_mode in ("default", "pretrained"):
        try:
            model = _timm_pretrained(name, cfg, kwargs)
        except _NoPretrained as err:
            _fall_back(err, weights_mode, notes)
        if (
            model is not None
            and num_classes is not None
            and cfg is not None
            and num_classes != cfg.num_classes
        ):
            notes.append(
                f"classifier head re-initialised for num_classes={num_classes} "
                f"(the pretrained head has {cfg.num_classes})"
            )
    pretrained = model is not None
    if model is None:
        model = timm.create_model(name, pretrained=False, **kwargs)
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    default_size = _as_input_size(pretrained_cfg.get("input_size")) or DEFAULT_INPUT_SIZE
    classes = getattr(model, "num_classes", None)
    classes = classes if isinstance(classes, int) and classes > 0 else _head_size(model)
    return model, name, pretrained, default_size, classes


def _timm_pretrained_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg, list_pretrained, split_model_name_tag

    try:
        return get_pretrained_cfg(name)
    except RuntimeError:  # the architecture exists but the tag does not
        arch, tag = split_model_name_tag(name)
        tags = [n.partition(".")[2] for n in list_pretrained(f"{arch}.*")]
        shown = ", ".join(tags[:6]) + (f" and {len(tags) - 6} more" if len(tags) > 6 else "")
        raise ModelLoadError(
            f"timm model {arch} has no weights tagged '{tag}'; available tags: {shown or 'none'}. "
            "See timm.list_pretrained()."
        ) from None


def _timm_weights_source(cfg: Any) -> _WeightsSource | None:
    """Mirror timm's choice of checkpoint location: the HF Hub first, then the URL."""
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        filename = cfg.hf_hub_filename or "pytorch_model.bin"
        if filename.endswith(".safetensors"):
            filenames: tuple[str, ...] = (filename,)
        elif filename == "pytorch_model.bin":
            filenames = ("model.safetensors", filename)
        elif filename.endswith(".bin"):
            filenames = (filename[:-4] + ".safetensors", filename)
        else:
            filenames = (filename,)
        return _WeightsSource(hf_repo=repo, hf_revision=revision or None, hf_filenames=filenames)
    if cfg.url:
        return _WeightsSource(url=cfg.url)
    return None


def _timm_pretrained(name: str, cfg: Any, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if cfg is not None and cfg.file:
        return timm.create_model(name, pretrained=True, **kwargs)
    source = _timm_weights_source(cfg)
    if source is None:
        raise _NoPretrained(
            note=f"timm has no pretrained weights for {name}; using random weights",
            error=f"timm has no pretrained weights for {name}; use weights 'none' or a weights file.",
        )
    cached = _cached_path(source)
    reason = None if cached else _fetch_blocker(source)
    if reason is None:
        overlay = {"file": cached} if cached and not cfg.custom_load else None
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except _FETCH_ERRORS as err:
            reason = _one_line(err)
    raise _unfetchable(name, reason, source)


# ------------------------------------------------------------------------------------------ file models


def _load_file_model(
    spec: str, file_spec: str, weights_mode: str, num_classes: int | None, notes: list[str]
) -> tuple[nn.Module, str, bool, tuple[int, int, int], int | None]:
    path_text, sep, factory_name = file_spec.rpartition(":")
    if not sep or factory_name.endswith(".py"):
        path_text, factory_name = file_spec, ""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"model file '{path_text}' not found (spec '{spec}', relative to {os.getcwd()}); check the path."
        )
    if weights_mode == "pretrained":
        raise ModelLoadError(
            f"weights 'pretrained' do not apply to a model file ('{spec}'); use 'none' (random init) "
            "or the path of a state-dict file."
        )
    module = _import_file(path)
    if not factory_name:
        raise ModelLoadError(
            f"spec '{spec}' names no factory; use {path_text}:NAME with one of: {_callables(module)}."
        )
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ModelLoadError(
            f"{path_text} has no callable '{factory_name}'; it defines: {_callables(module)}. "
            f"Use {path_text}:NAME."
        )

    kwargs: dict[str, Any] = {}
    skipped_num_classes = False
    if num_classes is not None:
        if _accepts(factory, "num_classes"):
            kwargs["num_classes"] = num_classes
        else:
            skipped_num_classes = True
    try:
        model = factory(**kwargs)
    except Exception as err:
        raise ModelLoadError(
            f"calling {factory_name}() from {path_text} failed: {_one_line(err)}; fix the factory."
        ) from err
    if not isinstance(model, nn.Module):
        raise ModelLoadError(
            f"{factory_name}() in {path_text} returned {type(model).__module__}.{type(model).__qualname__}, "
            "not an nn.Module; point the spec at a function or class that builds the model."
        )

    classes = num_classes if kwargs else _file_num_classes(model, factory)
    if skipped_num_classes and classes != num_classes:
        notes.append(f"{factory_name}() takes no num_classes argument; num_classes={num_classes} ignored")
    input_size = (
        _as_input_size(getattr(model, "input_size", None))
        or _as_input_size(getattr(module, "input_size", None))
        or DEFAULT_INPUT_SIZE
    )
    return model, factory_name, False, input_size, classes


def _import_file(path: Path) -> ModuleType:
    """Import a .py file under a module name unique to its absolute path; its folder is importable."""
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"ghostify_user_{stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ModelLoadError(
            f"cannot import '{path}': not a Python source file; use path/to/file.py:factory."
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    folder = str(resolved.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as err:
        sys.modules.pop(module_name, None)
        where = _error_line(err, resolved)
        raise ModelLoadError(
            f"importing {path} failed{where}: {_one_line(err)}; "
            f"run `python {path}` to see the full traceback."
        ) from err
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _error_line(err: BaseException, path: Path) -> str:
    if isinstance(err, SyntaxError) and err.lineno is not None:
        return f" at line {err.lineno}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if Path(f.filename) == path]
    return f" at line {frames[-1].lineno}" if frames else ""


def _callables(module: ModuleType) -> str:
    names = [
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and getattr(obj, "__module__", None) == module.__name__
    ]
    if not names:
        return "no functions or classes"
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def _accepts(factory: Any, param: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == param or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _file_num_classes(model: nn.Module, factory: Any) -> int | None:
    value = getattr(model, "num_classes", None)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    try:
        default = inspect.signature(factory).parameters["num_classes"].default
    except (TypeError, ValueError, KeyError):
        default = None
    if isinstance(default, int) and not isinstance(default, bool) and default > 0:
        return default
    return _head_size(model)


def _head_size(model: nn.Module) -> int | None:
    """out_features of the last nn.Linear, a fair guess at the classes of a classifier."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last.out_features if last is not None else None


# ----------------------------------------------------------------------------------------- weights files


def _load_weights(model: nn.Module, path: Path, model_name: str) -> None:
    state = _strip_wrappers(_extract_state_dict(_read_weights(path), path), model)
    model_state = model.state_dict()
    for key, value in model_state.items():  # counters that older checkpoints lack
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    _check_match(state, model_state, path, model_name)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(
            f"weights file {path} does not load into {model_name}: {_one_line(err)}"
        ) from err


def _read_weights(path: Path) -> Any:
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise ModelLoadError(
                f"could not read weights file {path} as safetensors ({_one_line(err)}); is the file complete?"
            ) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise ModelLoadError(
                f"could not read weights file {path} ({_one_line(err)}); expected a torch.save'd state dict "
                "or a .safetensors file."
            ) from err
        raise ModelLoadError(
            f"weights file {path} holds Python objects besides tensors, which torch.load(weights_only=True) "
            "refuses to unpickle; re-save it with torch.save(model.state_dict(), path) or as safetensors."
        ) from err
    except Exception as err:
        raise ModelLoadError(
            f"could not read weights file {path} ({_one_line(err)}); expected a torch.save'd state dict "
            "or a .safetensors file."
        ) from err


def _looks_like_safetensors(path: Path) -> bool:
    """safetensors files open with an 8-byte header length and a JSON header."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(map(str, list(obj)[:6])) or "none"
        found = f"a dict with keys {keys}"
    else:
        found = type(obj).__name__
    raise ModelLoadError(
        f"weights file {path} holds no state dict ({found}); expected a dict of tensors, "
        "optionally under a 'state_dict' or 'model' key."
    )


def _strip_wrappers(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    model_keys = list(model.state_dict())
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _check_match(
    state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor], path: Path, model_name: str
) -> None:
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [k for k in state if k in model_state and state[k].shape != model_state[k].shape]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_first(unexpected)})")
    if shapes:
        shown = ", ".join(
            f"{k}: file {list(state[k].shape)} vs model {list(model_state[k].shape)}" for k in shapes[:2]
        )
        more = ", ..." if len(shapes) > 2 else ""
        parts.append(f"{len(shapes)} shape mismatch{'es' * (len(shapes) != 1)} ({shown}{more})")
    raise ModelLoadError(
        f"weights file {path} does not match model {model_name}: {', '.join(parts)}; "
        "check --num-classes or the model spec."
    )


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")
