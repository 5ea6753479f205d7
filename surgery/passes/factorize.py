"""`factorize`: DSFormer dense × sparse factorisation of matched `Linear` layers (2312.13211).

``factorize Linear dense-sparse basis B nonzeros K`` replaces each ``Linear(in→out)`` (weight
``W`` ``[out, in]``) by :class:`~surgery.modules.sparse.DenseSparseLinear` holding
``W ≈ D·C``: ``D`` ``[out, B]`` dense, ``C`` ``[B, in]`` with exactly ``K`` non-zeros per
column (each input feature's weights are a combination of ``K`` of the ``B`` basis atoms; the
paper's "K per row" in its ``x·W`` layout). The fit alternates a sparse-coding step (top-K
support, least-squares refit) and a least-squares basis step, from the truncated SVD.
During healing the module's forward re-selects the top-K with a straight-through gradient,
and :class:`RefreshMasks` (from :meth:`training_hooks`) brings the saved mask up to date
after each optimiser step.

Counting: ``params_after = out·B + K·in (+ bias)`` (non-zeros of ``C``; indices are not
counted); on CPU ``C`` runs dense, ``B·(in+out)`` MACs per token, and that is what
``flops_after`` reports. Layers where neither saves anything are skipped.

>>> import torch
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64))
>>> stmt = parse("factorize Linear dense-sparse basis 16 nonzeros 4").statements[0]
>>> _ = FactorizePass(stmt)(model)
>>> type(model[0]).__name__, int(model[0].mask.sum(0).max())
('DenseSparseLinear', 4)
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch
from torch import nn

from surgery import ast
from surgery.modules.sparse import DenseSparseLinear
from surgery.passes.base import Change, PlanRow, StepPlan, SurgeryPass, TrainingHook
from surgery.select import select

__all__ = ["FactorizePass", "RefreshMasks"]


class RefreshMasks(TrainingHook):
    """After each optimiser step, recompute every :class:`DenseSparseLinear` top-K mask.

    The forward already re-selects the top-K while training; this keeps the ``mask`` buffer
    (used in eval and saved) equal to the top-K of the *updated* coefficients.
    """

    def after_step(self, model: nn.Module, step: int) -> None:
        for module in model.modules():
            if isinstance(module, DenseSparseLinear):
                module.refresh_mask()


class FactorizePass(SurgeryPass[ast.Factorize]):
    """Dense-basis × sparse-coefficient factorisation of `Linear` layers (DSFormer)."""

    keyword: ClassVar[str] = "factorize"

    def plan(self, model: nn.Module) -> StepPlan:
        context = self.ensure_context(model)
        analysis = context.analysis
        stmt = cast(ast.Factorize, self.statement)
        # No re-validation: `check` rejects an unknown method (S0201) and `nonzeros` outside
        # 1..basis (S0203) before a recipe reaches a pass.
        basis, k = stmt.basis.value, stmt.nonzeros.value
        plan = self.new_plan()
        plan.notes.append("C is stored dense with a top-K mask; params count its non-zeros")
        modules = dict(model.named_modules())
        paths = select(model, analysis, stmt.selector, types=self.supported_types)
        for path in paths:
            linear = _as_linear(modules[path])
            if linear is None:
                continue
            info = analysis.modules[path]
            out_f, in_f = linear.weight.shape
            bias = 0 if linear.bias is None else out_f
            before = out_f * in_f + bias
            after = out_f * basis + k * in_f + bias
            flops_after = info.flops * basis * (in_f + out_f) // (in_f * out_f)
            row = PlanRow(
                path=path,
                type=info.type,
                shape=f"{in_f}→{out_f}",
                action="factorize",
                params_before=before,
                params_after=after,
                flops_before=info.flops,
                flops_after=flops_after,
                detail={"method": "dense-sparse", "basis": basis, "nonzeros": k},
            )
            plan.rows.append(row)
            skip = None
            if info.tied:
                skip = "weight shared with another module (tied)"
            elif after >= before:
                skip = f"basis {basis}, {k} non-zeros saves no parameters ({after} ≥ {before})"
            if skip:
                row.action, row.note = "skip", skip
                row.params_after, row.flops_after = before, info.flops
        if not paths:
            plan.notes.append("the selector matched no module")
        return plan

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        changes: list[Change] = []
        for row in plan.changed_rows:
            linear = _as_linear(model.get_submodule(row.path))
            if linear is None:
                raise self.moved(row.path, "Linear")
            new = DenseSparseLinear.from_linear(linear, row.detail["basis"], row.detail["nonzeros"])
            model.set_submodule(row.path, new)
            detail = dict(row.detail)
            detail["fit_error"] = round(new.fit_error, 6)
            changes.append(self.change(row.path, "factorize", **detail))
        return changes

    def training_hooks(self, model: nn.Module) -> list[TrainingHook]:
        """:class:`RefreshMasks`: the saved top-K mask follows the trained coefficients."""
        return [RefreshMasks()]


def _as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` as an ``nn.Linear``: itself, or for a Hugging Face ``Conv1D`` (GPT-2's
    ``x @ W + b``, weight ``[in, out]``) a Linear computing the same map (``Linear`` selectors
    match both); None for anything else."""
    if isinstance(module, nn.Linear):
        return module
    weight = getattr(module, "weight", None)
    if type(module).__name__ != "Conv1D" or not isinstance(weight, torch.Tensor):
        return None
    if weight.dim() != 2:
        return None
    bias = getattr(module, "bias", None)
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=isinstance(bias, torch.Tensor))
    linear = linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if isinstance(bias, torch.Tensor) and linear.bias is not None:
            linear.bias.copy_(bias)
    return linear
