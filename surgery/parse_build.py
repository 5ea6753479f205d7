"""Parsed statements -> AST: :class:`_Build` turns one statement (a Lark tree, or on the fast
path each reduction as it happens) into :mod:`surgery.ast` nodes positioned in the whole source.

Statements are built generically from the one tuple of verbs (:data:`surgery.verbs.VERBS`): a
verb's rule fills ``verb.positional`` in order and its ``opt_<field>`` rules the fields they
name (:class:`_Methods`). Leaves are checked as they are built -- a number that overflows or
would be read as 0, a whole number of more than :data:`MAX_DIGITS` digits, an option given
twice -- and each such error is raised as a :class:`_Fail` carrying its diagnostic. Spans are
computed without pydantic's validation (:func:`_construct_span`), which cost more than the
rest of the node.

>>> from surgery.parse_lark import parser
>>> source = "decompose Linear rank=25%; group kv=2"
>>> tree = parser().parse(source[27:], start="statement")
>>> group = _Build(source, 27).transform(tree)
>>> group.kv.value, (group.span.start, group.span.col)
(2, (27, 28))
"""

from __future__ import annotations

import functools
import math
import re
from bisect import bisect_right
from dataclasses import dataclass
from typing import Any

from lark import Token, Tree

from surgery import ast
from surgery.diagnostics import Diagnostic, LineIndex, clip
from surgery.parse_lark import _keyword_types
from surgery.verbs import BY_KEYWORD, Verb

#: Most digits of a whole number (so every one fits a signed 64-bit integer).
MAX_DIGITS = 18


@dataclass(frozen=True)
class _Opt:
    key: str
    value: Any
    span: ast.Span


class _Fail(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


_NUMBER_RE = re.compile(r"(?P<num>-?[0-9.]+(?:[eE][-+]?[0-9]+)?)(?P<unit>[%KMGx]?)")
_UNIT_SCALE = {"": 1.0, "%": 0.01, "K": 1e3, "M": 1e6, "G": 1e9, "x": 1.0}
# The one statement whose numbers may be ratios to the original model (`1.10x`).
_RATIO_VERBS = frozenset({"expect"})


# Rules whose children are keywords that carry the value (`params`, `add`, ...): kept.
_VALUE_KEYWORD_RULES = frozenset({"field", "metric", "sublayer", "combine", "budget_resource"})


_SPAN_FIELDS = frozenset(ast.Span.model_fields)


def _construct_span(fields: dict[str, int]) -> ast.Span:
    """A :class:`~surgery.ast.Span` from its six (int) fields, as ``Span(**fields)`` builds it
    but without pydantic's validation (``model_construct`` is slower than validating)."""
    span = object.__new__(ast.Span)
    object.__setattr__(span, "__dict__", fields)
    object.__setattr__(span, "__pydantic_fields_set__", set(_SPAN_FIELDS))
    object.__setattr__(span, "__pydantic_extra__", None)
    object.__setattr__(span, "__pydantic_private__", None)
    return span


def _span_constructor() -> Any:
    """:func:`_construct_span` where it builds exactly what pydantic builds, else ``Span``."""
    fields = {"start": 1, "end": 2, "line": 3, "col": 4, "end_line": 5, "end_col": 6}
    made, real = _construct_span(dict(fields)), ast.Span(**fields)
    attrs = ("__dict__", "__pydantic_fields_set__", "__pydantic_extra__", "__pydantic_private__")
    same = all(getattr(made, a, 0) == getattr(real, a, 1) for a in attrs)
    return _construct_span if same and made == real else lambda f: ast.Span(**f)


_new_span = _span_constructor()


class _Tok:
    """A token on the fast path: what the builder reads of a Lark ``Token``."""

    __slots__ = ("end_pos", "start_pos", "type", "value")

    def __init__(self, type_: str, value: str, start: int, end: int) -> None:
        self.type = type_
        self.value = value
        self.start_pos = start
        self.end_pos = end

    def __str__(self) -> str:
        return self.value


class _Methods(dict[str, Any]):
    """Rule name -> bound builder method, looked up once per builder."""

    def __init__(self, build: _Build) -> None:
        super().__init__()
        self.build = build

    def __missing__(self, key: str) -> Any:
        verb = BY_KEYWORD.get(key)
        if verb is not None:  # a statement: its verb's node from the rule's children
            method = functools.partial(self.build.statement, verb)
        elif key.startswith("opt_") and not hasattr(self.build, key):
            method = functools.partial(self.build.option, key.removeprefix("opt_"))
        else:
            method = getattr(self.build, key)
        self[key] = method
        return method


class _Build:
    """Lark tree of one statement -> AST node. Positions are shifted by the statement offset.

    Each rule (or alias) ``r`` of the grammar is built by the method ``r(meta, children)``,
    children first; a verb's rule by :meth:`statement`, an ``opt_<field>`` rule without a
    method of its own by :meth:`option`. The walk is iterative, so no tree is too deep for it
    (nesting is bounded anyway, by :class:`~surgery.parse_lark._Words`, for the AST's own
    recursive consumers); it is not Lark's ``Transformer``, whose per-node wrappers cost more
    than building the node.
    """

    def __init__(self, source: str, offset: int, index: LineIndex | None = None) -> None:
        self.source = source
        self.offset = offset
        self.index = index or LineIndex(source)
        self.methods = _Methods(self)
        # Ratios (`1.1x`) built so far; a statement that takes none refuses those inside it.
        self.ratios: list[ast.Number] = []

    def transform(self, tree: Tree[Token]) -> Any:
        keywords = _keyword_types()
        order: list[Any] = []  # every tree and token, parents before children, right to left
        todo: list[Any] = [tree]
        while todo:
            node = todo.pop()
            order.append(node)
            if isinstance(node, Tree):
                todo.extend(node.children)
        built: list[Any] = []  # results of the finished nodes, left to right
        extent: list[tuple[int, int]] = []  # (start, end) in the chunk of each result
        for node in reversed(order):
            if isinstance(node, Tree):
                first = len(built) - len(node.children)  # every rule has at least one token
                values, spans = built[first:], extent[first:]
                del built[first:], extent[first:]
                pos = (spans[0][0], spans[-1][1])
                if node.data not in _VALUE_KEYWORD_RULES:  # drop this node's own keywords
                    values = [
                        v
                        for raw, v in zip(node.children, values)
                        if not (isinstance(raw, Token) and raw.type in keywords)
                    ]
                built.append(self.methods[node.data](pos, values))
                extent.append(pos)
            else:
                built.append(node)
                extent.append((node.start_pos, node.end_pos))
        return built[0]

    # spans; `meta` is the (start, end) of the node in the statement
    def _span(self, meta: tuple[int, int]) -> ast.Span:
        return self._located(self.offset + meta[0], self.offset + meta[1])

    def _tspan(self, tok: Token | _Tok) -> ast.Span:
        assert tok.start_pos is not None and tok.end_pos is not None
        return self._located(self.offset + tok.start_pos, self.offset + tok.end_pos)

    def _located(self, start: int, end: int) -> ast.Span:
        """``self.index.span(start, end)``, without validating the six integers it computes."""
        index = self.index
        n = len(index.source)
        start = max(0, min(start, n))
        end = max(start, min(end, n))
        starts = index.starts
        line = bisect_right(starts, start)
        end_line = bisect_right(starts, end)
        return _new_span(
            {
                "start": start,
                "end": end,
                "line": line,
                "col": start - starts[line - 1] + 1,
                "end_line": end_line,
                "end_col": end - starts[end_line - 1] + 1,
            }
        )

    def _fail(self, code: str, message: str, span: ast.Span, help: str | None = None) -> _Fail:
        return _Fail(Diagnostic(code=code, message=message, span=span, help=help))

    # keywords that are values, and parentheses
    def _keyword(self, meta: Any, children: list[Token]) -> Token:
        return children[0]

    field = metric = sublayer = combine = budget_resource = _keyword

    def atom(self, meta: Any, children: list[Any]) -> Any:  # `( predicate )`
        return children[0]

    # leaves
    def name(self, meta: Any, children: list[Token]) -> ast.Name:
        return ast.Name(value=str(children[0]), span=self._tspan(children[0]))

    def string(self, meta: Any, children: list[Token]) -> ast.Str:
        raw = str(children[0])[1:-1]
        value = re.sub(r"\\(.)", r"\1", raw)
        return ast.Str(value=value, span=self._tspan(children[0]))

    def number(self, meta: Any, children: list[Token]) -> ast.Number:
        tok = children[0]
        m = _NUMBER_RE.fullmatch(str(tok))
        span = self._tspan(tok)
        if m is None:  # pragma: no cover - the lexer only produces matching text
            raise self._fail("S0105", f"`{clip(tok)}` is not a number", span)
        # float() has no digit limit (only int() has); 1e999 becomes inf, 1e-999 becomes 0.
        value = float(m["num"])
        if not math.isfinite(value * _UNIT_SCALE[m["unit"]]):
            if math.isfinite(value):  # `1e308K`: the number fits, its magnitude does not
                raise self._fail(
                    "S0105",
                    f"`{clip(tok)}` is too large",
                    span,
                    help="numbers with a unit must stay below about 1.8e308 once scaled",
                )
            raise self._fail("S0105", f"`{clip(tok)}` is too large", span)
        if value == 0 and re.search(r"[1-9]", m["num"].partition("e")[0].partition("E")[0]):
            raise self._fail(
                "S0105",
                f"`{clip(tok)}` is too small: it would be read as 0",
                span,
                help="write `0` if zero is meant; the smallest number is about 5e-324",
            )
        number = ast.Number(value=value, unit=m["unit"], span=span)  # type: ignore[arg-type]
        if number.unit == "x":
            self.ratios.append(number)
        return number

    def int(self, meta: Any, children: list[Token]) -> ast.Int:
        tok = children[0]
        text = str(tok)
        span = self._tspan(tok)
        if not re.fullmatch(r"-?[0-9]+", text):
            raise self._fail(
                "S0105",
                f"expected a whole number, found `{clip(text)}`",
                span,
                help="write an integer without a decimal point, unit or exponent",
            )
        # Count the digits before converting: int() refuses strings over 4,300 digits, and no
        # count in a recipe needs more than 18 (they all fit a signed 64-bit integer).
        digits = text.lstrip("-").lstrip("0") or "0"
        if len(digits) > MAX_DIGITS:
            raise self._fail(
                "S0105",
                f"`{clip(text)}` is too large",
                span,
                help=f"a whole number has at most {MAX_DIGITS} digits; this one has {len(digits)}",
            )
        value = int(digits)
        return ast.Int(value=-value if text.startswith("-") else value, span=span)

    # selectors
    def select_type(self, meta: Any, children: list[Any]) -> ast.Selector:
        return ast.Selector(type=children[0], span=self._span(meta))

    def select_type_where(self, meta: Any, children: list[Any]) -> ast.Selector:
        return ast.Selector(type=children[0], where=children[1], span=self._span(meta))

    def select_where(self, meta: Any, children: list[Any]) -> ast.Selector:
        return ast.Selector(where=children[0], span=self._span(meta))

    def or_(self, meta: Any, children: list[Any]) -> Any:
        if len(children) == 1:
            return children[0]
        return ast.Or(items=children, span=self._span(meta))

    def and_(self, meta: Any, children: list[Any]) -> Any:
        if len(children) == 1:
            return children[0]
        return ast.And(items=children, span=self._span(meta))

    def not_(self, meta: Any, children: list[Any]) -> ast.Not:
        return ast.Not(item=children[0], span=self._span(meta))

    def compare(self, meta: Any, children: list[Any]) -> ast.Compare:
        field_tok, op_tok, value = children
        field = ast.Name(value=str(field_tok), span=self._tspan(field_tok))
        return ast.Compare(field=field, op=str(op_tok), value=value, span=self._span(meta))

    def match(self, meta: Any, children: list[Any]) -> ast.Match:
        return ast.Match(pattern=children[0], span=self._span(meta))

    # options
    def _rank(self, meta: Any, kind: str, number: ast.Number) -> ast.Rank:
        return ast.Rank(kind=kind, value=number, span=self._span(meta))  # type: ignore[arg-type]

    def rank_number(self, meta: Any, children: list[Any]) -> ast.Rank:
        number: ast.Number = children[0]
        text = self.source[number.span.start : number.span.end]
        written_as_int = number.unit == "" and text.isdigit()
        return self._rank(meta, "absolute" if written_as_int else "fraction", number)

    def rank_energy(self, meta: Any, children: list[Any]) -> ast.Rank:
        return self._rank(meta, "energy", children[0])

    def _opt(self, key: str, value: Any, meta: Any) -> _Opt:
        return _Opt(key, value, self._span(meta))

    def _value(self, child: Any) -> Any:
        """A child as a field value: a keyword that is a value (``attention``) or a name
        becomes a :class:`~surgery.ast.Name`, a comparison its operator text."""
        if isinstance(child, Token | _Tok):
            if child.type == "CMP":
                return str(child)
            return ast.Name(value=str(child), span=self._tspan(child))
        return child

    def option(self, key: str, meta: Any, children: list[Any]) -> list[_Opt]:
        """``opt_<key>``: the option's value (none: a flag; several: a list), followed by the
        options nested in it (``subset 10% by importance``)."""
        nested = [o for c in children if isinstance(c, list) for o in c]
        values = [self._value(c) for c in children if not isinstance(c, list)]
        if key == "indices":
            value: Any = values
        elif not values:
            value = ast.Flag(span=self._span(meta))
        else:
            (value,) = values
        return [self._opt(key, value, meta), *nested]

    def opt_rank(self, meta: Any, children: list[Any]) -> list[_Opt]:
        rank: ast.Rank = children[0]
        return [self._opt("rank", rank.model_copy(update={"span": self._span(meta)}), meta)]

    def opt_budget(self, meta: Any, children: list[Any]) -> list[_Opt]:
        resource, value, *by = children
        budget = ast.Budget(
            resource=str(resource),  # type: ignore[arg-type]
            value=value,
            by=by[0] if by else None,
            span=self._span(meta),
        )
        return [self._opt("budget", budget, meta)]

    def budget_by(self, meta: Any, children: list[Any]) -> ast.Name:
        name: ast.Name = children[0]
        return name

    def mode_exact(self, meta: Any, children: list[Any]) -> ast.Name:
        return ast.Name(value="exact", span=self._span(meta))

    def mode_2plus1d(self, meta: Any, children: list[Any]) -> ast.Name:
        return ast.Name(value="(2+1)d", span=self._span(meta))

    def _options(self, verb: str, items: list[list[_Opt]]) -> dict[str, Any]:
        flat = [opt for item in items for opt in item]
        seen: dict[str, _Opt] = {}
        for opt in flat:
            if opt.key in seen:
                raise self._fail(
                    "S0106",
                    f"option `{opt.key}` given twice in `{verb}`",
                    opt.span,
                    help=f"keep one `{opt.key}`",
                )
            seen[opt.key] = opt
        return {key: opt.value for key, opt in seen.items()}

    def statement(self, verb: Verb, meta: Any, children: list[Any]) -> Any:
        """A verb's statement: the rule's value children fill ``verb.positional`` in order,
        its options the fields they name."""
        span = self._span(meta)
        if self.ratios:
            ratios = [r for r in self.ratios if r.span.start >= span.start]
            self.ratios.clear()  # the rest belong to a statement abandoned by the fast path
            if ratios and verb.keyword not in _RATIO_VERBS:
                raise self._fail(
                    "S0105",
                    f"`{clip(self.source[ratios[0].span.start : ratios[0].span.end])}` is a "
                    f"ratio, which `{verb.keyword}` does not take",
                    ratios[0].span,
                    help="a ratio to the original model (`1.10x`) only goes in an `expect` "
                    "contract; write a plain number here",
                )
        options = [c for c in children if isinstance(c, list)]
        values = [self._value(c) for c in children if not isinstance(c, list)]
        assert len(values) <= len(verb.positional), (verb.keyword, values)
        fields = dict(zip(verb.positional, values, strict=False))
        fields.update(self._options(verb.keyword, options))
        return verb.node(span=span, **fields)
