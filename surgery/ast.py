"""The typed AST of a `.surg` recipe: frozen pydantic models, every node with a source span.

The AST is plain data. It round-trips through JSON (``Recipe.model_validate_json``) and its
JSON schema (``recipe_json_schema()``) is shipped for editors.

>>> from surgery.parse import parse
>>> recipe = parse("group kv = 2")
>>> recipe.statements[0].kv.value
2
>>> Recipe.model_validate_json(recipe.model_dump_json()) == recipe
True
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "And",
    "Budget",
    "Calibrate",
    "Compare",
    "Decompose",
    "Drop",
    "Expect",
    "Factorize",
    "Flag",
    "Freeze",
    "Group",
    "Heal",
    "Int",
    "Match",
    "Name",
    "Node",
    "Not",
    "Number",
    "Or",
    "Predicate",
    "Rank",
    "Recipe",
    "Regularize",
    "Selector",
    "SkipTokens",
    "Span",
    "Sparsify",
    "Split",
    "Statement",
    "Str",
    "Target",
    "Truncate",
    "recipe_json_schema",
    "strip_spans",
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
    """A number as written: ``0.25``, ``25%``, ``1M``, ``3e-4``.

    ``value`` is the written number and ``unit`` its suffix; :attr:`magnitude` applies it
    (``25%`` → 0.25, ``1M`` → 1e6).
    """

    value: float
    unit: Literal["", "%", "K", "M", "G"] = ""

    @property
    def magnitude(self) -> float:
        scale = {"": 1.0, "%": 0.01, "K": 1e3, "M": 1e6, "G": 1e9}[self.unit]
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


class Budget(Node):
    """``budget params 50% [by sensitivity]``: a global budget shared by all layers the
    selector matches; ``by`` names how layers are weighed against each other (default: their
    spectra alone)."""

    resource: Literal["params", "flops"]
    value: Number
    by: Name | None = None


# --- statements ------------------------------------------------------------------------


class Target(Node):
    """``target tvm llvm [trials 64]``: where to lower and measure."""

    verb: Literal["target"] = "target"
    backend: Name
    device: Name | None = None
    trials: Int | None = None


class Calibrate(Node):
    """``calibrate with "calib.pt" [samples 128] [batch 8]``."""

    verb: Literal["calibrate"] = "calibrate"
    source: Str
    samples: Int | None = None
    batch: Int | None = None


class Decompose(Node):
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


class Group(Node):
    """``group kv = G`` (GQA/MQA) or ``group q = Gq kv = Gkv`` (GQKVA)."""

    verb: Literal["group"] = "group"
    q: Int | None = None
    kv: Int


class SkipTokens(Node):
    """``skip tokens 55% after block 3 [until block 9]`` (SkipViT)."""

    verb: Literal["skip"] = "skip"
    ratio: Number
    after: Int
    until: Int | None = None


class Split(Node):
    """``split Conv3d exact`` or ``split Conv3d (2+1)d [add|cat] [rank = R]``."""

    verb: Literal["split"] = "split"
    selector: Selector
    mode: Name  # "exact" | "(2+1)d"
    combine: Name | None = None  # "add" | "cat"
    rank: Rank | None = None


class Sparsify(Node):
    """``sparsify SELECTOR N:M`` (semi-structured sparsity, e.g. 2:4)."""

    verb: Literal["sparsify"] = "sparsify"
    selector: Selector
    n: Int
    m: Int


class Factorize(Node):
    """``factorize SELECTOR dense-sparse basis B nonzeros K`` (DSFormer)."""

    verb: Literal["factorize"] = "factorize"
    selector: Selector
    method: Name
    basis: Int
    nonzeros: Int


class Regularize(Node):
    """``regularize nuclear 3e-4 [every M steps]`` (trained rank pruning, while healing)."""

    verb: Literal["regularize"] = "regularize"
    method: Name
    strength: Number
    every: Int | None = None


class Drop(Node):
    """``drop attention|mlp N [by similarity]``: replace the least useful sublayers by identity."""

    verb: Literal["drop"] = "drop"
    sublayer: Name
    count: Int
    by: Name | None = None


class Truncate(Node):
    """``truncate blocks keep K uniform|pseudo-uniform`` or ``... keep K [i, j, ...]``."""

    verb: Literal["truncate"] = "truncate"
    keep: Int
    strategy: Name | None = None
    indices: list[Int] | None = None


class Freeze(Node):
    """``freeze first-factor|core|alternate`` (sequential freezing while healing)."""

    verb: Literal["freeze"] = "freeze"
    what: Name


class Heal(Node):
    """``heal steps N [lr X] [distill from original] [subset P [by importance]] [every M steps]``."""

    verb: Literal["heal"] = "heal"
    steps: Int
    lr: Number | None = None
    distill: Flag | None = None
    subset: Number | None = None
    by: Name | None = None
    every: Int | None = None


class Expect(Node):
    """``expect params|flops|drift|speedup OP VALUE [on BACKEND]``: a contract on the result."""

    verb: Literal["expect"] = "expect"
    metric: Name
    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: Number
    on: Name | None = None


Statement = Annotated[
    Union[  # noqa: UP007
        Target,
        Calibrate,
        Decompose,
        Group,
        SkipTokens,
        Split,
        Sparsify,
        Factorize,
        Regularize,
        Drop,
        Truncate,
        Freeze,
        Heal,
        Expect,
    ],
    Field(discriminator="verb"),
]


class Recipe(Node):
    """A whole recipe: its statements in source order."""

    statements: list[Statement]


for _model in (And, Or, Not, Selector, Recipe):
    _model.model_rebuild()


def strip_spans(node: BaseModel | Any) -> Any:
    """The node as plain data without spans: equal for ASTs that mean the same.

    >>> from surgery.parse import parse
    >>> strip_spans(parse("group kv=2")) == strip_spans(parse("  group   kv = 2 # GQA"))
    True
    """

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "span"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = node.model_dump() if isinstance(node, BaseModel) else node
    return clean(data)


def recipe_json_schema() -> dict[str, Any]:
    """JSON schema of :class:`Recipe` (shipped as ``surgery/schema/recipe.schema.json``)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery recipe AST"
    return schema
