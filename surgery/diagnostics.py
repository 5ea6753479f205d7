"""Diagnostics in rustc style: a code, a message, a located caret and a help line.

Codes are grouped by the stage that finds them:

=========  ===========================================================
``S01xx``  syntax: the recipe does not parse
``S02xx``  check: unknown names, values out of range, contradictions
``S03xx``  resolution against a model: selectors, models, inputs
``S04xx``  apply: a pass failed on the model
``S05xx``  contracts: an ``expect`` that the result does not meet
``S09xx``  internal errors (a bug in surgery)
=========  ===========================================================

>>> src = "group kv = 0"
>>> d = Diagnostic(code="S0203", message="`kv` must be a positive integer",
...                span=span_of(src, 11, 12), help="use `kv = 1` for multi-query attention")
>>> print(render(d, src, "r.surg"))
error[S0203]: `kv` must be a positive integer
 --> r.surg:1:12
  |
1 | group kv = 0
  |            ^
  = help: use `kv = 1` for multi-query attention
<BLANKLINE>
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from surgery.ast import Span

__all__ = [
    "Diagnostic",
    "DiagnosticError",
    "first_line",
    "nearest",
    "render",
    "render_all",
    "span_of",
    "to_json",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    """One located problem. ``span`` is None for problems that have no place in the recipe."""

    code: str
    message: str
    span: Span | None = None
    help: str | None = None
    notes: tuple[str, ...] = ()
    severity: Severity = "error"
    labels: tuple[tuple[Span, str], ...] = field(default=())  # secondary spans with a label

    def sort_key(self) -> tuple[int, int, str]:
        return (self.span.start if self.span else -1, self.span.end if self.span else -1, self.code)


class DiagnosticError(Exception):
    """Raised to stop on user errors; carries every diagnostic found so far."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        first = self.diagnostics[0] if self.diagnostics else None
        super().__init__(first.message if first else "error")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-blank line of an exception's message (library errors run to pages).

    >>> first_line(ValueError("\\n  shape mismatch  \\n  at layer 3"))
    'shape mismatch'
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def span_of(source: str, start: int, end: int) -> Span:
    """The :class:`Span` of ``source[start:end]`` with 1-based line and column numbers."""
    start = max(0, min(start, len(source)))
    end = max(start, min(end, len(source)))
    line = source.count("\n", 0, start) + 1
    col = start - (source.rfind("\n", 0, start) + 1) + 1
    end_line = source.count("\n", 0, end) + 1
    end_col = end - (source.rfind("\n", 0, end) + 1) + 1
    return Span(start=start, end=end, line=line, col=col, end_line=end_line, end_col=end_col)


def nearest(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (for "did you mean" help), or None."""
    pool = sorted(set(candidates))
    lowered = {c.lower(): c for c in pool}
    if word.lower() in lowered:
        return lowered[word.lower()]
    found = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if not found:
        found = [
            lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), 1, cutoff)
        ]
    return found[0] if found else None


def _line_text(source: str, line: int) -> str:
    # Spans count lines by "\n" only; str.splitlines would also break at U+2028 and friends.
    lines = source.split("\n")
    return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""


def render(diag: Diagnostic, source: str | None, filename: str) -> str:
    """Render one diagnostic as text (ends with a newline)."""
    out = [f"{diag.severity}[{diag.code}]: {diag.message}"]
    if diag.span is None or source is None:
        out.append(f" --> {filename}")
        gutter = " "
    else:
        span = diag.span
        gutter = " " * len(str(span.line))
        out.append(f"{gutter}--> {filename}:{span.line}:{span.col}")
        text = _line_text(source, span.line)
        # A span over several lines is underlined to the end of its first line.
        stop = span.end_col if span.end_line == span.line else len(text) + 1
        width = max(1, stop - span.col)
        # Keep the source's tabs in the padding so the caret lines up in a terminal.
        pad = "".join(c if c == "\t" else " " for c in text[: span.col - 1])
        caret_line = pad + "^" * width
        labels = [label for s, label in diag.labels if s.line == span.line]
        out.append(f"{gutter} |")
        out.append(f"{span.line} | {text}".rstrip())
        out.append(f"{gutter} | {caret_line}" + (f" {labels[0]}" if labels else ""))
    for note in diag.notes:
        out.append(f"{gutter} = note: {note}")
    if diag.help:
        out.append(f"{gutter} = help: {diag.help}")
    return "\n".join(out) + "\n"


def render_all(diags: Sequence[Diagnostic], source: str | None, filename: str) -> str:
    """Render several diagnostics, sorted by position, with a closing summary line."""
    ordered = sorted(diags, key=Diagnostic.sort_key)
    parts = [render(d, source, filename) for d in ordered]
    errors = sum(d.severity == "error" for d in ordered)
    warnings = len(ordered) - errors
    summary = []
    if errors:
        summary.append(f"error: {filename}: {errors} error{'s' if errors != 1 else ''}")
    if warnings and not errors:
        summary.append(f"warning: {filename}: {warnings} warning{'s' if warnings != 1 else ''}")
    return "\n".join(parts) + ("\n" + "\n".join(summary) + "\n" if summary else "")


def to_json(diags: Sequence[Diagnostic], filename: str) -> list[dict[str, Any]]:
    """Diagnostics as JSON-ready dicts (``--format json``)."""
    result = []
    for d in sorted(diags, key=Diagnostic.sort_key):
        result.append(
            {
                "severity": d.severity,
                "code": d.code,
                "message": d.message,
                "file": filename,
                "span": d.span.model_dump() if d.span else None,
                "help": d.help,
                "notes": list(d.notes),
            }
        )
    return result


def dumps(diags: Sequence[Diagnostic], filename: str) -> str:
    return json.dumps(to_json(diags, filename), indent=2)
