"""``heal steps N [lr X] [distill from original] [subset P [by importance]] [every M steps]``.

>>> from surgery.parse import parse
>>> format(parse("heal steps 200 distill from original lr 1e-4").statements[0])
'heal steps 200 lr 0.0001 distill from original'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Flag, Int, Name, Number, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_number

__all__ = ["VERB", "Heal"]

LANGUAGE: dict[str, tuple[str, ...]] = {"by": ("importance",)}


class Heal(StatementNode):
    """``heal steps N [lr X] [distill from original] [subset P [by importance]] [every M steps]``."""

    verb: Literal["heal"] = "heal"
    steps: Int
    lr: Number | None = None
    distill: Flag | None = None
    subset: Number | None = None
    by: Name | None = None
    every: Int | None = None


def check(c: Checker, s: Heal) -> None:
    ok = c.implemented("heal", s)
    c.count(s.steps, "`steps`", "heal steps")
    if s.lr is not None and s.lr.magnitude <= 0:
        c.error("S0203", "learning rate must be positive", s.lr)
    c.fraction(s.subset, "`subset`")
    c.name_in(s.by, LANGUAGE["by"], "data-selection score")
    c.positive(s.every, "`every`")
    if ok:
        for option in ("lr", "distill", "subset", "by", "every"):
            c.option_implemented("heal", option, getattr(s, option))


def format(s: Heal) -> str:
    out = ["heal steps", str(s.steps.value)]
    if s.lr:
        out.append(f"lr {format_number(s.lr)}")
    if s.distill:
        out.append("distill from original")
    if s.subset:
        out.append(f"subset {format_number(s.subset)}")
        if s.by:
            out.append(f"by {s.by.value}")
    if s.every:
        out.append(f"every {s.every.value} steps")
    return " ".join(out)


VERB = Verb(
    keyword="heal",
    node=Heal,
    positional=("steps",),
    check=check,
    format=format,
    support=VerbSupport(
        {"lr": None, "distill": None, "subset": None, "by": set(LANGUAGE["by"]), "every": None}
    ),
    language=LANGUAGE,
)
