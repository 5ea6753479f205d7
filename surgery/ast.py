"""The typed AST of a `.surg` recipe: frozen pydantic models, every node with a source span.

One import for every node: the shared ones (spans, leaves, selectors, ranks) live in
:mod:`surgery.nodes`, each statement in its verb's module (:mod:`surgery.verbs`). The AST is
plain data. It round-trips through JSON (``Recipe.model_validate_json``) and its
JSON schema (``recipe_json_schema()``) is shipped for editors.

>>> from surgery.parse import parse
>>> recipe = parse("group kv = 2")
>>> recipe.statements[0].kv.value
2
>>> Recipe.model_validate_json(recipe.model_dump_json()) == recipe
True
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

__all__ = [
    "And",
    "Budget",
    "Calibrate",
    "Compare",
    "Decompose",
    "Drop",
    "Expect",
    "Factorize",
    "Flag",
    "Freeze",
    "Group",
    "Heal",
    "Int",
    "Match",
    "Name",
    "Node",
    "Not",
    "Number",
    "Or",
    "Predicate",
    "Rank",
    "Recipe",
    "Regularize",
    "Selector",
    "SkipTokens",
    "Span",
    "Sparsify",
    "Split",
    "Statement",
    "StatementNode",
    "Str",
    "Target",
    "Truncate",
    "recipe_json_schema",
    "strip_spans",
]


from surgery.nodes import (
    And,
    Compare,
    Flag,
    Int,
    Match,
    Name,
    Node,
    Not,
    Number,
    Or,
    Predicate,
    Rank,
    Selector,
    Span,
    StatementNode,
    Str,
)
from surgery.verbs import Recipe, Statement
from surgery.verbs.calibrate import Calibrate
from surgery.verbs.decompose import Budget, Decompose
from surgery.verbs.drop import Drop
from surgery.verbs.expect import Expect
from surgery.verbs.factorize import Factorize
from surgery.verbs.freeze import Freeze
from surgery.verbs.group import Group
from surgery.verbs.heal import Heal
from surgery.verbs.regularize import Regularize
from surgery.verbs.skip import SkipTokens
from surgery.verbs.sparsify import Sparsify
from surgery.verbs.split import Split
from surgery.verbs.target import Target
from surgery.verbs.truncate import Truncate


def __getattr__(name: str) -> Any:
    """The node of a verb added to :data:`surgery.verbs.VERBS` but not imported above (the
    imports are for type checkers; a new verb works without them)."""
    from surgery.verbs import VERBS

    for verb in VERBS:
        if verb.node.__name__ == name:
            return verb.node
    raise AttributeError(f"module 'surgery.ast' has no attribute {name!r}")


def strip_spans(node: BaseModel | Any) -> Any:
    """The node as plain data without spans: equal for ASTs that mean the same.

    >>> from surgery.parse import parse
    >>> strip_spans(parse("group kv=2")) == strip_spans(parse("  group   kv = 2 # GQA"))
    True
    """

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k != "span"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = node.model_dump() if isinstance(node, BaseModel) else node
    return clean(data)


def recipe_json_schema() -> dict[str, Any]:
    """JSON schema of :class:`Recipe` (shipped as ``surgery/schema/recipe.schema.json``)."""
    schema = Recipe.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "surgery recipe AST"
    return schema
