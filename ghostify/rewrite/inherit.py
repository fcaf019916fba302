"""Data-free weight inheritance: build a C-Ghost module that starts as close as possible to a trained conv.

Work in "effective" space, where the conv and the BN after it are one affine map per channel:
    y_j = A_j * x + b_j,   A_j = (gamma_j / sigma_j) W_j,   b_j = beta_j - (gamma_j / sigma_j)(mu_j - bias_j)
1. Intrinsic channels: the m = ceil(n/s) channels with the largest ||A_j|| (the ones that carry most
   signal) are reproduced *exactly* by the primary conv (their weights and BN statistics are copied).
2. Pairing: each remaining ("ghost") channel g, taken in order of decreasing ||A_g||, is assigned to the
   intrinsic channel i with the largest |cos(A_i, A_g)| that still has a free cheap-op slot (s - 1 each).
   For 1x1 convs this is exactly the pairing that minimises the least-squares error below.
3. Cheap kernel: the depthwise d x d kernel D minimising || D (*) A_i - A_g ||^2, where D (*) A_i is the
   kernel of "primary conv then depthwise conv" composed into one conv over the input (stride and
   dilation taken into account). The cheap branch's BN is set to carry the bias b_g - sum(D) b_i.
   The activation between the branches is ignored here (a data-driven refit belongs to calibration).
4. `out_index` reorders the module's output so that channel j stands for the original channel j.
"""

from __future__ import annotations

import torch
from torch import nn

from ghostify.modules.ghost_module import GhostModule


@torch.no_grad()
def effective_affine(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel kernel A [n, c, kh, kw] and bias b [n] of conv followed by (eval-mode) BN, float64."""
    w = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    if bn is None:
        return w, bias
    scale, shift = bn_scale_shift(bn)
    return w * scale.view(-1, 1, 1, 1), shift + scale * bias


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN in eval mode as y = scale * x + shift (float64)."""
    n = bn.num_features
    mean = bn.running_mean.double() if bn.running_mean is not None else torch.zeros(n, dtype=torch.float64)
    var = bn.running_var.double() if bn.running_var is not None else torch.ones(n, dtype=torch.float64)
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - scale * mean


def choose_intrinsic(kernels: torch.Tensor, m: int) -> torch.Tensor:
    """Indices (sorted) of the m channels with the largest effective-kernel L2 norm."""
    norms = kernels.flatten(1).norm(dim=1)
    return torch.sort(torch.topk(norms, m, sorted=False).indices).values


def assign_ghosts(
    kernels: torch.Tensor, intrinsic: torch.Tensor, capacity: int
) -> dict[int, tuple[int, int]]:
    """Map each non-intrinsic channel g to (position k of its intrinsic channel, slot r < capacity).

    Greedy by importance: in rounds, every unassigned ghost asks for its most similar intrinsic
    channel with a free slot; where more ask than there are slots, the ghosts with the largest
    norm win. Vectorised, so a 2048-channel layer takes milliseconds.
    """
    n = kernels.shape[0]
    is_intrinsic = torch.zeros(n, dtype=torch.bool)
    is_intrinsic[intrinsic] = True
    ghosts = torch.nonzero(~is_intrinsic).flatten()
    flat = kernels.flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    similarity = (unit[ghosts] @ unit[intrinsic].T).abs()  # [G, m]
    norms = flat[ghosts].norm(dim=1)
    free = torch.full((len(intrinsic),), capacity, dtype=torch.long)
    owner = torch.full((len(ghosts),), -1, dtype=torch.long)
    slot = torch.zeros(len(ghosts), dtype=torch.long)
    while True:
        waiting = torch.nonzero(owner < 0).flatten()
        if len(waiting) == 0:
            break
        sim = similarity[waiting].masked_fill(free.view(1, -1) == 0, -1.0)
        wish = sim.argmax(dim=1)
        by_norm = torch.argsort(norms[waiting], descending=True, stable=True)
        order = by_norm[torch.argsort(wish[by_norm], stable=True)]  # grouped by wish, strongest first
        wishes = wish[order]
        group_start = torch.searchsorted(wishes, wishes, right=False)
        rank = torch.arange(len(order)) - group_start
        win = rank < free[wishes]
        winners, won = waiting[order[win]], wishes[win]
        owner[winners] = won
        slot[winners] = capacity - free[won] + rank[win]
        free -= torch.bincount(won, minlength=len(free))
    return {
        int(g): (int(k), int(r))
        for g, k, r in zip(ghosts.tolist(), owner.tolist(), slot.tolist(), strict=True)
    }


def _dilate(a: torch.Tensor, dilation: tuple[int, int]) -> torch.Tensor:
    """Kernels [P, c, kh, kw] with (dilation - 1) zeros between taps, as the conv really applies them."""
    p, c, kh, kw = a.shape
    dy, dx = dilation
    out = a.new_zeros(p, c, dy * (kh - 1) + 1, dx * (kw - 1) + 1)
    out[:, :, ::dy, ::dx] = a
    return out


def _correlation(x: torch.Tensor, y: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """sum over channels and positions z of x[p](z) * y[p](z + (dy, dx)), for each p: [P]."""
    h, w = x.shape[2], x.shape[3]
    if abs(dy) >= h or abs(dx) >= w:
        return x.new_zeros(x.shape[0])
    xs = x[:, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
    ys = y[:, :, max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return (xs * ys).sum(dim=(1, 2, 3))


def fit_cheap_kernels(
    primary: torch.Tensor,
    target: torch.Tensor,
    d: int,
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    """Least-squares depthwise kernels D [P, d, d] with D (*) primary[p] ~ target[p] for each pair p.

    The composed kernel of tap u is the primary kernel shifted by stride * u, so the normal equations
    need only correlations at a few displacements: Gram[u, u'] = auto(stride * (u - u')) and
    rhs[u] = cross(stride * (u - centre)); the composed kernels are never materialised.
    """
    if primary.shape[0] == 0:
        return primary.new_zeros(0, d, d)
    x, y = _dilate(primary.float(), dilation), _dilate(target.float(), dilation)
    sy, sx = stride
    taps = [(uy, ux) for uy in range(d) for ux in range(d)]
    auto: dict[tuple[int, int], torch.Tensor] = {}
    gram = torch.zeros(x.shape[0], d * d, d * d, dtype=torch.float64)
    for a, (ay, ax) in enumerate(taps):
        for b, (by, bx) in enumerate(taps):
            key = (sy * (ay - by), sx * (ax - bx))
            if key not in auto:
                auto[key] = _correlation(x, x, *key)
            gram[:, a, b] = auto[key]
    c = d // 2
    rhs = torch.stack([_correlation(x, y, sy * (uy - c), sx * (ux - c)) for uy, ux in taps], dim=1).double()
    ridge = 1e-8 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    gram = gram + ridge.view(-1, 1, 1) * torch.eye(d * d, dtype=gram.dtype)
    return torch.linalg.solve(gram, rhs).view(-1, d, d)


@torch.no_grad()
def inherit_weights(ghost: GhostModule, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, fit: bool = True) -> None:
    """Fill `ghost` from the trained `conv` (+ `bn`): intrinsic channels exact, cheap op fitted.

    With fit=False this is the naive swap used as a baseline: the first m filters become intrinsic
    and the cheap operation keeps its random initialisation.
    """
    n, m, s = conv.out_channels, ghost.init_chs, ghost.ratio
    kernels, biases = effective_affine(conv, bn)
    intrinsic = choose_intrinsic(kernels, m) if fit else torch.arange(m)
    _copy_primary(ghost, conv, bn, intrinsic)
    if not fit:
        ghost.set_out_index(torch.arange(n))
        return

    assignment = assign_ghosts(kernels, intrinsic, capacity=s - 1)
    ghosts = sorted(assignment)
    pairs_i = torch.tensor([int(intrinsic[assignment[g][0]]) for g in ghosts], dtype=torch.long)
    pairs_g = torch.tensor(ghosts, dtype=torch.long)
    kernels_d = fit_cheap_kernels(
        kernels[pairs_i], kernels[pairs_g], ghost.dw_size, conv.stride, conv.dilation
    )

    cheap_conv, cheap_norm = ghost.cheap_operation[0], ghost.cheap_operation[1]
    weight = torch.zeros_like(cheap_conv.weight, dtype=torch.float64)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64)
    index = torch.empty(n, dtype=torch.long)
    index[intrinsic] = torch.arange(m)
    slots = torch.tensor([k * (s - 1) + r for k, r in (assignment[g] for g in ghosts)], dtype=torch.long)
    weight[slots, 0] = kernels_d
    bias[slots] = biases[pairs_g] - kernels_d.sum(dim=(1, 2)) * biases[pairs_i]
    index[pairs_g] = m + slots
    cheap_conv.weight.copy_(weight.to(cheap_conv.weight.dtype))
    if isinstance(cheap_norm, nn.BatchNorm2d):
        cheap_norm.reset_running_stats()
        cheap_norm.running_var.fill_(1.0 - cheap_norm.eps)
        cheap_norm.weight.fill_(1.0)
        cheap_norm.bias.copy_(bias.to(cheap_norm.bias.dtype))
    elif cheap_conv.bias is not None:
        cheap_conv.bias.copy_(bias.to(cheap_conv.bias.dtype))
    ghost.set_out_index(index)


def _copy_primary(ghost: GhostModule, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, keep: torch.Tensor) -> None:
    primary_conv, primary_norm = ghost.primary_conv[0], ghost.primary_conv[1]
    primary_conv.weight.copy_(conv.weight[keep])
    if conv.bias is not None and primary_conv.bias is not None:
        primary_conv.bias.copy_(conv.bias[keep])
    if bn is not None and isinstance(primary_norm, nn.BatchNorm2d):
        primary_norm.eps, primary_norm.momentum = bn.eps, bn.momentum
        for name in ("weight", "bias", "running_mean", "running_var"):
            src, dst = getattr(bn, name), getattr(primary_norm, name)
            if src is not None and dst is not None:
                dst.copy_(src[keep])
        if bn.num_batches_tracked is not None:
            primary_norm.num_batches_tracked.copy_(bn.num_batches_tracked)
    cheap_norm = ghost.cheap_operation[1]
    if bn is not None and isinstance(cheap_norm, nn.BatchNorm2d):
        cheap_norm.eps, cheap_norm.momentum = bn.eps, bn.momentum
