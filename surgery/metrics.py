"""How far a surgered model's outputs are from the original's: the one definition of drift.

Drift is the relative output error ``‖y − y₀‖ / ‖y₀‖`` over all floating outputs of one or
more calls. Outputs shaped ``[B, T, …]`` are masked by the call's ``attention_mask``:
positions of padding tokens carry no meaning (a model may write anything there), and a
padded calibration batch would otherwise measure mostly noise. Healing minimises the square
of the same quantity.

>>> import torch
>>> drift([torch.ones(4)], [torch.ones(4) * 1.1])
0.1000...
>>> mask = torch.tensor([[1, 0]])
>>> ref, cand = torch.zeros(1, 2, 3) + 1, torch.tensor([[[1.0] * 3, [9.0] * 3]])
>>> drift([ref], [cand], [mask])  # the padded position does not count
0.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from surgery.inputs import Inputs, flatten_outputs

__all__ = ["drift", "float_outputs", "padding_mask", "squared_error"]


def padding_mask(inputs: Inputs) -> Tensor | None:
    """The ``(B, T)`` ``attention_mask`` of a call, if it has one."""
    mask = inputs.kwargs.get("attention_mask")
    return mask if isinstance(mask, Tensor) and mask.dim() == 2 else None


def float_outputs(out: Any) -> list[Tensor]:
    """The floating-point tensors of a model output, in a stable order."""
    return [t for t in flatten_outputs(out) if t.is_floating_point()]


def squared_error(candidate: list[Tensor], reference: list[Tensor], mask: Tensor | None) -> Tensor:
    """``Σ‖c − r‖²`` (float64) over paired tensors, masked at padded ``[B, T, …]`` positions."""
    total = torch.zeros((), dtype=torch.float64)
    for c, r in zip(candidate, reference, strict=True):
        diff = (c.to(torch.float64) - r.to(torch.float64)).square()
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            diff = diff * mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - 2)))
        total = total + diff.sum()
    return total


def drift(
    reference: Sequence[Any],
    candidate: Sequence[Any],
    masks: Sequence[Tensor | None] | None = None,
) -> float:
    """Relative output error of ``candidate`` outputs against ``reference`` outputs."""
    num = 0.0
    den = 0.0
    for i, (ref_out, cand_out) in enumerate(zip(reference, candidate, strict=True)):
        mask = masks[i] if masks is not None else None
        refs, cands = float_outputs(ref_out), float_outputs(cand_out)
        num += float(squared_error([c.detach() for c in cands], [r.detach() for r in refs], mask))
        den += float(squared_error([torch.zeros_like(r) for r in refs], refs, mask))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)
