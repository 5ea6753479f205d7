"""``freeze first-factor|core|alternate``: sequential freezing of factors while healing.

>>> from surgery.parse import parse
>>> format(parse("freeze   core").statements[0])
'freeze core'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Name, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport

__all__ = ["VERB", "Freeze"]

LANGUAGE: dict[str, tuple[str, ...]] = {"what": ("first-factor", "core", "alternate")}


class Freeze(StatementNode):
    """``freeze first-factor|core|alternate`` (sequential freezing while healing)."""

    verb: Literal["freeze"] = "freeze"
    what: Name


def check(c: Checker, s: Freeze) -> None:
    ok = c.implemented("freeze", s)
    c.name_in(s.what, LANGUAGE["what"], "factor to freeze")
    if ok:
        c.option_implemented("freeze", "what", s.what, s.what.value, f"freeze {s.what.value}")


def format(s: Freeze) -> str:
    return f"freeze {s.what.value}"


VERB = Verb(
    keyword="freeze",
    node=Freeze,
    positional=("what",),
    check=check,
    format=format,
    support=VerbSupport({"what": set(LANGUAGE["what"])}),
    language=LANGUAGE,
)
