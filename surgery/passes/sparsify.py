"""`sparsify`: prune matched dense matrix layers to N:M semi-structured sparsity (2:4, ...).

``Linear`` selects every dense matrix layer, Hugging Face ``Conv1D`` (GPT-2) included; a
``Conv1D`` (weight ``[in, out]``) becomes the equivalent :class:`SparseLinear`, its weight
transposed, and ``sparsify Conv1D`` selects those alone.

``sparsify Linear where name ~ "*.mlp.*" 2:4`` keeps, in each group of ``M`` consecutive
input weights of every output row, the ``N`` with the largest score, and replaces the layer by
:class:`~surgery.modules.sparse.SparseLinear` (weight + bool mask buffer). The score is
``|W_ij|``, or Wanda's ``|W_ij|·‖x_j‖₂`` (2306.11695) when the pass context holds calibration
inputs: one forward over them with hooks collects each layer's input-feature norms.

2:4 is *not* assumed faster: on CPU the layer runs dense (``W ⊙ mask``), so the plan keeps
its FLOPs unchanged; ``params_after`` counts the non-zero weights. On CUDA,
:meth:`SparseLinear.to_semi_structured` converts to the vendor's sparse kernels — measure it
(``bench/sparsity.py``). During healing, :class:`KeepMasks` (from :meth:`training_hooks`)
re-applies every mask after each optimiser step so the pattern survives training.

>>> import torch
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Linear(16, 8))
>>> result = SparsifyPass(parse("sparsify Linear 2:4").statements[0])(model)
>>> type(model[0]).__name__, int((model[0].weight != 0).sum())
('SparseLinear', 64)
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from torch import nn

from surgery import ast
from surgery.modules.sparse import SparseLinear
from surgery.passes.base import Change, PlanRow, StepPlan, SurgeryPass, TrainingHook
from surgery.select import is_linear_like, select, type_label

__all__ = ["KeepMasks", "SparsifyPass", "input_norms"]

CPU_NOTE = "N:M runs dense (weight⊙mask) on CPU: not assumed faster, FLOPs unchanged"


class KeepMasks(TrainingHook):
    """Re-apply every :class:`SparseLinear` mask after each optimiser step.

    >>> m = nn.Sequential(SparseLinear(8, 4))
    >>> with torch.no_grad():
    ...     _ = m[0].weight.add_(1.0)  # an optimiser step moves pruned weights too
    >>> KeepMasks().after_step(m, 0)
    >>> bool((m[0].weight[~m[0].mask] == 0).all())
    True
    """

    def after_step(self, model: nn.Module, step: int) -> None:
        for module in model.modules():
            if isinstance(module, SparseLinear):
                module.apply_mask_()


def input_norms(
    model: nn.Module, paths: list[str], calibration: list[Any]
) -> dict[str, torch.Tensor]:
    """``‖x_j‖₂`` over all calibration tokens for each input feature of each layer in ``paths``.

    ``calibration`` is a list of :class:`~surgery.inputs.Inputs`; each is run once under
    forward pre-hooks. Layers never called get no entry.
    """
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(path: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64)  # (tokens, in)
            sq = flat.square().sum(0)  # (in,)
            sums[path] = sums[path] + sq if path in sums else sq

        return hook

    modules = dict(model.named_modules())
    try:
        for path in paths:
            handles.append(modules[path].register_forward_pre_hook(hook_for(path)))
        for inputs in calibration:
            inputs.call(model)
    finally:
        for h in handles:
            h.remove()
    return {p: s.sqrt() for p, s in sums.items()}


class SparsifyPass(SurgeryPass[ast.Sparsify]):
    """N:M magnitude (or Wanda, with calibration data) pruning of `Linear`/`Conv1D` layers."""

    keyword: ClassVar[str] = "sparsify"

    def plan(self, model: nn.Module) -> StepPlan:
        context = self.ensure_context(model)
        analysis = context.analysis
        stmt = cast(ast.Sparsify, self.statement)
        # No re-validation: `check` rejects any `N:M` but 0 < N < M (S0203) before a recipe
        # reaches a pass.
        n, m = stmt.n.value, stmt.m.value
        plan = self.new_plan()
        plan.notes.append(CPU_NOTE)
        modules = dict(model.named_modules())
        paths = select(model, analysis, stmt.selector, types=self.supported_types)
        chosen: list[str] = []
        for path in paths:
            layer = modules[path]
            if isinstance(layer, nn.Linear):
                out_f, in_f = layer.weight.shape
            elif is_linear_like(layer):
                in_f, out_f = cast(torch.Tensor, layer.weight).shape  # Conv1D: [in, out]
            else:
                continue
            info = analysis.modules[path]
            bias = 0 if getattr(layer, "bias", None) is None else out_f
            before = out_f * in_f + bias
            row = PlanRow(
                path=path,
                type=type_label(layer, info.type, stmt.selector),
                shape=f"{in_f}→{out_f}",
                action="sparsify",
                params_before=before,
                params_after=before,
                flops_before=info.flops,
                flops_after=info.flops,  # dense-masked execution: nothing is skipped
                detail={"n": n, "m": m, "score": "magnitude"},
                note="non-zeros counted; stored dense with a mask",
            )
            plan.rows.append(row)
            if info.tied:
                row.action, row.note = "skip", "weight shared with another module (tied)"
            elif in_f % m:
                row.action, row.note = "skip", f"in_features {in_f} is not a multiple of {m}"
            else:
                row.params_after = out_f * in_f * n // m + bias
                chosen.append(path)
        norms: dict[str, torch.Tensor] = {}
        if chosen and context.calibration:
            norms = input_norms(model, chosen, context.calibration)
            for row in plan.rows:
                if row.path in norms:
                    row.detail["score"] = "wanda"
        plan.data["norms"] = norms
        if not paths:
            plan.notes.append("the selector matched no module")
        return plan

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        norms: dict[str, torch.Tensor] = plan.data.get("norms", {})
        changes: list[Change] = []
        for row in plan.changed_rows:
            layer = model.get_submodule(row.path)
            n, m, norm = row.detail["n"], row.detail["m"], norms.get(row.path)
            if isinstance(layer, nn.Linear):
                new = SparseLinear.from_linear(layer, n, m, input_norm=norm)
            elif is_linear_like(layer):
                new = SparseLinear.from_conv1d(layer, n, m, input_norm=norm)
            else:
                raise self.moved(row.path, "Linear")
            model.set_submodule(row.path, new)
            changes.append(self.change(row.path, "sparsify", **dict(row.detail)))
        return changes

    def training_hooks(self, model: nn.Module) -> list[TrainingHook]:
        """:class:`KeepMasks`, so healing never revives a pruned weight."""
        return [KeepMasks()]
