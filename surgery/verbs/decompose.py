"""``decompose SELECTOR rank = R | budget …``: low-rank factorization of matrices and convs.

>>> from surgery.parse import parse
>>> format(parse("decompose Linear where params>1M rank=25% method asvd").statements[0])
'decompose Linear where params > 1M rank = 25% method asvd'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Flag, Int, Name, Node, Number, Rank, Selector, StatementNode
from surgery.verbs.base import (
    Checker,
    Verb,
    VerbSupport,
    format_number,
    format_rank,
    format_selector,
)

__all__ = ["VERB", "Budget", "Decompose"]

LANGUAGE: dict[str, tuple[str, ...]] = {
    "type": ("Linear", "Conv1D", "Conv2d"),
    "method": ("svd", "asvd", "svd-llm", "tucker"),
    "budget by": ("sensitivity",),
}


class Budget(Node):
    """``budget params 50% [by sensitivity]``: a global budget shared by all layers the
    selector matches; ``by`` names how layers are weighed against each other (default: their
    spectra alone)."""

    resource: Literal["params", "flops"]
    value: Number
    by: Name | None = None


class Decompose(StatementNode):
    """``decompose SELECTOR [rank = R] [method M] [round N] [progressive K steps] [keep if faster]
    [budget params|flops P]``."""

    verb: Literal["decompose"] = "decompose"
    selector: Selector
    rank: Rank | None = None
    method: Name | None = None
    round: Int | None = None
    progressive: Int | None = None
    keep_if_faster: Flag | None = None
    budget: Budget | None = None


def check(c: Checker, s: Decompose) -> None:
    verb = "decompose"
    ok = c.implemented(verb, s)
    c.selector(verb, s.selector)
    if s.rank is not None:
        c.rank(s.rank)
    c.name_in(s.method, LANGUAGE["method"], "decomposition method")
    c.positive(s.round, "`round`")
    c.count(s.progressive, "`progressive` steps", "progressive")
    if s.budget is not None:
        c.fraction(s.budget.value, "a budget")
        c.name_in(s.budget.by, LANGUAGE["budget by"], "budget weighing", verb)
    if s.rank is not None and s.budget is not None:
        c.error(
            "S0204",
            "`rank` and `budget` contradict each other",
            s.budget,
            "a budget chooses the rank of every layer: remove `rank` or `budget`",
        )
    if s.rank is None and s.budget is None:
        c.error(
            "S0204",
            "`decompose` needs a `rank` or a `budget`",
            s,
            "add e.g. `rank = 0.25` or `budget params 50%`",
        )
    if not ok:
        return
    if s.rank is not None:
        c.option_implemented(verb, "rank", s.rank, s.rank.kind, format_rank(s.rank))
    if s.method is not None:
        c.option_implemented(verb, "method", s.method, s.method.value, f"method {s.method.value}")
    c.option_implemented(verb, "round", s.round)
    c.option_implemented(verb, "progressive", s.progressive)
    c.option_implemented(verb, "keep_if_faster", s.keep_if_faster, shown="keep if faster")
    c.option_implemented(verb, "budget", s.budget)
    by = s.budget.by if s.budget is not None else None
    if by is not None and by.value in LANGUAGE["budget by"]:
        c.option_implemented(verb, "budget by", by, by.value, f"budget ... by {by.value}")


def format(s: Decompose) -> str:
    out = ["decompose", format_selector(s.selector)]
    if s.rank:
        out.append(format_rank(s.rank))
    if s.method:
        out.append(f"method {s.method.value}")
    if s.round:
        out.append(f"round {s.round.value}")
    if s.progressive:
        out.append(f"progressive {s.progressive.value} steps")
    if s.keep_if_faster:
        out.append("keep if faster")
    if s.budget:
        out.append(f"budget {s.budget.resource} {format_number(s.budget.value)}")
        if s.budget.by:
            out.append(f"by {s.budget.by.value}")
    return " ".join(out)


def members(s: Decompose) -> int:
    """``progressive K steps`` builds a family of K models, one per rank step."""
    return s.progressive.value if s.progressive is not None else 1


VERB = Verb(
    keyword="decompose",
    node=Decompose,
    positional=("selector",),
    check=check,
    format=format,
    support=VerbSupport(
        {
            "rank": {"fraction", "absolute", "energy"},
            "method": set(LANGUAGE["method"]),
            "round": None,
            "progressive": None,
            "budget": None,
            "budget by": set(LANGUAGE["budget by"]),
            "keep_if_faster": None,
            "where speedup": None,
        },
        ("Linear", "Conv1D", "Conv2d"),
    ),
    language=LANGUAGE,
    pass_path="surgery.passes.decompose:DecomposePass",
    members=members,
)
