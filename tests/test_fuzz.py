"""Mutated recipes never crash the front end: they parse or they produce diagnostics.

Start from real recipes (``recipes/*.surg``, the language sketch, the design card line) and
mutate them: delete, insert or replace characters and whole tokens, swap or duplicate
statements, insert keywords, numbers, quotes, separators, line continuations, CR/LF and
unusual unicode. For every mutant ``parse_statements`` and ``check`` must return (never raise),
and every diagnostic must have a span inside the source and render with ``render_all``.

``bench/frontend_fuzz.py`` goes further (generated recipes of every verb, byte-level mutations,
``fmt`` idempotence and meaning); a bounded run of it is a test here, the full 100,000-case run
is the benchmark.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.frontend_fuzz import run_fuzz
from surgery import ast
from surgery.check import check, support
from surgery.diagnostics import Diagnostic, render_all, span_of
from surgery.parse import VERBS, parse_statements
from tests.test_parse import DESIGN_CARD, SKETCH

ROOT = Path(__file__).resolve().parents[1]

SEEDS = [SKETCH, DESIGN_CARD] + [
    p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.surg"))
]

KEYWORDS = [
    *VERBS,
    "where", "and", "or", "not", "name", "rank", "energy", "method", "round", "progressive",
    "steps", "keep", "if", "faster", "budget", "params", "flops", "kv", "q", "tokens", "after",
    "block", "until", "exact", "(2+1)d", "add", "cat", "basis", "nonzeros", "every", "by",
    "blocks", "lr", "distill", "from", "original", "subset", "on", "with", "samples", "batch",
    "trials", "Linear", "Conv2d", "Conv3d", "svd-llm", "pseudo-uniform", "first-factor",
]  # fmt: skip
PIECES = [
    *KEYWORDS,
    "0", "-1", "2", "0.25", "1.", ".5", "55%", "1M", "3e-4", "1e999", "9" * 30, "2:4", "4:4",
    '"', '""', '"x"', '"unterminated', "\\", "\\\n", ";", ";;", "\n", "\r\n", "\r", "\t", " ",
    "#", "# comment", "=", "~", ">", ">=", "==", "!=", "(", ")", "[", "]", ",", ":", "%", "-",
    "é", "Linéar", "\u2028", "\u00a0", "\x00", "\x0b", "\x0c", "\ufeff", "😀", "ß", "İ",
]  # fmt: skip

TABLE = support()


# Strategies are built once: building them per example costs more than parsing the mutant.
_SEED = st.sampled_from(SEEDS)
_WHOLE = st.integers(min_value=0, max_value=3)  # 0: the whole file, else a window of lines
_BIG = st.integers(min_value=0, max_value=1 << 20)
_OP = st.integers(min_value=0, max_value=8)
_PIECE = st.sampled_from(PIECES) | st.text(max_size=3)
_COUNTS = {k: st.integers(min_value=1, max_value=k) for k in (3, 6)}


@st.composite
def mutants(draw: st.DrawFn, max_mutations: int = 6) -> str:
    source = draw(_SEED)
    if draw(_WHOLE):
        # a window of up to 6 lines of one recipe: keeps examples fast, mutations local
        lines = source.splitlines(keepends=True)
        first = draw(_BIG) % len(lines)
        source = "".join(lines[first : first + 1 + draw(_BIG) % 6])
    for _ in range(draw(_COUNTS[max_mutations])):
        source = mutate(source, draw(_OP), draw(_BIG), draw(_BIG), draw(_PIECE))
    return source


def mutate(source: str, op: int, a: int, b: int, text: str) -> str:
    """One mutation of ``source``: ``op`` picks the kind, ``a``/``b`` positions, ``text`` what
    to insert."""
    n = len(source)
    i = a % (n + 1)
    if op == 0:  # delete up to 8 characters
        return source[:i] + source[i + 1 + b % 8 :]
    if op == 1:  # insert a piece
        return source[:i] + text + source[i:]
    if op == 2:  # replace one character
        return source[:i] + text + source[i + 1 :]
    if op in (3, 4, 5):  # replace, delete or insert a whole token
        tokens = re.split(r"(\s+)", source)
        k = a % len(tokens)
        piece = PIECES[b % len(PIECES)]
        if op == 3:
            tokens[k] = piece
        elif op == 4:
            del tokens[k]
        else:
            tokens.insert(k, piece + " ")
        return "".join(tokens)
    # swap, duplicate or delete a statement (a line, or a `;`-separated part)
    parts = re.split(r"(?<=\n)|(?<=;)", source)
    j, k = a % len(parts), b % len(parts)
    if op == 6:
        parts[j], parts[k] = parts[k], parts[j]
    elif op == 7:
        parts.insert(k, parts[j])
    else:
        del parts[j]
    return "".join(parts)


def _assert_front_end_is_total(source: str) -> None:
    statements, diags = parse_statements(source)
    recipe = ast.Recipe(statements=statements, span=span_of(source, 0, len(source)))
    diags = diags + check(recipe, TABLE)
    for d in diags:
        assert isinstance(d, Diagnostic)
        assert re.fullmatch(r"S\d{4}", d.code), d
        assert d.message and d.severity in ("error", "warning")
        assert d.span is not None, d
        assert 0 <= d.span.start <= d.span.end <= len(source), d
        assert d.span == span_of(source, d.span.start, d.span.end), d
    text = render_all(diags, source, "fuzz.surg")
    assert isinstance(text, str)
    # what reaches a terminal: no raw control, separator or format character
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\x85\u2028\u2029\u200b\ufeff]", text), text
    text.encode("utf-8")  # no lone surrogate
    if diags:
        assert text.count(" --> fuzz.surg:") == len(diags)
        assert text.endswith("\n")
    for s in statements:
        assert 0 <= s.span.start <= s.span.end <= len(source)


@pytest.mark.slow
@settings(
    max_examples=10_000,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(mutants())
def test_fuzz_mutated_recipes_10k(source: str) -> None:
    _assert_front_end_is_total(source)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
    database=None,
)
@given(mutants(max_mutations=3))
def test_fuzz_mutated_recipes_quick(source: str) -> None:
    _assert_front_end_is_total(source)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(PIECES), max_size=30).map(" ".join))
def test_fuzz_random_token_soup(source: str) -> None:
    _assert_front_end_is_total(source)


@pytest.mark.parametrize(
    "source",
    [
        "",
        "\\",
        '"',
        "#",
        "\r",
        "\x00",
        "\ufeffgroup kv = 2",
        "group kv = " + "9" * 400,
        "skip tokens 1e400% after block 1",
        "decompose Linear where " + "(" * 200 + "params > 1" + ")" * 200 + " rank = 1",
        "decompose Linear where " + "not " * 300 + "params > 1 rank = 1",
        "truncate blocks keep 1 [" + ", ".join(["1"] * 500) + "]",
        "group kv = 2\\",
        "group kv = 2 \\\n",
        'calibrate with "a\\',
        "expect drift <= 0.05 on",
        # each of these crashed the front end or reached the terminal raw
        "group kv = " + "9" * 4301,
        "heal steps " + "0" * 5000 + "1",
        "decompose Linear where " + "(" * 250 + "params > 1" + ")" * 250 + " rank = 1",
        "decompose Linear where " + "not " * 500 + "params > 1 rank = 1",
        "decompose Linear where " + "not (" * 300 + "params > 1" + ")" * 300 + " rank = 1",
        "decomposeLinear rank=0.5",
        "decompose Linear rank = 0.5method svd",
        "group kv\u2028= 2",
        "group kv = 2\u2029",
        "\u2028\n\u00a0\n\u200b",
        "group kv = 2 \x00 \ufeff",
        "expect params <= 1e300G; heal steps 1 lr 1e-999",
        "# \x0c\n\n\ngroup kv = 2 # \x0b\r\x85",
    ],
)
def test_edge_cases(source: str) -> None:
    _assert_front_end_is_total(source)


def _assert_no_findings(result: dict[str, object]) -> None:
    found = {k: result[k] for k in ("exceptions", "non_idempotent", "meaning_changed")}
    assert found == {"exceptions": 0, "non_idempotent": 0, "meaning_changed": 0}, result["examples"]


def test_fuzz_check_and_fmt_quick() -> None:
    _assert_no_findings(run_fuzz(300, seed=7))


@pytest.mark.slow
def test_fuzz_check_and_fmt_5000() -> None:
    """5,000 generated and mutated recipes (about 30 s): no exception, `fmt` idempotent and
    meaning-preserving, diagnostics rendered without raw control characters."""
    _assert_no_findings(run_fuzz(5000, seed=1))


def _both_paths(source: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(statements and rendered diagnostics) from the fast path, then from Lark's own path."""
    import sys

    parse_module = sys.modules["surgery.parse"]  # `surgery.parse` is the function

    def dump() -> str:
        statements, diags = parse_statements(source)
        return "\n".join(
            [
                *(s.model_dump_json() for s in statements),
                repr(diags),
                render_all(diags, source, "r"),
            ]
        )

    fast = dump()
    with monkeypatch.context() as m:
        m.setattr(parse_module, "_tables", lambda: None)  # every statement through Lark
        slow = dump()
    return fast, slow


def test_the_fast_parse_path_equals_larks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The table-driven fast path builds exactly what Lark's parser and tree walk build, on
    every shipped recipe, every invalid golden, and a few thousand generated and mutated
    recipes (any statement it cannot parse falls back to Lark, so diagnostics match too)."""
    import random

    from bench.frontend_fuzz import _seeds, case

    root = Path(__file__).resolve().parents[1]
    sources = [p.read_text(encoding="utf-8") for p in sorted(root.glob("recipes/*.surg"))]
    sources += [
        p.read_text(encoding="utf-8", errors="replace")
        for p in sorted(root.glob("tests/golden/invalid/*.surg"))
    ]
    r = random.Random(7)
    seeds = _seeds()
    pool = [line for s in seeds for line in s.splitlines() if line.strip()]
    while len(sources) < 2500:
        _, text = case(r, seeds, pool)
        if isinstance(text, str):
            sources.append(text)
    for source in sources:
        fast, slow = _both_paths(source, monkeypatch)
        assert fast == slow, source
