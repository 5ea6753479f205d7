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
from surgery.passes.drop import DropPass
from surgery.passes.factorize import FactorizePass
from surgery.passes.group import GroupPass
from surgery.passes.skip import SkipPass
from surgery.passes.sparsify import SparsifyPass
from surgery.passes.split import SplitPass
from surgery.passes.truncate import TruncatePass

__all__ = [
    "PASSES",
    "Change",
    "DecomposePass",
    "DropPass",
    "FactorizePass",
    "GroupPass",
    "PassContext",
    "PassError",
    "PlanRow",
    "SkipPass",
    "SparsifyPass",
    "SplitPass",
    "StepPlan",
    "SurgeryPass",
    "TrainingHook",
    "TruncatePass",
    "pass_for",
]

# One explicit table, sqlglot-style: the keyword of a recipe statement -> its pass.
PASSES: dict[str, type[SurgeryPass]] = {
    cls.keyword: cls
    for cls in (
        DecomposePass,
        GroupPass,
        SkipPass,
        DropPass,
        TruncatePass,
        SplitPass,
        SparsifyPass,
        FactorizePass,
    )
}


def pass_for(statement: Any, context: PassContext | None = None) -> SurgeryPass:
    """The configured pass for one recipe statement."""
    try:
        cls = PASSES[statement.verb]
    except KeyError:
        raise KeyError(f"no pass implements `{statement.verb}`") from None
    return cls(statement, context)
