"""The parser: the design card's examples, spans, separators, comments, JSON and its schema."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from surgery import ast
from surgery.ast import Recipe, recipe_json_schema, strip_spans
from surgery.diagnostics import DiagnosticError
from surgery.parse import VERBS, parse, parse_statements

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SCHEMA = ROOT / "surgery" / "schema" / "recipe.schema.json"


DESIGN_CARD = (
    "decompose Linear where params>1M rank=0.25 progressive 4 steps; group kv=2; "
    "skip tokens 55% after block 3"
)

# The language sketch of ARCHITECTURE.md, verbatim.
SKETCH = """\
# recipes/bert-lowrank.surg
target tvm llvm                       # where to lower and measure; several allowed
calibrate with "calib.pt" samples 128 # inputs for data-aware passes, drift and timing

decompose Linear where params > 1M and name ~ "encoder.*" rank = 0.25 method svd-llm round 64
decompose Conv2d where kernel > 1 method tucker rank = 0.5 keep if faster
decompose Linear rank = 0.5 progressive 4 steps             # PLRD family, one checkpoint per step
group kv = 2                                                # GQA; `group q = 3 kv = 2` is GQKVA
skip tokens 55% after block 3                               # SkipViT
split Conv3d exact                                          # 3D conv with 4D tensors only
split Conv3d (2+1)d add                                     # spatial + temporal branches
sparsify Linear where name ~ "*.mlp.*" 2:4                  # measured, never assumed faster
factorize Linear dense-sparse basis 32 nonzeros 8           # DSFormer
regularize nuclear 3e-4 every 10 steps                      # trained rank pruning, while healing
drop attention 4 by similarity                              # remove least useful sublayers
truncate blocks keep 6 pseudo-uniform
freeze first-factor                                         # sequential freezing while healing
heal steps 200 distill from original subset 10% by importance every 50 steps

expect params <= 60%
expect drift <= 0.05                                        # relative output error on calibration
expect speedup >= 1.3 on tvm
"""


def _at(source: str, node: ast.Node) -> str:
    return source[node.span.start : node.span.end]


# --- the design card and the sketch ------------------------------------------------------


def test_design_card_line_parses_exactly_as_written() -> None:
    recipe = parse(DESIGN_CARD)
    decompose, group, skip = recipe.statements
    assert isinstance(decompose, ast.Decompose)
    assert decompose.selector.type is not None and decompose.selector.type.value == "Linear"
    where = decompose.selector.where
    assert isinstance(where, ast.Compare)
    assert (where.field.value, where.op, where.value.value, where.value.unit) == (
        "params",
        ">",
        1.0,
        "M",
    )
    assert where.value.magnitude == 1e6
    assert decompose.rank is not None
    assert (decompose.rank.kind, decompose.rank.value.value) == ("fraction", 0.25)
    assert decompose.progressive is not None and decompose.progressive.value == 4
    assert decompose.method is None and decompose.budget is None and decompose.round is None
    assert isinstance(group, ast.Group) and group.kv.value == 2 and group.q is None
    assert isinstance(skip, ast.SkipTokens)
    assert (skip.ratio.value, skip.ratio.unit, skip.ratio.magnitude) == (55.0, "%", 0.55)
    assert skip.after.value == 3 and skip.until is None
    assert (
        _at(DESIGN_CARD, decompose)
        == "decompose Linear where params>1M rank=0.25 progressive 4 steps"
    )
    assert _at(DESIGN_CARD, group) == "group kv=2"
    assert _at(DESIGN_CARD, skip) == "skip tokens 55% after block 3"


def test_the_architecture_sketch_parses() -> None:
    recipe = parse(SKETCH)
    verbs = [s.verb for s in recipe.statements]
    assert set(verbs) == set(VERBS), set(VERBS) - set(verbs)
    assert len(verbs) == 19
    by_verb: dict[str, list[Any]] = {}
    for s in recipe.statements:
        by_verb.setdefault(s.verb, []).append(s)
    target = by_verb["target"][0]
    assert (target.backend.value, target.device.value) == ("tvm", "llvm")
    calibrate = by_verb["calibrate"][0]
    assert (calibrate.source.value, calibrate.samples.value) == ("calib.pt", 128)
    first, conv, plrd = by_verb["decompose"]
    assert isinstance(first.selector.where, ast.And)
    assert [type(i).__name__ for i in first.selector.where.items] == ["Compare", "Match"]
    assert first.selector.where.items[1].pattern.value == "encoder.*"
    assert (first.method.value, first.round.value) == ("svd-llm", 64)
    assert conv.keep_if_faster is not None and conv.method.value == "tucker"
    assert plrd.progressive.value == 4
    exact, two_plus_one = by_verb["split"]
    assert exact.mode.value == "exact" and exact.combine is None
    assert two_plus_one.mode.value == "(2+1)d" and two_plus_one.combine.value == "add"
    sparsify = by_verb["sparsify"][0]
    assert (sparsify.n.value, sparsify.m.value) == (2, 4)
    factorize = by_verb["factorize"][0]
    assert (factorize.method.value, factorize.basis.value, factorize.nonzeros.value) == (
        "dense-sparse",
        32,
        8,
    )
    regularize = by_verb["regularize"][0]
    assert regularize.strength.magnitude == pytest.approx(3e-4) and regularize.every.value == 10
    drop = by_verb["drop"][0]
    assert (drop.sublayer.value, drop.count.value, drop.by.value) == ("attention", 4, "similarity")
    truncate = by_verb["truncate"][0]
    assert (truncate.keep.value, truncate.strategy.value, truncate.indices) == (
        6,
        "pseudo-uniform",
        None,
    )
    assert by_verb["freeze"][0].what.value == "first-factor"
    heal = by_verb["heal"][0]
    assert heal.steps.value == 200 and heal.distill is not None
    assert heal.subset.magnitude == pytest.approx(0.1) and heal.by.value == "importance"
    assert heal.every.value == 50
    contracts = [
        (e.metric.value, e.op, e.value.magnitude, e.on and e.on.value) for e in by_verb["expect"]
    ]
    assert contracts == [
        ("params", "<=", 0.6, None),
        ("drift", "<=", 0.05, None),
        ("speedup", ">=", 1.3, "tvm"),
    ]


def test_sketch_options_in_any_order_mean_the_same() -> None:
    a = parse("decompose Conv2d where kernel > 1 method tucker rank = 0.5 keep if faster")
    b = parse("decompose Conv2d where kernel > 1 keep if faster rank = 0.5 method tucker")
    assert strip_spans(a) == strip_spans(b)


# --- spans -------------------------------------------------------------------------------


def test_spans_have_lines_and_columns() -> None:
    source = "target torch\n\n  group q = 3 kv = 2\ndecompose Linear where params > 1M rank = 8\n"
    target, group, decompose = parse(source).statements
    assert (target.span.line, target.span.col, target.span.end_line, target.span.end_col) == (
        1,
        1,
        1,
        13,
    )
    assert (group.span.line, group.span.col) == (3, 3)
    assert _at(source, group) == "group q = 3 kv = 2"
    assert group.q is not None and (group.q.span.line, group.q.span.col) == (3, 13)
    assert (group.kv.span.line, group.kv.span.col, group.kv.span.end_col) == (3, 20, 21)
    assert decompose.span.line == 4
    assert _at(source, decompose.selector) == "Linear where params > 1M"
    where = decompose.selector.where
    assert isinstance(where, ast.Compare)
    assert _at(source, where) == "params > 1M"
    assert _at(source, where.field) == "params"
    assert (where.value.span.line, where.value.span.col) == (4, 33)
    assert decompose.rank is not None and _at(source, decompose.rank) == "rank = 8"
    assert _at(source, decompose.rank.value) == "8"


def test_every_node_span_is_inside_its_parent() -> None:
    recipe = parse(SKETCH)

    def walk(node: Any, parent: ast.Span) -> int:
        count = 0
        if isinstance(node, ast.Node):
            assert parent.start <= node.span.start <= node.span.end <= parent.end, node
            parent = node.span
            count += 1
            node = dict(node)
        if isinstance(node, dict):
            return count + sum(walk(v, parent) for k, v in node.items() if k != "span")
        if isinstance(node, list):
            return count + sum(walk(v, parent) for v in node)
        return count

    assert walk(recipe, recipe.span) > 80


def test_multiline_statement_span() -> None:
    source = "decompose Linear \\\n    rank = 0.5 \\\n    method svd\n"
    (stmt,) = parse(source).statements
    assert (stmt.span.line, stmt.span.end_line) == (1, 3)
    assert stmt.method is not None and (stmt.method.span.line, stmt.method.span.col) == (3, 12)


def test_crlf_spans() -> None:
    source = "target torch\r\ngroup kv = 2\r\n"
    target, group = parse(source).statements
    assert _at(source, target) == "target torch"
    assert (group.span.line, group.span.col) == (2, 1)
    assert _at(source, group) == "group kv = 2"


def test_unicode_string_spans_count_characters() -> None:
    source = 'calibrate with "données/ç.pt" samples 8'
    (stmt,) = parse(source).statements
    assert stmt.source.value == "données/ç.pt"
    assert stmt.samples is not None and _at(source, stmt.samples) == "8"
    assert stmt.samples.span.col == source.index("8") + 1


# --- separators, comments, continuation ----------------------------------------------------


@pytest.mark.parametrize(
    "source",
    [
        "group kv = 2\nskip tokens 10% after block 1",
        "group kv = 2; skip tokens 10% after block 1",
        "group kv = 2;skip tokens 10% after block 1;",
        "\n\n;group kv = 2 ;;\n\n; skip tokens 10% after block 1\n\n",
        "group kv = 2 # GQA ; not a separator\nskip tokens 10% after block 1 # SkipViT",
        "# header\n\n  group kv = 2\n\t skip tokens 10% after block 1\n# footer",
        "group \\\n kv = 2\nskip tokens 10% \\\n after block 1",
        "group kv = 2\r\nskip tokens 10% after block 1\r\n",
        "group \\\r\n kv = 2\r\nskip tokens 10% after block 1",
    ],
)
def test_separators_comments_and_continuation(source: str) -> None:
    expected = strip_spans(parse("group kv = 2\nskip tokens 10% after block 1"))
    assert strip_spans(parse(source)) == expected


@pytest.mark.parametrize("source", ["", "\n", "# only a comment\n", "  ;  ; \n# x ; y\n", "\\\n"])
def test_empty_recipes(source: str) -> None:
    assert parse(source).statements == []


def test_hash_and_semicolon_inside_strings_are_not_special() -> None:
    (stmt,) = parse('calibrate with "a#b;c.pt" samples 2 # real comment').statements
    assert stmt.source.value == "a#b;c.pt" and stmt.samples is not None


def test_escaped_quote_in_string() -> None:
    (stmt,) = parse(r'calibrate with "say \"hi\".pt"').statements
    assert stmt.source.value == 'say "hi".pt'


def test_every_statement_is_reported_not_just_the_first() -> None:
    statements, diags = parse_statements("grop kv = 2\ngroup kv = 2\ndecompose Linear rnak = 1")
    assert [s.verb for s in statements] == ["group"]
    assert [(d.code, d.span.line) for d in diags] == [("S0101", 1), ("S0102", 3)]
    with pytest.raises(DiagnosticError) as info:
        parse("grop kv = 2\ngroup kv = 2\ndecompose Linear rnak = 1")
    assert len(info.value.diagnostics) == 2


# --- numbers, ranks, predicates ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "magnitude"),
    [
        ("0.25", "fraction", 0.25),
        ("25%", "fraction", 0.25),
        ("1.", "fraction", 1.0),
        (".5", "fraction", 0.5),
        ("128", "absolute", 128),
        ("energy 0.9", "energy", 0.9),
        ("energy 90%", "energy", 0.9),
    ],
)
def test_rank_kinds(text: str, kind: str, magnitude: float) -> None:
    (stmt,) = parse(f"decompose Linear rank = {text}").statements
    assert stmt.rank is not None
    assert (stmt.rank.kind, stmt.rank.value.magnitude) == (kind, pytest.approx(magnitude))


@pytest.mark.parametrize(
    ("text", "value", "unit", "magnitude"),
    [("1K", 1, "K", 1e3), ("2.5M", 2.5, "M", 2.5e6), ("3G", 3, "G", 3e9), ("3e-4", 3e-4, "", 3e-4)],
)
def test_number_units(text: str, value: float, unit: str, magnitude: float) -> None:
    (stmt,) = parse(f"decompose Linear where flops > {text} rank = 1").statements
    where = stmt.selector.where
    assert isinstance(where, ast.Compare)
    assert (where.value.value, where.value.unit) == (pytest.approx(value), unit)
    assert where.value.magnitude == pytest.approx(magnitude)


def test_predicate_precedence() -> None:
    (stmt,) = parse(
        'decompose where not params > 1 and name ~ "a" or kernel == 3 and (block < 2 or flops != 0) rank = 1'
    ).statements
    where = stmt.selector.where
    assert isinstance(where, ast.Or) and len(where.items) == 2
    left, right = where.items
    assert isinstance(left, ast.And) and isinstance(left.items[0], ast.Not)
    assert isinstance(right, ast.And) and isinstance(right.items[1], ast.Or)
    assert stmt.selector.type is None


def test_truncate_indices() -> None:
    (stmt,) = parse("truncate blocks keep 3 [0, 5, 11,]").statements
    assert [i.value for i in stmt.indices] == [0, 5, 11] and stmt.strategy is None


# --- JSON and the schema -------------------------------------------------------------------


@pytest.mark.parametrize("source", [SKETCH, DESIGN_CARD, "", "truncate blocks keep 2 [1, 3]"])
def test_json_round_trip(source: str) -> None:
    recipe = parse(source)
    assert Recipe.model_validate_json(recipe.model_dump_json()) == recipe
    assert Recipe.model_validate(json.loads(recipe.model_dump_json())) == recipe


def _validate(instance: Any, schema: dict[str, Any], root: dict[str, Any]) -> None:
    """A small structural JSON-schema check (the subset pydantic emits) for when
    ``jsonschema`` is not installed."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _validate(instance, root["$defs"][name], root)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            matches = 0
            for option in schema[key]:
                try:
                    _validate(instance, option, root)
                    matches += 1
                except AssertionError:
                    pass
            assert matches >= 1 if key == "anyOf" else matches == 1, (key, instance)
            return None
    if "const" in schema:
        assert instance == schema["const"]
    if "enum" in schema:
        assert instance in schema["enum"], (instance, schema["enum"])
    kind = schema.get("type")
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    if kind is not None:
        assert checks[kind](instance), (kind, instance)
    if kind == "object":
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in instance, (name, instance)
        if schema.get("additionalProperties") is False:
            assert set(instance) <= set(props), set(instance) - set(props)
        for name, value in instance.items():
            if name in props:
                _validate(value, props[name], root)
    if kind == "array" and "items" in schema:
        for item in instance:
            _validate(item, schema["items"], root)
    return None


def _schema_validate(instance: Any, schema: dict[str, Any]) -> None:
    try:
        import jsonschema
    except ImportError:
        _validate(instance, schema, schema)
    else:
        jsonschema.validate(instance, schema)


def test_schema_validates_dumps() -> None:
    schema = recipe_json_schema()
    sources = [SKETCH, DESIGN_CARD] + [
        p.read_text(encoding="utf-8") for p in sorted((ROOT / "recipes").glob("*.surg"))
    ]
    for source in sources:
        _schema_validate(json.loads(parse(source).model_dump_json()), schema)


def test_schema_rejects_a_wrong_document() -> None:
    schema = recipe_json_schema()
    good = json.loads(parse("group kv = 2").model_dump_json())
    bad_verb = json.loads(json.dumps(good).replace('"group"', '"grop"'))
    missing = json.loads(json.dumps(good))
    del missing["statements"][0]["kv"]
    extra = json.loads(json.dumps(good))
    extra["statements"][0]["kvv"] = 1
    for document in (bad_verb, missing, extra):
        with pytest.raises(Exception):  # noqa: B017 - AssertionError or jsonschema's error
            _schema_validate(document, schema)


def test_shipped_schema_is_the_generated_one(golden: Callable[[Path, str], None]) -> None:
    # Shipped with the package, so it lives there, but it is compared like any golden file.
    golden(SHIPPED_SCHEMA, json.dumps(recipe_json_schema(), indent=2) + "\n")


def test_schema_describes_every_statement() -> None:
    schema = recipe_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    text = json.dumps(schema)
    for name in (
        "Target",
        "Calibrate",
        "Decompose",
        "Group",
        "SkipTokens",
        "Split",
        "Sparsify",
        "Factorize",
        "Regularize",
        "Drop",
        "Truncate",
        "Freeze",
        "Heal",
        "Expect",
    ):
        assert f'"#/$defs/{name}"' in text, name
