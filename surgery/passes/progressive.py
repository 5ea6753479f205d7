"""``decompose … progressive K steps``: the family of ``K`` members (PLRD, arXiv 2406.19995).

Step 1 decomposes each layer at ``r_1``; step ``k > 1`` re-factors each pair step 1 made down
to ``r_k`` (:func:`~surgery.lowrank.refactor_pair`). The ranks are decided once, at step 1,
on the original spectra (:func:`progressive_schedule`), and kept on each pair it makes
(:func:`mark_pair`), so later steps find their pairs (:func:`pairs_of`) and ranks
(:func:`schedule_of`) in the model itself, after healing or a save and reload in between.
Each member is reported by its size (:func:`annotate_member`) and, once applied, by its
output drift from the original model (:func:`member_drift`).

>>> progressive_schedule(383, 96, 3)  # from the break-even rank of a 768×768 layer to 96
[241, 152, 96]
"""

from __future__ import annotations

from torch import nn

from surgery.lowrank import round_rank
from surgery.metrics import drift, padding_mask
from surgery.modules.lowrank_conv import LowRankConv2d
from surgery.modules.lowrank_linear import LowRankLinear
from surgery.passes.base import PassContext, StepPlan

__all__ = [
    "PROGRESSIVE_ATTR",
    "annotate_member",
    "mark_pair",
    "member_drift",
    "pairs_of",
    "progressive_schedule",
    "schedule_of",
]

#: Attribute on a pair made by a progressive statement: its schedule and statement position.
PROGRESSIVE_ATTR = "surgery_progressive"

_PAIRS = (LowRankLinear, LowRankConv2d)


def progressive_schedule(start: int, target: int, steps: int, multiple: int = 1) -> list[int]:
    """Ranks ``r_1 … r_K``: geometric from ``start`` (exclusive) down to ``target`` (inclusive).

    ``r_k = round(start·(target/start)^(k/K))``, rounded to ``multiple`` (never below
    ``target``), made non-increasing; ``r_K = target``.

    >>> progressive_schedule(383, 96, 3)
    [241, 152, 96]
    >>> progressive_schedule(100, 100, 2), progressive_schedule(64, 8, 3, multiple=8)
    ([100, 100], [32, 16, 8])
    """
    ranks: list[int] = []
    prev = start
    for k in range(1, steps + 1):
        r = target if k == steps else round(start * (target / start) ** (k / steps))
        if multiple > 1 and k < steps:
            r = max(target, round_rank(r, multiple, max_rank=max(prev, multiple)))
        r = max(target, min(r, prev))
        ranks.append(r)
        prev = r
    return ranks


def mark_pair(pair: nn.Module, statement: str, schedule: list[int]) -> None:
    """Keep on ``pair`` (made by step 1) its ``schedule`` and the ``statement`` that made it."""
    setattr(pair, PROGRESSIVE_ATTR, {"statement": statement, "schedule": schedule})


def pairs_of(model: nn.Module, statement: str) -> dict[str, LowRankLinear | LowRankConv2d]:
    """The pairs of ``model`` (path → pair) that step 1 of ``statement`` made and marked."""
    pairs: dict[str, LowRankLinear | LowRankConv2d] = {}
    for path, m in model.named_modules():
        tag = getattr(m, PROGRESSIVE_ATTR, None)
        if isinstance(m, _PAIRS) and isinstance(tag, dict) and tag.get("statement") == statement:
            pairs[path] = m
    return pairs


def schedule_of(pair: nn.Module) -> list[int]:
    """The ranks ``r_1 … r_K`` kept on a marked ``pair``."""
    schedule: list[int] = getattr(pair, PROGRESSIVE_ATTR)["schedule"]
    return schedule


def annotate_member(plan: StepPlan, context: PassContext, step: int, steps: int) -> None:
    """Add to ``plan`` the model's parameters after this member (a row detail and a note)."""
    saved = sum(r.params_before - r.params_after for r in plan.changed_rows)
    size = context.analysis.total_params - saved
    for row in plan.changed_rows:
        row.detail["member_params"] = size
    plan.notes.append(f"family member {step} of {steps}: {size:,} parameters")


def member_drift(model: nn.Module, plan: StepPlan, context: PassContext | None) -> None:
    """Relative output error of this member against the original, before any healing, on
    the example inputs (``member_drift`` of each changed row); nothing without them."""
    if context is None or context.example is None or context.original is None:
        return
    example = context.example
    value = drift([example.call(context.original)], [example.call(model)], [padding_mask(example)])
    for row in plan.changed_rows:
        row.detail["member_drift"] = round(value, 6)
