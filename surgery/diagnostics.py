"""Diagnostics in rustc style: a code, a message, a located caret and a help line.

Codes are grouped by the stage that finds them; :mod:`surgery.codes` lists every code with
its one meaning, and the ranges.

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

import codecs
import contextlib
import difflib
import functools
import gc
import json
import unicodedata
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from surgery.nodes import Span

__all__ = [
    "Diagnostic",
    "DiagnosticError",
    "LineIndex",
    "SourceDecodeError",
    "clip",
    "collector_paused",
    "decode_source",
    "first_line",
    "line_index",
    "nearest",
    "render",
    "render_all",
    "shown",
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


class LineIndex:
    """Where each line of one source starts, computed once: positions become lines and columns
    by bisection, so locating ``k`` positions costs ``O(n + k log n)``, never ``O(n·k)``.

    Lines end at ``"\\n"`` only (as the grammar's separators do): ``str.splitlines`` would also
    break at form feeds, U+2028 and friends, and disagree with the parser about line numbers.

    >>> index = LineIndex("group kv = 2\\nskip tokens 55% after block 3")
    >>> index.span(13, 17).line, index.span(13, 17).col, index.line_text(2)[:4]
    (2, 1, 'skip')
    """

    __slots__ = ("source", "starts")

    def __init__(self, source: str) -> None:
        self.source = source
        starts = [0]
        find = source.find
        i = find("\n")
        while i >= 0:
            starts.append(i + 1)
            i = find("\n", i + 1)
        self.starts = starts

    def line_col(self, pos: int) -> tuple[int, int]:
        """1-based line and column of offset ``pos``."""
        line = bisect_right(self.starts, pos)
        return line, pos - self.starts[line - 1] + 1

    def span(self, start: int, end: int) -> Span:
        """The :class:`Span` of ``source[start:end]`` (clamped to the source)."""
        n = len(self.source)
        start = max(0, min(start, n))
        end = max(start, min(end, n))
        line, col = self.line_col(start)
        end_line, end_col = self.line_col(end)
        return Span(start=start, end=end, line=line, col=col, end_line=end_line, end_col=end_col)

    def line_text(self, line: int) -> str:
        """Line ``line`` (1-based) without its line ending; empty past the end."""
        if not 0 < line <= len(self.starts):
            return ""
        start = self.starts[line - 1]
        stop = self.starts[line] - 1 if line < len(self.starts) else len(self.source)
        return self.source[start:stop].rstrip("\r")


@functools.lru_cache(maxsize=4)
def line_index(source: str) -> LineIndex:
    """The :class:`LineIndex` of ``source``, shared by every caller that asks for the same text.

    The key hashes the string once (Python caches a string's hash) and compares by identity
    first, so a hit costs O(1) for the very string object that was indexed.
    """
    return LineIndex(source)


def span_of(source: str, start: int, end: int) -> Span:
    """The :class:`Span` of ``source[start:end]`` with 1-based line and column numbers."""
    return line_index(source).span(start, end)


class SourceDecodeError(DiagnosticError):
    """A recipe file that is not UTF-8; ``source`` is its text with each undecodable byte shown
    as ``\\xNN``, so the diagnostic can be rendered with its line."""

    def __init__(self, diagnostics: Sequence[Diagnostic], source: str) -> None:
        super().__init__(diagnostics)
        self.source = source


def decode_source(data: bytes, filename: str = "recipe") -> str:
    """The text of a recipe file: UTF-8, with a leading byte-order mark dropped (as Python does
    for its own source files; the mark is invisible in editors and means nothing here).

    Raises :class:`SourceDecodeError` located at the first byte that is not UTF-8.

    >>> decode_source(b"\\xef\\xbb\\xbfgroup kv = 2")
    'group kv = 2'
    >>> try:
    ...     decode_source(b"group kv = 2\\n# caf\\xe9 cr\\xe8me", "r.surg")
    ... except SourceDecodeError as exc:
    ...     print(render(exc.diagnostics[0], exc.source, "r.surg"), end="")
    error[S0001]: recipe file `r.surg` is not UTF-8 text
     --> r.surg:2:6
      |
    2 | # caf\\xe9 cr\\xe8me
      |      ^^^^
      = note: byte 0xE9: invalid continuation byte
      = help: save the file as UTF-8
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8")  # valid: the error is the first bad byte
        shown_text = data.decode("utf-8", errors="backslashreplace")
        bad = data[exc.start : exc.end]
        start = len(before)
        span = LineIndex(shown_text).span(start, start + 4 * len(bad))  # `\\xNN` per byte
        diagnostic = Diagnostic(
            code="S0001",
            message=f"recipe file `{filename}` is not UTF-8 text",
            span=span,
            notes=(f"byte 0x{bad[0]:02X}: {exc.reason}",),
            help="save the file as UTF-8",
        )
        raise SourceDecodeError([diagnostic], shown_text) from None


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block (parsing and checking).

    They allocate a few objects per character of the recipe (tokens, trees, AST nodes,
    diagnostics) and build no reference cycles, so reference counting frees everything. The
    collector would only rescan the growing heap again and again: it doubled the time of a
    700 KB selector and made checking 32,000 errors 4× slower than linear.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def clip(text: str, limit: int = 40) -> str:
    """``text`` for a message: a long word keeps its two ends.

    >>> clip("9" * 5000)
    '99999999999999999999…99999999'
    """
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]}…{text[-8:]}"


def nearest(word: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (for "did you mean" help), or None."""
    return _nearest(word, tuple(sorted(set(candidates))), cutoff)


@functools.lru_cache(maxsize=1024)  # a recipe with many errors asks about the same words
def _nearest(word: str, pool: tuple[str, ...], cutoff: float) -> str | None:
    lowered = {c.lower(): c for c in pool}
    if word.lower() in lowered:
        return lowered[word.lower()]
    found = difflib.get_close_matches(word, pool, n=1, cutoff=cutoff)
    if not found:
        found = [
            lowered[m] for m in difflib.get_close_matches(word.lower(), list(lowered), 1, cutoff)
        ]
    return found[0] if found else None


# --- showing source text in a terminal -----------------------------------------------------


def shown(c: str, keep_tab: bool = False) -> str:
    """How one character is written to a terminal: itself, or ``\\u{…}`` when it is a control,
    format, separator or unassigned character (NUL, BOM, U+2028, zero-width space, NBSP...)
    that would be invisible, look like a plain space, or move the cursor.

    >>> shown("a"), shown("\\u2028"), shown("\\x00"), shown("\\t"), shown("\\t", keep_tab=True)
    ('a', '\\\\u{2028}', '\\\\u{0}', '\\\\u{9}', '\\t')
    """
    if c == " " or (c == "\t" and keep_tab) or unicodedata.category(c)[0] not in "CZ":
        return c
    return f"\\u{{{ord(c):x}}}"


def _visible(text: str) -> str:
    """``text`` (a message, a note) with every invisible character escaped; newlines and tabs
    stay (a library's error message may run over several lines)."""
    if text.isprintable():  # the common case: nothing to escape
        return text
    return "".join(c if c in "\n\t" else shown(c) for c in text)


def _width(c: str) -> int:
    """Terminal columns a shown character takes: 2 for wide East Asian characters, 0 for
    combining marks (they sit on the previous character), else 1."""
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


# A line longer than this is shown as a window around the span (a 700 KB one-line selector
# would otherwise be echoed whole for every error on it).
_MAX_SHOWN = 240
_CONTEXT = 80


def _source_lines(text: str, col: int, stop: int) -> tuple[str, str]:
    """The line as shown and the caret line under ``text[col-1:stop-1]``: every character
    escaped as :func:`shown` writes it, the caret padding as wide as what it stands under."""
    if len(text) <= _MAX_SHOWN and text.isascii() and text.isprintable():  # the common case
        return text, " " * (col - 1) + "^" * max(1, min(stop, len(text) + 1) - col)
    lo, hi = 0, len(text)
    if hi > _MAX_SHOWN:
        lo = max(0, col - 1 - _CONTEXT)
        hi = min(hi, lo + _MAX_SHOWN)
    shown_line: list[str] = ["..."] if lo > 0 else []
    pad: list[str] = ["   "] if lo > 0 else []
    carets = 0
    for i in range(lo, hi):
        c = text[i]
        piece = shown(c, keep_tab=True)
        shown_line.append(piece)
        width = sum(_width(p) for p in piece) if piece != "\t" else 0
        if i < col - 1:
            # Keep the source's tabs in the padding so the caret lines up in a terminal.
            pad.append("\t" if piece == "\t" else " " * width)
        elif i < stop - 1:
            carets += width if piece != "\t" else 1
    if hi < len(text):
        shown_line.append("...")
    return "".join(shown_line), "".join(pad) + "^" * max(1, carets)


def render(diag: Diagnostic, source: str | None, filename: str) -> str:
    """Render one diagnostic as text (ends with a newline)."""
    return _render(diag, line_index(source) if source is not None else None, filename)


def _render(diag: Diagnostic, index: LineIndex | None, filename: str) -> str:
    out = [f"{diag.severity}[{diag.code}]: {_visible(diag.message)}"]
    if diag.span is None or index is None:
        out.append(f" --> {filename}")
        gutter = " "
    else:
        span = diag.span
        gutter = " " * len(str(span.line))
        out.append(f"{gutter}--> {filename}:{span.line}:{span.col}")
        text = index.line_text(span.line)
        # A span over several lines is underlined to the end of its first line.
        stop = span.end_col if span.end_line == span.line else len(text) + 1
        line_shown, caret_line = _source_lines(text, span.col, stop)
        labels = [label for s, label in diag.labels if s.line == span.line]
        out.append(f"{gutter} |")
        out.append(f"{span.line} | {line_shown}".rstrip())
        out.append(f"{gutter} | {caret_line}" + (f" {_visible(labels[0])}" if labels else ""))
    for note in diag.notes:
        out.append(f"{gutter} = note: {_visible(note)}")
    if diag.help:
        out.append(f"{gutter} = help: {_visible(diag.help)}")
    return "\n".join(out) + "\n"


def render_all(diags: Sequence[Diagnostic], source: str | None, filename: str) -> str:
    """Render several diagnostics, sorted by position, with a closing summary line."""
    ordered = sorted(diags, key=Diagnostic.sort_key)
    index = LineIndex(source) if source is not None else None
    parts = [_render(d, index, filename) for d in ordered]
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
