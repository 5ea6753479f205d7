"""``truncate blocks keep K uniform|pseudo-uniform`` or ``… keep K [i, j, …]``: fewer blocks.

>>> from surgery.parse import parse
>>> format(parse("truncate blocks keep 2 [0,3]").statements[0])
'truncate blocks keep 2 [0, 3]'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Name, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport

__all__ = ["VERB", "Truncate"]

LANGUAGE: dict[str, tuple[str, ...]] = {"strategy": ("uniform", "pseudo-uniform")}


class Truncate(StatementNode):
    """``truncate blocks keep K uniform|pseudo-uniform`` or ``... keep K [i, j, ...]``."""

    verb: Literal["truncate"] = "truncate"
    keep: Int
    strategy: Name | None = None
    indices: list[Int] | None = None


def check(c: Checker, s: Truncate) -> None:
    c.implemented("truncate", s)
    c.positive(s.keep, "`keep`")
    c.name_in(s.strategy, LANGUAGE["strategy"], "truncation strategy")
    if s.indices is None:
        return
    for i in s.indices:
        c.index(i, "a block index")
    values = [i.value for i in s.indices]
    if len(values) != s.keep.value:
        c.error(
            "S0204",
            f"`keep {s.keep.value}` but {len(values)} block indices listed",
            s.indices[0] if s.indices else s.keep,
            f"list exactly {s.keep.value} indices",
        )
    if len(set(values)) != len(values):
        c.error("S0203", "a block index is listed twice", s.indices[0])


def format(s: Truncate) -> str:
    out = ["truncate blocks keep", str(s.keep.value)]
    if s.strategy:
        out.append(s.strategy.value)
    if s.indices is not None:
        out.append("[" + ", ".join(str(i.value) for i in s.indices) + "]")
    return " ".join(out)


VERB = Verb(
    keyword="truncate",
    node=Truncate,
    positional=("keep",),
    check=check,
    format=format,
    support=VerbSupport({"keep": None, "strategy": set(LANGUAGE["strategy"]), "indices": None}),
    language=LANGUAGE,
    pass_path="surgery.passes.truncate:TruncatePass",
)
