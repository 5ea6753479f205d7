"""`split`: compute matched `Conv3d` layers with 4D tensors only (2407.16514).

``split Conv3d exact`` replaces each ``Conv3d`` by :class:`~surgery.modules.conv3d.Conv3dAs2d`,
a sum over temporal taps of ``Conv2d`` on shifted frames: numerically the same layer, with the
same parameters and FLOPs, for backends that have no 5D convolution.

``split Conv3d (2+1)d [add|cat] [rank = R]`` replaces it by
:class:`~surgery.modules.conv3d.Conv2Plus1d`: a ``kH×kW`` spatial conv to ``R`` channels shared
by a spatial branch (strided ``1×1`` along time) and a temporal branch (``(kT, 1)`` conv over
time with spatial positions flattened), initialised from the best rank-``R`` time×space
separable approximation of the kernel. ``rank`` is a fraction of the full rank
``min(S·kT, C·kH·kW)`` (``0.25``), an absolute rank (``16``) or ``energy 0.9``; without it,
the largest rank that has fewer parameters than the original (R(2+1)D's parameter-matched
rule, strictly below). ``add`` (the default) sums the two branches over all output channels;
``cat`` gives half of the output channels to each branch (the channels whose kernels lose
least outside the centre frame go to the spatial one) and concatenates them, cheaper and
less exact.

Layers are left alone, and the plan says why, when they use a ``padding_mode`` other than
``zeros`` (temporal zero frames are what makes the rewrite exact), for ``(2+1)d`` when they
are grouped (the separable fit mixes channels; ``exact`` handles groups), and when the
(2+1)D form would have as many parameters or FLOPs as the original.

>>> import torch
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1))
>>> result = SplitPass(parse("split Conv3d exact").statements[0])(model)
>>> result.modified, type(model[0]).__name__
(True, 'Conv3dAs2d')
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.facts import ModuleInfo
from surgery.modules.conv3d import (
    Conv2Plus1d,
    Conv3dAs2d,
    conv3d_output_size,
    explicit_padding,
    separable_factors,
    triple,
)
from surgery.passes.base import Change, PlanRow, StepPlan, SurgeryPass
from surgery.passes.ranks import resolve_rank
from surgery.select import select

__all__ = ["SplitPass", "conv2plus1d_flops", "conv3d_flops"]


def _frames(info: ModuleInfo) -> tuple[int, int, int, int] | None:
    """``(B, T, H, W)`` of the first measured input, if the analysis ran the model."""
    if info.input_shapes and len(info.input_shapes[0]) == 5:
        b, _, t, h, w = info.input_shapes[0]
        return b, t, h, w
    return None


def conv3d_flops(conv: nn.Conv3d, frames: tuple[int, int, int, int]) -> int:
    """``2·B·T'·H'·W'·S·(C/g)·kT·kH·kW``: FLOPs of ``conv`` on ``(B, ·, T, H, W)`` input."""
    b, t, h, w = frames
    to, ho, wo = conv3d_output_size(
        (t, h, w), conv.kernel_size, conv.stride, explicit_padding(conv), conv.dilation
    )
    kt, kh, kw = triple(conv.kernel_size)
    cg = conv.in_channels // conv.groups
    return 2 * b * to * ho * wo * conv.out_channels * cg * kt * kh * kw


def conv2plus1d_flops(
    conv: nn.Conv3d, frames: tuple[int, int, int, int], rank: int, combine: str
) -> int:
    """FLOPs of the (2+1)D rewrite: the spatial conv runs on all ``T`` input frames."""
    b, t, h, w = frames
    to, ho, wo = conv3d_output_size(
        (t, h, w), conv.kernel_size, conv.stride, explicit_padding(conv), conv.dilation
    )
    kt, kh, kw = triple(conv.kernel_size)
    c, s = conv.in_channels, conv.out_channels
    macs = b * t * ho * wo * rank * c * kh * kw  # spatial kH×kW conv, every frame
    if combine == "add":
        macs += b * to * ho * wo * s * rank * kt  # one (kT, 1) conv: the 1×1 is folded in
    else:
        s_sp = Conv2Plus1d.spatial_share(s, combine, None)
        macs += b * to * ho * wo * rank * (s_sp + (s - s_sp) * kt)  # 1×1 share + (kT, 1) share
    return 2 * macs


class SplitPass(SurgeryPass[ast.Split]):
    """Rewrite `Conv3d` layers as 4D-only computations: exact, or factorised (2+1)D."""

    keyword: ClassVar[str] = "split"

    def _rank(self, conv: nn.Conv3d, combine: str) -> tuple[int, float]:
        """The (2+1)D rank for ``conv`` and the kernel energy it keeps: the statement's
        ``rank = …`` of the kernel's time×space unfolding
        (:func:`~surgery.passes.ranks.resolve_rank`), else the parameter-matched rank."""
        full = Conv2Plus1d.full_rank(conv)
        spec = cast(ast.Split, self.statement).rank
        w = conv.weight.detach()
        s, c, kt, kh, kw = w.shape
        if spec is None:
            before = conv.weight.numel() + (0 if conv.bias is None else s)
            rank = 0
            for r in range(full, 0, -1):  # largest rank strictly below the original's size
                n = Conv2Plus1d.param_count(c, s, r, (kt, kh, kw), combine, conv.bias is not None)
                if n < before:
                    rank = r
                    break
            if rank == 0:
                return 0, 0.0
        else:

            def spectrum() -> torch.Tensor:  # of the unfolding [(S, kT), (C, kH, kW)]
                unfolded = w.to(torch.float64).permute(0, 2, 1, 3, 4).reshape(s * kt, c * kh * kw)
                return torch.linalg.svdvals(unfolded)

            rank = resolve_rank(spec, full, spectrum)
        if rank > full or rank < 1:
            return rank, 0.0
        _, _, energy = separable_factors(w, rank)
        return rank, float(energy)

    def plan(self, model: nn.Module) -> StepPlan:
        context = self.ensure_context(model)
        analysis = context.analysis
        stmt = cast(ast.Split, self.statement)
        # No re-validation: the grammar admits only `exact`/`(2+1)d` and `add`/`cat`, and
        # `check` rejects options on `exact` (S0204) before a recipe reaches a pass.
        mode = stmt.mode.value
        combine = stmt.combine.value if stmt.combine is not None else "add"
        plan = self.new_plan()
        modules = dict(model.named_modules())
        paths = select(model, analysis, stmt.selector, types=self.supported_types)
        for path in paths:
            conv = modules[path]
            if not isinstance(conv, nn.Conv3d):
                continue
            info = analysis.modules[path]
            kt, kh, kw = triple(conv.kernel_size)
            params = sum(p.numel() for p in conv.parameters())
            frames = _frames(info)
            flops = info.flops
            if frames is not None and not flops:
                try:
                    flops = conv3d_flops(conv, frames)
                except ValueError:
                    flops = 0
            row = PlanRow(
                path=path,
                type=info.type,
                shape=f"{conv.in_channels}→{conv.out_channels} {kt}×{kh}×{kw}",
                action="split",
                params_before=params,
                params_after=params,
                flops_before=flops,
                flops_after=flops,
                detail={"mode": mode},
            )
            plan.rows.append(row)
            skip = self._refusal(conv, mode)
            if skip is None and mode == "exact":
                row.detail["taps"] = "stack" if conv.groups == 1 else "sum"
                row.note = "exact: same parameters and FLOPs, 4D tensors only"
                continue
            if skip is None:
                rank, energy = self._rank(conv, combine)
                full = Conv2Plus1d.full_rank(conv)
                row.detail.update({"combine": combine, "rank": rank, "full_rank": full})
                if combine == "cat" and conv.out_channels < 2:
                    skip = "`cat` needs at least 2 output channels to share between branches"
                elif rank == 0:
                    skip = "no (2+1)d rank has fewer parameters than the original"
                elif rank > full:
                    skip = f"rank {rank} exceeds full rank {full}"
                else:
                    row.detail["energy"] = round(energy, 6)
                    row.params_after = Conv2Plus1d.param_count(
                        conv.in_channels,
                        conv.out_channels,
                        rank,
                        (kt, kh, kw),
                        combine,
                        conv.bias is not None,
                    )
                    if frames is not None and flops:
                        row.flops_after = conv2plus1d_flops(conv, frames, rank, combine)
                    if row.params_after >= row.params_before:
                        skip = (
                            f"rank {rank} saves no parameters "
                            f"({row.params_after} ≥ {row.params_before})"
                        )
                    elif frames is not None and row.flops_after >= row.flops_before > 0:
                        skip = (
                            f"rank {rank} saves no FLOPs ({row.flops_after} ≥ {row.flops_before})"
                        )
            if skip is not None:
                row.action, row.note = "skip", skip
                row.params_after, row.flops_after = row.params_before, row.flops_before
        if not paths:
            plan.notes.append("the selector matched no module")
        return plan

    def _refusal(self, conv: nn.Conv3d, mode: str) -> str | None:
        """Why ``conv`` cannot be split in ``mode`` (also reported as a warning), or None."""
        reason = None
        code = "S0360"
        try:
            explicit_padding(conv)
        except ValueError as exc:
            reason = str(exc)
        if reason is None and mode == "(2+1)d" and conv.groups != 1:
            code = "S0361"
            reason = (
                f"grouped Conv3d (groups={conv.groups}) cannot be split (2+1)d: the separable fit "
                "mixes all input channels"
            )
        if reason is not None and self.context is not None:
            self.context.warn(
                Diagnostic(
                    code=code,
                    message=reason,
                    span=self.statement.span,
                    help="use `split Conv3d exact` for grouped convs; set padding_mode='zeros'",
                    severity="warning",
                )
            )
        return reason

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        changes: list[Change] = []
        for row in plan.changed_rows:
            conv = model.get_submodule(row.path)
            if not isinstance(conv, nn.Conv3d):
                raise self.moved(row.path, "Conv3d")
            new: nn.Module
            if row.detail["mode"] == "exact":
                new = Conv3dAs2d.from_conv(conv)
            else:
                new = Conv2Plus1d.from_conv(conv, row.detail["rank"], row.detail["combine"])
            model.set_submodule(row.path, new)
            detail: dict[str, Any] = dict(row.detail)
            changes.append(self.change(row.path, "split", **detail))
        return changes
