"""The C-Ghost module: a few "intrinsic" maps from a real conv, the rest from cheap depthwise ops.

Han et al., "GhostNet: More Features from Cheap Operations" (CVPR 2020), section 3.1, and the
IJCV 2022 extension. Parameter names follow the official code and timm (`primary_conv`,
`cheap_operation`, `ratio`, `dw_size`) so readers recognise the paper's parts.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class GhostModule(nn.Module):
    """Stands in for a Conv2d (optionally with the BN and activation that followed it).

    primary_conv: the original conv's kernel/stride/padding/dilation, making m = ceil(n / ratio)
    intrinsic maps, then BN and the activation (where the replaced conv had them).
    cheap_operation: a depthwise dw_size x dw_size conv making (ratio - 1) ghost maps per intrinsic
    map, then BN and the activation.
    Output: concat(intrinsic, ghost) cut to the n channels. When weights are inherited from a trained
    conv, `out_index` reorders the concat so that channel j of the output stands for channel j of the
    original (its consumers expect that order); it is identity for a freshly built module.

    Args:
        in_chs: input channels of the replaced conv.
        out_chs: output channels n of the replaced conv.
        kernel_size, stride, padding, dilation, padding_mode: those of the replaced conv.
        ratio: s, integer >= 2.
        dw_size: kernel d of the cheap depthwise conv, odd.
        bias: whether the convs carry a bias (used when there is no BN to carry it).
        norm: put a BatchNorm2d after each branch (True when the replaced conv was followed by BN).
        act_layer: activation module to put after each branch's BN (a copy is made per branch), or None.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        ratio: int = 2,
        dw_size: int = 3,
        bias: bool = False,
        norm: bool = True,
        act_layer: nn.Module | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.ratio = ratio
        self.dw_size = dw_size
        init_chs = math.ceil(out_chs / ratio)
        new_chs = init_chs * (ratio - 1)
        self.init_chs = init_chs
        self.primary_conv = nn.Sequential(
            nn.Conv2d(
                in_chs,
                init_chs,
                _pair(kernel_size),
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=bias,
                padding_mode=padding_mode,
            ),
            nn.BatchNorm2d(init_chs) if norm else nn.Identity(),
            copy.deepcopy(act_layer) if act_layer is not None else nn.Identity(),
        )
        self.cheap_operation = nn.Sequential(
            nn.Conv2d(init_chs, new_chs, dw_size, 1, dw_size // 2, groups=init_chs, bias=bias),
            nn.BatchNorm2d(new_chs) if norm else nn.Identity(),
            copy.deepcopy(act_layer) if act_layer is not None else nn.Identity(),
        )
        self.register_buffer("out_index", torch.arange(out_chs))
        self.permuted = False

    def set_out_index(self, index: torch.Tensor) -> None:
        """Make output channel j the concat's channel index[j]."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.out_index.device)
        if index.shape != (self.out_chs,):
            raise ValueError(f"out_index must have {self.out_chs} entries, got {tuple(index.shape)}")
        self.out_index.copy_(index)
        self._refresh_permuted()

    def _refresh_permuted(self) -> None:
        self.permuted = not torch.equal(self.out_index.cpu(), torch.arange(self.out_chs))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._refresh_permuted()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        out = torch.cat([x1, x2], dim=1)
        if self.permuted:
            return out.index_select(1, self.out_index)
        return out[:, : self.out_chs]

    def extra_repr(self) -> str:
        conv = self.primary_conv[0]
        k = "x".join(str(v) for v in conv.kernel_size)
        s = "x".join(str(v) for v in conv.stride)
        return (
            f"{self.in_chs} -> {self.out_chs} (intrinsic {self.init_chs}), kernel {k}, stride {s}, "
            f"ratio={self.ratio}, dw_size={self.dw_size}, permuted={self.permuted}"
        )
