"""The G-Ghost stage of "GhostNets on Heterogeneous Devices via Cheap Operations" (Han et al., IJCV 2022)."""

from __future__ import annotations

import torch
from torch import nn


class GGhostStage(nn.Module):
    """A residual stage whose middle blocks run on a fraction of the channels; cheap ops make the rest.

    With n blocks of width c and `raw` complicated channels:

    - base: block 1, unchanged, -> x0 (c channels);
    - layers: blocks 2..n-1, narrowed to `raw` channels, run on x0[:, raw_index] -> e, keeping each output;
    - cheap: 1x1 conv + BN on the other c - raw channels of x0 (a plain conv, no depthwise);
    - merge (the paper's mix / "information enhancement", optional): concat(x0, e_2..e_{n-1}) -> global
      average pool -> 1x1 conv -> BN -> ReLU -> 1x1 conv -> BN (hidden width c - raw, as in the official
      G-Ghost RegNet), added to the cheap path; then ReLU;
    - end: block n, unchanged, on concat(e, cheap) put back in x0's channel order.

    The buffers `raw_index` / `cheap_index` say which channels of x0 take each path (by default the first
    `raw` are complicated, the official layout), and `restore_index` puts concat(e, cheap) back in x0's
    channel order. Converting a trained stage picks the complicated channels by importance, and these
    buffers let the base and end blocks keep their weights and channel order untouched (identity shortcuts
    included) at the cost of two channel gathers per stage. They are always present, so the state dict has
    the same keys whatever channels were picked.

    Args:
        base: block 1 (full width, may change resolution / width).
        layers: the narrowed blocks 2..n-1 (`raw` channels in and out).
        end: block n (full width).
        channels: c, the stage's output width.
        raw: channels on the complicated path.
        mix: build the merge branch.
        raw_index: x0 channels for the complicated path, or None for the first `raw`.
    """

    def __init__(
        self,
        base: nn.Module,
        layers: list[nn.Module],
        end: nn.Module,
        channels: int,
        raw: int,
        mix: bool = True,
        raw_index: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not 0 < raw < channels:
            raise ValueError(f"raw must be in 1..{channels - 1} (got {raw})")
        self.channels = channels
        self.raw = raw
        self.cheap_planes = channels - raw
        self.base = base
        self.layers = nn.Sequential(*layers)
        self.end = end
        cheap = self.cheap_planes
        self.cheap = nn.Sequential(nn.Conv2d(cheap, cheap, 1, bias=False), nn.BatchNorm2d(cheap))
        self.cheap_relu = nn.ReLU(inplace=True)
        self.merge: nn.Module | None = None
        if mix:
            self.merge = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels + raw * len(layers), cheap, 1, bias=False),
                nn.BatchNorm2d(cheap),
                nn.ReLU(inplace=True),
                nn.Conv2d(cheap, cheap, 1, bias=False),
                nn.BatchNorm2d(cheap),
            )
        if raw_index is None:
            raw_index = torch.arange(raw)
        raw_index = raw_index.detach().long().cpu()
        if raw_index.numel() != raw or raw_index.unique().numel() != raw:
            raise ValueError(f"raw_index must hold {raw} distinct channel indices")
        mask = torch.ones(channels, dtype=torch.bool)
        mask[raw_index] = False
        cheap_index = torch.arange(channels)[mask]
        self.register_buffer("raw_index", raw_index)
        self.register_buffer("cheap_index", cheap_index)
        self.register_buffer("restore_index", torch.argsort(torch.cat([raw_index, cheap_index])))
        self.reset_cheap()

    @torch.no_grad()
    def reset_cheap(self) -> None:
        """Start close to the original: cheap = identity, merge adds zero (its last BN scale is 0)."""
        conv, bn = self.cheap
        conv.weight.zero_()
        conv.weight[:, :, 0, 0].copy_(torch.eye(self.cheap_planes))
        bn.reset_parameters()
        bn.running_var.fill_(1.0 - bn.eps)
        if self.merge is not None:
            last_bn = self.merge[-1]
            last_bn.reset_parameters()
            last_bn.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.base(x)
        e = x0.index_select(1, self.raw_index)
        c = x0.index_select(1, self.cheap_index)
        feats = [x0]
        for layer in self.layers:
            e = layer(e)
            feats.append(e)
        c = self.cheap(c)
        if self.merge is not None:
            c = c + self.merge(torch.cat(feats, 1))
        c = self.cheap_relu(c)
        out = torch.cat((e, c), 1).index_select(1, self.restore_index)
        return self.end(out)

    def extra_repr(self) -> str:
        mix = "on" if self.merge is not None else "off"
        return (
            f"blocks={len(self.layers) + 2}, channels={self.channels}, raw={self.raw}, "
            f"cheap={self.cheap_planes}, mix={mix}"
        )
