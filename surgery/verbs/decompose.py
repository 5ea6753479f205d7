"""``decompose SELECTOR rank = R | rank = auto | budget …``: low-rank factorization.

``rank = auto`` leaves the ranks to the compiler: it chooses each layer's rank (or leaves the
layer dense) from measured latency and sensitivity, against the recipe's ``expect speedup``
and ``expect drift`` contracts (``surgery.passes.auto_rank``). ``budget latency P`` is the
same search with the matched layers' measured latency capped at ``P`` of their dense latency.

>>> from surgery.parse import parse
>>> format(parse("decompose Linear where params>1M rank=25% method asvd").statements[0])
'decompose Linear where params > 1M rank = 25% method asvd'
>>> format(parse("decompose Linear rank=auto method svd-llm round 16").statements[0])
'decompose Linear rank = auto method svd-llm round 16'
"""

from __future__ import annotations

from collections.abc import Iterable
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

__all__ = ["GOAL_METRICS", "VERB", "Budget", "Decompose", "check_goals"]

LANGUAGE: dict[str, tuple[str, ...]] = {
    "type": ("Linear", "Conv1D", "Conv2d"),
    "method": ("svd", "asvd", "svd-llm", "tucker"),
    "budget by": ("sensitivity",),
}


class Budget(Node):
    """``budget params|flops|latency 50% [by sensitivity]``: a global budget shared by all
    layers the selector matches; ``by`` names how layers are weighed against each other
    (default: their spectra alone). A latency budget caps the matched layers' latency, each
    timed alone on the recipe's first target, at the fraction of their dense latency."""

    resource: Literal["params", "flops", "latency"]
    value: Number
    by: Name | None = None


class Decompose(StatementNode):
    """``decompose SELECTOR [rank = R | rank = auto] [method M] [round N] [progressive K steps]
    [keep if faster] [budget params|flops|latency P]``."""

    verb: Literal["decompose"] = "decompose"
    selector: Selector
    rank: Rank | None = None
    rank_auto: Flag | None = None  # `rank = auto`: the compiler chooses each layer's rank
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
    if s.rank is not None and s.rank_auto is not None:
        second = max((s.rank, s.rank_auto), key=lambda n: n.span.start)
        c.error(
            "S0204",
            f"`{_rank_text(s)}` and `rank = auto` contradict each other",
            second,
            "keep one `rank`: a number fixes it, `auto` lets the compiler choose",
        )
    if s.rank is not None and s.budget is not None:
        c.error(
            "S0204",
            "`rank` and `budget` contradict each other",
            s.budget,
            "a budget chooses the rank of every layer: remove `rank` or `budget`",
        )
    if s.rank_auto is not None and s.budget is not None:
        c.error(
            "S0204",
            "`rank = auto` and `budget` contradict each other",
            s.budget,
            "a budget chooses the rank of every layer: remove `rank = auto` or `budget`",
        )
    if s.rank is None and s.budget is None and s.rank_auto is None:
        c.error(
            "S0204",
            "`decompose` needs a `rank` or a `budget`",
            s,
            "add e.g. `rank = 0.25` or `budget params 50%`",
        )
    _check_search(c, s)
    if not ok:
        return
    if s.rank is not None:
        c.option_implemented(verb, "rank", s.rank, s.rank.kind, format_rank(s.rank))
    if s.rank_auto is not None:
        c.option_implemented(verb, "rank", s.rank_auto, "auto", "rank = auto")
    if s.method is not None:
        c.option_implemented(verb, "method", s.method, s.method.value, f"method {s.method.value}")
    c.option_implemented(verb, "round", s.round)
    c.option_implemented(verb, "progressive", s.progressive)
    c.option_implemented(verb, "keep_if_faster", s.keep_if_faster, shown="keep if faster")
    c.option_implemented(verb, "budget", s.budget)
    by = s.budget.by if s.budget is not None else None
    if by is not None and by.value in LANGUAGE["budget by"]:
        c.option_implemented(verb, "budget by", by, by.value, f"budget ... by {by.value}")


def _rank_text(s: Decompose) -> str:
    return format_rank(s.rank) if s.rank is not None else "rank = auto"


def _searched(s: Decompose) -> Node | None:
    """The option that makes the compiler search ranks on measured latency, if any."""
    if s.rank_auto is not None:
        return s.rank_auto
    if s.budget is not None and s.budget.resource == "latency":
        return s.budget
    return None


def _check_search(c: Checker, s: Decompose) -> None:
    """``rank = auto`` and ``budget latency``: options that do not go with a rank search."""
    node = _searched(s)
    if node is None:
        return
    what = "`rank = auto`" if node is s.rank_auto else "`budget latency`"
    if s.keep_if_faster is not None:
        c.error(
            "S0204",
            f"`keep if faster` does nothing with {what}",
            s.keep_if_faster,
            f"remove `keep if faster`: {what} chooses among measured ranks and keeps a layer "
            "factored only where that is faster",
        )
    if s.progressive is not None:
        c.error(
            "S0204",
            f"{what} and `progressive` do not go together",
            s.progressive,
            "the search chooses the final ranks of one model; build a family with a fixed "
            "`rank`, or remove `progressive`",
        )
    if s.method is not None and s.method.value == "tucker":
        c.error(
            "S0204",
            f"{what} chooses ranks of matrix layers; `method tucker` factors k×k convolutions",
            s.method,
            "use `method svd`, `asvd` or `svd-llm`, or give the convolutions a fixed `rank`",
        )


#: Contracts the ``rank = auto`` search can aim at: a speedup it predicts from measured layer
#: latency, and a drift it predicts from measured sensitivity (a lower bound on speedup, an
#: upper bound on drift).
GOAL_METRICS: dict[str, tuple[str, ...]] = {"speedup": (">", ">="), "drift": ("<", "<=")}


def _is_goal(contract: Node) -> bool:
    metric = getattr(contract, "metric", None)
    op = getattr(contract, "op", None)
    return metric is not None and op in GOAL_METRICS.get(metric.value, ())


def check_goals(c: Checker, s: Decompose, contracts: Iterable[Node]) -> None:
    """The rule between statements for ``rank = auto``: the recipe must say what to aim at.

    ``contracts`` are the recipe's ``expect`` statements; ``rank = auto`` needs one the search
    can predict (``expect speedup >= X`` or ``expect drift <= D``). ``check.py`` calls this
    for every ``decompose`` (a verb's own ``check`` sees one statement only).

    >>> from surgery.check import support
    >>> from surgery.parse import parse
    >>> from surgery.verbs.base import Checker
    >>> recipe = parse("decompose Linear rank = auto")
    >>> c = Checker(support(), {})
    >>> check_goals(c, recipe.statements[0], [])
    >>> c.diags[0].message
    '`rank = auto` has no goal: the recipe has no speedup or drift contract'
    >>> c.diags = []
    >>> check_goals(c, recipe.statements[0], parse("expect speedup >= 1.5").statements)
    >>> c.diags
    []
    """
    if s.rank_auto is None or any(_is_goal(e) for e in contracts):
        return
    c.error(
        "S0204",
        "`rank = auto` has no goal: the recipe has no speedup or drift contract",
        s.rank_auto,
        "add what the ranks must achieve, e.g. `expect speedup >= 1.5`, or cap the layers' "
        "latency instead of `rank = auto`: `budget latency 60%`",
    )


def format(s: Decompose) -> str:
    out = ["decompose", format_selector(s.selector)]
    if s.rank:
        out.append(format_rank(s.rank))
    if s.rank_auto:
        out.append("rank = auto")
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
            "rank": {"fraction", "absolute", "energy", "auto"},
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
