"""`decompose`: replace matched `Linear` layers by low-rank `LowRankLinear` pairs.

``decompose Linear where params > 100K rank = 0.25`` factors each matched ``Linear(in→out)``
by truncated SVD, ``W ≈ (U_r √Σ_r)(√Σ_r V_rᵀ)``, into ``Linear(in→r)`` then ``Linear(r→out)``
(see :class:`~surgery.modules.LowRankLinear`). The rank is a fraction of the full rank
``min(in, out)`` (``0.25``, ``25%``) or an absolute number (``128``).

A layer is left alone, and the plan says why, when its factorization would not have fewer
parameters (``r·(in+out) ≥ in·out``), when its weight is shared with another module (tied
embeddings), or when the model never calls it as a module (its weight is read directly).

>>> import torch
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Linear(256, 256))
>>> p = DecomposePass(parse("decompose Linear rank = 0.25").statements[0])
>>> plan = p.ensure_context(model) and p.plan(model)
>>> row = plan.rows[0]
>>> row.detail["rank"], row.params_before, row.params_after
(64, 65792, 33024)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from surgery import ast
from surgery.diagnostics import Diagnostic
from surgery.lowrank import (
    Factors,
    break_even_rank,
    dense_params,
    lowrank_params,
    rank_from_fraction,
    svd_factors,
)
from surgery.modules import LowRankLinear
from surgery.passes.base import Change, PassError, PlanRow, StepPlan, SurgeryPass
from surgery.select import select

__all__ = ["DecomposePass", "lowrank_linear_from"]


def _linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a module standing for one (a `.pt2` program's unflattened Linear)."""
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.Linear) or (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and not any(True for _ in module.children())
    )


def lowrank_linear_from(linear: nn.Module, factors: Factors) -> LowRankLinear:
    """A :class:`LowRankLinear` holding ``factors`` of ``linear.weight`` and its bias."""
    assert isinstance(linear.weight, torch.Tensor)
    out_f, in_f = linear.weight.shape  # [out, in]
    dtype = str(linear.weight.dtype).removeprefix("torch.")
    module = LowRankLinear(in_f, out_f, factors.rank, bias=getattr(linear, "bias", None) is not None, dtype=dtype)
    module.to(linear.weight.device)
    with torch.no_grad():
        module.first.weight.copy_(factors.right)  # [r, in]
        module.second.weight.copy_(factors.left)  # [out, r]
        bias = getattr(linear, "bias", None)
        if bias is not None:
            module.second.bias.copy_(bias)
    module.train(linear.training)
    return module


class DecomposePass(SurgeryPass):
    """Low-rank decomposition of `Linear` layers by truncated SVD."""

    keyword: ClassVar[str] = "decompose"
    statement_type = ast.Decompose
    supported_types: ClassVar[tuple[str, ...]] = ("Linear",)
    implemented_options: ClassVar[dict[str, set[str] | None]] = {
        "rank": {"fraction", "absolute"},
        "method": {"svd"},
    }

    def _rank_for(self, in_f: int, out_f: int) -> int:
        rank = self.statement.rank
        assert rank is not None, "the checker requires a rank"
        if rank.kind == "fraction":
            return rank_from_fraction(in_f, out_f, rank.value.magnitude)
        return int(rank.value.magnitude)

    def plan(self, model: nn.Module) -> StepPlan:
        context = self.ensure_context(model)
        analysis = context.analysis
        stmt: ast.Decompose = self.statement
        plan = self.new_plan()
        modules = dict(model.named_modules())
        paths = select(model, analysis, stmt.selector, types=self.supported_types)
        measured = analysis.total_flops > 0
        factors: dict[str, Factors] = {}
        for path in paths:
            module = modules[path]
            info = analysis.modules[path]
            if not _linear_like(module) or info.type != "Linear" and not isinstance(module, nn.Linear):
                continue
            assert isinstance(module.weight, torch.Tensor)
            out_f, in_f = module.weight.shape
            bias = getattr(module, "bias", None) is not None
            full = min(in_f, out_f)
            rank = self._rank_for(in_f, out_f)
            before = dense_params(in_f, out_f, bias)
            flops = info.flops
            row = PlanRow(
                path=path,
                type=info.type,
                shape=f"{in_f}→{out_f}",
                action="decompose",
                params_before=before,
                params_after=before,
                flops_before=flops,
                flops_after=flops,
                detail={"rank": rank, "full_rank": full, "method": "svd"},
            )
            plan.rows.append(row)
            skip = None
            if info.tied:
                skip = "weight shared with another module (tied)"
            elif measured and info.calls == 0:
                skip = "never called as a module (its weight is used directly)"
            elif rank > full:
                skip = f"rank {rank} exceeds full rank {full}"
            elif rank > break_even_rank(in_f, out_f):
                skip = f"rank {rank} saves no parameters (break-even {break_even_rank(in_f, out_f)})"
            if skip:
                row.action, row.note = "skip", skip
                continue
            f = svd_factors(module.weight, rank)
            factors[path] = f
            row.params_after = lowrank_params(in_f, out_f, rank, bias)
            # FLOPs scale like the weights: every token goes through r·(in+out) MACs, not in·out.
            row.flops_after = flops * rank * (in_f + out_f) // (in_f * out_f)
            row.detail["energy"] = round(f.energy, 6)
        plan.data["factors"] = factors
        if not paths:
            plan.notes.append("the selector matched no module")
        return plan

    def apply(self, model: nn.Module, plan: StepPlan) -> list[Change]:
        factors: dict[str, Factors] = plan.data.get("factors", {})
        changes: list[Change] = []
        for row in plan.changed_rows:
            linear = model.get_submodule(row.path)
            if not _linear_like(linear):
                raise PassError(
                    Diagnostic(
                        code="S0401",
                        message=f"`{row.path}` is no longer a `Linear`",
                        span=self.statement.span,
                        help="an earlier statement replaced it; reorder the recipe",
                    )
                )
            new = lowrank_linear_from(linear, factors[row.path])
            model.set_submodule(row.path, new)
            detail: dict[str, Any] = {k: row.detail[k] for k in ("rank", "method", "energy")}
            changes.append(self.change(row.path, "decompose", **detail))
        return changes
