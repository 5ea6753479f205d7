"""Recipe passes: one file per recipe verb, the file name is the keyword and registry key.

``PASSES`` is the one explicit table of implemented passes, in no particular order: recipes
run their statements in the order they are written.

>>> sorted(PASSES)[:1]
['decompose']
"""

from __future__ import annotations

from typing import Any

from surgery.passes.base import (
    Change,
    PassContext,
    PassError,
    PlanRow,
    StepPlan,
    SurgeryPass,
    TrainingHook,
)
from surgery.passes.decompose import DecomposePass

__all__ = [
    "PASSES",
    "Change",
    "DecomposePass",
    "PassContext",
    "PassError",
    "PlanRow",
    "StepPlan",
    "SurgeryPass",
    "TrainingHook",
    "pass_for",
]

PASSES: dict[str, type[SurgeryPass]] = {cls.keyword: cls for cls in (DecomposePass,)}


def pass_for(statement: Any, context: PassContext | None = None) -> SurgeryPass:
    """The configured pass for one recipe statement."""
    try:
        cls = PASSES[statement.verb]
    except KeyError:
        raise KeyError(f"no pass implements `{statement.verb}`") from None
    return cls(statement, context)
