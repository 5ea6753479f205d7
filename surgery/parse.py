"""Parse `.surg` source into a :class:`surgery.ast.Recipe`, reporting every syntax error.

The recipe is cut into statements at top-level newlines and ``;`` (outside strings and
comments), and each statement is parsed on its own by the LALR parser built from
``grammar/surg.lark``, so one bad statement does not hide the errors of the next. Lark's
errors become located :class:`~surgery.diagnostics.Diagnostic` objects that name what was
expected and suggest the nearest keyword.

Everything here is linear in the size of the source: positions become lines and columns through
one :class:`~surgery.diagnostics.LineIndex`, nesting is bounded (``MAX_NESTING``) before any
recursive code sees it, and numbers are read without Python's int-string digit limit.

This module cuts the source into statements and holds the entry points; the parts live in
private siblings, each importing only those before it in this list:

- :mod:`surgery.parse_lark`: the grammar, the Lark parser and its post-lexer;
- :mod:`surgery.parse_build`: the builder from parsed statements to AST nodes;
- :mod:`surgery.parse_errors`: syntax errors -> diagnostics;
- :mod:`surgery.parse_fast`: the table-driven fast path, with Lark's path as its fallback.

>>> recipe = parse("decompose Linear where params>1M rank=0.25 progressive 4 steps; group kv=2")
>>> [s.verb for s in recipe.statements]
['decompose', 'group']
>>> recipe.statements[0].rank.kind, recipe.statements[0].rank.value.magnitude
('fraction', 0.25)
"""

from __future__ import annotations

import re

from lark.exceptions import UnexpectedInput

from surgery import ast
from surgery.diagnostics import Diagnostic, DiagnosticError, collector_paused, line_index, span_of
from surgery.parse_build import MAX_DIGITS, _Build, _Fail
from surgery.parse_errors import _lex_diagnostic, _syntax_diagnostic
from surgery.parse_fast import _Fallback, _fast_statement, _tables
from surgery.parse_lark import MAX_NESTING, VERBS, _LexProblem, grammar_text, parser

# MAX_DIGITS, MAX_NESTING, VERBS, grammar_text and parser are defined (and documented) in the
# module that uses them, and exported from here.
__all__ = [
    "MAX_DIGITS",
    "MAX_NESTING",
    "VERBS",
    "grammar_text",
    "parse",
    "parse_statements",
    "parser",
]


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
