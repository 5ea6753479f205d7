"""``drop attention|mlp N [by similarity]``: replace the least useful sublayers by identity.

>>> from surgery.parse import parse
>>> format(parse("drop attention 4 by similarity").statements[0])
'drop attention 4 by similarity'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Name, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport

__all__ = ["VERB", "Drop"]

LANGUAGE: dict[str, tuple[str, ...]] = {"by": ("similarity",)}


class Drop(StatementNode):
    """``drop attention|mlp N [by similarity]``: replace the least useful sublayers by identity."""

    verb: Literal["drop"] = "drop"
    sublayer: Name
    count: Int
    by: Name | None = None


def check(c: Checker, s: Drop) -> None:
    c.implemented("drop", s)
    if s.count.value < 0:
        c.error("S0203", "cannot drop a negative number of sublayers", s.count)
    c.name_in(s.by, LANGUAGE["by"], "importance score")


def format(s: Drop) -> str:
    out = ["drop", s.sublayer.value, str(s.count.value)]
    if s.by:
        out.append(f"by {s.by.value}")
    return " ".join(out)


VERB = Verb(
    keyword="drop",
    node=Drop,
    positional=("sublayer", "count"),
    check=check,
    format=format,
    support=VerbSupport({"sublayer": {"attention", "mlp"}, "by": set(LANGUAGE["by"])}),
    language=LANGUAGE,
    pass_path="surgery.passes.drop:DropPass",
)
