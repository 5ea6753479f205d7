"""``parse(format_recipe(ast))`` gives ``ast`` back (up to spans) for every statement kind.

The strategies build ASTs directly (not text), so they reach combinations no example recipe
has: every verb and option, recursive predicates, numbers with units, hyphenated names. Where
an AST cannot be written in the language at all, the strategy avoids it and says why.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from surgery import ast
from surgery.ast import strip_spans
from surgery.check import BACKENDS, LANGUAGE
from surgery.fmt import format_recipe, format_source, format_statement
from surgery.parse import parse
from surgery.verbs.expect import METRICS as EXPECT_METRICS

ROOT = Path(__file__).resolve().parents[1]

S = ast.Span(start=0, end=0, line=1, col=1, end_line=1, end_col=1)

OPS = [">", ">=", "<", "<=", "==", "!="]
FIELDS = ["params", "flops", "in_features", "out_features", "kernel", "block", "speedup"]
METRICS = list(EXPECT_METRICS)
UNITS = ["", "%", "K", "M", "G"]

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def names(values: Any) -> st.SearchStrategy[ast.Name]:
    return st.sampled_from(sorted(values)).map(lambda v: ast.Name(value=v, span=S))


# --- leaves --------------------------------------------------------------------------------

# Integers are written as digits, so any whole number round-trips (the grammar allows `-`).
ints = st.integers(min_value=-3, max_value=10**12).map(lambda v: ast.Int(value=v, span=S))
positive_ints = st.integers(min_value=1, max_value=4096).map(lambda v: ast.Int(value=v, span=S))

# At most 1e299: with the unit `G` applied a number must stay finite (`1e300G` is rejected).
finite = st.one_of(
    st.floats(min_value=0.0, max_value=1e299, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=10**6).map(float),
    st.sampled_from(
        [0.0, 0.25, 0.5, 1.0, 3e-4, 1e-05, 55.0, 1e15, 1e16, 123456789.125, 5e-324, 1e299]
    ),
)
numbers = st.builds(
    lambda v, u: ast.Number(value=v, unit=u, span=S), finite, st.sampled_from(UNITS)
)

# Strings cannot hold a newline: a statement (and a string) ends with its line.
strings = st.text(
    alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=20
).map(lambda v: ast.Str(value=v, span=S))

flag = st.just(ast.Flag(span=S))


def ranks() -> st.SearchStrategy[ast.Rank]:
    # An absolute rank is how an integer without unit is read, so it has integral value and no
    # unit; `rank = 1K` reads as a fraction (whose range the checker then rejects).
    # Up to 10**30: an absolute rank of 1e15 and more must still be written as digits.
    absolute = st.integers(min_value=0, max_value=10**30).map(
        lambda v: ast.Rank(kind="absolute", value=ast.Number(value=float(v), span=S), span=S)
    )
    fraction = numbers.map(lambda n: ast.Rank(kind="fraction", value=n, span=S))
    energy = numbers.map(lambda n: ast.Rank(kind="energy", value=n, span=S))
    return st.one_of(absolute, fraction, energy)


# --- predicates and selectors ------------------------------------------------------------

compares = st.builds(
    lambda f, op, v: ast.Compare(field=ast.Name(value=f, span=S), op=op, value=v, span=S),
    st.sampled_from(FIELDS),
    st.sampled_from(OPS),
    numbers,
)
matches = strings.map(lambda s: ast.Match(pattern=s, span=S))


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    many = st.lists(children, min_size=2, max_size=3)
    return st.one_of(
        many.map(lambda items: ast.And(items=items, span=S)),
        many.map(lambda items: ast.Or(items=items, span=S)),
        children.map(lambda item: ast.Not(item=item, span=S)),
    )


# An And/Or of one item is unrepresentable (the parser returns the item itself), hence
# min_size=2 above.
predicates = st.recursive(st.one_of(compares, matches), _extend, max_leaves=6)


def selectors(verb: str) -> st.SearchStrategy[ast.Selector]:
    types = st.none() | names(LANGUAGE[verb]["type"])
    where = st.none() | predicates
    return (
        st.tuples(types, where)
        # A selector with neither a type nor a `where` is not a selector: the grammar needs one.
        .filter(lambda tw: tw != (None, None))
        .map(lambda tw: ast.Selector(type=tw[0], where=tw[1], span=S))
    )


# --- statements --------------------------------------------------------------------------


def opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


def target() -> st.SearchStrategy[ast.Target]:
    def build(backend: str, device: ast.Name | None, trials: ast.Int | None) -> ast.Target:
        return ast.Target(
            backend=ast.Name(value=backend, span=S), device=device, trials=trials, span=S
        )

    return st.sampled_from(sorted(BACKENDS)).flatmap(
        lambda b: st.builds(build, st.just(b), opt(names(BACKENDS[b])), opt(ints))
    )


calibrates = st.builds(
    ast.Calibrate, source=strings, samples=opt(ints), batch=opt(ints), span=st.just(S)
)

decomposes = st.builds(
    ast.Decompose,
    selector=selectors("decompose"),
    rank=opt(ranks()),
    method=opt(names(LANGUAGE["decompose"]["method"])),
    round=opt(ints),
    progressive=opt(ints),
    keep_if_faster=opt(flag),
    rank_auto=opt(flag),
    budget=opt(
        st.builds(
            ast.Budget,
            resource=st.sampled_from(["params", "flops", "latency"]),
            value=numbers,
            by=opt(names(LANGUAGE["decompose"]["budget by"])),
            span=st.just(S),
        )
    ),
    span=st.just(S),
)

groups = st.builds(ast.Group, q=opt(ints), kv=ints, span=st.just(S))
skips = st.builds(ast.SkipTokens, ratio=numbers, after=ints, until=opt(ints), span=st.just(S))
splits = st.builds(
    ast.Split,
    selector=selectors("split"),
    mode=names(["exact", "(2+1)d"]),
    combine=opt(names(LANGUAGE["split"]["combine"])),
    rank=opt(ranks()),
    span=st.just(S),
)
sparsifies = st.builds(
    ast.Sparsify, selector=selectors("sparsify"), n=ints, m=ints, span=st.just(S)
)
factorizes = st.builds(
    ast.Factorize,
    selector=selectors("factorize"),
    method=names(LANGUAGE["factorize"]["method"]),
    basis=ints,
    nonzeros=ints,
    span=st.just(S),
)
regularizes = st.builds(
    ast.Regularize,
    method=names(LANGUAGE["regularize"]["method"]),
    strength=numbers,
    every=opt(ints),
    span=st.just(S),
)
drops = st.builds(
    ast.Drop,
    sublayer=names(["attention", "mlp"]),
    count=ints,
    by=opt(names(LANGUAGE["drop"]["by"])),
    span=st.just(S),
)
# A strategy and an index list exclude each other in the grammar, and an empty index list
# `[]` is not valid syntax.
truncates = st.one_of(
    st.builds(
        ast.Truncate,
        keep=ints,
        strategy=opt(names(LANGUAGE["truncate"]["strategy"])),
        span=st.just(S),
    ),
    st.builds(
        ast.Truncate, keep=ints, indices=st.lists(ints, min_size=1, max_size=5), span=st.just(S)
    ),
)
freezes = st.builds(ast.Freeze, what=names(LANGUAGE["freeze"]["what"]), span=st.just(S))


@st.composite
def heals(draw: st.DrawFn) -> ast.Heal:
    subset = draw(opt(numbers))
    # `by importance` is part of `subset P [by NAME]`; without a subset it cannot be written.
    by = draw(opt(names(LANGUAGE["heal"]["by"]))) if subset is not None else None
    # `loss` is written only with its terms, and `temperature` only after `kl`.
    mse, kl, task = draw(opt(numbers)), draw(opt(numbers)), draw(opt(numbers))
    temperature = draw(opt(numbers)) if kl is not None else None
    terms = (mse, kl, task)
    return ast.Heal(
        steps=draw(ints),
        lr=draw(opt(numbers)),
        distill=draw(opt(flag)),
        subset=subset,
        by=by,
        every=draw(opt(ints)),
        on=draw(opt(strings)),
        field=draw(opt(strings)),
        label=draw(opt(strings)),
        max_length=draw(opt(ints)),
        batch=draw(opt(ints)),
        eval_on=draw(opt(strings)),
        eval_split=draw(opt(numbers)),
        eval_every=draw(opt(ints)),
        warmup=draw(opt(ints)),
        accumulate=draw(opt(ints)),
        clip=draw(opt(numbers)),
        loss=ast.Flag(span=S) if any(t is not None for t in terms) else None,
        mse=mse,
        kl=kl,
        temperature=temperature,
        task=task,
        checkpoint_every=draw(opt(ints)),
        keep_best=draw(opt(flag)),
        stop_early=draw(opt(flag)),
        seed=draw(opt(ints)),
        gradient_checkpointing=draw(opt(flag)),
        span=S,
    )


# `x` (a ratio to the original) is a unit only `expect` takes.
expects = st.builds(
    ast.Expect,
    metric=names(METRICS),
    op=st.sampled_from(OPS),
    value=numbers | st.builds(lambda v: ast.Number(value=v, unit="x", span=S), finite),
    on=opt(names(BACKENDS)),
    data=opt(strings),
    k=opt(ints),
    function=opt(strings),
    span=st.just(S),
)

STATEMENTS: dict[str, st.SearchStrategy[Any]] = {
    "target": target(),
    "calibrate": calibrates,
    "decompose": decomposes,
    "group": groups,
    "skip": skips,
    "split": splits,
    "sparsify": sparsifies,
    "factorize": factorizes,
    "regularize": regularizes,
    "drop": drops,
    "truncate": truncates,
    "freeze": freezes,
    "heal": heals(),
    "expect": expects,
}
statements = st.one_of(*STATEMENTS.values())
recipes = st.lists(statements, max_size=6).map(lambda ss: ast.Recipe(statements=ss, span=S))


def test_every_verb_has_a_strategy() -> None:
    from surgery.parse import VERBS

    assert set(STATEMENTS) == set(VERBS)


# --- properties ------------------------------------------------------------------------------


def _roundtrip(recipe: ast.Recipe) -> None:
    text = format_recipe(recipe)
    assert strip_spans(parse(text)) == strip_spans(recipe), text


@pytest.mark.parametrize("verb", sorted(STATEMENTS))
def test_statement_round_trips(verb: str) -> None:
    @PROPERTY
    @given(STATEMENTS[verb])
    def check(stmt: Any) -> None:
        _roundtrip(ast.Recipe(statements=[stmt], span=S))

    check()


@settings(PROPERTY, max_examples=300)
@given(recipes)
def test_recipe_round_trips(recipe: ast.Recipe) -> None:
    _roundtrip(recipe)


@PROPERTY
@given(recipes)
def test_formatted_text_is_a_fixed_point(recipe: ast.Recipe) -> None:
    text = format_recipe(recipe)
    assert format_source(text) == text
    assert format_recipe(parse(text)) == text


comments = st.text(
    alphabet=st.characters(
        blacklist_characters="\n\r", blacklist_categories=("Cs", "Zl", "Zp", "Cc")
    ),
    max_size=15,
).map(lambda t: "# " + t.strip())


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(statements, st.none() | comments, st.none() | comments, st.booleans()), max_size=5
    )
)
def test_format_source_keeps_comments_and_is_idempotent(
    items: list[tuple[Any, str | None, str | None, bool]],
) -> None:
    lines: list[str] = []
    written: list[str] = []
    for stmt, above, trailing, blank in items:
        if blank:
            lines.append("")
        if above is not None:
            lines.append(above)
            written.append(above)
        text = format_statement(stmt)
        if trailing is not None:
            text += "   " + trailing
            written.append(trailing)
        lines.append(text)
    source = "\n".join(lines) + "\n"
    once = format_source(source)
    assert format_source(once) == once
    assert _comment_texts(once) == [c.rstrip() for c in written]
    assert strip_spans(parse(once)) == strip_spans(parse(source))


def _comment_texts(source: str) -> list[str]:
    found = []
    for line in source.splitlines():
        # comments in the generated sources never follow a string containing `#`... unless
        # the string does; skip string contents when looking for the comment.
        stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', line)
        if "#" in stripped:
            found.append(line[len(line) - len(stripped) + stripped.index("#") :].rstrip())
    return found


EXAMPLES = [
    *sorted((ROOT / "recipes").glob("*.surg")),
]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_format_source_on_the_recipes(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    once = format_source(source)
    assert format_source(once) == once
    original = [line.strip() for line in source.splitlines() if line.strip().startswith("#")]
    kept = [line.strip() for line in once.splitlines() if line.strip().startswith("#")]
    assert kept == original
    assert strip_spans(parse(once)) == strip_spans(parse(source))


def test_format_source_on_the_sketch() -> None:
    from tests.test_parse import SKETCH

    once = format_source(SKETCH)
    assert format_source(once) == once
    assert strip_spans(parse(once)) == strip_spans(parse(SKETCH))
    for comment in re.findall(r"#[^\n]*", SKETCH):
        assert comment.rstrip() in once, comment
    # same order
    assert re.findall(r"#[^\n]*", once) == [c.rstrip() for c in re.findall(r"#[^\n]*", SKETCH)]


def test_format_source_examples() -> None:
    source = "group   kv=2 ;skip tokens 55% after  block 3 # SkipViT\n\n\n# tail\n"
    assert (
        format_source(source)
        == "group kv = 2\nskip tokens 55% after block 3  # SkipViT\n\n# tail\n"
    )
    assert format_source("# a\n# b\n") == "# a\n# b\n"
    assert format_source("") == ""
