"""The Lark side of :mod:`surgery.parse`: the grammar, the LALR parser built from it, and the
post-lexer between the two that keeps words whole and nesting bounded.

:func:`parser` is built once from ``grammar/surg.lark``. :class:`_Words` runs between its lexer
and its parser, counting nesting with :class:`_Nesting`, which the fast path
(:mod:`surgery.parse_fast`) shares so that both bound it alike; what they refuse is raised as a
:class:`_LexProblem`. :func:`_keyword_types` and :func:`_terminal_literals` read the parser's
terminals for the builder and for messages. The public names here are re-exported, and
documented for users, by :mod:`surgery.parse`.

>>> str(parser().parse("group kv=2", start="statement").data)
'group'
>>> _terminal_literals()["DECOMPOSE"]
['decompose']
>>> nesting = _Nesting()
>>> any(nesting.too_deep("(") for _ in range(MAX_NESTING)), nesting.too_deep("not")
(False, True)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from importlib import resources

from lark import Lark, Token
from lark.lark import PostLex
from lark.lexer import PatternStr

from surgery.verbs import BY_KEYWORD

#: Deepest nesting of parentheses and ``not`` in a selector. Real selectors nest two or three
#: levels; the bound keeps every recursive consumer of the AST (checker, formatter, pydantic's
#: validation and JSON serialisation, which give up between 120 and 200 levels) far from its
#: limit.
MAX_NESTING = 64

#: Every statement keyword (from the one tuple of verbs, :data:`surgery.verbs.VERBS`).
VERBS = tuple(BY_KEYWORD)


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

    Trees keep every token (``keep_all_tokens``) and carry no positions: the builder
    (:class:`~surgery.parse_build._Build`) takes each node's extent from its first and last
    token and drops the keywords itself. Lark's ``propagate_positions`` does the same per
    reduction in generic code and cost a third of the parse.
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
