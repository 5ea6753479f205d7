"""Check a parsed recipe without a model: names, value ranges, contradictions, contracts.

Every problem of the recipe is reported in one run, sorted by position. Names get the
nearest valid spelling as help. A statement or option whose implementation does not exist
yet is an error that says so: a recipe never does silently less than it says.

>>> from surgery.parse import parse
>>> [d.message for d in check(parse("decompose Linear rank = 0\\nexpect drift <= -1"))]
['rank must be positive, found 0', 'contract `expect drift <= -1` can never hold']
"""

from __future__ import annotations

from surgery import ast
from surgery.diagnostics import Diagnostic, collector_paused
from surgery.support import SUPPORT
from surgery.targets import BACKENDS
from surgery.verbs import BY_KEYWORD, LANGUAGE
from surgery.verbs.base import COUNT_LIMITS, Checker, Support
from surgery.verbs.decompose import check_goals

__all__ = ["BACKENDS", "COUNT_LIMITS", "LANGUAGE", "Support", "check", "support"]


def support() -> Support:
    """The support table of this build (`surgery.support`: every verb's implemented options)."""
    table = Support()
    for verb, (options, types) in SUPPORT.items():
        table.add(verb, options, types)
    return table


class _Checker(Checker):
    """Each statement by its verb's own check, then the rules between statements."""

    def statement(self, s: ast.Statement) -> None:
        BY_KEYWORD[s.verb].check(self, s)

    def recipe(self, recipe: ast.Recipe) -> None:
        seen_calibrate: ast.Calibrate | None = None
        targets = {"torch"}
        last_heal = -1  # index of the last `heal` (found once: asking per statement is O(n²))
        contracts = [s for s in recipe.statements if isinstance(s, ast.Expect)]
        for index, s in enumerate(recipe.statements):
            if isinstance(s, ast.Target):
                targets.add(s.backend.value)
            elif isinstance(s, ast.Heal):
                last_heal = index
        for index, s in enumerate(recipe.statements):
            self.statement(s)
            if isinstance(s, ast.Decompose):
                check_goals(self, s, contracts)
            if isinstance(s, ast.Calibrate):
                if seen_calibrate is not None:
                    self.error(
                        "S0205",
                        "a second `calibrate` statement",
                        s,
                        f"keep the one on line {seen_calibrate.span.line}",
                    )
                seen_calibrate = s
            if isinstance(s, ast.Freeze | ast.Regularize):
                if last_heal < index:
                    self.error(
                        "S0206",
                        f"`{s.verb}` has no effect without a later `heal`",
                        s,
                        "add e.g. `heal steps 200 distill from original` after it",
                    )
            if (
                isinstance(s, ast.Expect)
                and s.metric.value == "speedup"
                and s.on is not None
                and s.on.value in BACKENDS
                and s.on.value not in targets
            ):
                self.error(
                    "S0207",
                    f"`expect speedup on {s.on.value}` but no `target {s.on.value}`",
                    s.on,
                    f"add `target {s.on.value}` to the recipe",
                )


def check(recipe: ast.Recipe, table: Support | None = None) -> list[Diagnostic]:
    """All problems of ``recipe`` (sorted by position); empty when it is valid."""
    checker = _Checker(table or support(), LANGUAGE)
    with collector_paused():
        checker.recipe(recipe)
        return sorted(checker.diags, key=Diagnostic.sort_key)
