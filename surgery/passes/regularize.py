"""`regularize nuclear λ [every M steps]`: trained rank pruning (TRP, 1812.02402) while healing.

Not a graph pass: the statement changes no module, it hands the healer a
:class:`NuclearRegularizer` (:func:`hooks_for`). For every target ``Linear`` weight ``W``:

* **each step** it applies the nuclear-norm sub-gradient ``λ·U_r V_rᵀ`` (``W = U Σ Vᵀ``, ``r``
  the numerical rank). By default (``mode="step"``) this is a gradient-free update in
  :meth:`~NuclearRegularizer.after_step`, ``W ← W − λ·U_r V_rᵀ`` with each singular value
  clipped at zero (``σ ← max(σ − λ, 0)``: the proximal step of ``λ‖W‖_*``, equal to the
  sub-gradient step whenever ``σ ≥ λ``), so its strength does not depend on the healer's
  optimiser or learning rate (Adam would rescale a loss gradient). With ``mode="loss"``,
  :meth:`~NuclearRegularizer.loss` instead returns ``λ·Σ‖W‖_*``, whose autograd gradient is
  exactly ``λ·U_r V_rᵀ`` (TRP's formulation, scaled by the learning rate);
* **every M steps** (after the optimiser steps ``M−1, 2M−1, …``, counting from 0) it projects
  ``W`` to its energy rank: the smallest ``r`` keeping ``≥ energy`` of ``Σσ²`` (99% by default).
  ``energy = 1.0`` leaves weights untouched.

Targets: every ``nn.Linear`` except the factors of a ``LowRankLinear`` (their rank is set by
``decompose``; shrink them with ``decompose ... progressive``) and ``Linear`` layers whose
weight is shared with another module (tied embeddings). The ranks found at the last
projection are in :attr:`NuclearRegularizer.ranks`, for a later ``decompose`` to use.

>>> import torch
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
>>> [hook] = hooks_for(parse("regularize nuclear 3e-4 every 10 steps").statements[0], model)
>>> (hook.strength, hook.every, hook.energy)
(0.0003, 10, 0.99)
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from surgery import ast
from surgery.lowrank import rank_for_energy
from surgery.passes.base import TrainingHook

__all__ = ["DEFAULT_EVERY", "NuclearRegularizer", "hooks_for", "nuclear_targets", "project_energy"]

DEFAULT_EVERY = 10  # projection period when the recipe gives no `every` (the design's example)


def nuclear_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``Linear`` layers the regulariser acts on (see the module docstring), by path."""
    from surgery.modules.lowrank_linear import LowRankLinear

    factors: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            factors.update(
                f"{path}.{name}" if path else name for name, _ in module.named_children()
            )
    owners: dict[int, int] = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and path not in factors
        and owners.get(id(module.weight), 0) == 1
        and min(module.weight.shape) > 1
    }


@torch.no_grad()
def project_energy(weight: torch.Tensor, energy: float) -> int:
    """Replace ``weight`` in place by its truncation to the smallest rank keeping ``energy``.

    Returns the rank. ``energy ≥ 1`` is a no-op returning the full rank ``min(out, in)``.

    >>> w = torch.randn(6, 4, dtype=torch.float64)
    >>> before = w.clone()
    >>> project_energy(w, 1.0), bool(torch.equal(w, before))
    (4, True)
    >>> project_energy(w, 0.5) < 4, int(torch.linalg.matrix_rank(w)) < 4
    (True, True)
    """
    full = min(weight.shape)
    if energy >= 1.0:
        return full
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    rank = rank_for_energy(s, energy)
    if rank < full:
        weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype))
    return rank


class NuclearRegularizer(TrainingHook):
    """Nuclear-norm shrinkage each step and energy-rank projection every ``every`` steps.

    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(16, 16, bias=False))
    >>> hook = NuclearRegularizer(strength=0.05, every=2, energy=0.9)
    >>> for step in range(4):  # a stand-in for optimiser steps
    ...     hook.after_step(model, step)
    >>> hook.ranks["0"] < 16
    True
    """

    def __init__(
        self,
        strength: float,
        every: int | None = DEFAULT_EVERY,
        energy: float = 0.99,
        mode: Literal["step", "loss"] = "step",
        paths: list[str] | None = None,
    ) -> None:
        if strength < 0:
            raise ValueError(f"strength must be ≥ 0, got {strength}")
        if every is not None and every < 1:
            raise ValueError(f"`every` must be a positive number of steps, got {every}")
        if not 0.0 < energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        if mode not in ("step", "loss"):
            raise ValueError(f"mode must be `step` or `loss`, got `{mode}`")
        self.strength = strength
        self.every = every
        self.energy = energy
        self.mode = mode
        self.paths = paths  # None: all targets, looked up at each call (passes may swap modules)
        self.ranks: dict[str, int] = {}

    def _targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        targets = nuclear_targets(model)
        if self.paths is None:
            return targets
        return {p: targets[p] for p in self.paths if p in targets}

    def loss(self, model: nn.Module) -> torch.Tensor | None:
        """``λ·Σ‖W‖_*`` in ``mode="loss"`` (its gradient is ``λ·U_r V_rᵀ``); None otherwise."""
        if self.mode != "loss" or self.strength == 0:
            return None
        targets = self._targets(model)
        if not targets:
            return None
        norms = [torch.linalg.matrix_norm(m.weight, ord="nuc") for m in targets.values()]
        return self.strength * torch.stack(norms).sum()

    @torch.no_grad()
    def shrink(self, model: nn.Module) -> None:
        """One gradient-free step ``σ ← max(σ − λ, 0)`` on every target weight."""
        for module in self._targets(model).values():
            w = module.weight
            u, s, vh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
            s = (s - self.strength).clamp_min(0.0)  # the sub-gradient λ·U_r V_rᵀ, clipped at 0
            w.copy_(((u * s) @ vh).to(w.dtype))

    @torch.no_grad()
    def project(self, model: nn.Module) -> dict[str, int]:
        """Project every target weight to its energy rank; returns (and keeps) the ranks."""
        for path, module in self._targets(model).items():
            self.ranks[path] = project_energy(module.weight, self.energy)
        return dict(self.ranks)

    def after_step(self, model: nn.Module, step: int) -> None:
        """Shrink (``mode="step"``), then project when ``step + 1`` is a multiple of ``every``."""
        if self.mode == "step" and self.strength > 0:
            self.shrink(model)
        if self.every is not None and (step + 1) % self.every == 0:
            self.project(model)


def hooks_for(statement: ast.Regularize, model: nn.Module) -> list[TrainingHook]:
    """The training hooks of one ``regularize`` statement (``model`` is not changed)."""
    method = statement.method.value
    if method != "nuclear":
        raise ValueError(f"unknown regulariser `{method}`: only `nuclear` is implemented")
    every = statement.every.value if statement.every is not None else DEFAULT_EVERY
    return [NuclearRegularizer(strength=statement.strength.magnitude, every=every)]
