"""Calibration: refit the cheap parts of a converted model on a few batches of real data, in closed form.

No gradients and no training loop. The student runs once over all calibration images (one big batch, in
eval mode); the teacher runs alongside it in a helper thread on the same images. Each converted site is
refitted when the student's forward reaches it, so every fit sees the student's *real* input there, with
the errors of the layers before it (already refitted) included, and matches the *teacher's* features at
the same place:

- C-Ghost module (kind "c-ghost"): target = the teacher's conv -> BN output (pre-activation) at the same
  name, on the teacher's own input.
  1. primary branch: the whole primary conv (+ BN shift) refitted by ridge least squares on the input
     patches (one Gram matrix of size (c*k*k + 1)^2 per site, pulled towards the inherited filters)
     towards the teacher's value of the channel each intrinsic map stands for. This is what lets
     each layer compensate the errors of the layers before it (the largest gain measured); a
     per-channel BN affine refit is the cheaper alternative (`primary="bn"`);
  2. cheap branch: for each ghost channel, least squares on the d x d patches of its intrinsic map (after
     the primary activation) plus a constant, from per-intrinsic-channel Gram matrices of size
     (d*d + 1)^2. The fit for every (ghost, intrinsic) pair comes out of the same statistics, so the
     ghost channels are re-paired greedily with the intrinsic maps that explain them best on data
     (capacity ratio - 1 each) when that explains more than the data-free pairing.
- G-Ghost stage (kind "g-ghost"): the cheap 1x1 conv (+ BN shift) is refitted by least squares from the
  student's x0 (cheap channels) to the teacher's features entering the last block (the same channels),
  net of whatever the mix branch adds.

Fitted affines are folded into the BN layers in a form that agrees with the calibration data's own
statistics (running_mean / running_var = the data's, weight / bias chosen to keep the fitted function),
so a later BN refresh or a train-mode forward keeps the fit. Finally every BN of the student may have
its running statistics recomputed on the calibration images (`refresh_bn_stats`).
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ghostify.modules.ghost_module import GhostModule
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite.result import ConversionResult, SiteRecord

__all__ = ["CalibrationReport", "SiteCalibration", "calibrate", "refresh_bn_stats"]

BN_REFRESH = ("none", "before", "after")
PRIMARY = ("conv", "bn", "none")
_RIDGE = 1e-6  # relative ridge on the Gram diagonals: keeps dead (all-zero) features solvable


@dataclass
class SiteCalibration:
    """What calibration did at one site.

    Attributes:
        name: the site's module name in the student.
        kind: "c-ghost" or "g-ghost".
        error_before: relative error ||student - teacher|| / ||teacher|| of the site's refitted features
            on the calibration images, with the weights before the refit (C-Ghost: the module's
            pre-activation output, all channels; G-Ghost: the cheap path's output, after its ReLU).
        error_after: the same with the refitted weights.
        repaired: ghost channels moved to another intrinsic map (C-Ghost).
    """

    name: str
    kind: str
    error_before: float
    error_after: float
    repaired: int = 0


@dataclass
class CalibrationReport:
    """The outcome of `calibrate`.

    Attributes:
        sites: per-site errors, in forward order.
        skipped: (site name, why) for sites left as they were.
        images: calibration images used.
        bn_refresh: when the BN statistics were recomputed ("before" / "after" the refit, or "none").
        seconds: wall time of the whole calibration.
    """

    sites: list[SiteCalibration] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    images: int = 0
    bn_refresh: str = "none"
    seconds: float = 0.0

    @property
    def refitted(self) -> int:
        return len(self.sites)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if not self.sites:
            return f"calibration: nothing refitted ({len(self.skipped)} skipped), {self.seconds:.1f} s"
        before = sum(s.error_before for s in self.sites) / len(self.sites)
        after = sum(s.error_after for s in self.sites) / len(self.sites)
        return (
            f"calibration: {len(self.sites)} sites refitted on {self.images} images, mean relative error "
            f"{before:.3f} -> {after:.3f}, BN refresh {self.bn_refresh}, {self.seconds:.1f} s"
        )


# --------------------------------------------------------------------------------------------- helpers


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Eval-mode BN as y = scale * x + shift (float64), or None for a non-BN module."""
    if not isinstance(bn, nn.BatchNorm2d):
        return None
    n = bn.num_features
    mean = bn.running_mean.double() if bn.running_mean is not None else torch.zeros(n, dtype=torch.float64)
    var = bn.running_var.double() if bn.running_var is not None else torch.ones(n, dtype=torch.float64)
    gamma = bn.weight.double() if bn.weight is not None else torch.ones(n, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros(n, dtype=torch.float64)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - scale * mean


@torch.no_grad()
def _fold_bn(
    bn: nn.BatchNorm2d, scale: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor, var: torch.Tensor
):
    """Make eval-mode `bn` compute scale * x + shift, with running statistics = the data's (mean, var).

    Then a train-mode forward (batch statistics close to these) or a BN refresh keeps the function.
    Needs affine parameters (weight / bias) and running statistics.
    """
    var = var.clamp_min(0.0)
    bn.running_mean.copy_(mean.to(bn.running_mean))
    bn.running_var.copy_(var.to(bn.running_var))
    bn.weight.copy_((scale * torch.sqrt(var + bn.eps)).to(bn.weight))
    bn.bias.copy_((shift + scale * mean).to(bn.bias))


def _foldable(bn: nn.Module) -> bool:
    return (
        isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
    )


def _chunks(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Batched ridge solve of gram @ x = rhs (float64, relative ridge)."""
    dim = gram.shape[-1]
    diag = gram.diagonal(dim1=-2, dim2=-1)
    ridge = _RIDGE * diag.mean(-1).clamp_min(1e-12) + 1e-12
    eye = torch.eye(dim, dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge[..., None, None] * eye, rhs)


# --------------------------------------------------------------------------------------------- C-Ghost


def _slot_owner(ghost: GhostModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Original channel of each intrinsic map [m] and of each cheap slot [m*(s-1)] (-1: unused)."""
    m, s = ghost.init_chs, ghost.ratio
    owner = torch.full((m * s,), -1, dtype=torch.long)
    owner[ghost.out_index.cpu()] = torch.arange(ghost.out_chs)
    return owner[:m], owner[m:]


@torch.no_grad()
def _c_ghost_error(ghost: GhostModule, x: torch.Tensor, target: torch.Tensor, chunk: int) -> float:
    """||pre-activation output - target|| / ||target|| over all channels."""
    conv, pbn = ghost.primary_conv[0], ghost.primary_conv[1]
    pact = ghost.primary_conv[2]
    cconv, cbn = ghost.cheap_operation[0], ghost.cheap_operation[1]
    index = ghost.out_index
    err = ref = 0.0
    for sl in _chunks(x.shape[0], chunk):
        z1 = pbn(conv(x[sl]))
        z2 = cbn(cconv(pact(z1.clone())))
        z = torch.cat([z1, z2], 1).index_select(1, index).double()
        t = target[sl].double()
        err += float(((z - t) ** 2).sum())
        ref += float((t**2).sum())
    return math.sqrt(err / max(ref, 1e-30))


@torch.no_grad()
def _refit_primary(ghost: GhostModule, x: torch.Tensor, target: torch.Tensor, chunk: int) -> None:
    """Per-channel affine of the primary BN: teacher value ~ a * conv(x) + b, folded into the BN."""
    conv, pbn = ghost.primary_conv[0], ghost.primary_conv[1]
    if not _foldable(pbn):
        return
    orig, _ = _slot_owner(ghost)
    m = ghost.init_chs
    s_u = torch.zeros(m, dtype=torch.float64)
    s_uu, s_t, s_ut = torch.zeros_like(s_u), torch.zeros_like(s_u), torch.zeros_like(s_u)
    count = 0
    for sl in _chunks(x.shape[0], chunk):
        u = conv(x[sl]).transpose(0, 1).flatten(1).double()  # [m, P]
        t = target[sl].index_select(1, orig.to(target.device)).transpose(0, 1).flatten(1).double()
        s_u += u.sum(1).cpu()
        s_uu += (u * u).sum(1).cpu()
        s_t += t.sum(1).cpu()
        s_ut += (u * t).sum(1).cpu()
        count += u.shape[1]
    mean_u, mean_t = s_u / count, s_t / count
    var_u = s_uu / count - mean_u**2
    cov = s_ut / count - mean_u * mean_t
    scale = cov / (var_u + 1e-12 * var_u.mean().clamp_min(1e-30))
    dead = var_u <= 1e-12 * var_u.max().clamp_min(1e-30)
    old_scale, _ = _bn_affine(pbn)
    scale = torch.where(dead, old_scale.cpu(), scale)
    shift = mean_t - scale * mean_u
    _fold_bn(pbn, scale, shift, mean_u, var_u)


@torch.no_grad()
def _refit_primary_conv(
    ghost: GhostModule, x: torch.Tensor, target: torch.Tensor, chunk: int, max_samples: int
) -> bool:
    """Whole primary conv (+ BN shift) by ridge least squares on the input patches; False if not possible.

    One Gram matrix of the input patches (c*kh*kw + 1 square) serves every intrinsic channel; the ridge
    pulls towards the inherited filters. Positions are subsampled to about `max_samples` per site.
    """
    conv, pbn = ghost.primary_conv[0], ghost.primary_conv[1]
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.groups != 1:
        return False
    foldable = _foldable(pbn)
    if not foldable and not isinstance(pbn, nn.Identity):
        return False
    carry_bias = foldable or conv.bias is not None
    orig, _ = _slot_owner(ghost)
    m = ghost.init_chs
    n_img = x.shape[0]
    step = max(1, math.ceil(n_img * target.shape[2] * target.shape[3] / max_samples))
    rows = torch.arange(0, n_img, step)
    dim = conv.weight[0].numel()
    k = dim + 1 if carry_bias else dim
    gram = torch.zeros(k, k, dtype=torch.float64)
    cross = torch.zeros(k, m, dtype=torch.float64)
    count = 0
    orig_dev = orig.to(target.device)
    for sl in _chunks(len(rows), chunk):
        idx = rows[sl].to(x.device)
        patches = F.unfold(x.index_select(0, idx), conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        f = patches.transpose(1, 2).reshape(-1, dim)  # [P, dim]
        if carry_bias:
            f = torch.cat([f, f.new_ones(f.shape[0], 1)], 1)
        t = target.index_select(0, idx.to(target.device)).index_select(1, orig_dev)
        t = t.permute(0, 2, 3, 1).reshape(-1, m)
        gram += (f.T @ f).double().cpu()
        cross += (f.T @ t).double().cpu()
        count += f.shape[0]
    # ridge towards the inherited effective filters (conv then BN), relative to the Gram's scale
    affine = _bn_affine(pbn)
    w0 = conv.weight.detach().double().flatten(1).cpu()  # [m, dim]
    b0 = conv.bias.detach().double().cpu() if conv.bias is not None else torch.zeros(m, dtype=torch.float64)
    if affine is not None:
        scale, shift = (a.cpu() for a in affine)
        w0, b0 = w0 * scale[:, None], shift + scale * b0
    prior = torch.cat([w0, b0[:, None]], 1).T if carry_bias else w0.T  # [k, m]
    lam = 1e-3 * gram.diagonal()[:dim].mean().clamp_min(1e-12)
    eye = torch.eye(k, dtype=torch.float64)
    coef = torch.linalg.solve(gram + lam * eye, cross + lam * prior)  # [k, m]
    w = coef[:dim].T.contiguous()
    conv.weight.copy_(w.view_as(conv.weight).to(conv.weight))
    bias = coef[dim] if carry_bias else torch.zeros(m, dtype=torch.float64)
    if foldable:
        if conv.bias is not None:
            conv.bias.zero_()
        w_ext = torch.cat([w, torch.zeros(m, 1, dtype=torch.float64)], 1)  # the conv's output, no bias
        mean = (w_ext @ gram[:, dim]) / count
        var = torch.einsum("mk,kl,ml->m", w_ext, gram, w_ext) / count - mean**2
        _fold_bn(pbn, torch.ones(m, dtype=torch.float64), bias, mean, var)
    elif conv.bias is not None:
        conv.bias.copy_(bias.to(conv.bias))
    return True


def _greedy_pairs(gain: torch.Tensor, capacity: int) -> torch.Tensor:
    """Intrinsic map for each ghost channel, maximising the explained energy greedily. gain: [G, m]."""
    n_ghosts, m = gain.shape
    owner = torch.full((n_ghosts,), -1, dtype=torch.long)
    free = torch.full((m,), capacity, dtype=torch.long)
    order = torch.argsort(gain.flatten(), descending=True)
    left = n_ghosts
    for flat in order.tolist():
        g, i = divmod(flat, m)
        if owner[g] >= 0 or free[i] == 0:
            continue
        owner[g] = i
        free[i] -= 1
        left -= 1
        if left == 0:
            break
    return owner


@torch.no_grad()
def _refit_cheap(ghost: GhostModule, x: torch.Tensor, target: torch.Tensor, chunk: int, repair: bool) -> int:
    """Least-squares cheap kernels (+ bias) on data; returns how many ghost channels changed partner."""
    conv, pbn, pact = ghost.primary_conv
    cconv, cbn = ghost.cheap_operation[0], ghost.cheap_operation[1]
    m, s, d = ghost.init_chs, ghost.ratio, ghost.dw_size
    dd = d * d
    carry_bias = _foldable(cbn) or cconv.bias is not None
    k = dd + 1 if carry_bias else dd
    _, slot_orig = _slot_owner(ghost)
    used = torch.nonzero(slot_orig >= 0).flatten()
    ghosts = slot_orig[used]  # original channels made by the cheap op
    current = used // (s - 1)  # their intrinsic map now
    n_g = len(ghosts)
    gram = torch.zeros(m, k, k, dtype=torch.float64)
    cross = torch.zeros(m, k, n_g, dtype=torch.float64)
    energy = torch.zeros(n_g, dtype=torch.float64)
    count = 0
    ghost_idx = ghosts.to(target.device)
    for sl in _chunks(x.shape[0], chunk):
        y1 = pact(pbn(conv(x[sl])))
        n, _, h, w = y1.shape
        patches = F.unfold(y1, d, padding=d // 2).view(n, m, dd, h * w)
        feats = patches.permute(1, 2, 0, 3).reshape(m, dd, n * h * w)
        if carry_bias:
            feats = torch.cat([feats, feats.new_ones(m, 1, n * h * w)], 1)
        t = target[sl].index_select(1, ghost_idx).permute(0, 2, 3, 1).reshape(n * h * w, n_g)
        gram += torch.bmm(feats, feats.transpose(1, 2)).double().cpu()
        cross += (feats.reshape(m * k, -1) @ t).view(m, k, n_g).double().cpu()
        energy += (t.double() ** 2).sum(0).cpu()
        count += n * h * w
    coef = _solve(gram, cross)  # [m, k, G]: the fit of every ghost from every intrinsic map
    gain = (coef * cross).sum(1).T  # [G, m] explained energy
    partner = current
    if repair and m > 1:
        greedy = _greedy_pairs(gain, s - 1)
        ar = torch.arange(n_g)
        if gain[ar, greedy].sum() > gain[ar, current].sum():
            partner = greedy
    repaired = int((partner != current).sum())

    # slots: the ghosts of each intrinsic map take its slots in order (the current ones keep theirs)
    slots = torch.empty(n_g, dtype=torch.long)
    if repaired == 0:
        slots = used.clone()
    else:
        fill = torch.zeros(m, dtype=torch.long)
        for j, i in enumerate(partner.tolist()):
            slots[j] = i * (s - 1) + fill[i]
            fill[i] += 1
    sel = coef[partner, :, torch.arange(n_g)]  # [G, k]
    weight = torch.zeros(m * (s - 1), dd, dtype=torch.float64)
    bias = torch.zeros(m * (s - 1), dtype=torch.float64)
    weight[slots] = sel[:, :dd]
    if carry_bias:
        bias[slots] = sel[:, dd]
    cconv.weight.copy_(weight.view_as(cconv.weight).to(cconv.weight))
    if _foldable(cbn):
        # statistics of the cheap conv's output (no bias) on the data, from the Gram matrices
        g = gram[partner]  # [G, k, k]
        w_ext = torch.cat([sel[:, :dd], torch.zeros(n_g, 1, dtype=torch.float64)], 1)
        mean = torch.zeros(m * (s - 1), dtype=torch.float64)
        var = torch.ones(m * (s - 1), dtype=torch.float64)
        mean[slots] = (g[:, dd, :] * w_ext).sum(1) / count
        var[slots] = torch.einsum("gk,gkl,gl->g", w_ext, g, w_ext) / count - mean[slots] ** 2
        _fold_bn(cbn, torch.ones_like(bias), bias, mean, var)
    elif cconv.bias is not None:
        cconv.bias.copy_(bias.to(cconv.bias))
    index = ghost.out_index.clone()
    index[ghosts.to(index.device)] = (m + slots).to(index.device)
    ghost.set_out_index(index)
    return repaired


def _fit_c_ghost(
    ghost: GhostModule,
    x: torch.Tensor,
    target: torch.Tensor,
    chunk: int,
    primary: str,
    repair: bool,
    max_samples: int,
) -> tuple[float, float, int]:
    before = _c_ghost_error(ghost, x, target, chunk)
    if primary == "conv" and not _refit_primary_conv(ghost, x, target, chunk, max_samples):
        primary = "bn"
    if primary == "bn":
        _refit_primary(ghost, x, target, chunk)
    repaired = _refit_cheap(ghost, x, target, chunk, repair)
    after = _c_ghost_error(ghost, x, target, chunk)
    return before, after, repaired


# --------------------------------------------------------------------------------------------- G-Ghost


@torch.no_grad()
def _fit_g_ghost(
    stage: GGhostStage, src: torch.Tensor, mixed: torch.Tensor, target: torch.Tensor, chunk: int
) -> tuple[float, float]:
    """Refit stage.cheap: relu(cheap(src) + mix) ~ target, as least squares on cheap(src) ~ target - mix.

    src: x0's cheap channels [N, k, H, W]; mixed: the mix branch's contribution (broadcastable, or 0);
    target: the teacher's features entering the last block, cheap channels.
    """
    conv, bn = stage.cheap[0], stage.cheap[1]
    k = src.shape[1]

    def error() -> float:
        err = ref = 0.0
        for sl in _chunks(src.shape[0], chunk):
            out = torch.relu(bn(conv(src[sl])) + (mixed[sl] if mixed.dim() else mixed)).double()
            t = target[sl].double()
            err += float(((out - t) ** 2).sum())
            ref += float((t**2).sum())
        return math.sqrt(err / max(ref, 1e-30))

    before = error()
    gram = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    cross = torch.zeros(k + 1, k, dtype=torch.float64)
    for sl in _chunks(src.shape[0], chunk):
        f = src[sl].transpose(0, 1).flatten(1)
        f = torch.cat([f, f.new_ones(1, f.shape[1])], 0)  # [k+1, P]
        t = target[sl] - (mixed[sl] if mixed.dim() else mixed)
        t = t.expand(src[sl].shape[0], k, *src.shape[2:]).transpose(0, 1).flatten(1)  # [k, P]
        gram += (f @ f.T).double().cpu()
        cross += (f @ t.T).double().cpu()
    coef = _solve(gram, cross)  # [k+1, k]
    w, b = coef[:k].T, coef[k]  # w: [out, in]
    conv.weight.copy_(w.to(conv.weight)[:, :, None, None])
    count = gram[k, k]
    mean_x = gram[:k, k] / count
    second = gram[:k, :k] / count
    mean = w @ mean_x
    var = torch.einsum("oi,ij,oj->o", w, second, w) - mean**2
    if _foldable(bn):
        _fold_bn(bn, torch.ones(k, dtype=torch.float64), b, mean, var)
    after = error()
    return before, after


# --------------------------------------------------------------------------------------------- teacher


class _Stop(Exception):
    """Unwinds the teacher's forward when the student side gave up."""


class _TeacherFeed:
    """Runs the teacher on the calibration images in a helper thread and hands over per-site features.

    The hooks put (site name, tensor) in a small queue, in the teacher's forward order; `get(name)`
    takes items until that site's arrives. The bounded queue keeps only a couple of sites' features
    in memory at a time.
    """

    def __init__(self, teacher: nn.Module, x: torch.Tensor, taps: dict[str, tuple[nn.Module, str]]) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._pending: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, (module, how) in taps.items():
            if how == "output":
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
        self._thread = threading.Thread(target=self._run, args=(teacher, x), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stop

    def _output_hook(self, name: str):
        def hook(module, args, output):
            self._put((name, output.detach()))

        return hook

    def _input_hook(self, name: str):
        def hook(module, args):
            self._put((name, args[0].detach()))

        return hook

    def _run(self, teacher: nn.Module, x: torch.Tensor) -> None:
        try:
            with torch.no_grad():
                teacher(x)
            self._put(("", None))
        except _Stop:
            pass
        except BaseException as err:  # noqa: BLE001 - handed to the student side and raised there
            try:
                self._put(("", err))
            except _Stop:
                pass

    def get(self, name: str) -> torch.Tensor:
        if name in self._pending:
            return self._pending.pop(name)
        while True:
            try:
                got, value = self._queue.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"the teacher never reached {name}") from None
                continue
            if got == name:
                return value
            if got == "":
                if isinstance(value, BaseException):
                    raise RuntimeError(f"the teacher's forward failed: {value}") from value
                raise RuntimeError(f"the teacher finished without reaching {name}")
            self._pending[got] = value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        for h in self._handles:
            h.remove()


# --------------------------------------------------------------------------------------------- BN refresh


def _identity_form(bn: nn.BatchNorm2d) -> bool:
    """A BN that only carries a bias (running stats 0 / 1 - eps, weight 1): refreshing would break it."""
    return bool(
        bn.running_mean is not None
        and torch.all(bn.running_mean == 0)
        and torch.allclose(bn.running_var, torch.full_like(bn.running_var, 1.0 - bn.eps))
        and (bn.weight is None or torch.all(bn.weight == 1))
    )


@torch.no_grad()
def refresh_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute every BN's running statistics on `batches` (cumulative average); leave `model` in eval mode.

    BN layers that only carry a bias (the data-free cheap branches: running stats 0 / 1 - eps, weight 1)
    are left alone: new statistics would rescale what they carry. Returns how many BN layers were
    refreshed.
    """
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and not _identity_form(m)
    ]
    momenta = {m: m.momentum for m in bns}
    frozen = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m not in momenta
    ]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for m in frozen:
            m.eval()
        for xb in batches:
            model(xb)
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.eval()
    return len(bns)


# --------------------------------------------------------------------------------------------- entry


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("calibrating {task.fields[site]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )


def _images(loader: Iterable, batches: int, device: torch.device) -> list[torch.Tensor]:
    out = []
    for batch in loader:
        if batch is None:
            continue
        xb = batch[0] if isinstance(batch, (list, tuple)) else batch
        out.append(xb.to(device))
        if len(out) >= batches:
            break
    return out


def _c_ghost_tap(teacher: nn.Module, site: SiteRecord) -> tuple[nn.Module, str] | str:
    """Where the teacher's pre-activation output of a C-Ghost site is seen, or why it cannot be."""
    try:
        conv = teacher.get_submodule(site.name)
    except AttributeError:
        return "no module of that name in the teacher"
    if type(conv) is not nn.Conv2d:
        return f"the teacher's {site.name} is a {type(conv).__name__}, not a Conv2d"
    for name in site.absorbed:
        try:
            module = teacher.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(module, nn.BatchNorm2d):
            return module, "output"
    return conv, "output"


def calibrate(
    student: nn.Module,
    teacher: nn.Module,
    loader: Iterable,
    result: ConversionResult,
    batches: int = 8,
    progress: bool = True,
    *,
    primary: str = "conv",
    repair: bool = True,
    bn_refresh: str = "after",
    max_samples: int = 262144,
) -> CalibrationReport:
    """Refit the converted sites of `student` (in place) to reproduce `teacher`'s features on real images.

    Closed-form least squares, no gradients: see the module docstring for what is fitted at each site.
    All calibration images go through the model as one batch (memory grows with batches x batch size);
    the teacher runs alongside in a helper thread on the same images. The student ends in eval mode.

    Args:
        student: the converted model (`result.model`, possibly already fine-tuned).
        teacher: the original model it was converted from (not changed).
        loader: yields (images, labels) or images batches; labels are not used.
        result: the conversion's account: which sites are C-Ghost modules / G-Ghost stages.
        batches: how many batches of `loader` to calibrate on.
        progress: show a transient rich progress bar.
        primary: how C-Ghost primary branches are refitted towards the teacher's channels they stand
            for: "conv" (the whole conv + BN shift, ridge least squares on the input patches; falls back
            to "bn" where the conv cannot be unfolded), "bn" (a per-channel affine folded into the BN)
            or "none" (kept as inherited).
        repair: let C-Ghost ghost channels move to the intrinsic map that fits them best on data.
        bn_refresh: recompute every BN's running statistics on the calibration images "before" or
            "after" the refit, or "none".
        max_samples: positions (images x output pixels) used for the primary conv's Gram matrix.
    """
    if primary not in PRIMARY:
        raise ValueError(f"primary must be one of {', '.join(PRIMARY)} (got {primary!r})")
    if bn_refresh not in BN_REFRESH:
        raise ValueError(f"bn_refresh must be one of {', '.join(BN_REFRESH)} (got {bn_refresh!r})")
    start = time.perf_counter()
    report = CalibrationReport(bn_refresh=bn_refresh)
    try:
        device = next(student.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    data = _images(loader, batches, device)
    if not data:
        raise ValueError("the calibration loader yielded no images")
    x = torch.cat(data)
    chunk = max(1, max(b.shape[0] for b in data))
    report.images = x.shape[0]

    teacher_modes = {m: m.training for m in teacher.modules()}
    teacher.eval()
    student.eval()

    if bn_refresh == "before":
        refresh_bn_stats(student, data)

    taps: dict[str, tuple[nn.Module, str]] = {}
    student_hooks = []
    plan: list[SiteRecord] = []
    for site in result.sites:
        try:
            module = student.get_submodule(site.name)
        except AttributeError:
            report.skipped.append((site.name, "no module of that name in the student"))
            continue
        if site.kind == "c-ghost" and isinstance(module, GhostModule):
            tap = _c_ghost_tap(teacher, site)
            if isinstance(tap, str):
                report.skipped.append((site.name, tap))
                continue
            if teacher.get_submodule(site.name).out_channels != module.out_chs:
                report.skipped.append((site.name, "the teacher's conv has another number of channels"))
                continue
            taps[site.name] = tap
        elif site.kind == "g-ghost" and isinstance(module, GGhostStage):
            block_names = site.extra.get("block_names") or []
            try:
                last = teacher.get_submodule(block_names[-1])
            except (AttributeError, IndexError):
                report.skipped.append((site.name, "the teacher's last block of the stage is unknown"))
                continue
            taps[site.name] = (last, "input")
        else:
            report.skipped.append((site.name, f"{type(module).__name__} is not a {site.kind} module"))
            continue
        plan.append(site)

    bar = _progress(progress)
    task = bar.add_task("calibrate", total=len(plan), site="") if bar is not None else None
    errors: list[BaseException] = []

    def done(entry: SiteCalibration) -> None:
        report.sites.append(entry)
        if bar is not None:
            bar.update(task, advance=1, site=entry.name)

    def c_ghost_hook(name: str):
        def hook(module: GhostModule, args):
            try:
                target = feed.get(name)
                before, after, repaired = _fit_c_ghost(
                    module, args[0], target, chunk, primary, repair, max_samples
                )
                done(SiteCalibration(name, "c-ghost", before, after, repaired))
            except BaseException as err:
                errors.append(err)
                raise

        return hook

    def g_ghost_hooks(name: str, stage: GGhostStage):
        seen: dict[str, torch.Tensor] = {}

        def cheap_in(module, args):
            seen["src"] = args[0]

        def cheap_out(module, args, output):
            seen["cheap"] = output

        def relu_in(module, args):
            try:
                target = feed.get(name).index_select(1, stage.cheap_index)
                mixed = args[0] - seen["cheap"]
                if stage.merge is None:
                    mixed = torch.zeros((), dtype=mixed.dtype, device=mixed.device)
                before, after = _fit_g_ghost(stage, seen["src"], mixed, target, chunk)
                done(SiteCalibration(name, "g-ghost", before, after))
                out = stage.cheap[1](stage.cheap[0](seen["src"]))
                seen.clear()
                return (out + mixed,)
            except BaseException as err:
                errors.append(err)
                raise

        return [
            stage.cheap.register_forward_pre_hook(cheap_in),
            stage.cheap.register_forward_hook(cheap_out),
            stage.cheap_relu.register_forward_pre_hook(relu_in),
        ]

    for site in plan:
        module = student.get_submodule(site.name)
        if site.kind == "c-ghost":
            student_hooks.append(module.register_forward_pre_hook(c_ghost_hook(site.name)))
        else:
            student_hooks += g_ghost_hooks(site.name, module)

    feed = _TeacherFeed(teacher, x, taps)
    try:
        if bar is not None:
            bar.start()
        with torch.no_grad():
            student(x)
    finally:
        if bar is not None:
            bar.stop()
        feed.close()
        for h in student_hooks:
            h.remove()
        for m, mode in teacher_modes.items():
            m.train(mode)
    missing = {s.name for s in plan} - {s.name for s in report.sites}
    report.skipped += [(name, "not reached by the student's forward") for name in sorted(missing)]

    if bn_refresh == "after":
        refresh_bn_stats(student, data)
    student.eval()
    report.seconds = time.perf_counter() - start
    return report
