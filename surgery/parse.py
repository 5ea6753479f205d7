"""Parse `.surg` source into a :class:`surgery.ast.Recipe`, reporting every syntax error.

The recipe is cut into statements at top-level newlines and ``;`` (outside strings and
comments), and each statement is parsed on its own by the LALR parser built from
``grammar/surg.lark``, so one bad statement does not hide the errors of the next. Lark's
errors become located :class:`~surgery.diagnostics.Diagnostic` objects that name what was
expected and suggest the nearest keyword.

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
from dataclasses import dataclass
from importlib import resources
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
    VisitError,
)
from lark.lexer import PatternStr

from surgery import ast
from surgery.diagnostics import Diagnostic, DiagnosticError, nearest, span_of

__all__ = ["VERBS", "grammar_text", "parse", "parse_statements", "parser"]

VERBS = (
    "target",
    "calibrate",
    "decompose",
    "group",
    "skip",
    "split",
    "sparsify",
    "factorize",
    "regularize",
    "drop",
    "truncate",
    "freeze",
    "heal",
    "expect",
)

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


@functools.lru_cache(maxsize=1)
def parser() -> Lark:
    """The LALR parser (built once)."""
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        start=["start", "statement"],
        maybe_placeholders=False,
    )


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


def _statement_ranges(source: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each statement: split at newlines and ``;`` outside strings/comments."""
    ranges: list[tuple[int, int]] = []
    start = 0
    i = 0
    n = len(source)
    in_string = False
    while i < n:
        c = source[i]
        if in_string:
            if c == "\\" and i + 1 < n and source[i + 1] != "\n":
                i += 2
                continue
            if c == '"':
                in_string = False
            elif c == "\n":  # an unterminated string ends with its line
                in_string = False
                ranges.append((start, i))
                start = i + 1
        elif c == '"':
            in_string = True
        elif c == "#":
            while i < n and source[i] != "\n":
                i += 1
            continue
        elif c == "\\" and source[i + 1 : i + 2] == "\n":  # line continuation
            i += 2
            continue
        elif c == "\\" and source[i + 1 : i + 3] == "\r\n":
            i += 3
            continue
        elif c in ";\n":
            ranges.append((start, i))
            start = i + 1
        i += 1
    ranges.append((start, n))
    return [(s, e) for s, e in ranges if _has_code(source[s:e])]


def _has_code(text: str) -> bool:
    stripped = re.sub(r"#[^\n]*|\\\r?\n|\s", "", text)
    return bool(stripped)


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


@v_args(meta=True)
class _Build(Transformer[Token, Any]):
    """Lark tree of one statement -> AST node. Positions are shifted by the statement offset."""

    def __init__(self, source: str, offset: int) -> None:
        super().__init__()
        self.source = source
        self.offset = offset

    # spans
    def _span(self, meta: Any) -> ast.Span:
        return span_of(self.source, self.offset + meta.start_pos, self.offset + meta.end_pos)

    def _tspan(self, tok: Token) -> ast.Span:
        assert tok.start_pos is not None and tok.end_pos is not None
        return span_of(self.source, self.offset + tok.start_pos, self.offset + tok.end_pos)

    def _fail(self, code: str, message: str, span: ast.Span, help: str | None = None) -> _Fail:
        return _Fail(Diagnostic(code=code, message=message, span=span, help=help))

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
            raise self._fail("S0105", f"`{tok}` is not a number", span)
        value = float(m["num"])
        if not math.isfinite(value):
            raise self._fail("S0105", f"`{tok}` is too large", span)
        return ast.Number(value=value, unit=m["unit"], span=span)  # type: ignore[arg-type]

    def int(self, meta: Any, children: list[Token]) -> ast.Int:
        tok = children[0]
        span = self._tspan(tok)
        if not re.fullmatch(r"-?[0-9]+", str(tok)):
            raise self._fail(
                "S0105",
                f"expected a whole number, found `{tok}`",
                span,
                help="write an integer without a decimal point, unit or exponent",
            )
        return ast.Int(value=int(str(tok)), span=span)

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

    def opt_rank(self, meta: Any, children: list[Any]) -> _Opt:
        rank: ast.Rank = children[0]
        return self._opt("rank", rank.model_copy(update={"span": self._span(meta)}), meta)

    def opt_method(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("method", children[0], meta)

    def opt_round(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("round", children[0], meta)

    def opt_progressive(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("progressive", children[0], meta)

    def opt_keep_if_faster(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("keep_if_faster", ast.Flag(span=self._span(meta)), meta)

    def opt_budget(self, meta: Any, children: list[Any]) -> _Opt:
        resource, value, *by = children
        budget = ast.Budget(
            resource=str(resource),  # type: ignore[arg-type]
            value=value,
            by=by[0] if by else None,
            span=self._span(meta),
        )
        return self._opt("budget", budget, meta)

    def budget_by(self, meta: Any, children: list[Any]) -> ast.Name:
        name: ast.Name = children[0]
        return name

    def opt_trials(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("trials", children[0], meta)

    def opt_samples(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("samples", children[0], meta)

    def opt_batch(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("batch", children[0], meta)

    def opt_combine(self, meta: Any, children: list[Any]) -> _Opt:
        tok = children[0]
        return self._opt("combine", ast.Name(value=str(tok), span=self._tspan(tok)), meta)

    def opt_lr(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("lr", children[0], meta)

    def opt_distill(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("distill", ast.Flag(span=self._span(meta)), meta)

    def opt_subset(self, meta: Any, children: list[Any]) -> list[_Opt]:
        opts = [self._opt("subset", children[0], meta)]
        if len(children) > 1:
            opts.append(children[1])
        return opts

    def heal_by(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("by", children[0], meta)

    def opt_every(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("every", children[0], meta)

    def regularize_every(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("every", children[0], meta)

    def group_q(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("q", children[0], meta)

    def skip_until(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("until", children[0], meta)

    def drop_by(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("by", children[0], meta)

    def expect_on(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("on", children[0], meta)

    def strategy(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("strategy", children[0], meta)

    def indices(self, meta: Any, children: list[Any]) -> _Opt:
        return self._opt("indices", list(children), meta)

    def mode_exact(self, meta: Any, children: list[Any]) -> ast.Name:
        return ast.Name(value="exact", span=self._span(meta))

    def mode_2plus1d(self, meta: Any, children: list[Any]) -> ast.Name:
        return ast.Name(value="(2+1)d", span=self._span(meta))

    def _options(self, verb: str, items: list[Any]) -> dict[str, Any]:
        flat: list[_Opt] = []
        for item in items:
            flat.extend(item if isinstance(item, list) else [item])
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

    # statements
    def target(self, meta: Any, children: list[Any]) -> ast.Target:
        names = [c for c in children if isinstance(c, ast.Name)]
        opts = self._options("target", [c for c in children if not isinstance(c, ast.Name)])
        device = names[1] if len(names) > 1 else None
        return ast.Target(backend=names[0], device=device, span=self._span(meta), **opts)

    def calibrate(self, meta: Any, children: list[Any]) -> ast.Calibrate:
        opts = self._options("calibrate", children[1:])
        return ast.Calibrate(source=children[0], span=self._span(meta), **opts)

    def decompose(self, meta: Any, children: list[Any]) -> ast.Decompose:
        opts = self._options("decompose", children[1:])
        return ast.Decompose(selector=children[0], span=self._span(meta), **opts)

    def group(self, meta: Any, children: list[Any]) -> ast.Group:
        opts = self._options("group", [c for c in children if isinstance(c, _Opt)])
        return ast.Group(kv=children[-1], span=self._span(meta), **opts)

    def skip(self, meta: Any, children: list[Any]) -> ast.SkipTokens:
        opts = self._options("skip", children[2:])
        return ast.SkipTokens(ratio=children[0], after=children[1], span=self._span(meta), **opts)

    def split(self, meta: Any, children: list[Any]) -> ast.Split:
        opts = self._options("split", children[2:])
        return ast.Split(selector=children[0], mode=children[1], span=self._span(meta), **opts)

    def sparsify(self, meta: Any, children: list[Any]) -> ast.Sparsify:
        selector, n, m = children
        return ast.Sparsify(selector=selector, n=n, m=m, span=self._span(meta))

    def factorize(self, meta: Any, children: list[Any]) -> ast.Factorize:
        selector, method, basis, nonzeros = children
        return ast.Factorize(
            selector=selector, method=method, basis=basis, nonzeros=nonzeros, span=self._span(meta)
        )

    def regularize(self, meta: Any, children: list[Any]) -> ast.Regularize:
        opts = self._options("regularize", children[2:])
        return ast.Regularize(
            method=children[0], strength=children[1], span=self._span(meta), **opts
        )

    def drop(self, meta: Any, children: list[Any]) -> ast.Drop:
        sub_tok, count = children[0], children[1]
        opts = self._options("drop", children[2:])
        sublayer = ast.Name(value=str(sub_tok), span=self._tspan(sub_tok))
        return ast.Drop(sublayer=sublayer, count=count, span=self._span(meta), **opts)

    def truncate(self, meta: Any, children: list[Any]) -> ast.Truncate:
        opts = self._options("truncate", children[1:])
        return ast.Truncate(keep=children[0], span=self._span(meta), **opts)

    def freeze(self, meta: Any, children: list[Any]) -> ast.Freeze:
        return ast.Freeze(what=children[0], span=self._span(meta))

    def heal(self, meta: Any, children: list[Any]) -> ast.Heal:
        opts = self._options("heal", children[1:])
        return ast.Heal(steps=children[0], span=self._span(meta), **opts)

    def expect(self, meta: Any, children: list[Any]) -> ast.Expect:
        metric_tok, op_tok, value = children[:3]
        opts = self._options("expect", children[3:])
        metric = ast.Name(value=str(metric_tok), span=self._tspan(metric_tok))
        return ast.Expect(metric=metric, op=str(op_tok), value=value, span=self._span(meta), **opts)


# --- syntax errors -> diagnostics ------------------------------------------------------

_WORD_RE = re.compile(r"[^\W\d]\w*(?:-\w+)*|-?[0-9][0-9A-Za-z.%+-]*|\S")


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


def _syntax_diagnostic(err: UnexpectedInput, source: str, start: int, end: int) -> Diagnostic:
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
    accepted = _accepts(source[start:pos])
    if accepted is not None:
        expected = accepted
    complete = "$END" in expected

    # Trailing whitespace/comments are not "the end": point just after the last token.
    last = start + len(re.sub(r"(\s|#[^\n]*)*$", "", text))
    at_end = pos >= last
    keywords, values = _describe_expected(expected)
    word_match = _WORD_RE.match(source, pos) if not at_end else None
    word = word_match.group(0) if word_match else ""

    if pos == first_word_pos and verb:
        if verb in VERBS:  # pragma: no cover - a known verb is never unexpected first
            pass
        guess = nearest(verb, VERBS)
        return Diagnostic(
            code="S0101",
            message=f"unknown statement `{verb}`",
            span=span_of(source, pos, pos + len(verb)),
            help=f"did you mean `{guess}`?"
            if guess
            else "a statement starts with one of: " + ", ".join(f"`{v}`" for v in VERBS),
        )

    if at_end:
        prev = re.findall(r'"[^"]*"|\S+', re.sub(r"#[^\n]*", "", text))
        after = prev[-1] if prev else verb
        wanted = [f"`{k}`" for k in keywords] + values
        wanted = [w for w in wanted if w != "the end of the statement"]
        return Diagnostic(
            code="S0104",
            message=f"incomplete `{verb}` statement",
            span=span_of(source, max(start, last - len(after)), last),
            help=f"expected {_one_of(wanted)} after `{after}`" if wanted else None,
        )

    span = span_of(source, pos, pos + max(1, len(word)))
    if word.startswith('"') or (word == '"'):
        return Diagnostic(
            code="S0107",
            message="unterminated string"
            if source.count('"', pos, end) % 2
            else "unexpected string",
            span=span_of(source, pos, end if source.count('"', pos, end) % 2 else pos + 1),
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


def _accepts(prefix: str) -> set[str] | None:
    """Terminals the statement parser accepts after ``prefix`` (None if it cannot tell)."""
    try:
        interactive = parser().parse_interactive(prefix, start="statement")
        interactive.exhaust_lexer()
        return set(interactive.accepts())
    except UnexpectedInput:
        return None


def _one_of(items: list[str]) -> str:
    items = [i for i in items if i]
    if not items:
        return "something else"
    if len(items) == 1:
        return items[0]
    return "one of " + ", ".join(items[:-1]) + " or " + items[-1]


# --- entry points ----------------------------------------------------------------------


def parse_statements(source: str) -> tuple[list[ast.Statement], list[Diagnostic]]:
    """Parse every statement; return the ones that parsed and the syntax diagnostics."""
    statements: list[ast.Statement] = []
    diagnostics: list[Diagnostic] = []
    lark = parser()
    for start, end in _statement_ranges(source):
        chunk = source[start:end]
        try:
            tree = lark.parse(chunk, start="statement")
            statements.append(_Build(source, start).transform(tree))
        except UnexpectedInput as err:
            diagnostics.append(_syntax_diagnostic(err, source, start, end))
        except VisitError as err:
            if isinstance(err.orig_exc, _Fail):
                diagnostics.append(err.orig_exc.diagnostic)
            else:  # pragma: no cover - a bug in the builder
                raise
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
