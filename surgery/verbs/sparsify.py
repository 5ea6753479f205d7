"""``sparsify SELECTOR N:M``: semi-structured sparsity (e.g. 2:4).

>>> from surgery.parse import parse
>>> format(parse("sparsify Linear   2:4").statements[0])
'sparsify Linear 2:4'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Selector, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_selector

__all__ = ["VERB", "Sparsify"]


class Sparsify(StatementNode):
    """``sparsify SELECTOR N:M`` (semi-structured sparsity, e.g. 2:4)."""

    verb: Literal["sparsify"] = "sparsify"
    selector: Selector
    n: Int
    m: Int


def check(c: Checker, s: Sparsify) -> None:
    c.implemented("sparsify", s)
    c.selector("sparsify", s.selector)
    c.positive(s.n, "`N` of `N:M`")
    c.positive(s.m, "`M` of `N:M`")
    if 0 < s.m.value <= s.n.value:
        c.error(
            "S0203",
            f"`{s.n.value}:{s.m.value}` keeps every weight",
            s.n,
            "N must be smaller than M, e.g. `2:4`",
        )


def format(s: Sparsify) -> str:
    return " ".join(["sparsify", format_selector(s.selector), f"{s.n.value}:{s.m.value}"])


VERB = Verb(
    keyword="sparsify",
    node=Sparsify,
    positional=("selector", "n", "m"),
    check=check,
    format=format,
    support=VerbSupport({"n": None, "m": None}, ("Linear", "Conv1D")),
    language={"type": ("Linear", "Conv1D")},
    pass_path="surgery.passes.sparsify:SparsifyPass",
)
