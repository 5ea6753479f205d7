"""``factorize SELECTOR dense-sparse basis B nonzeros K``: dense × sparse factors (DSFormer).

>>> from surgery.parse import parse
>>> format(parse("factorize Linear dense-sparse basis 64 nonzeros 8").statements[0])
'factorize Linear dense-sparse basis 64 nonzeros 8'
"""

from __future__ import annotations

from typing import Literal

from surgery.nodes import Int, Name, Selector, StatementNode
from surgery.verbs.base import Checker, Verb, VerbSupport, format_selector

__all__ = ["VERB", "Factorize"]

LANGUAGE: dict[str, tuple[str, ...]] = {"type": ("Linear",), "method": ("dense-sparse",)}


class Factorize(StatementNode):
    """``factorize SELECTOR dense-sparse basis B nonzeros K`` (DSFormer)."""

    verb: Literal["factorize"] = "factorize"
    selector: Selector
    method: Name
    basis: Int
    nonzeros: Int


def check(c: Checker, s: Factorize) -> None:
    c.implemented("factorize", s)
    c.selector("factorize", s.selector)
    c.name_in(s.method, LANGUAGE["method"], "factorization")
    c.count(s.basis, "`basis`", "basis")
    c.positive(s.nonzeros, "`nonzeros`")
    if s.nonzeros.value > s.basis.value > 0:
        c.error(
            "S0203",
            f"`nonzeros {s.nonzeros.value}` exceeds `basis {s.basis.value}`",
            s.nonzeros,
            f"use at most {s.basis.value} non-zeros",
        )


def format(s: Factorize) -> str:
    return " ".join(
        [
            "factorize",
            format_selector(s.selector),
            s.method.value,
            f"basis {s.basis.value}",
            f"nonzeros {s.nonzeros.value}",
        ]
    )


VERB = Verb(
    keyword="factorize",
    node=Factorize,
    positional=("selector", "method", "basis", "nonzeros"),
    check=check,
    format=format,
    support=VerbSupport(
        {"method": set(LANGUAGE["method"]), "basis": None, "nonzeros": None}, ("Linear",)
    ),
    language=LANGUAGE,
    pass_path="surgery.passes.factorize:FactorizePass",
)
