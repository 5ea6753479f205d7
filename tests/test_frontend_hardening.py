"""The front end on hostile input: huge numbers, deep nesting, huge files, invisible characters,
bytes that are not UTF-8, and counts no run could carry out.

Each test names the failure it guards against; all of them failed (crash, wrong meaning, raw
control characters on the terminal, quadratic time, no location) before the hardening.
"""

from __future__ import annotations

import json
import re
import time
import unicodedata
from pathlib import Path

import pytest

import surgery.diagnostics
from surgery import ast
from surgery.ast import strip_spans
from surgery.check import COUNT_LIMITS, check
from surgery.cli import main
from surgery.diagnostics import Diagnostic, LineIndex, render_all, span_of
from surgery.fmt import format_source
from surgery.parse import MAX_DIGITS, MAX_NESTING, parse, parse_statements
from tests.test_check import full_support
from tests.test_parse import _schema_validate


def diagnose(source: str) -> list[Diagnostic]:
    """Syntax and check diagnostics of ``source`` (what `surgery check` reports)."""
    statements, diags = parse_statements(source)
    recipe = ast.Recipe(statements=statements, span=span_of(source, 0, len(source)))
    return diags + check(recipe, full_support())


def rendered(source: str) -> str:
    return render_all(diagnose(source), source, "r.surg")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


# --- item 8: crashes --------------------------------------------------------------------------


def test_an_integer_over_4300_digits_is_a_located_error() -> None:
    # int("9" * 4301) raises ValueError (Python's int-string limit): was a VisitError, exit 1
    source = "group kv = " + "9" * 4301
    [d] = diagnose(source)
    assert (d.code, d.span and (d.span.line, d.span.col)) == ("S0105", (1, 12))
    assert d.message == "`99999999999999999999…99999999` is too large"
    assert d.help == f"a whole number has at most {MAX_DIGITS} digits; this one has 4301"


def test_leading_zeros_do_not_count_as_digits() -> None:
    [stmt] = parse("group kv = " + "0" * 5000 + "2").statements
    assert isinstance(stmt, ast.Group) and stmt.kv.value == 2


@pytest.mark.parametrize(
    ("digits", "ok"), [(MAX_DIGITS, True), (MAX_DIGITS + 1, False), (400, False)]
)
def test_whole_numbers_fit_64_bits(digits: int, ok: bool) -> None:
    codes = [d.code for d in diagnose("heal steps " + "9" * digits)]
    assert ("S0105" not in codes) == ok, codes


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("expect params <= 1e999", "is too large"),
        ("expect params <= 1e300G", "is too large"),  # finite, but 1e309 once scaled
        ("heal steps 10 lr 1e-999", "is too small: it would be read as 0"),
        ("expect drift <= " + "9" * 400 + "e-100000", "is too small"),
    ],
)
def test_numbers_that_a_float_cannot_hold_are_errors(source: str, fragment: str) -> None:
    found = [(d.code, d.message) for d in diagnose(source)]
    assert any(code == "S0105" and fragment in message for code, message in found), found


@pytest.mark.parametrize(
    "selector",
    [
        "(" * 250 + "params > 1" + ")" * 250,  # was RecursionError
        "not " * 500 + "params > 1",  # was RecursionError
        "not " * 300 + "params > 1",  # passed check, then could not be serialised
        "not (" * 40 + "params > 1" + ")" * 40,
    ],
)
def test_deep_selectors_are_a_located_error(selector: str) -> None:
    source = f"decompose Linear where {selector} rank = 0.5"
    [d] = diagnose(source)
    assert d.code == "S0108" and d.message == f"selector nested more than {MAX_NESTING} levels deep"
    assert d.span is not None and source[d.span.start : d.span.end] in ("(", "not")
    assert d.help
    # the opening tokens before the error, counted: exactly MAX_NESTING
    before = source[: d.span.start]
    assert before.count("(") + len(re.findall(r"\bnot\b", before)) == MAX_NESTING


@pytest.mark.parametrize(
    "selector",
    [
        "not " * MAX_NESTING + "params > 1",
        "(" * MAX_NESTING + "params > 1" + ")" * MAX_NESTING,
        "(params > 1 and " * MAX_NESTING + "flops < 2" + ")" * MAX_NESTING,
        "not (params > 1 or " * (MAX_NESTING // 2) + "flops < 2" + ")" * (MAX_NESTING // 2),
        # `not` binds to one operand: a long chain of `not x and` stays shallow
        " and ".join(["not not params > 1"] * 200),
    ],
)
def test_what_passes_check_serialises_and_formats(selector: str) -> None:
    source = f"decompose Linear where {selector} rank = 0.5"
    assert diagnose(source) == []
    recipe = parse(source)
    text = recipe.model_dump_json()
    assert ast.Recipe.model_validate_json(text) == recipe
    _schema_validate(json.loads(text), ast.recipe_json_schema())
    once = format_source(source)
    assert format_source(once) == once
    assert strip_spans(parse(once)) == strip_spans(recipe)


def test_deep_selector_exits_2_not_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.surg"
    path.write_text("decompose Linear where " + "not " * 500 + "params > 1 rank = 1\n")
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 2 and "error[S0108]" in err and "internal error" not in err
    code, _, err = run_cli(["fmt", str(path)], capsys)
    assert code == 2 and "error[S0108]" in err


# --- item 9: linear time ----------------------------------------------------------------------


def test_lines_are_indexed_once_per_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Locating k positions must not rescan the source k times (it counted newlines from the
    start for every position, and split the whole file for every rendered error)."""
    built: list[int] = []
    original_init = LineIndex.__init__

    def counting_init(self: LineIndex, source: str) -> None:
        built.append(len(source))
        original_init(self, source)

    monkeypatch.setattr(LineIndex, "__init__", counting_init)
    surgery.diagnostics.line_index.cache_clear()
    source = "group kv = 0\ngroup kv = x\ndecompose Linear rnak = 0.5\n" * 400
    diags = diagnose(source)
    assert len(diags) == 1200
    render_all(diags, source, "r.surg")
    # parse + check share one index; render_all builds its own: independent of the 1200 errors
    assert 1 <= len(built) <= 2, len(built)
    built.clear()
    for pos in range(0, len(source), 7):  # span_of on one source reuses its index
        span_of(source, pos, pos + 3)
    assert len(built) <= 1, len(built)


def test_line_index_agrees_with_counting() -> None:
    source = "a\nbc\r\n\n\u2028d\x0ce\n" + "x" * 10
    index = LineIndex(source)
    for pos in range(len(source) + 1):
        line = source.count("\n", 0, pos) + 1
        col = pos - (source.rfind("\n", 0, pos) + 1) + 1
        assert index.line_col(pos) == (line, col), pos
    assert [index.line_text(k) for k in range(1, 6)] == ["a", "bc", "", "\u2028d\x0ce", "x" * 10]


def _seconds(source: str) -> float:
    started = time.perf_counter()
    render_all(diagnose(source), source, "big.surg")
    return time.perf_counter() - started


@pytest.mark.slow
def test_huge_recipes_check_in_seconds_not_minutes() -> None:
    """A regression guard, not a benchmark (`bench/frontend_fuzz.py` times these): they took
    126 s, 64 s and 137 s on this machine before, and take a few seconds now."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    blob = "\n".join(p.read_text(encoding="utf-8") for p in sorted(recipes.glob("*.surg")))
    big = (blob + "\n") * (2_000_000 // len(blob) + 1)
    chain = "decompose Linear where " + " and ".join(f"params > {i}" for i in range(50_000))
    errors = "group kv = 0\n" * 32_000
    for source in (big, chain + " rank = 0.5\n", errors):
        assert _seconds(source) < 40


# --- item 10: fmt, keywords, invisible characters, encodings ---------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "# a\x0cb\n\n\n# c\n",  # `splitlines` broke the comment's line in two: blank lines lost
        "# a\x0cb\n\n\ngroup kv = 2\n",
        "group kv = 2  # x\x0by\n\n\n# z\x1c\n",
        "# \u2028\n\n\nskip tokens 5% after block 1\n",
        "group kv = 2 # a\rb\n\n\n# c\x85d\n",
    ],
)
def test_fmt_is_idempotent_with_line_breaking_characters_in_comments(source: str) -> None:
    once = format_source(source)
    assert format_source(once) == once
    assert "\n\n" in once  # the blank line between groups is kept once


@pytest.mark.parametrize("rank", [10**15, 10**15 + 1, 10**20, 10**30])
def test_fmt_keeps_a_huge_absolute_rank_absolute(rank: int) -> None:
    once = format_source(f"decompose Linear rank = {rank}\n")
    assert re.fullmatch(r"decompose Linear rank = \d+\n", once), once
    [stmt] = parse(once).statements
    assert isinstance(stmt, ast.Decompose) and stmt.rank is not None
    assert stmt.rank.kind == "absolute" and stmt.rank.value.value == float(rank)


@pytest.mark.parametrize(
    "value", ["5e-324", "2.2250738585072014e-308", "1.7976931348623157e308", "1e15", "1e16"]
)
def test_fmt_round_trips_extreme_floats(value: str) -> None:
    source = f"expect drift <= {value}\n"
    once = format_source(source)
    assert format_source(once) == once
    assert strip_spans(parse(once)) == strip_spans(parse(source))


@pytest.mark.parametrize(
    ("source", "code", "message"),
    [
        ("decomposeLinear rank=0.5", "S0101", "unknown statement `decomposeLinear`"),
        ("decompose Linear rank = 0.5 methodsvd", "S0102", "unknown word `methodsvd`"),
        ("expect paramsx <= 1", "S0102", "unknown word `paramsx` in `expect`"),
        ("decompose Linear where paramsx > 1 rank = 1", "S0102", "unknown word `paramsx`"),
        ("group kvv = 2", "S0102", "unknown word `kvv`"),
        (
            "decompose Linear rank = 0.5method svd",
            "S0109",
            "missing space between `0.5` and `method`",
        ),
        ("split Conv3d (2+1)dadd", "S0109", "missing space between `(2+1)d` and `add`"),
        ("drop mlp 2by similarity", "S0109", "missing space between `2` and `by`"),
    ],
)
def test_keywords_need_a_word_boundary(source: str, code: str, message: str) -> None:
    found = [(d.code, d.message) for d in diagnose(source)]
    assert any(c == code and message in m for c, m in found), found


def test_keywords_still_touch_punctuation() -> None:
    source = 'decompose Linear where(params>1M)and(name~"a*")or not(flops<=2) rank=25%;group kv=2'
    assert diagnose(source) == []
    assert [s.verb for s in parse(source).statements] == ["decompose", "group"]


def test_glued_keyword_suggests_the_split() -> None:
    [d] = diagnose("decomposeLinear rank=0.5")
    assert d.help == "did you mean `decompose`?"


def test_a_leading_byte_order_mark_is_ignored() -> None:
    source = "\ufeffgroup kv = 2\n"
    assert diagnose(source) == []
    assert format_source(source) == "group kv = 2\n"


def _assert_visible(text: str) -> None:
    """No character a terminal would hide or act on (tabs and newlines are fine)."""
    hidden = [
        c for c in text if c not in "\t\n" and unicodedata.category(c)[0] in "CZ" and c != " "
    ]
    assert not hidden, [f"U+{ord(c):04X}" for c in hidden]


def _caret_under(text: str, line_no: int) -> str:
    """The displayed text a rendered caret points at (terminal columns, wide characters 2)."""
    lines = text.splitlines()
    src = next(line for line in lines if line.startswith(f"{line_no} | "))[len(f"{line_no} | ") :]
    caret = next(line for line in lines if re.match(r"^\s*\| [ \t]*\^", line))
    caret = caret[caret.index("| ") + 2 :]

    def width(s: str) -> int:
        return sum(
            0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
            for c in s
        )

    column = width(caret[: caret.index("^")])
    shown = 0
    for i, c in enumerate(src):
        if shown == column:
            return src[i:]
        shown += width(c)
    return ""


@pytest.mark.parametrize(
    ("source", "char"),
    [
        ("group kv\u2028= 2", "U+2028 (LINE SEPARATOR)"),  # was "unexpected ``"
        ("group kv = 2\u2029", "U+2029 (PARAGRAPH SEPARATOR)"),  # was "incomplete statement"
        ("group kv = 2 \x00", "U+0000 (a control character)"),  # NUL reached the terminal raw
        ("group\u00a0kv = 2", "U+00A0 (NO-BREAK SPACE)"),
        ("group kv = \u200b2", "U+200B (ZERO WIDTH SPACE)"),
        ("\u2028", "U+2028 (LINE SEPARATOR)"),  # a line of it alone was silently skipped
        ("group kv = 2\n\ufeffgroup kv = 3", "U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
    ],
)
def test_invisible_characters_are_named_and_shown_escaped(source: str, char: str) -> None:
    [d] = diagnose(source)
    assert d.code == "S0103" and d.message == f"unexpected character {char}"
    text = rendered(source)
    _assert_visible(text)
    assert _caret_under(text, d.span.line if d.span else 0).startswith("\\u{")


@pytest.mark.parametrize(
    "source",
    [
        'calibrate with "a\u200bb\x00c" samples 0',  # invisible characters before the caret
        'calibrate with "線形\u3000データ" samples 0',  # wide characters before the caret
        'calibrate with "cafe\u0301" samples 0',  # a combining accent
        'calibrate with "a\tb" samples 0',  # a tab (kept, and kept in the padding)
    ],
)
def test_caret_lines_up_under_escaped_and_wide_characters(source: str) -> None:
    text = rendered(source)
    _assert_visible(text)
    assert _caret_under(text.expandtabs(8), 1).startswith("0"), text


def test_messages_and_notes_are_escaped() -> None:
    source = 'decompose Linear where name ~ "x" rank = 0.5 method svd\x00x'
    text = rendered(source)
    _assert_visible(text)


def test_a_very_long_line_is_shown_around_the_error() -> None:
    source = "decompose Linear where " + " and ".join(["params > 1"] * 20_000) + " rank = 0"
    text = rendered(source)
    assert max(len(line) for line in text.splitlines()) < 400
    assert _caret_under(text, 1).startswith("0")


def test_invalid_utf8_is_located(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.surg"
    path.write_bytes("group kv = 2\n# café crème\n".encode("latin-1"))
    code, _, err = run_cli(["check", str(path)], capsys)
    assert code == 2
    assert f"error[S0001]: recipe file `{path}` is not UTF-8 text" in err
    assert f" --> {path}:2:6\n" in err  # was: no line and column at all
    assert "2 | # caf\\xe9 cr\\xe8me\n" in err
    assert "  |      ^^^^\n" in err
    assert "note: byte 0xE9: invalid continuation byte" in err
    code, out, _ = run_cli(["check", "--format", "json", str(path)], capsys)
    [entry] = json.loads(out)
    assert (entry["span"]["line"], entry["span"]["col"]) == (2, 6)
    code, _, err = run_cli(["fmt", str(path)], capsys)
    assert code == 2 and f" --> {path}:2:6\n" in err


def test_bom_and_nul_through_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bom = tmp_path / "bom.surg"
    bom.write_bytes(b"\xef\xbb\xbfgroup kv = 2\n")
    assert run_cli(["check", str(bom)], capsys)[0] == 0
    code, out, _ = run_cli(["fmt", str(bom)], capsys)
    assert (code, out) == (0, "group kv = 2\n")
    nul = tmp_path / "nul.surg"
    nul.write_bytes(b"group kv = 2 \x00\n")
    code, _, err = run_cli(["check", str(nul)], capsys)
    assert code == 2 and "\x00" not in err and "\\u{0}" in err


# --- item 11: counts that no run could carry out ---------------------------------------------


COUNTS = {
    "trials": "target tvm llvm trials {}",
    "samples": 'calibrate with "c.txt" samples {}',
    "batch": 'calibrate with "c.txt" batch {}',
    "progressive": "decompose Linear rank = 0.25 progressive {} steps",
    "heal steps": "heal steps {}",
    "basis": "factorize Linear dense-sparse basis {} nonzeros 1",
}


def test_every_bounded_count_has_a_case() -> None:
    assert set(COUNTS) == set(COUNT_LIMITS)


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_counts_are_bounded(name: str) -> None:
    limit, why = COUNT_LIMITS[name]
    assert diagnose(COUNTS[name].format(limit)) == []
    [d] = diagnose(COUNTS[name].format(limit + 1))
    assert d.code == "S0203" and f"must be at most {limit:,}, found {limit + 1:,}" in d.message
    assert d.help == f"the limit is {limit:,}: {why}"


def test_a_million_progressive_steps_is_refused() -> None:
    # passed check, then ran out of memory building the family
    [d] = diagnose("decompose Linear rank = 0.25 progressive 1000000 steps")
    assert d.message == "`progressive` steps must be at most 64, found 1,000,000"


def test_fmt_reports_an_unreadable_file_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.surg"
    bad.write_bytes(b"group kv = 2 # \xff\n")
    good = tmp_path / "good.surg"
    good.write_text("group   kv=2\n")
    code, out, err = run_cli(["fmt", str(bad), str(good)], capsys)
    assert code == 2 and out == "group kv = 2\n"
    assert f" --> {bad}:1:16\n" in err
