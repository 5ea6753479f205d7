"""``regularize nuclear 3e-4 [every M steps]``: trained rank pruning, while healing.

>>> from surgery.parse import parse
>>> format(parse("regularize nuclear 0.0003 every 10 steps").statements[0])
'regularize nuclear 0.0003 every 10 steps'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Name, Number, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_number

__all__ = ["VERB", "Regularize"]

LANGUAGE: dict[str, tuple[str, ...]] = {"method": ("nuclear",)}


class Regularize(StatementNode):
    """``regularize nuclear 3e-4 [every M steps]`` (trained rank pruning, while healing)."""

    verb: Literal["regularize"] = "regularize"
    method: Name
    strength: Number
    every: Int | None = None


def check(c: Checker, s: Regularize) -> None:
    ok = c.implemented("regularize", s)
    c.name_in(s.method, LANGUAGE["method"], "regularizer")
    if s.strength.magnitude <= 0:
        c.error("S0203", "regularization strength must be positive", s.strength)
    c.positive(s.every, "`every`")
    if ok:
        c.option_implemented("regularize", "every", s.every)


def format(s: Regularize) -> str:
    out = ["regularize", s.method.value, format_number(s.strength)]
    if s.every:
        out.append(f"every {s.every.value} steps")
    return " ".join(out)


VERB = Verb(
    keyword="regularize",
    node=Regularize,
    positional=("method", "strength"),
    check=check,
    format=format,
    support=VerbSupport({"every": None}),
    language=LANGUAGE,
)
