"""Recipe passes: one file per recipe verb that changes the model, named by its keyword.

``PASSES`` (keyword → pass class) is generated from the verbs' table
(:data:`surgery.verbs.VERBS`: each verb names its pass); recipes run their statements in the
order they are written.

>>> sorted(PASSES)[:1]
['decompose']
"""

from __future__ import annotations

import importlib
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
from surgery.verbs import VERBS

__all__ = [
    "PASSES",
    "Change",
    "PassContext",
    "PassError",
    "PlanRow",
    "StepPlan",
    "SurgeryPass",
    "TrainingHook",
    "pass_for",
]


def _pass_class(path: str) -> type[SurgeryPass]:
    module, _, name = path.partition(":")
    cls: type[SurgeryPass] = getattr(importlib.import_module(module), name)
    return cls


# The keyword of a recipe statement -> its pass, for every verb that names one.
PASSES: dict[str, type[SurgeryPass]] = {
    v.keyword: _pass_class(v.pass_path) for v in VERBS if v.pass_path is not None
}


def pass_for(statement: Any, context: PassContext | None = None, *, member: int = 1) -> SurgeryPass:
    """The configured pass for one recipe statement (``member``: which of its family)."""
    try:
        cls = PASSES[statement.verb]
    except KeyError:
        raise KeyError(f"no pass implements `{statement.verb}`") from None
    return cls(statement, context, member=member)
