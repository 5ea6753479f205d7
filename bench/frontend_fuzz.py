"""Benchmark: fuzz the front end (parse, check, render, fmt) and time it on huge recipes.

Prints one JSON object. ``--count`` recipes are generated from the grammar (every verb, every
option, edge values: 19-digit and 4,000-digit integers, ``1e999``, ``5e-324``, ``1e15`` as an
absolute rank, deep selectors, comments holding form feeds, NUL, U+2028...) or mutated from
``recipes/*.surg``, ``tests/golden/invalid/*.surg`` and generated recipes (byte flips, random
unicode and control characters, truncations, token swaps, statements spliced from other files).
Every case goes through ``parse_statements`` + ``check`` + ``render_all`` and, when it parses,
``format_source`` twice. Counted:

- ``exceptions``: anything raised other than a ``DiagnosticError`` from ``fmt`` (a bug);
- ``non_idempotent``: ``fmt(fmt(x)) != fmt(x)``;
- ``meaning_changed``: ``parse(fmt(x))`` differs from ``parse(x)`` up to spans, or the AST
  does not survive its own JSON.

``timings`` are wall seconds of what ``surgery check`` does after start-up (parse, check,
render) on a 2 MB recipe (``recipes/*.surg`` repeated), a 700 KB ``and`` chain and files with
32,000 check errors and 32,000 syntax errors, each also at half size: the ``ratio`` of full to
half size is about 2 when the front end is linear (it was 4 when it was quadratic).

    python bench/frontend_fuzz.py --count 100000        # the full run (minutes)
    python bench/frontend_fuzz.py --count 2000 --no-timings
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from surgery import ast
from surgery.check import BACKENDS, LANGUAGE, Support, check, support
from surgery.diagnostics import (
    DiagnosticError,
    SourceDecodeError,
    decode_source,
    render_all,
    span_of,
)
from surgery.fmt import format_source
from surgery.parse import MAX_NESTING, VERBS, parse, parse_statements

ROOT = Path(__file__).resolve().parents[1]

# --- generating valid-looking recipes ------------------------------------------------------

FIELDS = ["params", "flops", "in_features", "out_features", "kernel", "block", "speedup"]
OPS = [">", ">=", "<", "<=", "==", "!="]
METRICS = ["params", "flops", "drift", "speedup"]
ODD = [
    "\x00", "\x0b", "\x0c", "\r", "\x1c", "\x1e", "\x7f", "\x85", "\u00a0", "\u00ad", "\u200b",
    "\u200d", "\u2028", "\u2029", "\u3000", "\ufeff", "\ufffd", "\U0001f600", "\u0301", "é",
    "İ", "ß", "線", "\t", "\\", '"', "#", ";",
]  # fmt: skip
BLANKS = [" ", " ", " ", "  ", "\t", " \x0c ", " \\\n ", " \\\r\n "]


def _number(r: random.Random) -> str:
    kind = r.randrange(12)
    if kind == 0:
        return r.choice(["0", "1", "0.0", ".5", "1.", "-1", "-0", "00012"])
    if kind == 1:
        return str(r.randrange(10 ** r.randrange(1, 25)))  # up to 24 digits
    if kind == 2:
        return r.choice(["1e999", "1e-999", "5e-324", "1e308", "1e15", "1e16", "1e300G"])
    if kind == 3:
        return "9" * r.choice([19, 400, 4301])
    if kind == 4:
        return f"{r.uniform(0, 1):.{r.randrange(1, 17)}f}"
    if kind == 5:
        return f"{r.randrange(1, 100)}%"
    if kind == 6:
        return f"{r.randrange(1, 1000)}{r.choice('KMG')}"
    if kind == 7:
        return f"{r.randrange(1, 10)}e{r.randrange(-330, 330)}"
    if kind == 8:
        return repr(r.uniform(-1e6, 1e6))
    return str(r.randrange(0, 5000))


def _int(r: random.Random) -> str:
    kind = r.randrange(10)
    if kind == 0:
        return str(-r.randrange(0, 5))
    if kind == 1:
        return str(10 ** r.randrange(4, 20) + r.randrange(10))
    if kind == 2:
        return "9" * r.choice([18, 19, 4301])
    if kind == 3:
        return _number(r)  # not always a whole number: a located error
    return str(r.randrange(0, 300))


def _name(r: random.Random, pool: tuple[str, ...] | list[str]) -> str:
    if r.random() < 0.85:
        return r.choice(list(pool))
    return r.choice(["Linéar", "svd_llm", "x-y-z", "線形", "if", "name", "where", "Conv2D"])


def _string(r: random.Random) -> str:
    chars = [
        r.choice(["a", "b", "/", ".", " ", "é", '\\"', "\\\\", "#", ";", "😀"])
        for _ in range(r.randrange(0, 12))
    ]
    return '"' + "".join(chars) + '"'


def _predicate(r: random.Random, budget: list[int], depth: int = 0) -> str:
    budget[0] -= 1
    choice = r.randrange(6) if budget[0] > 0 and depth < MAX_NESTING + 3 else r.randrange(2)
    if choice == 0:
        return f"{r.choice(FIELDS)} {r.choice(OPS)} {_number(r)}"
    if choice == 1:
        return f"name ~ {_string(r)}"
    if choice == 2:
        return "not " + _predicate(r, budget, depth + 1)
    if choice == 3:
        return "(" + _predicate(r, budget, depth + 1) + ")"
    joiner = " and " if choice == 4 else " or "
    return joiner.join(_predicate(r, budget, depth + 1) for _ in range(r.randrange(2, 4)))


def _selector(r: random.Random, verb: str) -> str:
    types = LANGUAGE.get(verb, {}).get("type", ("Linear",))
    kind = r.randrange(4)
    if kind == 3 and r.random() < 0.2:  # deep on purpose: at and just past the nesting bound
        k = MAX_NESTING + r.randrange(-1, 2)
        inner = r.choice(["not " * k + "params > 1", "(" * k + "params > 1" + ")" * k])
        return f"{_name(r, types)} where {inner}"
    where = _predicate(r, [r.randrange(1, 8)])
    if kind == 0:
        return _name(r, types)
    if kind == 1:
        return f"where {where}"
    return f"{_name(r, types)} where {where}"


def _rank(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:
        return f"rank = energy {_number(r)}"
    if kind == 1:  # absolute, including 1e15 and more: must stay digits through fmt
        return f"rank = {10 ** r.randrange(0, 30) + r.randrange(100)}"
    return f"rank = {_number(r)}"


def _options(r: random.Random, options: list[str]) -> list[str]:
    chosen = [o for o in options if r.random() < 0.4]
    r.shuffle(chosen)
    if chosen and r.random() < 0.05:
        chosen.append(chosen[0])  # an option given twice
    return chosen


def statement(r: random.Random) -> str:
    """One statement of a random verb with random options and values."""
    verb = r.choice(VERBS)
    if verb == "target":
        backend = _name(r, tuple(BACKENDS))
        parts = ["target", backend]
        if r.random() < 0.6:
            parts.append(_name(r, BACKENDS.get(backend, ("cpu",))))
        parts += _options(r, [f"trials {_int(r)}"])
    elif verb == "calibrate":
        parts = [
            "calibrate with",
            _string(r),
            *_options(r, [f"samples {_int(r)}", f"batch {_int(r)}"]),
        ]
    elif verb == "decompose":
        opts = [
            _rank(r),
            f"method {_name(r, LANGUAGE['decompose']['method'])}",
            f"round {_int(r)}",
            f"progressive {_int(r)} steps",
            "keep if faster",
            f"budget {r.choice(['params', 'flops'])} {_number(r)}"
            + (" by sensitivity" if r.random() < 0.3 else ""),
        ]
        parts = ["decompose", _selector(r, verb), *_options(r, opts)]
    elif verb == "group":
        parts = ["group"] + ([f"q = {_int(r)}"] if r.random() < 0.3 else []) + [f"kv = {_int(r)}"]
    elif verb == "skip":
        parts = ["skip tokens", _number(r), f"after block {_int(r)}"]
        parts += _options(r, [f"until block {_int(r)}"])
    elif verb == "split":
        mode = r.choice(["exact", "(2+1)d"])
        parts = [
            "split",
            _selector(r, verb),
            mode,
            *_options(r, [r.choice(["add", "cat"]), _rank(r)]),
        ]
    elif verb == "sparsify":
        parts = ["sparsify", _selector(r, verb), f"{_int(r)}:{_int(r)}"]
    elif verb == "factorize":
        parts = [
            "factorize",
            _selector(r, verb),
            "dense-sparse",
            f"basis {_int(r)}",
            f"nonzeros {_int(r)}",
        ]
    elif verb == "regularize":
        parts = [
            "regularize",
            _name(r, ("nuclear",)),
            _number(r),
            *_options(r, [f"every {_int(r)} steps"]),
        ]
    elif verb == "drop":
        parts = ["drop", r.choice(["attention", "mlp"]), _int(r), *_options(r, ["by similarity"])]
    elif verb == "truncate":
        parts = ["truncate blocks keep", _int(r)]
        if r.random() < 0.5:
            parts.append(r.choice(["uniform", "pseudo-uniform"]))
        else:
            parts.append("[" + ", ".join(_int(r) for _ in range(r.randrange(1, 5))) + "]")
    elif verb == "freeze":
        parts = ["freeze", _name(r, LANGUAGE["freeze"]["what"])]
    elif verb == "heal":
        opts = [
            f"lr {_number(r)}",
            "distill from original",
            f"subset {_number(r)}" + (" by importance" if r.random() < 0.5 else ""),
            f"every {_int(r)} steps",
        ]
        parts = ["heal steps", _int(r), *_options(r, opts)]
    else:
        parts = ["expect", r.choice(METRICS), r.choice(OPS), _number(r)]
        parts += _options(r, [f"on {_name(r, tuple(BACKENDS))}"])
    text = ""
    for i, part in enumerate(parts):
        text += (r.choice(BLANKS) if i else "") + part
    return text


def _comment(r: random.Random) -> str:
    body = "".join(r.choice(["a", " ", *ODD]) for _ in range(r.randrange(0, 8)))
    return "#" + body.replace("\n", "")


def generated(r: random.Random) -> str:
    """A recipe of 1-6 generated statements with comments, blank lines and odd separators."""
    out = []
    for _ in range(r.randrange(1, 7)):
        if r.random() < 0.2:
            out.append(_comment(r) + "\n")
        if r.random() < 0.1:
            out.append(r.choice(["\n", "\x0c\n", " \t\n"]))
        line = statement(r)
        if r.random() < 0.3:
            line += " " + _comment(r)
        out.append(line + r.choice(["\n", "\n", "\r\n", "; ", ";"]))
    return "".join(out)


# --- mutating -----------------------------------------------------------------------------


def _seeds() -> list[str]:
    files = sorted((ROOT / "recipes").glob("*.surg")) + sorted(
        (ROOT / "tests" / "golden" / "invalid").glob("*.surg")
    )
    return [p.read_text(encoding="utf-8") for p in files]


def mutate(r: random.Random, source: str, pool: list[str]) -> str:
    """One random mutation of ``source``; ``pool`` gives statements to splice in."""
    n = len(source)
    i = r.randrange(n + 1)
    op = r.randrange(10)
    if op == 0:  # delete a few characters
        return source[:i] + source[i + 1 + r.randrange(8) :]
    if op == 1:  # insert an odd character
        return source[:i] + r.choice(ODD) + source[i:]
    if op == 2:  # insert any character
        return (
            source[:i] + chr(r.choice([r.randrange(32, 127), r.randrange(0x10FFFF)])) + source[i:]
        )
    if op == 3:  # truncate
        return source[:i]
    if op == 4:  # replace a token by a piece of another statement
        tokens = re.split(r"(\s+)", source)
        k = r.randrange(len(tokens))
        other = re.split(r"\s+", r.choice(pool))
        tokens[k] = r.choice(other)
        return "".join(tokens)
    if op == 5:  # splice a statement from another recipe
        lines = source.split("\n")
        lines.insert(r.randrange(len(lines) + 1), r.choice(pool))
        return "\n".join(lines)
    if op == 6:  # duplicate or delete a line
        lines = source.split("\n")
        k = r.randrange(len(lines))
        if r.random() < 0.5:
            lines.insert(k, lines[k])
        else:
            del lines[k]
        return "\n".join(lines)
    if op == 7:  # glue two words: drop a space
        spaces = [m.start() for m in re.finditer(" ", source)]
        if spaces:
            k = r.choice(spaces)
            return source[:k] + source[k + 1 :]
        return source
    if op == 8:  # a keyword or number in an odd place
        piece = r.choice(["not", "(", ")", "and", "9" * 30, "1e999", "rank", "=", "\\\n", '"'])
        return source[:i] + " " + piece + " " + source[i:]
    return source[:i] + generated(r).rstrip("\n") + source[i:]


def _window(r: random.Random, source: str) -> str:
    """A few lines of ``source`` (whole files are slow to fuzz and no more interesting)."""
    lines = source.splitlines(keepends=True)
    if not lines or r.random() < 0.02:
        return source
    first = r.randrange(len(lines))
    return "".join(lines[first : first + 1 + r.randrange(8)])


def case(r: random.Random, seeds: list[str], pool: list[str]) -> tuple[str, str | bytes]:
    """("generated" | "mutated" | "bytes", the recipe text or file bytes)."""
    roll = r.random()
    if roll < 0.3:
        return "generated", generated(r)
    source = _window(r, r.choice(seeds)) if roll < 0.8 else generated(r)
    for _ in range(1 + r.randrange(4)):
        source = mutate(r, source, pool)
    if r.random() < 0.05:  # a file that may not be UTF-8
        data = bytearray(source.encode("utf-8", errors="surrogatepass"))
        for _ in range(1 + r.randrange(3)):
            if data:
                data[r.randrange(len(data))] = r.randrange(256)
        return "bytes", bytes(data)
    return "mutated", source


# --- the properties -----------------------------------------------------------------------


class Finding(Exception):
    """A property that does not hold (not an exception of the code under test)."""


def run_case(text: str | bytes, table: Support) -> str | None:
    """Check one recipe; returns None, "non_idempotent" or "meaning_changed", or raises."""
    if isinstance(text, bytes):
        try:
            text = decode_source(text, "fuzz.surg")
        except SourceDecodeError as exc:
            render_all(exc.diagnostics, exc.source, "fuzz.surg").encode("utf-8")
            return None
    statements, diags = parse_statements(text)
    recipe = ast.Recipe(statements=statements, span=span_of(text, 0, len(text)))
    diags = diags + check(recipe, table)
    for d in diags:
        if d.span is None or not 0 <= d.span.start <= d.span.end <= len(text):
            raise Finding(f"diagnostic without a span inside the source: {d}")
    # Written to a terminal: must encode (no lone surrogates) and hold no raw control character.
    rendered = render_all(diags, text, "fuzz.surg")
    rendered.encode("utf-8")
    if re.search(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029\ufeff]", rendered):
        raise Finding(f"raw control character in rendered diagnostics: {rendered[:200]!r}")
    if ast.Recipe.model_validate_json(recipe.model_dump_json()) != recipe:
        return "meaning_changed"
    syntax = [d for d in diags if d.code.startswith("S01")]
    try:
        once = format_source(text)
    except DiagnosticError:
        if not syntax:
            raise Finding("fmt refused a recipe without syntax errors") from None
        return None
    if syntax:
        raise Finding("fmt formatted a recipe with syntax errors")
    if format_source(once) != once:
        return "non_idempotent"
    if ast.strip_spans(parse(once)) != ast.strip_spans(recipe):
        return "meaning_changed"
    return None


def run_fuzz(
    count: int, seed: int = 0, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Fuzz ``count`` cases; the counts and up to five examples of each kind of failure."""
    r = random.Random(seed)
    seeds = _seeds() + [generated(r) for _ in range(20)]
    pool = [line for s in seeds for line in s.splitlines() if line.strip()]
    table = support()
    kinds = {"generated": 0, "mutated": 0, "bytes": 0}
    failures: dict[str, int] = {"exceptions": 0, "non_idempotent": 0, "meaning_changed": 0}
    examples: list[dict[str, str]] = []
    started = time.perf_counter()
    for i in range(count):
        kind, text = case(r, seeds, pool)
        kinds[kind] += 1
        try:
            found = run_case(text, table)
        except Exception as exc:
            found = "exceptions"
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()[:300]
        else:
            detail = ""
        if found is not None:
            failures[found] += 1
            if len(examples) < 5:
                examples.append({"kind": found, "source": repr(text)[:400], "error": detail})
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1)
    seconds = time.perf_counter() - started
    return {
        "count": count,
        **kinds,
        **failures,
        "seconds": round(seconds, 1),
        "cases_per_second": round(count / seconds, 1) if seconds else None,
        "examples": examples,
    }


# --- timings on huge recipes --------------------------------------------------------------


def _big_recipe(size: int) -> str:
    blob = "\n".join(
        p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.surg"))
    )
    return (blob + "\n") * (size // (len(blob) + 1) + 1)


def _and_chain(size: int) -> str:
    parts = []
    total = 40
    i = 0
    while total < size:
        part = f"params > {i}"
        parts.append(part)
        total += len(part) + 5
        i += 1
    return "decompose Linear where " + " and ".join(parts) + " rank = 0.5\n"


def _check_seconds(source: str, table: Support) -> tuple[float, int]:
    started = time.perf_counter()
    statements, diags = parse_statements(source)
    recipe = ast.Recipe(statements=statements, span=span_of(source, 0, len(source)))
    diags = diags + check(recipe, table)
    render_all(diags, source, "big.surg")
    return time.perf_counter() - started, len(diags)


def timings() -> dict[str, Any]:
    """Seconds of parse + check + render on four huge recipes, at full and half size."""
    table = support()
    parse_statements("group kv = 2")  # build the parser outside the clock
    cases: dict[str, Callable[[int], str]] = {
        "recipe_2mb": lambda k: _big_recipe(2_000_000 // k),
        "and_chain_700kb": lambda k: _and_chain(700_000 // k),
        "check_errors_32000": lambda k: "group kv = 0\n" * (32_000 // k),
        "syntax_errors_32000": lambda k: (
            "group kv = x\ndecompose Linear rnak = 0.5\n" * (16_000 // k)
        ),
    }
    out: dict[str, Any] = {}
    for name, make in cases.items():
        full, diags = _check_seconds(make(1), table)
        half, _ = _check_seconds(make(2), table)
        out[name] = {
            "bytes": len(make(1).encode("utf-8")),
            "diagnostics": diags,
            "seconds": round(full, 2),
            "half_size_seconds": round(half, 2),
            "ratio": round(full / half, 2) if half else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000, help="recipes to fuzz (default 100000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-timings", action="store_true", help="skip the huge-recipe timings")
    ap.add_argument("--progress", action="store_true", help="a line on stderr every 1000 cases")
    args = ap.parse_args()

    def progress(done: int) -> None:
        sys.stderr.write(f"{done}/{args.count}\n")

    result: dict[str, Any] = {
        "benchmark": "frontend_fuzz",
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        **run_fuzz(args.count, args.seed, progress if args.progress else None),
    }
    if not args.no_timings:
        result["timings"] = timings()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
