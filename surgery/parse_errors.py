"""Syntax errors -> diagnostics: what Lark raises for one statement, or what the post-lexer
refuses (:class:`~surgery.parse_lark._LexProblem`), becomes a located
:class:`~surgery.diagnostics.Diagnostic` that names what was expected there and suggests the
nearest keyword.

What was expected is asked of the parser itself (:func:`_lex_prefix`: the terminals it accepts
after the text before the error), not read from Lark's exception, whose lexer list mixes in
terminals of other statements.

>>> _one_of(["`rank`", "`method`", "a number"])
'one of `rank`, `method` or a number'
>>> _describe_char(chr(0x2028))
'U+2028 (LINE SEPARATOR)'
"""

from __future__ import annotations

import re
import unicodedata

from lark import Token
from lark.exceptions import (
    UnexpectedCharacters,
    UnexpectedEOF,
    UnexpectedInput,
    UnexpectedToken,
)

from surgery.diagnostics import Diagnostic, LineIndex, clip, nearest
from surgery.parse_lark import MAX_NESTING, VERBS, _LexProblem, _terminal_literals, parser

# How value terminals are described in messages.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "STRING": 'a quoted string like "calib.pt"',
    "NUMBER": "a number",
    "_SEP": "the end of the statement",
    "$END": "the end of the statement",
    "CMP": "a comparison (`>`, `>=`, `<`, `<=`, `==`, `!=`)",
}


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
