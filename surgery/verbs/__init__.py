"""The verbs of the language: one module each, and the one tuple that lists them.

:data:`VERBS` generates the ``Statement`` union of the AST, the parser's statement builders,
the checker's and the formatter's dispatch (:data:`BY_KEYWORD`), the pass table
(``surgery.passes.PASSES``) and the support table (``surgery.support``). Adding a verb is a
grammar rule in ``grammar/surg.lark``, a module here with its ``VERB``, its entry below and its
tests (plus its pass under ``surgery/passes/`` when it changes the model); README.md,
"Adding a verb", walks through it.

>>> [v.keyword for v in VERBS][:3]
['target', 'calibrate', 'decompose']
>>> BY_KEYWORD["skip"].node.__name__
'SkipTokens'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, TypeAlias, Union

from pydantic import Field

from surgery.nodes import Node, StatementNode
from surgery.verbs import (
    calibrate,
    decompose,
    drop,
    expect,
    factorize,
    freeze,
    group,
    heal,
    regularize,
    skip,
    sparsify,
    split,
    target,
    truncate,
)
from surgery.verbs.base import Verb

__all__ = ["BY_KEYWORD", "LANGUAGE", "VERBS", "Recipe", "Statement", "Verb"]

#: Every verb, in the order `surgery check` lists them and the grammar's `statement` rule has
#: them.
VERBS: tuple[Verb, ...] = (
    target.VERB,
    calibrate.VERB,
    decompose.VERB,
    group.VERB,
    skip.VERB,
    split.VERB,
    sparsify.VERB,
    factorize.VERB,
    regularize.VERB,
    drop.VERB,
    truncate.VERB,
    freeze.VERB,
    heal.VERB,
    expect.VERB,
)

BY_KEYWORD: dict[str, Verb] = {v.keyword: v for v in VERBS}

#: Per verb, what the language allows where a NAME stands (the checker's "unknown name").
LANGUAGE: dict[str, dict[str, tuple[str, ...]]] = {v.keyword: v.language for v in VERBS}

if TYPE_CHECKING:
    Statement: TypeAlias = StatementNode
else:  # a JSON object's `verb` says which statement it is
    Statement = Annotated[Union[tuple(v.node for v in VERBS)], Field(discriminator="verb")]  # noqa: UP007


class Recipe(Node):
    """A whole recipe: its statements in source order."""

    statements: list[Statement]
