"""Resolve a recipe selector against a model's :class:`~surgery.facts.Analysis`.

A selector names a module type (its class or any base class, so ``Linear`` also matches a
``NonDynamicallyQuantizableLinear``) and/or a ``where`` predicate over measured facts.
``Linear`` means any dense matrix layer: it also matches Hugging Face's ``Conv1D`` (GPT-2's
projections, ``x @ W + b`` with the weight stored ``[in, out]``), which plans then show as
``Conv1D (Linear-like)``. The predicate reads
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

import torch
from torch import nn

from surgery import ast
from surgery.diagnostics import nearest
from surgery.facts import Analysis, ModuleInfo

__all__ = [
    "LINEAR_LIKE",
    "SelectorError",
    "evaluate",
    "is_linear_like",
    "matches_type",
    "nearest_paths",
    "no_match_help",
    "select",
    "type_label",
    "type_names",
    "uses_speedup",
]

# Classes that compute a dense matrix product like `nn.Linear` and that a `Linear` selector
# also matches (by class name, so transformers need not be imported).
LINEAR_LIKE = ("Conv1D",)

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


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is a dense matrix layer that is not an ``nn.Linear`` (HF ``Conv1D``).

    >>> from transformers.pytorch_utils import Conv1D
    >>> is_linear_like(Conv1D(8, 4)), is_linear_like(nn.Linear(4, 8)), is_linear_like(nn.Conv1d(4, 8, 1))
    (True, False, False)
    """
    weight = getattr(module, "weight", None)
    return (
        not isinstance(module, nn.Linear)
        and bool(type_names(module) & set(LINEAR_LIKE))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def matches_type(module: nn.Module, info_type: str, wanted: set[str]) -> bool:
    """Whether ``module`` (analysed as ``info_type``) is of a type in ``wanted``: its class, a
    base class, or, for ``Linear``, a Linear-like class (see :data:`LINEAR_LIKE`)."""
    names = type_names(module) | {info_type}
    if names & wanted:
        return True
    return "Linear" in wanted and is_linear_like(module)


def type_label(module: nn.Module, type_name: str, selector: ast.Selector) -> str:
    """``type_name`` for a plan row, marked ``(Linear-like)`` when ``module`` was matched by a
    ``Linear`` selector although it is not an ``nn.Linear``.

    >>> from transformers.pytorch_utils import Conv1D
    >>> from surgery.parse import parse
    >>> sel = parse("decompose Linear rank = 0.5").statements[0].selector
    >>> type_label(Conv1D(8, 4), "Conv1D", sel)
    'Conv1D (Linear-like)'
    """
    if selector.type is not None and selector.type.value == "Linear" and is_linear_like(module):
        return f"{type_name} (Linear-like)"
    return type_name


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

    A ``Linear`` type also matches the Linear-like ``Conv1D`` (see :data:`LINEAR_LIKE`).
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
        if wanted and not matches_type(module, info.type, wanted):
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
            if p in modules
            and matches_type(modules[p], analysis.modules[p].type, {selector.type.value})
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


def no_match_help(
    model: nn.Module, analysis: Analysis, selector: ast.Selector, limit: int = 3
) -> str:
    """The help of a "matched no module" diagnostic: the layer types the model has (the leaf
    modules with parameters, most frequent first), a did-you-mean for a mistyped type, and the
    nearest modules.

    >>> import torch
    >>> from surgery.graph import analyze
    >>> from surgery.parse import parse
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 3))
    >>> sel = parse("decompose Conv1d rank = 0.5").statements[0].selector
    >>> print(no_match_help(model, analyze(model), sel))
    did you mean `Conv2d`?; layer types in this model: `Conv2d` (2); nearest modules: `0` (Conv2d), `1` (Conv2d)
    """
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for path, info in analysis.modules.items():
        module = modules.get(path)
        if info.is_leaf and module is not None and any(True for _ in module.parameters()):
            counts[info.type] = counts.get(info.type, 0) + 1
    parts: list[str] = []
    asked = selector.type.value if selector.type is not None else None
    if asked is not None and asked not in counts:
        guess = nearest(asked, counts)
        if guess is not None and guess != asked:
            parts.append(f"did you mean `{guess}`?")
    if counts:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"`{t}` ({n})" for t, n in ranked[:8])
        more = f" and {len(ranked) - 8} more" if len(ranked) > 8 else ""
        parts.append(f"layer types in this model: {shown}{more}")
    near = nearest_paths(model, analysis, selector, limit)
    if near:
        listed = ", ".join(f"`{p}` ({analysis.modules[p].type})" for p in near)
        parts.append(f"nearest modules: {listed}")
    return "; ".join(parts)


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
