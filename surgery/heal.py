"""`heal`: label-free distillation of the surgered model towards the original.

``heal steps N [lr X] [distill from original] [subset P [by importance]] [every M steps]``,
optionally preceded by ``freeze first-factor|core|alternate``.

**Loss.** For each calibration batch (cycled), the squared error between every floating
output of the model and of the original (the teacher: outputs computed once, cached, no
grad), normalised by the teacher's squared norm: ``Σ‖y − y₀‖² / Σ‖y₀‖²`` over the batch's
outputs, i.e. the squared relative drift. Outputs shaped ``[B, T, …]`` are masked by the
batch's ``attention_mask`` (padded positions carry no meaning). Losses of
:class:`~surgery.passes.base.TrainingHook` s (``hook.loss(model)``) are added.

**Optimiser.** AdamW, ``lr`` 1e-4 by default (small enough not to move pretrained weights
far in a short heal, large enough to recover most of a decomposition's drift in tens of
steps on BERT-size models), no weight decay (decay would pull pretrained weights towards
zero, away from the teacher), gradient norm clipped at 1.0. The model trains in ``eval()``
mode: dropout noise would swamp the small residual being fitted and BatchNorm statistics of a
few calibration batches would drift; gradients flow regardless of the mode. The model is in
``eval()`` at the end.

**Freezing** (sequential freezing, arXiv 2309.03824 / 2407.20266): every parameter trains
unless frozen. ``freeze first-factor`` freezes the first factor of every ``LowRankLinear`` /
``LowRankConv2d`` (as the papers do; everything else, including the second factors, norms and
undecomposed layers, trains). ``freeze core`` freezes the two 1×1 convolutions of every
``TuckerConv2d`` and trains its core. ``freeze alternate`` freezes the first factor (Tucker:
the 1×1s) for ``every`` steps (default: one pass over the calibration batches), then the
second factor (Tucker: the core), and so on. Hooks' ``trainable(name, model)`` removes more.

**Subset by importance** (SwiftLearn, arXiv 2311.15134), at the granularity of calibration
batches: the first evaluation period (``every`` steps, default one pass over the batches) uses
all batches; at the end of each period the student's outputs on every batch are compared with
those of the previous evaluation, ``importance_i = ‖y_i^s − y_i^{s−1}‖² / ‖y_i^teacher‖²``
(the change of the teacher–student difference), and the following period cycles over the top
``⌈P·N⌉`` batches, re-scored every ``every`` steps.

>>> import torch
>>> from surgery.inputs import Inputs
>>> from surgery.parse import parse
>>> from surgery.passes.base import PassContext
>>> from surgery.graph import analyze
>>> torch.manual_seed(0) and None
>>> teacher = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> student = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> ctx = PassContext(analysis=analyze(student), calibration=[Inputs((torch.randn(16, 8),), {})],
...                   original=teacher)
>>> report = heal(student, parse("heal steps 30 lr 1e-2").statements[0], ctx, freeze=None, hooks=[])
>>> report.steps, report.losses[-1] < report.losses[0], student.training
(30, True, False)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from surgery import ast
from surgery.inputs import Inputs
from surgery.metrics import float_outputs, padding_mask, squared_error
from surgery.passes.base import PassContext, TrainingHook
from surgery.support import RUN_VERBS

__all__ = ["DEFAULT_LR", "HEAL_SUPPORT", "HealReport", "frozen_names", "heal"]

#: Learning rate when the recipe gives no ``lr`` (see the module docstring).
DEFAULT_LR = 1e-4
#: Gradient-norm clip: one bad batch must not undo a decomposition.
GRAD_CLIP = 1.0

#: What the manager carries out for ``heal`` and ``freeze``: verb -> (options, types), from
#: the one support table ``surgery.support``.
HEAL_SUPPORT: dict[str, tuple[dict[str, set[str] | None], tuple[str, ...]]] = {
    verb: RUN_VERBS[verb] for verb in ("heal", "freeze")
}


@dataclass
class HealReport:
    """What one ``heal`` statement did."""

    steps: int
    losses: list[float]  # one per step: the distillation loss (without hook losses)
    seconds: float
    trainable_params: int
    frozen_params: int
    lr: float = DEFAULT_LR
    freeze: str | None = None
    subsets: list[list[int]] = field(default_factory=list)  # batch indices of each period

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "losses": list(self.losses),
            "seconds": self.seconds,
            "trainable_params": self.trainable_params,
            "frozen_params": self.frozen_params,
            "lr": self.lr,
            "freeze": self.freeze,
            "subsets": [list(s) for s in self.subsets],
        }


def _factor_groups(model: nn.Module) -> tuple[set[str], set[str], set[str], set[str]]:
    """Parameter names of (pair first factors, pair second factors, Tucker 1×1s, Tucker cores)."""
    from surgery.modules import LowRankLinear
    from surgery.modules.lowrank_conv import LowRankConv2d
    from surgery.modules.tucker_conv import TuckerConv2d

    first: set[str] = set()
    second: set[str] = set()
    outer: set[str] = set()
    core: set[str] = set()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        if isinstance(m, LowRankLinear | LowRankConv2d):
            first.update(f"{prefix}first.{n}" for n, _ in m.first.named_parameters())
            second.update(f"{prefix}second.{n}" for n, _ in m.second.named_parameters())
        elif isinstance(m, TuckerConv2d):
            outer.update(f"{prefix}first.{n}" for n, _ in m.first.named_parameters())
            outer.update(f"{prefix}last.{n}" for n, _ in m.last.named_parameters())
            core.update(f"{prefix}core.{n}" for n, _ in m.core.named_parameters())
    return first, second, outer, core


def frozen_names(model: nn.Module, freeze: str | None, phase: int = 0) -> set[str]:
    """Names of the parameters ``freeze`` keeps fixed (``phase`` counts alternations).

    >>> from surgery.modules import LowRankLinear
    >>> m = nn.Sequential(LowRankLinear(4, 4, rank=2), nn.LayerNorm(4))
    >>> sorted(frozen_names(m, "first-factor")), sorted(frozen_names(m, "alternate", phase=1))
    (['0.first.weight'], ['0.second.bias', '0.second.weight'])
    """
    if freeze is None:
        return set()
    first, second, outer, core = _factor_groups(model)
    if freeze == "first-factor":
        return first
    if freeze == "core":
        return outer
    if freeze == "alternate":
        return first | outer if phase % 2 == 0 else second | core
    raise ValueError(f"unknown freeze `{freeze}`: expected first-factor, core or alternate")


def _sq_norm(teacher: list[Tensor], mask: Tensor | None) -> float:
    zeros = [torch.zeros_like(t) for t in teacher]
    return float(squared_error(teacher, zeros, mask))


def heal(
    model: nn.Module,
    statement: ast.Heal,
    context: PassContext,
    *,
    freeze: ast.Freeze | None,
    hooks: list[TrainingHook],
    regularizers: Sequence[ast.Regularize] = (),
) -> HealReport:
    """Fine-tune ``model`` in place towards ``context.original`` (see the module docstring),
    honouring the passes' ``hooks`` and the ``regularize`` statements that apply."""
    from surgery.passes.regularize import hooks_for

    hooks = [*hooks, *(h for r in regularizers for h in hooks_for(r, model))]
    teacher = context.original
    if teacher is None:
        raise ValueError("healing distils from the original model, but the context has none")
    batches: list[Inputs] = list(context.calibration) or (
        [context.example] if context.example is not None else []
    )
    if not batches:
        raise ValueError("healing needs calibration inputs (or example inputs)")
    steps = statement.steps.value
    lr = statement.lr.magnitude if statement.lr is not None else DEFAULT_LR
    what = freeze.what.value if freeze is not None else None
    period = statement.every.value if statement.every is not None else len(batches)
    subset = statement.subset.magnitude if statement.subset is not None else None
    started = time.perf_counter()

    teacher_was_training = teacher.training
    teacher.eval()
    targets = [float_outputs(b.call(teacher)) for b in batches]  # cached once, no grad
    teacher.train(teacher_was_training)
    masks = [padding_mask(b) for b in batches]
    scales = [max(_sq_norm(t, m), 1e-30) for t, m in zip(targets, masks, strict=True)]

    named = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in named.items()}
    # A list in the model's own order, never a set: a set's order follows the per-process string
    # hash, and the order of `params` decides the order of the gradient-norm sum and of AdamW's
    # fused updates, so two runs of one recipe would differ in every weight.
    allowed = [
        n for n, p in named.items() if p.requires_grad and all(h.trainable(n, model) for h in hooks)
    ]
    params = [named[n] for n in allowed]
    is_allowed = set(allowed)  # membership only; never iterated
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0) if params else None
    frozen_at_start = frozen_names(model, what, 0)
    trainable = sum(named[n].numel() for n in allowed if n not in frozen_at_start)
    frozen = sum(p.numel() for n, p in named.items() if n not in is_allowed or n in frozen_at_start)

    def set_phase(phase: int) -> None:
        fixed = frozen_names(model, what, phase)
        for n, p in named.items():
            p.requires_grad_(n in is_allowed and n not in fixed)

    def outputs_of(i: int) -> list[Tensor]:
        return float_outputs(batches[i].call(model))

    report = HealReport(
        steps=steps,
        losses=[],
        seconds=0.0,
        trainable_params=trainable,
        frozen_params=frozen,
        lr=lr,
        freeze=what,
    )
    order = list(range(len(batches)))
    previous = [outputs_of(i) for i in order] if subset is not None else []
    cursor = itertools.cycle(order)
    model.eval()
    try:
        set_phase(0)
        for step in range(steps):
            if what == "alternate" and step > 0 and step % period == 0:
                set_phase(step // period)
            if subset is not None and step > 0 and step % period == 0:
                order, previous = _rescore(outputs_of, previous, scales, subset)
                report.subsets.append(list(order))
                cursor = itertools.cycle(order)
            i = next(cursor)
            with torch.enable_grad():
                out = float_outputs(model(*batches[i].args, **batches[i].kwargs))
                loss = squared_error(out, targets[i], masks[i]) / scales[i]
                total = loss
                for h in hooks:
                    extra = h.loss(model)
                    if extra is not None:
                        total = total + extra
                if optimizer is not None and total.requires_grad:
                    optimizer.zero_grad(set_to_none=True)
                    total.backward()
                    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                    optimizer.step()
            for h in hooks:
                h.after_step(model, step)
            report.losses.append(float(loss.detach()))
            if context.progress is not None:
                context.progress("healing", step + 1, steps)
    finally:
        for n, p in named.items():
            p.requires_grad_(flags[n])
        model.eval()
    report.seconds = time.perf_counter() - started
    return report


def _rescore(
    outputs_of: Any, previous: list[list[Tensor]], scales: list[float], keep: float
) -> tuple[list[int], list[list[Tensor]]]:
    """Top ``⌈keep·N⌉`` batches by the change of the student's outputs since the last scoring."""
    current = [outputs_of(i) for i in range(len(previous))]
    scores = [
        float(squared_error(c, p, None)) / s
        for c, p, s in zip(current, previous, scales, strict=True)
    ]
    n = max(1, math.ceil(keep * len(scores)))
    top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n]
    return sorted(top), current
