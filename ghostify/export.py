"""Export a model (by default its deploy form) for other runtimes: ONNX or a torch.export ExportedProgram.

Files are written next to their destination and renamed into place, so a failed export never leaves a
half-written file. `verify_export` loads the file back (ONNX Runtime / `torch.export.load`) and says how
far its outputs are from the eager model's.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ghostify.atomic import atomic_write
from ghostify.deploy import deploy_form
from ghostify.errors import ConfigError, FormatError
from ghostify.modes import eval_mode

FORMATS = {"onnx": ".onnx", "exported-program": ".pt2"}
ONNX_OPSET = 17


def export(
    model: nn.Module,
    path: str | Path,
    format: str = "onnx",
    example_inputs: torch.Tensor | None = None,
    deploy: bool = True,
) -> Path:
    """Write `model` to `path` as ONNX or an ExportedProgram (.pt2), with a dynamic batch axis.

    Args:
        model: the model to export (left untouched).
        path: the output file; the format's suffix is added when it has none.
        format: "onnx" (legacy TorchScript exporter, opset 17) or "exported-program" (`torch.export.save`).
        example_inputs: a batch the model accepts (default: one random 3x224x224 image).
        deploy: export the deploy form (BN folded, Ghost layouts simplified; see ghostify.deploy).

    Returns:
        The path written.

    Raises:
        ConfigError: unknown format.
        FormatError: a package the format needs is missing, or the exporter failed.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if format == "onnx":
        _require("onnx", "to export ONNX")
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(FORMATS[format])
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; give a file name such as {path / 'model'}{FORMATS[format]}.")
    if example_inputs is None:
        example_inputs = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def write(tmp: str) -> None:
        target = deploy_form(model, example_inputs) if deploy else model
        with eval_mode(target), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the exporters' notes on constant folding etc.
            (_export_onnx if format == "onnx" else _export_program)(target, example_inputs, tmp)

    try:
        atomic_write(path, write, suffix=FORMATS[format])
    except Exception as err:
        other = next(f for f in FORMATS if f != format)
        raise FormatError(
            f"{format} export failed ({_one_line(err)}); try the {other} format instead "
            "(GHOSTIFY_DEBUG=1 shows the traceback)."
        ) from err
    return path


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    with warnings.catch_warnings():  # chosen on purpose (see below): its deprecation notice says nothing new
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        _onnx_export(model, example, path)


def _onnx_export(model: nn.Module, example: torch.Tensor, path: str) -> None:
    torch.onnx.export(
        model,
        (example,),
        path,
        dynamo=False,  # the dynamo exporter needs onnxscript; the TorchScript one needs only torch
        opset_version=ONNX_OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )


def _export_program(model: nn.Module, example: torch.Tensor, path: str) -> None:
    if example.shape[0] == 1:  # torch.export fixes a dimension of size 1: trace with 2 to keep it free
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


def verify_export(
    path: str | Path, model: nn.Module, example_inputs: torch.Tensor, atol: float | None = None
) -> float:
    """Largest absolute difference between the exported file's outputs and `model`'s on `example_inputs`.

    Raises:
        FormatError: the file's format is unknown, ONNX Runtime is missing, or the difference exceeds atol.
    """
    path = Path(path)
    with eval_mode(model), torch.no_grad():
        expected = [t for t in tree_leaves(model(example_inputs)) if isinstance(t, torch.Tensor)]
    if path.suffix == FORMATS["onnx"]:
        _require("onnxruntime", "to check an ONNX file")
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: example_inputs.detach().cpu().numpy()}
        got = [torch.from_numpy(a) for a in session.run(None, feed)]
    elif path.suffix == FORMATS["exported-program"]:
        with torch.no_grad():
            got = [t for t in tree_leaves(torch.export.load(path).module()(example_inputs))]
    else:
        raise FormatError(f"cannot tell the format of {path}; expected a .onnx or .pt2 file.")
    if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=True)):
        raise FormatError(f"{path} returns outputs of other shapes than the model; export it again.")
    diff = max(
        (a.double().cpu() - b.double().cpu()).abs().max().item() for a, b in zip(got, expected, strict=True)
    )
    if atol is not None and diff > atol:
        raise FormatError(
            f"{path} differs from the model by {diff:.3g} (more than {atol:g}); export it again."
        )
    return diff


def _require(package: str, purpose: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise FormatError(f"{package} is not installed; it is needed {purpose}: pip install {package}.")


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:200]
