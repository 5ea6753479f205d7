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

import math
import re

from surgery import ast
from surgery.parse import parse

__all__ = ["format_number", "format_recipe", "format_source", "format_statement"]


def format_number(number: ast.Number) -> str:
    return _num(number.value) + number.unit


def _num(value: float) -> str:
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    if "e" in text:  # `1e-05` → `1e-5`
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


def _str(s: ast.Str) -> str:
    return '"' + s.value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "compare": 4, "match": 4}


def _pred(p: ast.Predicate, parent: int = 0) -> str:
    if isinstance(p, ast.Compare):
        text = f"{p.field.value} {p.op} {format_number(p.value)}"
    elif isinstance(p, ast.Match):
        text = f"name ~ {_str(p.pattern)}"
    elif isinstance(p, ast.Not):
        text = "not " + _pred(p.item, _PRECEDENCE["not"])
    elif isinstance(p, ast.And):
        text = " and ".join(_pred(i, _PRECEDENCE["and"]) for i in p.items)
    else:
        text = " or ".join(_pred(i, _PRECEDENCE["or"]) for i in p.items)
    # Nested and/or of the same kind would flatten on re-parse, so always bracket them.
    if _PRECEDENCE[p.kind] < parent or (p.kind in ("and", "or") and parent == _PRECEDENCE[p.kind]):
        return f"({text})"
    return text


def _selector(s: ast.Selector) -> str:
    parts = []
    if s.type is not None:
        parts.append(s.type.value)
    if s.where is not None:
        parts.append("where " + _pred(s.where))
    return " ".join(parts)


def _rank(r: ast.Rank) -> str:
    if r.kind == "energy":
        return f"rank = energy {format_number(r.value)}"
    if r.kind == "absolute":
        # Always digits: `_num` writes 1e15 and above with an exponent, which reads back as a
        # fraction (an absolute rank is exactly "an integer without point, exponent or unit").
        return f"rank = {int(r.value.value)}"
    text = format_number(r.value)
    if r.value.unit == "" and re.fullmatch(r"-?[0-9]+", text):
        text += ".0"  # keep it a fraction: `rank = 1` would be the absolute rank 1
    return f"rank = {text}"


def format_statement(stmt: ast.Statement) -> str:
    """The canonical text of one statement (no comment, no newline)."""
    s = stmt
    if isinstance(s, ast.Target):
        out = ["target", s.backend.value]
        if s.device:
            out.append(s.device.value)
        if s.trials:
            out.append(f"trials {s.trials.value}")
    elif isinstance(s, ast.Calibrate):
        out = ["calibrate with", _str(s.source)]
        if s.samples:
            out.append(f"samples {s.samples.value}")
        if s.batch:
            out.append(f"batch {s.batch.value}")
    elif isinstance(s, ast.Decompose):
        out = ["decompose", _selector(s.selector)]
        if s.rank:
            out.append(_rank(s.rank))
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
    elif isinstance(s, ast.Group):
        out = ["group"]
        if s.q:
            out.append(f"q = {s.q.value}")
        out.append(f"kv = {s.kv.value}")
    elif isinstance(s, ast.SkipTokens):
        out = ["skip tokens", format_number(s.ratio), f"after block {s.after.value}"]
        if s.until:
            out.append(f"until block {s.until.value}")
    elif isinstance(s, ast.Split):
        out = ["split", _selector(s.selector), s.mode.value]
        if s.combine:
            out.append(s.combine.value)
        if s.rank:
            out.append(_rank(s.rank))
    elif isinstance(s, ast.Sparsify):
        out = ["sparsify", _selector(s.selector), f"{s.n.value}:{s.m.value}"]
    elif isinstance(s, ast.Factorize):
        out = [
            "factorize",
            _selector(s.selector),
            s.method.value,
            f"basis {s.basis.value}",
            f"nonzeros {s.nonzeros.value}",
        ]
    elif isinstance(s, ast.Regularize):
        out = ["regularize", s.method.value, format_number(s.strength)]
        if s.every:
            out.append(f"every {s.every.value} steps")
    elif isinstance(s, ast.Drop):
        out = ["drop", s.sublayer.value, str(s.count.value)]
        if s.by:
            out.append(f"by {s.by.value}")
    elif isinstance(s, ast.Truncate):
        out = ["truncate blocks keep", str(s.keep.value)]
        if s.strategy:
            out.append(s.strategy.value)
        if s.indices is not None:
            out.append("[" + ", ".join(str(i.value) for i in s.indices) + "]")
    elif isinstance(s, ast.Freeze):
        out = ["freeze", s.what.value]
    elif isinstance(s, ast.Heal):
        out = ["heal steps", str(s.steps.value)]
        if s.lr:
            out.append(f"lr {format_number(s.lr)}")
        if s.distill:
            out.append("distill from original")
        if s.subset:
            out.append(f"subset {format_number(s.subset)}")
            if s.by:
                out.append(f"by {s.by.value}")
        if s.every:
            out.append(f"every {s.every.value} steps")
    else:
        assert isinstance(s, ast.Expect)
        out = ["expect", s.metric.value, s.op, format_number(s.value)]
        if s.on:
            out.append(f"on {s.on.value}")
    return " ".join(out)


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
