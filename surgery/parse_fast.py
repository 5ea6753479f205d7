"""The table-driven fast path of :mod:`surgery.parse`: one statement parsed straight from
Lark's tables, its AST nodes built at each reduction.

Lark's parser spends most of its time per token in generic code (a lexer thread, a
post-lexer generator, ``Token`` objects, ``feed_token``, a ``Tree`` per reduction) and
:class:`~surgery.parse_build._Build` walks the finished tree once more. For a statement that
parses, :func:`_fast_statement` does the same work from Lark's own tables (:func:`_tables`) --
the per-state scanners of the contextual lexer (with their keyword callbacks) and the LALR
action table -- and calls the builder at each reduction, with the children Lark's tree builder
would have given the node. Anything unusual (a character no terminal matches, a syntax error,
glued words, deep nesting, a builder error) abandons it with :class:`_Fallback`, and the
statement is parsed again by :meth:`Lark.parse` and ``_Build``, which produce the diagnostic
exactly as before.

>>> from surgery.parse_build import _Build
>>> source = "decompose Linear rank = 0.5"
>>> _fast_statement(_tables(), source, _Build(source, 0)).rank.kind
'fraction'
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lark.lexer import PatternStr

from surgery.parse_build import _VALUE_KEYWORD_RULES, _Build, _Tok
from surgery.parse_lark import _VALUE_TERMINALS, _is_word_char, _keyword_types, _Nesting, parser


class _Fallback(Exception):
    """The fast path cannot handle this statement: parse it the ordinary way."""


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
