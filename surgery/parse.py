"""Parse `.surg` source into a :class:`surgery.ast.Recipe`, reporting every syntax error.

The recipe is cut into statements at top-level newlines and ``;`` (outside strings and
comments), and each statement is parsed on its own by the LALR parser built from
``grammar/surg.lark``, so one bad statement does not hide the errors of the next. Lark's
errors become located :class:`~surgery.diagnostics.Diagnostic` objects that name what was
expected and suggest the nearest keyword.

Everything here is linear in the size of the source: positions become lines and columns through
one :class:`~surgery.diagnostics.LineIndex`, nesting is bounded (``MAX_NESTING``) before any
recursive code sees it, and numbers are read without Python's int-string digit limit.

>>> recipe = parse("decompose Linear where params>1M rank=0.25 progressive 4 steps; group kv=2")
>>> [s.verb for s in recipe.statements]
['decompose', 'group']
>>> recipe.statements[0].rank.kind, recipe.statements[0].rank.value.magnitude
('fraction', 0.25)
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)
from lark.lark import PostLex
from lark.lexer import PatternStr

from surgery import ast
from surgery.diagnostics import (
    Diagnostic,
    DiagnosticError,
    LineIndex,
    clip,
    collector_paused,
    line_index,
    nearest,
    span_of,
)
from surgery.verbs import BY_KEYWORD, Verb

__all__ = [
    "MAX_DIGITS",
    "MAX_NESTING",
    "VERBS",
    "grammar_text",
    "parse",
    "parse_statements",
    "parser",
]

#: Deepest nesting of parentheses and ``not`` in a selector. Real selectors nest two or three
#: levels; the bound keeps every recursive consumer of the AST (checker, formatter, pydantic's
#: validation and JSON serialisation, which give up between 120 and 200 levels) far from its
#: limit.
MAX_NESTING = 64

#: Most digits of a whole number (so every one fits a signed 64-bit integer).
MAX_DIGITS = 18

#: Every statement keyword (from the one tuple of verbs, :data:`surgery.verbs.VERBS`).
VERBS = tuple(BY_KEYWORD)

# How value terminals are described in messages.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "STRING": 'a quoted string like "calib.pt"',
    "NUMBER": "a number",
    "_SEP": "the end of the statement",
    "$END": "the end of the statement",
    "CMP": "a comparison (`>`, `>=`, `<`, `<=`, `==`, `!=`)",
}


def grammar_text() -> str:
    """The text of the shipped grammar ``surg.lark``."""
    return resources.files("surgery.grammar").joinpath("surg.lark").read_text(encoding="utf-8")


class _LexProblem(Exception):
    """Raised by :class:`_Words` on tokens the parser must never see (positions in the chunk)."""

    def __init__(self, kind: str, first: Token, second: Token) -> None:
        super().__init__(kind)
        self.kind = kind  # "glued" or "nesting"
        self.first = first
        self.second = second


_VALUE_TERMINALS = frozenset({"NAME", "NUMBER", "STRING", "CMP"})


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class _Nesting:
    """How deep a selector nests, a word at a time: each `(` and each `not` awaiting its
    operand is one level. Shared by Lark's post-lexer and the fast path, so both bound it alike.
    """

    __slots__ = ("depth", "nots")

    def __init__(self) -> None:
        self.nots = [0]  # per open parenthesis (and the top level): `not`s awaiting their operand
        self.depth = 0

    def too_deep(self, word: str) -> bool:
        """Account for ``word`` (a keyword or punctuation); True past :data:`MAX_NESTING`."""
        nots = self.nots
        if word == "(" or word == "not":
            if word == "(":
                nots.append(0)
            else:
                nots[-1] += 1
            self.depth += 1
            return self.depth > MAX_NESTING
        if word == ")" and len(nots) > 1:  # the group is the operand of pending `not`s
            self.depth -= 1 + nots.pop() + nots[-1]
            nots[-1] = 0
        elif word == "and" or word == "or":
            self.depth -= nots[-1]
            nots[-1] = 0
        return False


class _Words(PostLex):
    """Between lexer and parser: words stay whole, and nesting stays bounded.

    ``always_accept`` makes the contextual lexer read a NAME in every state, so a keyword glued
    to the next word (``decomposeLinear``) is lexed as the one word it is and then reported,
    instead of silently splitting into ``decompose Linear``: Lark turns a NAME into a keyword
    only when the whole word equals it. What the lexer cannot see is checked here: a token
    ending in a letter or digit directly followed by one starting with a letter or digit
    (``rank = 0.5method``) is two words run together.

    Nesting (open parentheses plus pending ``not``) is counted as tokens arrive, so a selector
    nested deeper than :data:`MAX_NESTING` stops the parse before the tree is built.
    """

    always_accept = ("NAME",)

    def process(self, stream: Iterator[Token]) -> Iterator[Token]:
        prev: Token | None = None
        nesting = _Nesting()
        for tok in stream:
            if (
                prev is not None
                and prev.end_pos == tok.start_pos
                and _is_word_char(prev.value[-1:])
                and _is_word_char(tok.value[:1])
            ):
                raise _LexProblem("glued", prev, tok)
            if tok.type not in _VALUE_TERMINALS and nesting.too_deep(tok.value):
                raise _LexProblem("nesting", tok, tok)
            prev = tok
            yield tok


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser (built once).

    Trees keep every token (``keep_all_tokens``) and carry no positions: :class:`_Build` takes
    each node's extent from its first and last token and drops the keywords itself. Lark's
    ``propagate_positions`` does the same per reduction in generic code and cost a third of
    the parse.
    """
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        postlex=_Words(),
        keep_all_tokens=True,
        start=["start", "statement"],
        maybe_placeholders=False,
    )


@functools.lru_cache(maxsize=1)
def _keyword_types() -> frozenset[str]:
    """Terminals that are literal keywords or punctuation: dropped from a node's children."""
    return frozenset(t.name for t in parser().terminals if isinstance(t.pattern, PatternStr))


@functools.lru_cache(maxsize=1)
def _terminal_literals() -> dict[str, list[str]]:
    """Terminal name -> the keywords it stands for (for messages and suggestions)."""
    result: dict[str, list[str]] = {}
    for term in parser().terminals:
        pattern = term.pattern
        if isinstance(pattern, PatternStr):
            result[term.name] = [pattern.value]
        elif re.fullmatch(r"\(\?:[a-z_|]+\)", pattern.value):
            result[term.name] = pattern.value[3:-1].split("|")
    return result


# --- cutting the source into statements ------------------------------------------------


_OUTSIDE = re.compile(r'["#\\;\n]')  # what can end a statement or start a string/comment
_INSIDE = re.compile(r'["\\\n]')  # what can end a string


def _statement_ranges(source: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each statement: split at newlines and ``;`` outside strings/comments.

    The scan jumps between the few characters that matter (a regex search), so plain text
    costs no Python-level work per character.
    """
    ranges: list[tuple[int, int]] = []
    # A byte-order mark at the very start is not part of the recipe (Python ignores it too).
    start = i = 1 if source.startswith("\ufeff") else 0
    n = len(source)
    while True:
        m = _OUTSIDE.search(source, i)
        if m is None:
            break
        i = m.start()
        c = source[i]
        if c == '"':
            i += 1
            while True:  # to the closing quote; `\x` escapes any character but a newline
                m = _INSIDE.search(source, i)
                if m is None:
                    i = n
                    break
                i = m.start()
                if source[i] == "\\":
                    i += 2 if i + 1 < n and source[i + 1] != "\n" else 1
                    continue
                if source[i] == "\n":  # an unterminated string ends with its line
                    ranges.append((start, i))
                    start = i + 1
                i += 1
                break
        elif c == "#":
            i = source.find("\n", i)
            if i < 0:
                break
        elif c == "\\":  # a line continuation, or a stray backslash
            if source.startswith("\n", i + 1):
                i += 2
            elif source.startswith("\r\n", i + 1):
                i += 3
            else:
                i += 1
        else:  # `;` or a newline
            ranges.append((start, i))
            start = i = i + 1
    ranges.append((start, n))
    return [(s, e) for s, e in ranges if _has_code(source[s:e])]


# What the grammar ignores between tokens (`%ignore` in surg.lark) plus the newline. Not `\s`:
# that would also skip U+2028, U+00A0 and friends, which the grammar rejects.
_BLANK = r"(?:#[^\n]*|\\\r?\n|[ \t\f\r\n])"
_BLANK_RE = re.compile(_BLANK + "+")


def _has_code(text: str) -> bool:
    return _BLANK_RE.fullmatch(text) is None and text != ""


# --- building the AST ------------------------------------------------------------------


@dataclass(frozen=True)
class _Opt:
    key: str
    value: Any
    span: ast.Span


class _Fail(Exception):
    def __init__(self, diagnostic: Diagnostic) -> None:
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic


_NUMBER_RE = re.compile(r"(?P<num>-?[0-9.]+(?:[eE][-+]?[0-9]+)?)(?P<unit>[%KMG]?)")
_UNIT_SCALE = {"": 1.0, "%": 0.01, "K": 1e3, "M": 1e6, "G": 1e9}


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
    method of its own by :meth:`option`. The walk is iterative, so no tree is too deep for it (nesting is bounded
    anyway, by :class:`_Words`, for the AST's own recursive consumers); it is not Lark's
    ``Transformer``, whose per-node wrappers cost more than building the node.
    """

    def __init__(self, source: str, offset: int, index: LineIndex | None = None) -> None:
        self.source = source
        self.offset = offset
        self.index = index or LineIndex(source)
        self.methods = _Methods(self)

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
        return ast.Number(value=value, unit=m["unit"], span=span)  # type: ignore[arg-type]

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
        options = [c for c in children if isinstance(c, list)]
        values = [self._value(c) for c in children if not isinstance(c, list)]
        assert len(values) <= len(verb.positional), (verb.keyword, values)
        fields = dict(zip(verb.positional, values, strict=False))
        fields.update(self._options(verb.keyword, options))
        return verb.node(span=self._span(meta), **fields)


# --- syntax errors -> diagnostics ------------------------------------------------------

_WORD_RE = re.compile(r"[^\W\d]\w*(?:-\w+)*|-?[0-9][0-9A-Za-z.%+-]*|\S|.", re.S)


def _describe_char(c: str) -> str:
    """``U+2028 (LINE SEPARATOR)``: a character that cannot be shown as itself."""
    name = unicodedata.name(c, "")
    if not name and unicodedata.category(c) == "Cc":
        name = "a control character"
    return f"U+{ord(c):04X}" + (f" ({name})" if name else "")


def _is_invisible(c: str) -> bool:
    """A character a terminal shows as nothing, as blank, or as a cursor movement."""
    return c != " " and unicodedata.category(c)[0] in "CZ"


def _describe_expected(expected: set[str]) -> tuple[list[str], list[str]]:
    """(keywords, value descriptions) that were acceptable where the error happened."""
    literals = _terminal_literals()
    keywords: list[str] = []
    values: list[str] = []
    for name in sorted(expected):
        if name in _TERMINAL_WORDS:
            values.append(_TERMINAL_WORDS[name])
        elif name in literals:
            keywords.extend(literals[name])
    return sorted(set(keywords)), sorted(set(values))


def _syntax_diagnostic(
    err: UnexpectedInput, source: str, start: int, end: int, index: LineIndex
) -> Diagnostic:
    text = source[start:end]
    verb_match = re.match(r"\s*([^\W\d][\w-]*)", text)
    verb = verb_match.group(1) if verb_match else ""
    first_word_pos = start + (verb_match.start(1) if verb_match else 0)

    if isinstance(err, UnexpectedCharacters):
        pos = start + (err.pos_in_stream or 0)
        expected = set(err.allowed or ())
    elif isinstance(err, UnexpectedToken):
        tok = err.token
        at_end = tok.type == "$END"
        pos = end if at_end else start + (tok.start_pos or 0)
        expected = set(err.expected)
    elif isinstance(err, UnexpectedEOF):
        pos = end
        expected = set(err.expected)
    else:  # pragma: no cover - lark raises only the three above
        pos = start
        expected = set()

    # What the parser accepts after the text before the error is exact; the lexer's own
    # list (UnexpectedCharacters) mixes in terminals of other statements.
    accepted, last_token = _lex_prefix(source[start:pos])
    if accepted is not None:
        expected = set(accepted)
    complete = "$END" in expected

    # The lexer skips only what the grammar ignores, so an error before the end of the chunk
    # is never at its end; at the end, point just after the last token (not at a comment).
    at_end = pos >= end
    if last_token is not None and last_token.end_pos is not None:
        last = start + last_token.end_pos
    else:
        last = start + len(text.rstrip(" \t\f\r\n"))
    keywords, values = _describe_expected(expected)
    word_match = _WORD_RE.match(source, pos) if not at_end else None
    word = word_match.group(0) if word_match else ""

    if pos == first_word_pos and verb:
        if verb in VERBS:  # pragma: no cover - a known verb is never unexpected first
            pass
        guess = nearest(verb, VERBS)
        return Diagnostic(
            code="S0101",
            message=f"unknown statement `{clip(verb)}`",
            span=index.span(pos, pos + len(verb)),
            help=f"did you mean `{guess}`?"
            if guess
            else "a statement starts with one of: " + ", ".join(f"`{v}`" for v in VERBS),
        )

    if at_end:
        after = str(last_token) if last_token is not None else verb
        wanted = [f"`{k}`" for k in keywords] + values
        wanted = [w for w in wanted if w != "the end of the statement"]
        return Diagnostic(
            code="S0104",
            message=f"incomplete `{clip(verb)}` statement",
            span=index.span(max(start, last - len(after)), last),
            help=f"expected {_one_of(wanted)} after `{clip(after)}`" if wanted else None,
        )

    span = index.span(pos, pos + max(1, len(word)))
    if len(word) == 1 and _is_invisible(word):
        return Diagnostic(
            code="S0103",
            message=f"unexpected character {_describe_char(word)}",
            span=span,
            help="delete it (your editor may not show it); words are separated by spaces or tabs",
        )
    verb = clip(verb)
    word = clip(word)
    if word.startswith('"') or (word == '"'):
        return Diagnostic(
            code="S0107",
            message="unterminated string"
            if source.count('"', pos, end) % 2
            else "unexpected string",
            span=index.span(pos, end if source.count('"', pos, end) % 2 else pos + 1),
            help='close the string with `"` on the same line'
            if source.count('"', pos, end) % 2
            else f"expected {_one_of([f'`{k}`' for k in keywords] + values)}",
        )
    is_word = bool(re.match(r"[^\W\d]", word))
    guess = nearest(word, keywords) if is_word and keywords else None
    if complete and guess is None:
        options = [f"`{k}`" for k in keywords]
        return Diagnostic(
            code="S0103",
            message=f"unexpected `{word}` after a complete `{verb}` statement",
            span=span,
            help="separate statements with a newline or `;`",
            notes=(f"`{verb}` can continue with {_one_of(options)}",) if options else (),
        )
    all_keywords = {k for words in _terminal_literals().values() for k in words}
    if is_word and keywords and (guess is not None or word not in all_keywords):
        listed = _one_of([f"`{k}`" for k in keywords] + values)
        return Diagnostic(
            code="S0102",
            message=f"unknown word `{word}` in `{verb}` statement",
            span=span,
            help=f"did you mean `{guess}`?" if guess else f"expected {listed}",
            notes=(f"expected {listed}",) if guess else (),
        )
    wanted = [f"`{k}`" for k in keywords] + values
    return Diagnostic(
        code="S0103",
        message=f"expected {_one_of(wanted)}, found `{word}`",
        span=span,
        help=None,
    )


# Terminals accepted by a parser state stack. Lark's `accepts()` tries every terminal on a copy
# of the parser; the answer depends on the stack alone, and a recipe with many errors meets the
# same few stacks again and again.
_ACCEPTS: dict[tuple[int, ...], frozenset[str]] = {}


def _lex_prefix(prefix: str) -> tuple[frozenset[str] | None, Token | None]:
    """Terminals the statement parser accepts after ``prefix`` and the last token of
    ``prefix`` (comments and blanks skipped); None for what it cannot tell."""
    try:
        interactive = parser().parse_interactive(prefix, start="statement")
        tokens = interactive.exhaust_lexer()
        last = tokens[-1] if tokens else None
        key = tuple(interactive.parser_state.state_stack)
        accepted = _ACCEPTS.get(key)
        if accepted is None:
            accepted = frozenset(interactive.accepts())
            if len(_ACCEPTS) < 4096:
                _ACCEPTS[key] = accepted
        return accepted, last
    except (UnexpectedInput, _LexProblem):
        return None, None


def _lex_diagnostic(problem: _LexProblem, start: int, index: LineIndex) -> Diagnostic:
    first, second = problem.first, problem.second
    assert first.start_pos is not None and second.start_pos is not None
    assert first.end_pos is not None and second.end_pos is not None
    if problem.kind == "glued":
        return Diagnostic(
            code="S0109",
            message=f"missing space between `{clip(first)}` and `{clip(second)}`",
            span=index.span(start + first.start_pos, start + second.end_pos),
            help=f"write `{clip(first)} {clip(second)}`",
        )
    return Diagnostic(
        code="S0108",
        message=f"selector nested more than {MAX_NESTING} levels deep",
        span=index.span(start + second.start_pos, start + second.end_pos),
        help="remove redundant parentheses and double `not`s, or split the statement in two",
    )


def _one_of(items: list[str]) -> str:
    items = [i for i in items if i]
    if not items:
        return "something else"
    if len(items) == 1:
        return items[0]
    return "one of " + ", ".join(items[:-1]) + " or " + items[-1]


# --- the fast path ---------------------------------------------------------------------
#
# Lark's parser spends most of its time per token in generic code (a lexer thread, a
# post-lexer generator, ``Token`` objects, ``feed_token``, a ``Tree`` per reduction) and
# :class:`_Build` walks the finished tree once more. For a statement that parses, the loop
# below does the same work from Lark's own tables -- the per-state scanners of the contextual
# lexer (with their keyword callbacks) and the LALR action table -- and calls the builder at
# each reduction, with the children Lark's tree builder would have given the node. Anything
# unusual (a character no terminal matches, a syntax error, glued words, deep nesting, a
# builder error) abandons it, and the statement is parsed again by :meth:`Lark.parse` and
# :class:`_Build`, which produce the diagnostic exactly as before.


class _Fallback(Exception):
    """The fast path cannot handle this statement: parse it the ordinary way."""


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


# Per parser state: (scanner regex, ignored terminal types, keyword map for NAME-like types).
_Scanner = tuple[Any, frozenset[str], dict[str, dict[str, str]]]
# Per rule: (length of the expansion, (index, splice) of kept children or None, expand a
# single child, name of the node (alias or rule), node is spliced into its parent, keep
# keyword tokens, the origin's name).
_RuleInfo = tuple[int, Any, bool, str, bool, bool, str]


@dataclass(frozen=True)
class _Tables:
    scanners: dict[int, _Scanner]
    actions: dict[int, dict[str, tuple[bool, Any]]]
    rules: dict[Any, _RuleInfo]
    start: int
    end: int
    keywords: frozenset[str]


@functools.lru_cache(maxsize=1)
def _tables() -> _Tables | None:
    """Lark's lexer and parser tables, in the shape the fast path reads; None where the parser
    uses a feature the fast path does not reproduce (then every statement takes Lark's path)."""
    from lark.lexer import ContextualLexer, UnlessCallback
    from lark.parsers.lalr_analysis import Shift

    lark = parser()
    try:
        contextual = lark.parser.lexer.lexer  # type: ignore[union-attr]
        table = lark.parser.parser.parser.parse_table  # type: ignore[union-attr]
    except AttributeError:  # pragma: no cover - another Lark layout
        return None
    if not isinstance(contextual, ContextualLexer) or lark.parser.lexer_conf.callbacks:
        return None  # pragma: no cover
    scanners: dict[int, _Scanner] = {}
    built: dict[int, _Scanner] = {}
    for state, basic in contextual.lexers.items():
        if id(basic) not in built:
            scanner = basic.scanner  # type: ignore[attr-defined]
            if len(scanner._mres) != 1 or basic.g_regex_flags:  # type: ignore[attr-defined]
                return None  # pragma: no cover
            unless: dict[str, dict[str, str]] = {}
            for type_, callback in basic.callback.items():  # type: ignore[attr-defined]
                if not isinstance(callback, UnlessCallback):
                    return None  # pragma: no cover
                words = {}
                for term in callback.scanner.terminals:
                    if not isinstance(term.pattern, PatternStr) or term.pattern.flags:
                        return None  # pragma: no cover
                    words[term.pattern.value] = term.name
                unless[type_] = words
            built[id(basic)] = (scanner._mres[0], frozenset(basic.ignore_types), unless)  # type: ignore[attr-defined]
        scanners[state] = built[id(basic)]
    actions = {
        # Lark's keys are Tokens, whose __eq__ is Python code: plain strings hash alike
        state: {str(name): (action is Shift, arg) for name, (action, arg) in row.items()}
        for state, row in table.states.items()
    }
    rules: dict[Any, _RuleInfo] = {}
    for rule in lark.rules:
        options = rule.options
        if options.template_source is not None or options.empty_indices:
            return None  # pragma: no cover
        include = [
            (i, not sym.is_term and sym.name.startswith("_"))
            for i, sym in enumerate(rule.expansion)
        ]
        if not options.keep_all_tokens:  # pragma: no cover - the parser keeps every token
            return None
        data = rule.alias or rule.origin.name
        rules[rule] = (
            len(rule.expansion),
            include if any(splice for _, splice in include) else None,
            bool(options.expand1 and not rule.alias),
            data,
            data.startswith("_"),
            data in _VALUE_KEYWORD_RULES,
            str(rule.origin.name),
        )
    return _Tables(
        scanners=scanners,
        actions=actions,
        rules=rules,
        start=table.start_states["statement"],
        end=table.end_states["statement"],
        keywords=_keyword_types(),
    )


def _fast_statement(tables: _Tables, chunk: str, build: _Build) -> Any:
    """The AST node of one statement (``chunk``), or :class:`_Fallback`.

    Each stack entry is ``(value, start, end, is_keyword)``; a node that its parent splices
    in (Lark's ``_rule``) is ``(children, 0, 0, None)``.
    """
    scanners = tables.scanners
    actions = tables.actions
    rules = tables.rules
    keywords = tables.keywords
    methods = build.methods
    end_state = tables.end
    states = [tables.start]
    stack: list[tuple[Any, int, int, Any]] = []
    n = len(chunk)
    pos = 0
    # _Words: glued words and nesting
    prev_end = -1
    prev_word_end = False
    too_deep = _Nesting().too_deep
    word_char = _is_word_char
    while True:
        state = states[-1]
        if pos < n:
            mre, ignore, unless = scanners[state]
            while True:
                m = mre.match(chunk, pos)
                if m is None:
                    raise _Fallback
                type_ = m.lastgroup
                if type_ in ignore:
                    pos = m.end()
                    if pos < n:
                        continue
                    type_ = None
                break
        else:
            type_ = None
        if type_ is None:
            type_ = "$END"
            tok: Any = None
            start = end = pos
        else:
            value = m.group()
            start = pos
            end = pos = m.end()
            if type_ in unless:
                type_ = unless[type_].get(value, type_)
            if prev_word_end and prev_end == start and word_char(value[:1]):
                raise _Fallback
            prev_end = end
            prev_word_end = word_char(value[-1:])
            if type_ not in _VALUE_TERMINALS and too_deep(value):
                raise _Fallback
            tok = _Tok(type_, value, start, end)
        while True:
            action = actions[state].get(type_)
            if action is None:
                raise _Fallback
            shift, arg = action
            if shift:
                if tok is None:
                    raise _Fallback  # pragma: no cover - Lark asserts this never happens
                states.append(arg)
                stack.append((tok, start, end, type_ in keywords))
                break
            size, include, expand1, data, splice, keep, origin = rules[arg]
            if size:
                children = stack[-size:]
                del stack[-size:]
                del states[-size:]
            else:
                children = []
            if include is not None:
                kept: list[Any] = []
                for i, inline in include:
                    if inline and not kept:
                        # Take over the spliced list instead of copying it (Lark's own
                        # ChildFilterLALR does the same): a left-recursive repetition such as
                        # an `and` chain grows one list, so a chain stays linear, not quadratic.
                        kept = children[i][0]
                    elif inline:
                        kept += children[i][0]
                    else:
                        kept.append(children[i])
                children = kept
            if splice:
                entry: tuple[Any, int, int, Any] = (children, 0, 0, None)
            elif expand1 and len(children) == 1:
                entry = children[0]
            else:
                first = children[0][1]
                last = children[-1][2]
                if keep:
                    values = [c[0] for c in children]
                else:
                    values = [c[0] for c in children if not c[3]]
                try:
                    entry = (methods[data]((first, last), values), first, last, False)
                except Exception:  # _Fail, or a message the builder writes for Lark's tokens
                    raise _Fallback from None
            action = actions[states[-1]][origin]
            states.append(action[1])
            stack.append(entry)
            state = states[-1]
            if tok is None and state == end_state:
                return entry[0]


# --- entry points ----------------------------------------------------------------------


def parse_statements(source: str) -> tuple[list[ast.Statement], list[Diagnostic]]:
    """Parse every statement; return the ones that parsed and the syntax diagnostics."""
    with collector_paused():
        return _parse_statements(source)


def _parse_statements(source: str) -> tuple[list[ast.Statement], list[Diagnostic]]:
    statements: list[ast.Statement] = []
    diagnostics: list[Diagnostic] = []
    lark = parser()
    index = line_index(source)
    tables = _tables()
    build = _Build(source, 0, index)
    for start, end in _statement_ranges(source):
        chunk = source[start:end]
        try:
            if tables is not None:
                build.offset = start
                try:
                    statements.append(_fast_statement(tables, chunk, build))
                    continue
                except _Fallback:
                    pass
            tree = lark.parse(chunk, start="statement")
            statements.append(_Build(source, start, index).transform(tree))
        except UnexpectedInput as err:
            diagnostics.append(_syntax_diagnostic(err, source, start, end, index))
        except _LexProblem as problem:
            diagnostics.append(_lex_diagnostic(problem, start, index))
        except _Fail as fail:
            diagnostics.append(fail.diagnostic)
    return statements, diagnostics


def parse(source: str) -> ast.Recipe:
    """Parse a recipe; raise :class:`DiagnosticError` with every syntax error found.

    >>> parse("decompose Lienar rnak = 0.5")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    surgery.diagnostics.DiagnosticError: unknown word `rnak` in `decompose` statement
    """
    statements, diagnostics = parse_statements(source)
    if diagnostics:
        raise DiagnosticError(diagnostics)
    return ast.Recipe(statements=statements, span=span_of(source, 0, len(source)))
