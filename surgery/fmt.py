"""The canonical text of a recipe (``surgery fmt``).

One statement per line, single spaces, ``=`` surrounded by spaces, options in a fixed order,
comments kept (a comment on its own line stays above the statement that follows it; a
trailing comment stays on its statement's line). ``parse(format_recipe(r))`` gives ``r`` back
up to spans.

>>> print(format_source("group   kv=2 ;skip tokens 55% after  block 3 # SkipViT"), end="")
group kv = 2
skip tokens 55% after block 3  # SkipViT
"""

from __future__ import annotations

from surgery import ast
from surgery.parse import parse
from surgery.verbs import BY_KEYWORD
from surgery.verbs.base import format_number

__all__ = ["format_number", "format_recipe", "format_source", "format_statement"]


def format_statement(stmt: ast.Statement) -> str:
    """The canonical text of one statement (no comment, no newline): its verb's format."""
    return BY_KEYWORD[stmt.verb].format(stmt)


def format_recipe(recipe: ast.Recipe) -> str:
    """Canonical text of a recipe AST, without comments."""
    return "".join(format_statement(s) + "\n" for s in recipe.statements)


def _comments(source: str) -> list[tuple[int, int, str]]:
    """(line, offset, text) of every comment outside strings."""
    found = []
    i, n, line, in_string = 0, len(source), 1, False
    while i < n:
        c = source[i]
        if c == "\n":
            line += 1
            in_string = False
        elif in_string:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c == "#":
            end = source.find("\n", i)
            end = n if end < 0 else end
            found.append((line, i, source[i:end].rstrip()))
            i = end
            continue
        i += 1
    return found


def format_source(source: str) -> str:
    """Canonical text of recipe source, keeping comments and single blank lines between groups.

    Raises :class:`~surgery.diagnostics.DiagnosticError` if the source does not parse.
    """
    recipe = parse(source)
    comments = _comments(source)
    # Lines as the parser counts them ("\n" only): `splitlines` also breaks at form feeds,
    # U+2028 and others, and then a comment's line number points at the wrong line.
    lines = source.split("\n")
    out: list[str] = []
    last_line = 0  # last source line already emitted
    ci = 0

    def blank_between(a: int, b: int) -> bool:
        return any(not lines[k - 1].strip() for k in range(a + 1, b) if 0 < k <= len(lines))

    statements = recipe.statements
    for index, stmt in enumerate(statements):
        first, final = stmt.span.line, stmt.span.end_line
        shares_line = index + 1 < len(statements) and statements[index + 1].span.line == final
        while ci < len(comments) and comments[ci][0] < first:
            line, _, text = comments[ci]
            if line > last_line:
                if out and blank_between(last_line, line):
                    out.append("")
                out.append(text)
                last_line = line
            elif out:  # a comment after `;`-separated statements on the same line
                out[-1] += "  " + text
            ci += 1
        if out and first > last_line and blank_between(last_line, first):
            out.append("")
        text = format_statement(stmt)
        trailing = []
        while not shares_line and ci < len(comments) and comments[ci][0] <= final:
            trailing.append(comments[ci][2])
            ci += 1
        out.append(text + ("  " + " ".join(trailing) if trailing else ""))
        last_line = max(last_line, final)
    for line, _, text in comments[ci:]:
        if out and blank_between(last_line, line):
            out.append("")
        out.append(text)
        last_line = line
    return "".join(line + "\n" for line in out)
