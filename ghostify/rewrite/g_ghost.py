"""G-Ghost rewriting: swap residual stages for `GGhostStage`s built from the stages' own weights."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from ghostify.config import ConvertConfig
from ghostify.errors import ConfigError, ConversionError
from ghostify.modes import eval_mode
from ghostify.modules.ghost_stage import GGhostStage
from ghostify.rewrite.narrow import analyse_block, narrow_block, residual_writer_scores, round_raw
from ghostify.rewrite.result import ConversionResult, SiteRecord
from ghostify.rewrite.stages import StageInfo, call_model, find_stages


def _macs(module: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward of `module` at input `shape`, batch 1 (fake tensors)."""
    with eval_mode(module):
        try:
            with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
                x = fake_mode.from_tensor(torch.empty(1, *shape[1:]))
                with FlopCounterMode(display=False) as counter:
                    module(x)
        except Exception:  # noqa: BLE001 - some ops have no fake kernel: compute for real
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                module(torch.randn(1, *shape[1:]))
    return counter.get_total_flops() // 2


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_g_ghost_stage(model: nn.Module, stage: StageInfo, ratio: int, mix: bool) -> GGhostStage:
    """Build the G-Ghost form of `stage` from its blocks' weights (the model is not changed).

    Kept channels: the residual channels that the stage's blocks write most strongly stay on the
    complicated path. Each channel's score is the sum over the stage's blocks of the L2 norm of the conv
    filter that writes it into the residual stream, times the |gamma| / sqrt(running_var + eps) of the BN
    after that conv (see `ghostify.rewrite.narrow`). The top `raw` channels, in ascending order, go through
    the narrowed middle blocks; the base and end blocks keep their weights, and GGhostStage's index buffers
    route the channels.

    Raises:
        ConfigError: the ratio leaves fewer than 8 channels on the complicated path.
        ConversionError: a block cannot be narrowed (the message names it and the op).
    """
    blocks = [model.get_submodule(b) for b in stage.blocks]
    c = stage.channels
    shape = stage.out_shapes[0]
    if c / ratio < 8:
        raise ConfigError(
            f"ratio {ratio} leaves {c // ratio} raw channels in stage {stage.name} ({c} ch); at least 8 "
            f"are needed: use --ratio {max(2, c // 8)} or lower, or leave the stage out with --exclude."
        )
    plans = []
    triples = zip(stage.blocks, blocks, stage.block_in_shapes, strict=True)
    for i, (b_name, block, in_shape) in enumerate(triples):
        strict = 0 < i < len(blocks) - 1
        try:
            plans.append(analyse_block(block, in_shape, f"block {b_name}", strict=strict))
        except ConversionError as err:
            raise ConversionError(
                f"stage {stage.name} cannot be narrowed: {err}; leave it out with --exclude '{stage.name}$'."
            ) from None
    group_widths = sorted({g for p in plans[1:-1] for g in p.group_widths()})
    raw = round_raw(c, ratio, group_widths)
    if raw >= c:
        raise ConfigError(
            f"stage {stage.name} ({c} ch) cannot keep a multiple of {raw} channels below {c} "
            f"(group widths {group_widths}); leave it out with --exclude '{stage.name}$'."
        )
    score = torch.zeros(c)
    for plan in plans:
        s = residual_writer_scores(plan)
        if s.numel() == c:
            score += s
    keep = torch.sort(torch.topk(score, raw).indices).values
    middle = []
    for b_name, block in zip(stage.blocks[1:-1], blocks[1:-1], strict=True):
        try:
            middle.append(narrow_block(block, shape, keep, f"block {b_name}"))
        except ConversionError as err:
            raise ConversionError(
                f"stage {stage.name} cannot be narrowed: {err}; leave it out with --exclude '{stage.name}$'."
            ) from None
    new = GGhostStage(blocks[0], middle, blocks[-1], channels=c, raw=raw, mix=mix, raw_index=keep)
    new.train(model.get_submodule(stage.name).training)
    return new


@torch.no_grad()
def fit_cheap(new: GGhostStage, blocks: list[nn.Module], stage_input: torch.Tensor) -> None:
    """Fit the cheap 1x1 conv (+ BN shift) so cheap(x0) matches the original stage on the cheap channels.

    On `stage_input` (the stage's input for the example inputs), the original blocks 1..n-1 give the
    features the end block used to see; their cheap channels are the target, x0's cheap channels the
    source. Ridge regression towards the identity (the data-free start) keeps the fit stable when the
    example batch has fewer pixels than channels.
    """
    with eval_mode(new, *blocks):
        x0 = blocks[0](stage_input)
        target = x0
        for b in blocks[1:-1]:
            target = b(target)
        src = x0.index_select(1, new.cheap_index).transpose(0, 1).flatten(1).double()  # (k, samples)
        dst = target.index_select(1, new.cheap_index).transpose(0, 1).flatten(1).double()
        k = src.shape[0]
        mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
        s, d = src - mu_s, dst - mu_d
        lam = 1e-1 * (s * s).sum() / k + 1e-6
        eye = torch.eye(k, dtype=torch.float64)
        w = torch.linalg.solve(s @ s.T + lam * eye, s @ d.T + lam * eye).T  # (out, in)
        b_vec = (mu_d - w @ mu_s).squeeze(1)
        conv, bn = new.cheap
        conv.weight.copy_(w.to(conv.weight.dtype)[:, :, None, None])
        bn.bias.copy_(b_vec.to(bn.bias.dtype))


def _stage_inputs(model: nn.Module, names: list[str], example_inputs) -> dict[str, torch.Tensor]:
    """The input tensor of each named module on one eval-mode forward of `example_inputs`."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, args, _name=name):
            if args and isinstance(args[0], torch.Tensor):
                seen.setdefault(_name, args[0].detach())

        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _stage_list(stages: list[StageInfo]) -> str:
    if not stages:
        return "none"
    return ", ".join(f"{s.name or '<model>'} ({len(s.blocks)} blocks)" for s in stages)


def apply_g_ghost(model: nn.Module, config: ConvertConfig, example_inputs, result: ConversionResult) -> None:
    """Swap each selected residual stage of `model` (in place) for a GGhostStage.

    Every stage seen is either recorded in `result.sites` (kind "g-ghost") or in `result.skipped` with
    the reason. `example_inputs` is a tensor (or a tuple of positional inputs) for one forward pass.

    Raises:
        ConversionError: no stage of >= 3 residual blocks, a block that cannot be narrowed, a --stages
            entry that names no stage, or no stage left after --stages / --include / --exclude.
        ConfigError: the ratio leaves fewer than 8 raw channels in a selected stage.
    """
    stages = find_stages(model, example_inputs)
    by_name = {s.name: s for s in stages}
    if config.stages is not None:
        missing = [n for n in config.stages if n not in by_name]
        if missing:
            raise ConversionError(
                f"--stages names {', '.join(missing)}, which is not a residual stage of this model; "
                f"stages: {_stage_list(stages)}."
            )
        for n in config.stages:
            if not by_name[n].eligible:
                raise ConversionError(f"stage {n} cannot be restructured: {by_name[n].why}.")
    if not any(s.eligible for s in stages):
        raise ConversionError(
            "no residual stage of 3 or more blocks with one output shape; "
            f"stages seen: {_stage_list(stages)}."
        )
    selected = [
        s
        for s in stages
        if s.eligible and (config.stages is None or s.name in config.stages) and config.selects(s.name)
    ]
    inputs = (
        _stage_inputs(model, [s.name for s in selected], example_inputs)
        if config.weight_init == "fit"
        else {}
    )
    converted = 0
    for stage in stages:
        if not stage.eligible:
            result.skipped.append((stage.name, stage.why))
            continue
        if config.stages is not None and stage.name not in config.stages:
            result.skipped.append((stage.name, "not in --stages"))
            continue
        if not config.selects(stage.name):
            result.skipped.append((stage.name, "excluded by --include / --exclude"))
            continue
        old = model.get_submodule(stage.name)
        macs_before, params_before = _macs(old, stage.in_shape), _params(old)
        new = build_g_ghost_stage(model, stage, config.ratio, config.mix)
        if config.weight_init == "random":  # the naive baseline: cheap conv / BN freshly initialised
            new.cheap[0].reset_parameters()
            new.cheap[1].reset_parameters()
            new.cheap[1].reset_running_stats()
        elif stage.name in inputs:
            fit_cheap(new, [model.get_submodule(b) for b in stage.blocks], inputs[stage.name])
        macs_after, params_after = _macs(new, stage.in_shape), _params(new)
        model.set_submodule(stage.name, new)
        converted += 1
        n, c = len(stage.blocks), stage.channels
        result.sites.append(
            SiteRecord(
                name=stage.name,
                kind="g-ghost",
                detail=f"{n} blocks, {c} ch, raw {new.raw}, cheap {new.cheap_planes}, "
                f"mix {'on' if config.mix else 'off'}",
                extra={
                    "blocks": n,
                    "channels": c,
                    "raw": new.raw,
                    "cheap": new.cheap_planes,
                    "mix": config.mix,
                    "block_names": list(stage.blocks),
                    "input_shape": list(stage.in_shape[1:]),
                    "macs_before": macs_before,
                    "macs_after": macs_after,
                    "params_before": params_before,
                    "params_after": params_after,
                },
            )
        )
    if converted == 0:
        raise ConversionError(
            "no residual stage left to restructure after --stages / --include / --exclude; "
            f"eligible stages: {_stage_list([s for s in stages if s.eligible])}."
        )
