"""The state of one translation and the registry of rules every rule family writes into.

A rule is data: a function ``(state, node) -> expression`` registered under the aten ops it
translates, with ``@_rule("aten.x.overload", ...)``. It renders its arguments through the
state (``g.r(arg)``, ``g.cast_to(arg, dtype)``), may bind intermediate lines (``g.tmp``), and
returns the expression the node's value is bound to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from ..base import LoweringError

__all__ = ["RULES", "Rule", "ms_dtype"]

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "ms.float32",
    torch.float16: "ms.float16",
    torch.bfloat16: "ms.bfloat16",
    torch.float64: "ms.float64",
    torch.int64: "ms.int64",
    torch.int32: "ms.int32",
    torch.int16: "ms.int16",
    torch.int8: "ms.int8",
    torch.uint8: "ms.uint8",
    torch.bool: "ms.bool_",
}


class _Codegen:
    """State of one translation: the names, constants and lines of the generated cell."""

    def __init__(self, program: Any, device: str = "cpu") -> None:
        self.program = program
        self.graph = program.graph
        self.device = device  # "cpu" or "ascend": a rule may pick the faster form per device
        self.lines: list[str] = []
        self.names: dict[Node, str] = {}
        self.folded: dict[Node, Any] = {}
        self.params: list[tuple[str, Tensor]] = []  # (attribute, value) -> ms.Parameter
        self.consts: list[tuple[str, Tensor]] = []  # (attribute, value) -> ms.Tensor
        self._const_ids: dict[int, str] = {}
        self._keep: list[Tensor] = []
        self._tmp = 0
        self.order: dict[Node, int] = {}  # graph position, filled when an in-place op needs it
        self.node: Node | None = None  # the node being translated, for error messages

    # --- values ------------------------------------------------------------------------

    def val(self, arg: Any) -> Any:
        """The example value torch.export recorded for a node (a fake tensor, or a list)."""
        if isinstance(arg, Node):
            if arg in self.folded:
                return self.folded[arg]
            return arg.meta.get("val")
        return arg

    def dtype(self, arg: Any) -> torch.dtype | None:
        v = self.val(arg)
        if isinstance(v, Tensor):
            return v.dtype
        return None

    def shape(self, arg: Any) -> tuple[int, ...]:
        v = self.val(arg)
        if not isinstance(v, Tensor):
            raise self.error(f"expected a tensor, found {type(v).__name__}")
        try:
            return tuple(int(s) for s in v.shape)
        except TypeError as exc:  # a symbolic size: the graph is not static
            raise self.error(f"dynamic shape {tuple(v.shape)} is not supported") from exc

    def out_shape(self, node: Node) -> tuple[int, ...]:
        return self.shape(node)

    def rank(self, arg: Any) -> int:
        return len(self.shape(arg))

    def dim(self, arg: Any, d: int) -> int:
        """``d`` made non-negative for ``arg``'s rank."""
        r = max(self.rank(arg), 1)
        return d + r if d < 0 else d

    def error(self, what: str) -> LoweringError:
        if self.node is None:
            return LoweringError(f"mindir: {what}")
        target = str(self.node.target)
        prefix = "" if target in what else f"{target}: "
        return LoweringError(f"mindir: {prefix}{what} (used by node `{self.node.name}`)")

    # --- rendering ---------------------------------------------------------------------

    def const(self, value: Tensor) -> str:
        """A constant tensor attribute of the cell (deduplicated by object)."""
        key = id(value)
        if key not in self._const_ids:
            name = f"c{len(self.consts)}"
            self.consts.append((name, value.detach().clone()))
            self._const_ids[key] = f"self.{name}"
            self._keep.append(value)  # an id is only unique while its object lives
        return self._const_ids[key]

    def r(self, arg: Any) -> str:
        """Python source for an argument: a variable, a constant attribute or a literal."""
        if isinstance(arg, Node):
            if arg in self.folded:
                return self.r(self.folded[arg])
            if arg not in self.names:
                raise self.error(f"uses `{arg.name}`, which was not translated")
            return self.names[arg]
        if isinstance(arg, Tensor):
            return self.const(arg)
        if isinstance(arg, torch.dtype):
            return ms_dtype(arg)
        if isinstance(arg, bool) or arg is None or isinstance(arg, (int, str)):
            return repr(arg)
        if isinstance(arg, float):
            if math.isnan(arg):
                return "_NAN"
            if math.isinf(arg):
                return "_INF" if arg > 0 else "-_INF"
            return repr(arg)
        if isinstance(arg, (list, tuple)):
            items = [self.r(a) for a in arg]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(arg, torch.SymInt | torch.SymFloat):
            raise self.error("symbolic sizes are not supported (the graph must be static)")
        raise self.error(f"argument of type {type(arg).__name__} has no MindSpore form")

    def cast_to(self, arg: Any, dtype: torch.dtype | None) -> str:
        """``arg`` rendered in ``dtype`` (a cast only when its dtype differs)."""
        src = self.r(arg)
        have = self.dtype(arg)
        if dtype is None or have is None or have == dtype:
            return src
        return f"ops.cast({src}, {ms_dtype(dtype)})"

    def scalar_tensor(self, value: Any, dtype: torch.dtype) -> str:
        """A 0-d constant of ``dtype``: keeps torch's dtype where a Python scalar would not."""
        if isinstance(value, Node) or isinstance(value, Tensor):
            return self.cast_to(value, dtype)
        return self.const(torch.tensor(value, dtype=dtype))

    def tmp(self, expr: str) -> str:
        """Bind ``expr`` to a fresh local and return its name (multi-line rules)."""
        self._tmp += 1
        name = f"t{self._tmp}"
        self.lines.append(f"{name} = {expr}")
        return name


Rule = Callable[[_Codegen, Node], str]
RULES: dict[str, Rule] = {}


def _rule(*targets: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return register


def ms_dtype(dtype: torch.dtype) -> str:
    """The MindSpore spelling of a torch dtype.

    >>> ms_dtype(torch.bool), ms_dtype(torch.float32)
    ('ms.bool_', 'ms.float32')
    """
    if dtype not in _DTYPES:
        raise LoweringError(f"mindir: dtype {dtype} has no MindSpore equivalent")
    return _DTYPES[dtype]


def _op_name(node: Node) -> str:
    """``add`` for ``aten.add.Tensor`` and for its in-place form ``aten.add_.Tensor``."""
    return str(node.target).split(".")[1].rstrip("_")


def _a(node: Node) -> tuple[Any, ...]:
    """A node's positional arguments (fx types them as a union no rule can use directly)."""
    return tuple(node.args)


def _k(node: Node) -> dict[str, Any]:
    return dict(node.kwargs)


def _arg(node: Node, i: int, name: str, default: Any = None) -> Any:
    """Positional ``i`` or keyword ``name`` of an aten call, else ``default``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)
