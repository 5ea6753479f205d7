"""Measured sensitivity of a model's output to each layer's truncation, for rank budgets.

A spectrum says how much of a layer's own output a truncation loses; it does not say how much
of the *model's* output that costs: an error in a value projection and an error in the last
FFN reach the output differently. ``budget ... by sensitivity`` measures it. Each layer is
truncated alone to a probe rank (the other layers stay dense), the model runs on the
calibration batches, and the layer's weight is

    w = drift² / lost

with ``drift`` the relative output error (:func:`surgery.metrics.drift`, padding masked) and
``lost`` the fraction of the layer's (data-aware) ``Σσ²`` the probe discards. To first order the
squared output errors of independent layers add, so ``Σ w · lost`` estimates the squared drift
of a whole allocation, which :func:`surgery.lowrank.allocate_budget` then minimises. Costs one
pass over the calibration batches per layer.

>>> import torch
>>> from surgery.inputs import Inputs
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
>>> zero = torch.nn.Linear(4, 4)
>>> _ = torch.nn.init.zeros_(zero.weight), torch.nn.init.zeros_(zero.bias)
>>> w = layer_sensitivities(model, {"1": (zero, 1.0)}, [Inputs((torch.randn(8, 4),), {})])
>>> round(w["1"], 6)  # replacing the last layer by zeros loses the whole output
1.0
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from surgery.metrics import drift, padding_mask

__all__ = ["layer_sensitivities"]

#: Weight of a layer whose probe discards (numerically) nothing: its drift is noise.
_NO_LOSS = 1e-12


def layer_sensitivities(
    model: nn.Module,
    probes: Mapping[str, tuple[nn.Module, float]],
    batches: Sequence[Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, float]:
    """``{path: drift² / lost}`` for each ``path → (replacement, lost)`` in ``probes``.

    ``replacement`` is the layer truncated to its probe rank and ``lost`` the fraction of the
    layer's ``Σσ²`` that truncation discards. Each layer is swapped in alone and swapped back
    (the model is unchanged afterwards, also on error). ``batches`` are ``Inputs``.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = [b.call(model) for b in batches]
            masks = [padding_mask(b) for b in batches]
            weights: dict[str, float] = {}
            for i, (path, (replacement, lost)) in enumerate(probes.items()):
                original = model.get_submodule(path)
                model.set_submodule(path, replacement)
                try:
                    value = drift(reference, [b.call(model) for b in batches], masks)
                finally:
                    model.set_submodule(path, original)
                weights[path] = value * value / lost if lost > _NO_LOSS else 0.0
                if progress is not None:
                    progress("measuring sensitivity", i + 1, len(probes))
    finally:
        model.train(was_training)
    return weights
