"""``skip tokens 55% after block 3 [until block 9]``: token skipping in ViTs (SkipViT).

>>> from surgery.parse import parse
>>> format(parse("skip tokens 0.55 after block 3").statements[0])
'skip tokens 0.55 after block 3'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Number, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_number

__all__ = ["VERB", "SkipTokens"]


class SkipTokens(StatementNode):
    """``skip tokens 55% after block 3 [until block 9]`` (SkipViT)."""

    verb: Literal["skip"] = "skip"
    ratio: Number
    after: Int
    until: Int | None = None


def check(c: Checker, s: SkipTokens) -> None:
    ok = c.implemented("skip", s)
    c.fraction(s.ratio, "the share of skipped tokens", allow_zero=True, allow_one=False)
    c.index(s.after, "a block index")
    c.index(s.until, "a block index")
    if s.until is not None and s.until.value <= s.after.value:
        c.error(
            "S0204",
            f"`until block {s.until.value}` is not after `after block {s.after.value}`",
            s.until,
            f"use a block after {s.after.value}, or drop `until`",
        )
    if ok:
        c.option_implemented("skip", "until", s.until)


def format(s: SkipTokens) -> str:
    out = ["skip tokens", format_number(s.ratio), f"after block {s.after.value}"]
    if s.until:
        out.append(f"until block {s.until.value}")
    return " ".join(out)


VERB = Verb(
    keyword="skip",
    node=SkipTokens,
    positional=("ratio", "after"),
    check=check,
    format=format,
    support=VerbSupport({"ratio": None, "after": None, "until": None}),
    pass_path="surgery.passes.skip:SkipPass",
)
