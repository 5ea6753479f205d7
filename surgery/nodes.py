"""The node types every verb's statement is built from: spans, leaves, selectors and ranks.

Frozen pydantic models, every node with a source span. The statements themselves live each in
its verb's module (``surgery/verbs/<verb>.py``); :mod:`surgery.ast` gathers all of them.

>>> Number(value=25.0, unit="%", span=Span(start=0, end=3, line=1, col=1, end_line=1,
...        end_col=4)).magnitude
0.25
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "And",
    "Compare",
    "Flag",
    "Int",
    "Match",
    "Name",
    "Node",
    "Not",
    "Number",
    "Or",
    "Predicate",
    "Rank",
    "Selector",
    "Span",
    "StatementNode",
    "Str",
]


class Span(BaseModel):
    """Half-open character range ``[start, end)`` of the source, with 1-based line/column."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start: int
    end: int
    line: int
    col: int
    end_line: int
    end_col: int


class Node(BaseModel):
    """Base of every AST node."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    span: Span


# --- leaves ----------------------------------------------------------------------------


class Name(Node):
    """An identifier as written: a module type, backend, method, strategy..."""

    value: str


class Str(Node):
    """A double-quoted string literal (value without quotes, escapes resolved)."""

    value: str


class Int(Node):
    value: int


class Number(Node):
    """A number as written: ``0.25``, ``25%``, ``1M``, ``3e-4``, ``1.10x``.

    ``value`` is the written number and ``unit`` its suffix; :attr:`magnitude` applies it
    (``25%`` → 0.25, ``1M`` → 1e6). ``x`` marks a ratio to the original model's value
    (``expect perplexity <= 1.10x``); the parser accepts it only in ``expect``, and its
    magnitude is the number itself.
    """

    value: float
    unit: Literal["", "%", "K", "M", "G", "x"] = ""

    @property
    def magnitude(self) -> float:
        scale = {"": 1.0, "%": 0.01, "K": 1e3, "M": 1e6, "G": 1e9, "x": 1.0}[self.unit]
        return self.value * scale


class Flag(Node):
    """A bare keyword option that is either there or not (e.g. ``keep if faster``)."""


# --- selectors -------------------------------------------------------------------------


class Compare(Node):
    """``FIELD OP VALUE`` over a measured fact of a module, e.g. ``params > 1M``."""

    kind: Literal["compare"] = "compare"
    field: Name
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Number


class Match(Node):
    """``name ~ "glob"``: the module path matches a shell-style glob."""

    kind: Literal["match"] = "match"
    pattern: Str


class And(Node):
    kind: Literal["and"] = "and"
    items: list[Predicate]


class Or(Node):
    kind: Literal["or"] = "or"
    items: list[Predicate]


class Not(Node):
    kind: Literal["not"] = "not"
    item: Predicate


Predicate = Annotated[Union[Compare, Match, And, Or, Not], Field(discriminator="kind")]  # noqa: UP007


class Selector(Node):
    """Which modules a statement applies to: a type and/or a ``where`` predicate."""

    type: Name | None = None
    where: Predicate | None = None


# --- options ---------------------------------------------------------------------------


class Rank(Node):
    """``rank = 0.25`` (fraction of full rank), ``rank = 128`` (absolute), ``rank = energy 0.9``.

    A number written with a decimal point or ``%`` is a fraction; an integer is absolute.
    """

    kind: Literal["fraction", "absolute", "energy"]
    value: Number


class StatementNode(Node):
    """Base of every statement: ``verb`` is its keyword (each verb narrows it to a literal,
    which tells pydantic which statement a JSON object is)."""

    verb: str


for _model in (And, Or, Not, Selector):
    _model.model_rebuild()
