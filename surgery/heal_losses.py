"""The losses healing mixes: output distillation (``mse``), logit distillation (``kl``) and
the task loss (``task``).

* ``mse`` — ``Σ‖y − y₀‖² / Σ‖y₀‖²`` over every floating output of the student ``y`` and the
  original ``y₀``, masked at padded positions: the squared relative drift
  (:mod:`surgery.metrics`).
* ``kl`` — ``T² · KL(softmax(z₀/T) ‖ softmax(z/T))`` of the logits, averaged over the
  (unpadded) positions: Hinton et al.'s distillation, for models with an LM or
  classification head.
* ``task`` — the next-token cross-entropy for decoders (padding ignored), the cross-entropy
  of the labels for classifiers.

>>> import torch
>>> z0 = torch.tensor([[2.0, 0.0, -1.0]])
>>> round(float(kl_loss(z0, z0, None, 2.0)), 6)
0.0
>>> float(kl_loss(z0 + torch.tensor([[0.0, 1.0, 0.0]]), z0, None, 1.0)) > 0
True
>>> ids = torch.tensor([[1, 2, 3]])
>>> logits = torch.nn.functional.one_hot(torch.tensor([[2, 3, 0]]), 5).float() * 20
>>> float(next_token_loss(logits, ids, None)) < 1e-6
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from surgery.metrics import float_outputs, squared_error

__all__ = [
    "kl_loss",
    "label_loss",
    "logits_of",
    "mse_loss",
    "next_token_loss",
    "per_example_mse",
    "positions",
    "teacher_scale",
]


def logits_of(out: Any) -> Tensor | None:
    """The ``logits`` of a model output (HF ``ModelOutput`` or a dict), if it has them."""
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def teacher_scale(teacher: list[Tensor], mask: Tensor | None) -> float:
    """``Σ‖y₀‖²`` (at least 1e-30): what ``mse`` divides by."""
    zeros = [torch.zeros_like(t) for t in teacher]
    return max(float(squared_error(teacher, zeros, mask)), 1e-30)


def mse_loss(student: Any, teacher: list[Tensor], mask: Tensor | None, scale: float) -> Tensor:
    """The squared relative drift of the student's outputs from the teacher's."""
    return squared_error(float_outputs(student), teacher, mask) / scale


def per_example_mse(student: Any, teacher: list[Tensor], mask: Tensor | None) -> list[float]:
    """The squared relative drift of each example (row) of a batch."""
    outs = float_outputs(student)
    rows = outs[0].shape[0] if outs and outs[0].dim() > 0 else 1
    num = torch.zeros(rows, dtype=torch.float64)
    den = torch.zeros(rows, dtype=torch.float64)
    for c, r in zip(outs, teacher, strict=True):
        if c.dim() == 0 or c.shape[0] != rows:
            continue
        diff = (c.detach().double() - r.double()).square()
        ref = r.double().square()
        if mask is not None and diff.dim() >= 2 and tuple(diff.shape[:2]) == tuple(mask.shape):
            m = mask.to(diff.dtype).reshape(*mask.shape, *([1] * (diff.dim() - 2)))
            diff, ref = diff * m, ref * m
        num += diff.reshape(rows, -1).sum(1)
        den += ref.reshape(rows, -1).sum(1)
    return (num / den.clamp_min(1e-30)).tolist()


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is not None and values.dim() == 2 and tuple(values.shape) == tuple(mask.shape):
        m = mask.to(values.dtype)
        return (values * m).sum() / m.sum().clamp_min(1.0)
    return values.mean()


def positions(shape: tuple[int, ...] | torch.Size, mask: Tensor | None) -> float:
    """How many positions a mean over values of ``shape`` (masked by ``mask``) divides by, as
    in ``kl_loss`` and ``next_token_loss``: the unmasked ones (at least 1) when the mask
    fits, else all.

    >>> positions((2, 3), torch.tensor([[1, 1, 0], [1, 0, 0]])), positions((2, 3), None)
    (3.0, 6.0)
    """
    if mask is not None and len(shape) == 2 and tuple(shape) == tuple(mask.shape):
        return max(1.0, float(mask.sum()))
    return float(math.prod(shape))


def kl_loss(student: Tensor, teacher: Tensor, mask: Tensor | None, temperature: float) -> Tensor:
    """``T² · KL(teacher ‖ student)`` of logits at temperature ``T``, mean over positions."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return _masked_mean(kl, mask) * (t * t)


def next_token_loss(logits: Tensor, input_ids: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-entropy of each next token (padded positions ignored)."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none")
    ce = ce.reshape(target.shape)
    return _masked_mean(ce, mask[:, 1:] if mask is not None else None)


def label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of class labels."""
    return F.cross_entropy(logits.float(), labels.to(logits.device))
