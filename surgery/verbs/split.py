"""``split Conv3d exact`` or ``split Conv3d (2+1)d [add|cat] [rank = R]``: 3D convolutions
as 2D ones.

>>> from surgery.parse import parse
>>> format(parse("split Conv3d (2+1)d cat rank=0.5").statements[0])
'split Conv3d (2+1)d cat rank = 0.5'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Name, Rank, Selector, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_rank, format_selector

__all__ = ["VERB", "Split"]

LANGUAGE: dict[str, tuple[str, ...]] = {
    "type": ("Conv3d",),
    "mode": ("exact", "(2+1)d"),
    "combine": ("add", "cat"),
}


class Split(StatementNode):
    """``split Conv3d exact`` or ``split Conv3d (2+1)d [add|cat] [rank = R]``."""

    verb: Literal["split"] = "split"
    selector: Selector
    mode: Name  # "exact" | "(2+1)d"
    combine: Name | None = None  # "add" | "cat"
    rank: Rank | None = None


def check(c: Checker, s: Split) -> None:
    ok = c.implemented("split", s)
    c.selector("split", s.selector)
    if s.mode.value == "exact" and (s.combine is not None or s.rank is not None):
        extra = s.combine if s.combine is not None else s.rank
        c.error(
            "S0204",
            "`exact` takes no `add`/`cat` or `rank`",
            extra,
            "these options belong to `(2+1)d`",
        )
    if s.rank is not None:
        c.rank(s.rank)
    if ok:
        c.option_implemented("split", "mode", s.mode, s.mode.value, s.mode.value)
        c.option_implemented("split", "combine", s.combine, s.combine.value if s.combine else None)
        c.option_implemented("split", "rank", s.rank, s.rank.kind if s.rank else None)


def format(s: Split) -> str:
    out = ["split", format_selector(s.selector), s.mode.value]
    if s.combine:
        out.append(s.combine.value)
    if s.rank:
        out.append(format_rank(s.rank))
    return " ".join(out)


VERB = Verb(
    keyword="split",
    node=Split,
    positional=("selector", "mode"),
    check=check,
    format=format,
    support=VerbSupport(
        {
            "mode": set(LANGUAGE["mode"]),
            "combine": set(LANGUAGE["combine"]),
            "rank": {"fraction", "absolute", "energy"},
        },
        ("Conv3d",),
    ),
    language={"type": LANGUAGE["type"], "combine": LANGUAGE["combine"]},
    pass_path="surgery.passes.split:SplitPass",
)
