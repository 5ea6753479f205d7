"""Resolve a recipe selector against a model's :class:`~surgery.facts.Analysis`.

A selector names a module type (its class or any base class, so ``Linear`` also matches a
``NonDynamicallyQuantizableLinear``) and/or a ``where`` predicate over measured facts:
``params``, ``flops``, ``in_features``, ``out_features``, ``kernel``, ``block`` and the
module path (``name ~ "encoder.*"``, a shell-style glob matched against the whole path).

>>> import torch
>>> from surgery.graph import analyze
>>> from surgery.parse import parse
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 400))
>>> sel = parse("decompose Linear where out_features > 100").statements[0].selector
>>> select(model, analyze(model), sel)
['1']
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from torch import nn

from surgery import ast
from surgery.diagnostics import nearest
from surgery.facts import Analysis, ModuleInfo

__all__ = ["SelectorError", "evaluate", "nearest_paths", "select", "type_names", "uses_speedup"]

_FIELDS = ("params", "flops", "in_features", "out_features", "kernel", "block", "speedup")


class SelectorError(Exception):
    """A predicate cannot be evaluated (e.g. `speedup` without a measuring backend)."""


def type_names(module: nn.Module) -> set[str]:
    """The class name of ``module`` and of its torch/transformers base classes."""
    return {
        cls.__name__
        for cls in type(module).__mro__
        if cls not in (nn.Module, object) and issubclass(cls, nn.Module)
    }


def compare(lhs: float, op: str, rhs: float) -> bool:
    """``lhs OP rhs`` for a recipe comparison (``>``, ``>=``, ``<``, ``<=``, ``==``, ``!=``)."""
    if op == ">":
        return lhs > rhs
    if op == ">=":
        return lhs >= rhs
    if op == "<":
        return lhs < rhs
    if op == "<=":
        return lhs <= rhs
    if op == "==":
        return lhs == rhs
    return lhs != rhs


def evaluate(
    predicate: ast.Predicate, info: ModuleInfo, speedups: Mapping[str, float] | None = None
) -> bool:
    """Whether ``info`` satisfies ``predicate``; a fact a module lacks (None) never matches.

    ``speedups`` holds the measured speedup of each module that can be timed (see
    `surgery.passes.rank_latency.layer_speedups`); ``speedup`` predicates need it.
    """
    if isinstance(predicate, ast.Match):
        return fnmatch.fnmatchcase(info.path, predicate.pattern.value)
    if isinstance(predicate, ast.And):
        return all(evaluate(p, info, speedups) for p in predicate.items)
    if isinstance(predicate, ast.Or):
        return any(evaluate(p, info, speedups) for p in predicate.items)
    if isinstance(predicate, ast.Not):
        return not evaluate(predicate.item, info, speedups)
    field = predicate.field.value
    if field == "speedup":
        if speedups is None:
            raise SelectorError("`speedup` predicates need a measuring backend")
        measured = speedups.get(info.path)
        return measured is not None and compare(measured, predicate.op, predicate.value.magnitude)
    value = getattr(info, field)
    if value is None:
        return False
    return compare(float(value), predicate.op, predicate.value.magnitude)


def uses_speedup(predicate: ast.Predicate | None) -> bool:
    """Whether ``predicate`` compares the measured ``speedup`` anywhere."""
    if predicate is None or isinstance(predicate, ast.Match):
        return False
    if isinstance(predicate, ast.And | ast.Or):
        return any(uses_speedup(p) for p in predicate.items)
    if isinstance(predicate, ast.Not):
        return uses_speedup(predicate.item)
    return predicate.field.value == "speedup"


def select(
    model: nn.Module,
    analysis: Analysis,
    selector: ast.Selector,
    *,
    types: Iterable[str] | None = None,
    speedups: Mapping[str, float] | None = None,
) -> list[str]:
    """Paths of the modules ``selector`` matches, in model order.

    ``types`` restricts a selector without a type to the module types a pass handles;
    ``speedups`` are the measured facts ``speedup`` predicates compare.
    """
    wanted = {selector.type.value} if selector.type is not None else set(types or ())
    modules = dict(model.named_modules())
    matched: list[str] = []
    for path, info in analysis.modules.items():
        module = modules.get(path)
        if module is None:
            continue
        # The analysis knows the original class of modules that lost it (a `.pt2` program
        # unflattened into `InterpreterModule`s), so both names count.
        if wanted and not ((type_names(module) | {info.type}) & wanted):
            continue
        if selector.where is not None and not evaluate(selector.where, info, speedups):
            continue
        matched.append(path)
    return matched


def nearest_paths(
    model: nn.Module, analysis: Analysis, selector: ast.Selector, limit: int = 3
) -> list[str]:
    """Module paths closest to what ``selector`` asked for (for "matched nothing" warnings)."""
    modules = dict(model.named_modules())
    if selector.type is not None:
        typed = [
            p
            for p in analysis.modules
            if p in modules and selector.type.value in type_names(modules[p])
        ]
        if typed:
            return typed[:limit]
        guess = nearest(selector.type.value, {i.type for i in analysis.modules.values()})
        if guess:
            return [p for p, i in analysis.modules.items() if i.type == guess][:limit]
    globs = _globs(selector.where)
    if globs:
        ranked = sorted(
            analysis.modules,
            key=lambda p: -max(_similarity(p, g) for g in globs),
        )
        return ranked[:limit]
    return list(analysis.modules)[:limit]


def _globs(predicate: ast.Predicate | None) -> list[str]:
    if predicate is None:
        return []
    if isinstance(predicate, ast.Match):
        return [predicate.pattern.value]
    if isinstance(predicate, ast.And | ast.Or):
        return [g for p in predicate.items for g in _globs(p)]
    if isinstance(predicate, ast.Not):
        return []
    return []


def _similarity(path: str, glob: str) -> float:
    import difflib

    return difflib.SequenceMatcher(None, path, glob.replace("*", "")).ratio()
