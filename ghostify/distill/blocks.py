"""Pair each converted site of the student with where the teacher computes the same thing.

A C-Ghost module stands in for conv (-> BN -> activation): its teacher input is the conv's input and
its target the output of the last module it absorbed. A G-Ghost stage stands in for a run of residual
blocks: its teacher input is the first block's input and its target the last block's output. Sites nested
inside a G-Ghost stage (mode "both") are covered by their stage.

`TeacherTaps` records those tensors during one teacher forward, so that every block can be trained
towards the teacher's output there, all in parallel (block-wise distillation), from the teacher's input
to it or from the student's own (`student_inputs`), or so that the student's site outputs can be
compared with the teacher's (feature loss).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ghostify.modules.ghost_module import GhostModule
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite.result import ConversionResult

__all__ = ["Block", "TeacherTaps", "find_blocks", "student_inputs"]


@dataclass
class Block:
    """One converted site and its counterpart in the teacher."""

    name: str
    kind: str
    student: nn.Module
    teacher_in: nn.Module
    teacher_out: nn.Module


def _outermost(result: ConversionResult) -> list:
    stages = [s.name for s in result.sites if s.kind == "g-ghost"]
    return [s for s in result.sites if not any(s.name.startswith(f"{g}.") for g in stages)]


def find_blocks(student: nn.Module, teacher: nn.Module, result: ConversionResult) -> list[Block]:
    """The converted sites that have a clear counterpart in `teacher`, in conversion order."""
    blocks = []
    for site in _outermost(result):
        try:
            module = student.get_submodule(site.name)
        except AttributeError:
            continue
        try:
            if site.kind == "c-ghost" and isinstance(module, GhostModule):
                conv = teacher.get_submodule(site.name)
                last = teacher.get_submodule(site.absorbed[-1]) if site.absorbed else conv
                blocks.append(Block(site.name, site.kind, module, conv, last))
            elif site.kind == "g-ghost" and isinstance(module, GGhostStage):
                names = site.extra.get("block_names") or []
                if names:
                    first, last = teacher.get_submodule(names[0]), teacher.get_submodule(names[-1])
                    blocks.append(Block(site.name, site.kind, module, first, last))
        except AttributeError:
            continue
    return blocks


class TeacherTaps:
    """Hooks on the teacher that keep each block's input and output of the latest forward.

    Tensors are cloned: the teacher may change them in place afterwards (e.g. `out += identity`).
    Use as a context manager; the hooks go when it exits.
    """

    def __init__(self, blocks: list[Block], inputs: bool = True) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for block in blocks:
            if inputs:
                self._handles.append(block.teacher_in.register_forward_pre_hook(self._keep_input(block.name)))
            self._handles.append(block.teacher_out.register_forward_hook(self._keep_output(block.name)))

    def _keep_input(self, name: str):
        def hook(module, args):
            self.inputs[name] = args[0].detach().clone()

        return hook

    def _keep_output(self, name: str):
        def hook(module, args, output):
            self.outputs[name] = output.detach().clone()

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def __enter__(self) -> TeacherTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()


@contextlib.contextmanager
def student_inputs(blocks: list[Block]) -> Iterator[dict[str, torch.Tensor]]:
    """name -> the input each block's student module got in the latest forward inside the `with`.

    Detached copies: training a block from them leaves the blocks before it alone.
    """
    seen: dict[str, torch.Tensor] = {}

    def keeper(name: str):  # noqa: ANN202
        def hook(module, args):
            seen[name] = args[0].detach().clone()

        return hook

    handles = [b.student.register_forward_pre_hook(keeper(b.name)) for b in blocks]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE divided by the target's mean square: shallow and deep sites weigh alike."""
    output, target = output.float(), target.float()  # in float32 under autocast too
    return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-8)
