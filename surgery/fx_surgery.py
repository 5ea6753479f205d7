"""Matrix passes on FX graphs: a ``torch.compile`` backend and ``torch.export`` programs.

A Dynamo graph or an exported program holds no ``nn.Linear`` modules: it holds functional
``linear`` / ``addmm`` / ``mm`` / ``matmul`` / ``conv2d`` calls whose weight is a parameter (a
``get_attr`` node, or a placeholder Dynamo lifted from the model). This module finds those
*sites* with a small table of patterns (:data:`PATTERNS`, data, not code), and carries out the
recipe's matrix statements — ``decompose`` and ``sparsify`` — on them with **the module
passes themselves**, so the factors and masks are those of the module path:

1. every site's weight (and bias) becomes a stand-in module (an ``nn.Linear`` holding the
   ``[out, in]`` weight, or an ``nn.Conv2d`` with the call's stride, padding, dilation and
   groups) at the path of the module that owns the parameter (``h.0.mlp.c_fc.weight`` →
   ``h.0.mlp.c_fc``), sharing the parameter's storage; the graph calls the stand-in, so a
   calibration run through the graph reaches it;
2. :func:`surgery.passes.pass_for` runs each statement on the tree of stand-ins, with an
   analysis measured on the example inputs (so ``where params / in_features /
   out_features / flops / kernel / name ~`` mean what they mean on modules, and data-aware
   methods — ``asvd``, ``svd-llm``, Wanda scores for ``sparsify`` when ``calibration`` is
   given — see the rows of the sites' real inputs);
3. sites whose stand-in was replaced call the replacement (``LowRankLinear``,
   ``SparseLinear``, ``LowRankConv2d``, ``TuckerConv2d``); the others get their original node
   back, untouched.

``Linear`` in a selector means every dense matrix site (its stand-in is an ``nn.Linear``);
a site also carries the class of its module when the graph records it (``nn_module_stack``),
so ``Conv1D`` selects GPT-2's ``addmm`` sites. A weight used anywhere else too (GPT-2's
``lm_head`` tied to ``wte``, a weight read by two differently shaped calls) is left alone, as
the module path leaves tied layers. ``name ~ "glob"`` matches the owning module's path (the
parameter's FQN without ``.weight``), as on modules.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
>>> x = torch.randn(2, 64)
>>> program = torch.export.export(model.eval(), (x,))
>>> out = rewrite_exported(program, "decompose Linear where out_features > 32 rank = 8")
>>> sorted(k for k in out.state_dict if k.startswith("0."))
['0.first.weight', '0.second.bias', '0.second.weight']
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.fx import GraphModule, Node

from surgery import ast
from surgery.check import check
from surgery.diagnostics import Diagnostic, DiagnosticError, render_all
from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.parse import parse
from surgery.passes import PassContext, PassError, StepPlan, pass_for
from surgery.passes.base import Change
from surgery.select import SelectorError

__all__ = [
    "PATTERNS",
    "GraphSurgery",
    "GraphSurgeryError",
    "MatrixPattern",
    "SurgeryBackend",
    "compile_backend",
    "graph_parameter_count",
    "rewrite_exported",
    "rewrite_graph",
]

#: The statements a graph can carry out: they rewrite single matrix layers in place.
MATRIX_VERBS = ("decompose", "sparsify")
#: ``where`` fields a graph site has (``name ~`` always works).
SITE_FIELDS = ("params", "flops", "in_features", "out_features", "kernel")

Compiler = Literal["auto", "inductor", "eager"]


class GraphSurgeryError(ValueError):
    """A recipe the graph path cannot carry out, with the located reason (rendered
    diagnostics when the recipe text is known)."""

    def __init__(self, message: str, diagnostics: Sequence[Diagnostic] = ()) -> None:
        super().__init__(message)
        self.diagnostics = list(diagnostics)


# --- the patterns ----------------------------------------------------------------------------


def _ops(*names: str) -> frozenset[Any]:
    """The callables named ``torch.x`` / ``torch.nn.functional.x`` / ``aten.x.default`` that
    exist in this torch (so a renamed op drops out of the table instead of failing)."""
    found: set[Any] = set()
    for name in names:
        obj: Any = torch
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            found.add(obj)
    return frozenset(found)


@dataclass(frozen=True)
class MatrixPattern:
    """One functional matrix call: where its input, weight and bias are, how its weight is
    laid out, and (convolutions) where its geometry is.

    ``layout``: ``"out_in"`` (``linear``: ``[out, in]``), ``"in_out"`` (``addmm``/``mm``/
    ``matmul``: ``x @ W``, ``W`` ``[in, out]``) or ``"conv"`` (``[S, C/groups, kh, kw]``).
    """

    name: str
    functions: frozenset[Any]
    methods: frozenset[str]
    input: int
    weight: int
    bias: int | None
    layout: Literal["out_in", "in_out", "conv"]
    weight_kw: str = "weight"
    bias_kw: str = "bias"
    conv_args: tuple[tuple[str, int, Any], ...] = ()  # (name, position, default)
    fixed: tuple[tuple[str, int, Any], ...] = ()  # arguments that must have this value


_CONV_ARGS = (("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 6, 1))

#: The matrix calls a graph pass rewrites (Dynamo's torch-level calls and ATen's).
PATTERNS: tuple[MatrixPattern, ...] = (
    MatrixPattern(
        "linear",
        _ops("_C._nn.linear", "nn.functional.linear", "ops.aten.linear.default"),
        frozenset(),
        input=0,
        weight=1,
        bias=2,
        layout="out_in",
    ),
    MatrixPattern(
        "addmm",
        _ops("addmm", "ops.aten.addmm.default"),
        frozenset(),
        input=1,
        weight=2,
        bias=0,
        layout="in_out",
        weight_kw="mat2",
        bias_kw="input",
        fixed=(("beta", -1, 1), ("alpha", -1, 1)),
    ),
    MatrixPattern(
        "matmul",
        _ops("matmul", "mm", "ops.aten.mm.default", "ops.aten.matmul.default") | {operator.matmul},
        frozenset({"matmul", "mm", "__matmul__"}),
        input=0,
        weight=1,
        bias=None,
        layout="in_out",
        weight_kw="other",
    ),
    MatrixPattern(
        "conv2d",
        _ops("conv2d", "nn.functional.conv2d", "ops.aten.conv2d.default"),
        frozenset(),
        input=0,
        weight=1,
        bias=2,
        layout="conv",
        conv_args=_CONV_ARGS,
    ),
    MatrixPattern(
        "convolution",
        _ops("ops.aten.convolution.default"),
        frozenset(),
        input=0,
        weight=1,
        bias=2,
        layout="conv",
        conv_args=(("stride", 3, 1), ("padding", 4, 0), ("dilation", 5, 1), ("groups", 8, 1)),
        fixed=(("transposed", 6, False),),
    ),
)

# ``W.t()`` / ``W.transpose(0, 1)`` / ``W.permute(1, 0)`` between a parameter and its call.
_TRANSPOSE_FUNCS = _ops("t", "ops.aten.t.default", "ops.aten.numpy_T.default")
_TRANSPOSE2_FUNCS = _ops(
    "transpose", "ops.aten.transpose.int", "permute", "ops.aten.permute.default"
)


def _is_transpose(node: Node) -> bool:
    """``node`` swaps the two axes of a 2-D tensor and nothing else."""
    if node.op == "call_function" and node.target in _TRANSPOSE_FUNCS:
        return True
    if node.op == "call_method" and node.target in ("t", "T"):
        return True
    rest: tuple[Any, ...] | None = None
    if node.op == "call_function" and node.target in _TRANSPOSE2_FUNCS:
        rest = tuple(node.args[1:])
    elif node.op == "call_method" and node.target in ("transpose", "permute"):
        rest = tuple(node.args[1:])
    if rest is None:
        return False
    if len(rest) == 1 and isinstance(rest[0], list | tuple):
        rest = tuple(rest[0])
    return rest in ((0, 1), (1, 0), (-1, -2), (-2, -1), (0, -1), (-1, 0), (1, -2), (-2, 1))


def _arg(node: Node, pos: int, kw: str, default: Any = None) -> Any:
    if 0 <= pos < len(node.args):
        return node.args[pos]
    return node.kwargs.get(kw, default)


# --- parameters of a graph ---------------------------------------------------------------------

_ROOT = re.compile(r"""^[LG]\[\s*['"]([^'"]+)['"]\s*\]""")
_SUB = re.compile(r"""\[\s*['"]?([^\]'"]+)['"]?\s*\]""")


def _source_fqn(name: str) -> str:
    """Dynamo's source of a parameter as the parameter's FQN in the compiled module:
    ``L['self']._modules['h']._modules['0']._parameters['weight']`` → ``h.0.weight``."""
    root = _ROOT.match(name)
    prefix = ""
    if root:
        prefix = "" if root.group(1) in ("self", "fn", "mod", "model") else root.group(1)
        name = name[root.end() :]
    name = re.sub(r"\._(modules|parameters|buffers)(?=\[)", "", name)
    name = _SUB.sub(r".\1", name)
    return ".".join(p for p in (prefix, name.strip(".")) if p)


def _parameter(node: Node, gm: GraphModule) -> tuple[str, nn.Parameter] | None:
    """``(FQN, parameter)`` when ``node`` is a parameter: a ``get_attr`` of one, or a
    placeholder Dynamo lifted from a module (its ``grapharg`` holds the parameter)."""
    if node.op == "get_attr":
        try:
            value = gm.get_parameter(str(node.target))
        except AttributeError:
            return None
        return str(node.target), value
    if node.op == "placeholder":
        arg = node.meta.get("grapharg")
        example = getattr(arg, "example", None) if arg is not None else None
        if isinstance(example, nn.Parameter):
            source = getattr(arg, "source", None)
            name = getattr(source, "name", None)
            text = name() if callable(name) else name
            return (_source_fqn(str(text)) if text else str(node.target)), example
    return None


def _param_nodes(gm: GraphModule) -> dict[Node, tuple[str, nn.Parameter]]:
    found: dict[Node, tuple[str, nn.Parameter]] = {}
    for node in gm.graph.nodes:
        if node.op in ("get_attr", "placeholder"):
            p = _parameter(node, gm)
            if p is not None:
                found[node] = p
    return found


def graph_parameter_count(gm: GraphModule) -> int:
    """Parameters the graph computes with: each distinct parameter that a node uses (a lifted
    placeholder or a ``get_attr``), and those of the modules it calls.

    >>> m = torch.nn.Linear(4, 3)
    >>> graph_parameter_count(torch.fx.symbolic_trace(m))
    15
    """
    seen: dict[int, int] = {}
    for node, (_, p) in _param_nodes(gm).items():
        if node.users:
            seen[id(p)] = p.numel()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            for p in gm.get_submodule(str(node.target)).parameters():
                seen[id(p)] = p.numel()
    return sum(seen.values())


# --- sites -------------------------------------------------------------------------------------


@dataclass
class _Site:
    """One matrix call on a parameter."""

    node: Node
    pattern: MatrixPattern
    input: Node
    weight: Node  # the parameter node
    transpose: Node | None  # the transpose between them, if any
    bias: Node | None
    fqn: str
    param: nn.Parameter
    bias_param: nn.Parameter | None
    kind: Literal["linear", "conv2d"]
    flipped: bool  # the parameter is stored [in, out]: the layer's weight is its transpose
    conv: tuple[Any, ...] = ()  # stride, padding, dilation, groups
    type_name: str = "Linear"

    def current_input(self) -> Node:
        """The site's input now (an earlier site's rewrite may have replaced it)."""
        x = _arg(self.node, self.pattern.input, "input" if self.pattern.name != "addmm" else "mat1")
        assert isinstance(x, Node)
        return x

    def signature(self) -> tuple[Any, ...]:
        return (self.kind, self.flipped, self.bias, self.conv)


@dataclass
class _Group:
    """The sites that share one weight: one layer, called once per site."""

    path: str
    sites: list[_Site]
    stand_in: nn.Module | None = None
    redirects: list[Node] = field(default_factory=list)


def _module_class(node: Node, owner: str) -> str | None:
    """The class of the module the graph records for ``owner`` in ``node``'s module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, val in reversed(list(stack.items())):
        raw, cls = (val[0], val[1]) if isinstance(val, tuple) and len(val) > 1 else (key, None)
        path = _source_fqn(str(raw)).split("@")[0] if raw else ""
        if path == owner and cls is not None:
            return cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
    return None


def _match(
    node: Node, params: dict[Node, tuple[str, nn.Parameter]]
) -> _Site | tuple[str, str] | None:
    """The site ``node`` is, ``(FQN, why)`` for a matrix call on a parameter that cannot be
    rewritten, or None."""
    pattern = None
    for p in PATTERNS:
        if (node.op == "call_function" and node.target in p.functions) or (
            node.op == "call_method" and node.target in p.methods
        ):
            pattern = p
            break
    if pattern is None:
        return None
    w = _arg(node, pattern.weight, pattern.weight_kw)
    if not isinstance(w, Node):
        return None
    transpose = None
    if w not in params and _is_transpose(w) and w.args and isinstance(w.args[0], Node):
        transpose, w = w, w.args[0]
    if w not in params:
        return None  # a matmul of two activations (attention scores), not a layer
    fqn, param = params[w]
    dims = 4 if pattern.layout == "conv" else 2
    if param.dim() != dims or (transpose is not None and dims != 2):
        return fqn, f"{param.dim()}-D weight in `{pattern.name}`"
    for name, pos, value in pattern.fixed:
        if _arg(node, pos, name, value) != value:
            return fqn, f"`{pattern.name}` with {name} ≠ {value}"
    x = _arg(node, pattern.input, "input" if pattern.name != "addmm" else "mat1")
    if not isinstance(x, Node):
        return None
    bias, bias_param = None, None
    if pattern.bias is not None:
        b = _arg(node, pattern.bias, pattern.bias_kw)
        if isinstance(b, Node):
            if b not in params:
                return fqn, "its bias is computed, not a parameter"
            bias, bias_param = b, params[b][1]
        elif b is not None:
            return fqn, "its bias is a constant"
    flipped = (pattern.layout == "in_out") != (transpose is not None)
    conv: tuple[Any, ...] = ()
    if pattern.layout == "conv":
        conv = tuple(_arg(node, pos, name, default) for name, pos, default in pattern.conv_args)
        conv = tuple(tuple(v) if isinstance(v, list) else v for v in conv)
    owner = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
    kind: Literal["linear", "conv2d"] = "conv2d" if pattern.layout == "conv" else "linear"
    out_f = param.shape[1] if flipped else param.shape[0]
    if bias_param is not None and (bias_param.dim() != 1 or bias_param.shape[0] != out_f):
        return fqn, f"its bias does not match its {out_f} outputs"
    return _Site(
        node=node,
        pattern=pattern,
        input=x,
        weight=w,
        transpose=transpose,
        bias=bias,
        fqn=fqn,
        param=param,
        bias_param=bias_param,
        kind=kind,
        flipped=flipped,
        conv=conv,
        type_name=_module_class(node, owner) or ("Conv2d" if kind == "conv2d" else "Linear"),
    )


def _groups(
    gm: GraphModule, params: dict[Node, tuple[str, nn.Parameter]]
) -> tuple[list[_Group], dict[str, str]]:
    """The rewritable layers of ``gm`` (sites grouped by weight) and, by FQN, why each other
    matrix call on a parameter is left alone."""
    by_weight: dict[int, list[_Site]] = {}
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        found = _match(node, params)
        if isinstance(found, tuple):
            skipped[found[0]] = found[1]
        elif found is not None:
            by_weight.setdefault(id(found.param), []).append(found)
    nodes_of: dict[int, list[Node]] = {}
    for node, (_, p) in params.items():
        nodes_of.setdefault(id(p), []).append(node)
    groups: list[_Group] = []
    for pid, sites in by_weight.items():
        fqn = sites[0].fqn
        expected = {s.node for s in sites} | {s.transpose for s in sites if s.transpose}
        users = {u for n in nodes_of[pid] for u in n.users}
        through = {u for s in sites if s.transpose for u in s.transpose.users}
        if not users <= expected or not through <= {s.node for s in sites}:
            skipped[fqn] = "weight shared with another use (tied)"
            continue
        if len({s.signature() for s in sites}) > 1:
            skipped[fqn] = "weight used by differently shaped calls"
            continue
        owner = fqn[: -len(".weight")] if fqn.endswith(".weight") else fqn
        groups.append(_Group(path=owner, sites=sites))
    # A layer path inside another layer's path would make one stand-in the other's parent.
    paths = {g.path for g in groups}
    for g in groups:
        if any(p.startswith(g.path + ".") for p in paths):
            g.path = g.sites[0].fqn  # `a.weight` beside the layer `a.b`
    return groups, skipped


def _stand_in(site: _Site) -> nn.Module:
    """The module a site computes, holding its parameters (shared, never copied)."""
    w = site.param
    bias = site.bias_param
    if site.kind == "linear":
        out_f, in_f = (w.shape[1], w.shape[0]) if site.flipped else (w.shape[0], w.shape[1])
        lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().t(), requires_grad=False) if site.flipped else w
        if bias is not None:
            lin.bias = bias
        return lin
    stride, padding, dilation, groups = site.conv
    conv = nn.Conv2d(
        w.shape[1] * int(groups),
        w.shape[0],
        (int(w.shape[2]), int(w.shape[3])),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=int(groups),
        bias=bias is not None,
        device="meta",
        dtype=w.dtype,
    )
    conv.weight = w
    if bias is not None:
        conv.bias = bias
    return conv


class _Redirect(nn.Module):
    """Calls whatever module the tree of stand-ins holds at ``path`` now (a pass may have
    replaced it); the tree is referenced, not owned, so it is not a child."""

    _tree: nn.Module

    def __init__(self, tree: nn.Module, path: str) -> None:
        super().__init__()
        object.__setattr__(self, "_tree", tree)
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        module = self._tree.get_submodule(self.path)
        out: torch.Tensor = module(x)
        return out


class _Layers(nn.Module):
    """The stand-ins at their module paths; calling it runs the graph (which calls them)."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__()
        object.__setattr__(self, "_gm", gm)

    _gm: GraphModule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._gm(*args, **kwargs)


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    owner.add_module(name, module)


# --- the recipe --------------------------------------------------------------------------------

RecipeLike = str | Path | ast.Recipe


def _load_recipe(recipe: RecipeLike) -> tuple[ast.Recipe, str | None, str]:
    """The parsed recipe, its source text and a file name for messages. A ``Path``, or a
    string naming an existing file or ending in ``.surg``, is read; other strings are text."""
    if isinstance(recipe, ast.Recipe):
        return recipe, None, "<recipe>"
    source, filename = str(recipe), "<recipe>"
    is_file = isinstance(recipe, Path) or (
        "\n" not in source and (source.endswith(".surg") or Path(source).is_file())
    )
    if is_file:
        try:
            source, filename = Path(recipe).read_text(encoding="utf-8"), str(recipe)
        except OSError as exc:
            raise GraphSurgeryError(f"cannot read recipe {recipe}: {exc.strerror}") from None
    try:
        return parse(source), source, filename
    except DiagnosticError as exc:
        raise GraphSurgeryError(
            render_all(exc.diagnostics, source, filename), exc.diagnostics
        ) from None


def _where_fields(predicate: ast.Predicate | None) -> Iterable[ast.Compare]:
    if predicate is None or isinstance(predicate, ast.Match):
        return
    if isinstance(predicate, ast.And | ast.Or):
        for p in predicate.items:
            yield from _where_fields(p)
    elif isinstance(predicate, ast.Not):
        yield from _where_fields(predicate.item)
    else:
        yield predicate


def _refusals(stmt: Any) -> list[Diagnostic]:
    """Why ``stmt`` cannot run on a graph (empty when it can)."""
    span = stmt.span
    verb = stmt.verb

    def refuse(message: str, node: Any, help: str) -> Diagnostic:
        return Diagnostic(code="S0401", message=message, span=node.span, help=help)

    if verb not in MATRIX_VERBS:
        return [
            Diagnostic(
                code="S0401",
                message=f"`{verb}` is not a matrix pass: a graph can only `decompose` or "
                "`sparsify` its matrix calls",
                span=span,
                help=f"run the recipe on the model (`surgery apply`, or "
                f"`surgery.passes.pass_for` on the nn.Module) for `{verb}`, or remove the line",
            )
        ]
    found: list[Diagnostic] = []
    for cmp in _where_fields(stmt.selector.where):
        if cmp.field.value not in SITE_FIELDS:
            found.append(
                refuse(
                    f"`where {cmp.field.value}` cannot be evaluated on a graph's matrix calls",
                    cmp.field,
                    f'a graph site has {", ".join(SITE_FIELDS)} and `name ~ "glob"`',
                )
            )
    if verb == "decompose":
        if stmt.progressive is not None:
            found.append(
                refuse(
                    "`progressive` builds a family of models healed in between: not on a graph",
                    stmt.progressive,
                    "run it on the model with `surgery apply`",
                )
            )
        if stmt.keep_if_faster is not None:
            found.append(
                refuse(
                    "`keep if faster` times layers on a target: not inside a compiler",
                    stmt.keep_if_faster,
                    "choose the rank with `surgery plan` on the model, then give it here",
                )
            )
    return found


def _validated(recipe: RecipeLike) -> tuple[ast.Recipe, str | None, str]:
    parsed, source, filename = _load_recipe(recipe)
    diags = [d for d in check(parsed) if d.severity == "error"]
    for stmt in parsed.statements:
        diags.extend(_refusals(stmt))
    if diags:
        raise GraphSurgeryError(render_all(diags, source, filename), diags)
    if not parsed.statements:
        raise GraphSurgeryError(f"{filename}: the recipe has no statement")
    return parsed, source, filename


# --- rewriting one graph ---------------------------------------------------------------------


@dataclass
class GraphSurgery:
    """What a recipe did to one graph."""

    graph_module: GraphModule
    plans: list[StepPlan]
    changes: list[Change]
    layers: list[str]  # paths of the matrix layers found (rewritable sites grouped by weight)
    skipped: dict[str, str]  # FQN → why a matrix call on it is left alone
    params_before: int
    params_after: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "skipped": dict(self.skipped),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "plans": [p.as_dict() for p in self.plans],
            "changes": [c.as_dict() for c in self.changes],
        }


def _analysis(tree: _Layers, example: Inputs | None, groups: list[_Group]) -> Any:
    analysis = analyze(tree, example, trace=False)
    for g in groups:
        info = analysis.modules.get(g.path)
        if info is not None and tree.get_submodule(g.path) is g.stand_in:  # not yet replaced
            info.type = g.sites[0].type_name
    return analysis


def _install(gm: GraphModule, path: str, module: nn.Module) -> str:
    """Register ``module`` in ``gm`` at ``path`` when that name is free (or only an emptied
    holder of the replaced parameters), else under a fresh flat name; the name used."""
    try:
        holder = gm.get_submodule(path)
    except AttributeError:
        holder = None
    referenced = any(
        n.op in ("get_attr", "call_module")
        and (str(n.target) == path or str(n.target).startswith(path + "."))
        for n in gm.graph.nodes
    )
    if holder is not None and not referenced and type(holder) is nn.Module:
        if not holder._parameters and not holder._buffers and not holder._modules:
            gm.delete_submodule(path)
            holder = None
    if holder is None and not referenced and gm.add_submodule(path, module):
        return path
    base = "_surgery_" + re.sub(r"\W", "_", path)
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.add_submodule(name, module)
    return name


def _drop_unused(gm: GraphModule, node: Node | None) -> None:
    """Erase a ``get_attr``/transpose node nothing uses any more, and the parameter it read
    when no other node reads it (placeholders stay: they are the graph's signature)."""
    if node is None or node.users or node.op == "placeholder":
        return
    target = str(node.target)
    op = node.op
    source = node.args[0] if node.op != "get_attr" and node.args else None
    gm.graph.erase_node(node)
    if isinstance(source, Node):
        _drop_unused(gm, source)
    if op == "get_attr" and not any(
        n.op == "get_attr" and n.target == target for n in gm.graph.nodes
    ):
        owner, _, name = target.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        if name in holder._parameters:
            del holder._parameters[name]


def rewrite_graph(
    gm: GraphModule,
    recipe: RecipeLike,
    example: Inputs | None = None,
    *,
    calibration: Sequence[Inputs] = (),
) -> GraphSurgery:
    """Carry out the matrix statements of ``recipe`` on ``gm`` in place.

    ``example`` is one call of ``gm`` (its analysis measures FLOPs and shapes on it, and a
    data-aware method without ``calibration`` is fitted on it, as on modules);
    ``calibration`` are further calls of ``gm`` (then ``asvd``/``svd-llm`` statistics and
    ``sparsify``'s Wanda scores use them).

    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
    >>> gm = torch.fx.symbolic_trace(model)  # holds modules: nothing functional to rewrite
    >>> rewrite_graph(gm, "decompose Linear rank = 4").layers
    []
    """
    parsed, _, _ = _validated(recipe)
    return _rewrite(gm, parsed, example, list(calibration), {})


# path → (its weight, the module that replaced it, or None when it stayed dense)
_Done = dict[str, tuple[nn.Parameter, nn.Module | None]]


def _rewrite(
    gm: GraphModule,
    recipe: ast.Recipe,
    example: Inputs | None,
    calibration: list[Inputs],
    done: _Done,
) -> GraphSurgery:
    """:func:`rewrite_graph`; layers in ``done`` (with the same weight) get their earlier
    outcome instead of a new one, and this graph's outcomes are added to ``done``."""
    params = _param_nodes(gm)
    before = graph_parameter_count(gm)
    found, skipped = _groups(gm, params)
    groups: list[_Group] = []
    reused: list[Change] = []
    for g in found:
        weight, earlier = done.get(g.path, (None, None))
        if weight is not g.sites[0].param:
            groups.append(g)
        elif earlier is None:
            skipped[g.sites[0].fqn] = "left dense when an earlier graph was rewritten"
        else:
            _replace_sites(gm, g, _install(gm, g.path, earlier))
            reused.append(Change("reuse", 0, 0, "", g.path, "reused", {"from": "earlier graph"}))
    tree = _Layers(gm)
    for i, g in enumerate(groups):
        g.stand_in = _stand_in(g.sites[0])
        _put(tree, g.path, g.stand_in)
        name = f"_surgery_site_{i}"
        gm.add_submodule(name, _Redirect(tree, g.path))
        for s in g.sites:
            with gm.graph.inserting_after(s.node):
                call = gm.graph.call_module(name, (s.current_input(),))
            s.node.replace_all_uses_with(call)
            g.redirects.append(call)
    gm.recompile()
    plans: list[StepPlan] = []
    changes: list[Change] = []
    ok = False
    try:
        for stmt in recipe.statements:
            context = PassContext(
                analysis=_analysis(tree, example, groups),
                example=example,
                calibration=list(calibration),
            )
            try:
                plan, made = pass_for(stmt, context).run(tree)
            except PassError as exc:
                d = exc.diagnostic
                where = f"line {d.span.line}: " if d.span is not None else ""
                help = f" ({d.help})" if d.help else ""
                if "needs calibration inputs" in d.message:  # no `calibrate` line here
                    help = " (give the graph example inputs or `calibration=`)"
                raise GraphSurgeryError(f"{where}{d.message}{help}", [d]) from None
            except SelectorError as exc:
                raise GraphSurgeryError(f"line {stmt.span.line}: {exc}") from None
            plans.append(plan)
            changes.extend(made)
        ok = True
    finally:  # a failed recipe leaves the graph as it was
        outcome = _finish(gm, tree, groups, restore=not ok)
    done.update(outcome)
    return GraphSurgery(
        graph_module=gm,
        plans=plans,
        changes=reused + changes,
        layers=[g.path for g in found],
        skipped=skipped,
        params_before=before,
        params_after=graph_parameter_count(gm),
    )


def _replace_sites(gm: GraphModule, group: _Group, name: str) -> None:
    """Every site of ``group`` calls the module ``gm`` holds at ``name`` instead."""
    for s in group.sites:
        with gm.graph.inserting_after(s.node):
            call = gm.graph.call_module(name, (s.current_input(),))
        s.node.replace_all_uses_with(call)
        gm.graph.erase_node(s.node)
        _drop_unused(gm, s.transpose)
        _drop_unused(gm, s.weight)
        _drop_unused(gm, s.bias)
    gm.recompile()


def _finish(gm: GraphModule, tree: nn.Module, groups: list[_Group], *, restore: bool) -> _Done:
    """Sites whose stand-in a pass replaced call the replacement; the others (all of them
    with ``restore``) get their original call back. Returns each layer's outcome."""
    outcome: _Done = {}
    for i, g in enumerate(groups):
        final = tree.get_submodule(g.path)
        if final is g.stand_in or restore:
            for site, call in zip(g.sites, g.redirects, strict=True):
                call.replace_all_uses_with(site.node)
                gm.graph.erase_node(call)
            outcome[g.path] = (g.sites[0].param, None)
        else:
            for site in g.sites:
                gm.graph.erase_node(site.node)
                _drop_unused(gm, site.transpose)
                _drop_unused(gm, site.weight)
                _drop_unused(gm, site.bias)
            name = _install(gm, g.path, final)
            for call in g.redirects:
                call.target = name
            outcome[g.path] = (g.sites[0].param, final)
        gm.delete_submodule(f"_surgery_site_{i}")
    gm.graph.lint()
    gm.recompile()
    return outcome


# --- torch.compile -----------------------------------------------------------------------------


class SurgeryBackend:
    """A ``torch.compile`` backend that carries out a recipe's matrix statements on every
    graph Dynamo hands it, then compiles the result (``compiler``: ``"inductor"``,
    ``"eager"`` — run the rewritten ``GraphModule`` as is — or ``"auto"``: inductor, and the
    eager graph with a warning where inductor cannot compile here).

    The recipe is checked when the backend is made, so a bad recipe fails before any
    compilation. Data-aware methods (``asvd``, ``svd-llm``) are fitted on the inputs of the
    call that triggered the compilation. Each layer is rewritten once: the graphs of later
    recompilations (new shapes, graph breaks) reuse its first outcome, so every graph
    computes with the same factors. ``reports`` holds one :class:`GraphSurgery` per graph.
    The rewritten graph still receives the model's original parameters (Dynamo passes them)
    but no longer reads the replaced ones; the replacement parameters are frozen (inference).
    """

    def __init__(self, recipe: RecipeLike, *, compiler: Compiler = "auto") -> None:
        if compiler not in ("auto", "inductor", "eager"):
            raise GraphSurgeryError(
                f"unknown compiler {compiler!r}: choose 'auto', 'inductor' or 'eager'"
            )
        self.recipe, _, self.filename = _validated(recipe)
        self.compiler = compiler
        self.reports: list[GraphSurgery] = []
        self._done: _Done = {}

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        example = Inputs(tuple(example_inputs), {})
        report = _rewrite(gm, self.recipe, example, [], self._done)
        for _, module in self._done.values():
            if module is not None:
                module.requires_grad_(False)
        self.reports.append(report)
        return self._compile(gm, list(example_inputs))

    def _compile(self, gm: GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if self.compiler == "eager":
            return gm
        if any(True for _ in gm.parameters()):
            # The replacements' parameters are no graph inputs Dynamo knows the source of:
            # hand inductor the rewritten graph as a graph of its own, not Dynamo's.
            gm = GraphModule(gm, gm.graph)
        try:
            from torch._inductor import compile as inductor_compile

            compiled: Callable[..., Any] = inductor_compile(gm, example_inputs)
            return compiled
        except Exception as exc:
            if self.compiler == "inductor":
                raise
            warnings.warn(
                f"inductor cannot compile here ({type(exc).__name__}: {str(exc)[:200]}); "
                "running the rewritten graph eagerly",
                RuntimeWarning,
                stacklevel=2,
            )
            return gm


def compile_backend(recipe: RecipeLike, *, compiler: Compiler = "auto") -> SurgeryBackend:
    """A ``torch.compile`` backend applying ``recipe`` (a ``.surg`` path, recipe text or a
    parsed recipe) to every graph: ``torch.compile(model, backend=compile_backend(...))``.

    >>> backend = compile_backend("decompose Linear rank = 0.25", compiler="eager")
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
    >>> with torch.no_grad():
    ...     _ = torch.compile(model, backend=backend)(torch.randn(2, 64))
    >>> [c.detail["rank"] for c in backend.reports[0].changes]
    [16]
    """
    return SurgeryBackend(recipe, compiler=compiler)


# --- torch.export ------------------------------------------------------------------------------


def _dynamic_shapes(program: torch.export.ExportedProgram, gm: GraphModule) -> Any:
    """The program's symbolic input dimensions as ``Dim.AUTO`` specs for re-exporting ``gm``
    (None when every input is static or the inputs cannot be matched up)."""
    import inspect

    from torch.utils._pytree import tree_unflatten

    user = set(program.graph_signature.user_inputs)
    vals = [
        n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in user
    ]
    spec = program.call_spec.in_spec
    if spec is None or spec.num_leaves != len(vals):
        return None
    leaves: list[Any] = []
    dynamic = False
    for v in vals:
        if isinstance(v, torch.Tensor):
            dims = {
                i: torch.export.Dim.AUTO
                for i, s in enumerate(v.shape)
                if isinstance(s, torch.SymInt)
            }
            dynamic = dynamic or bool(dims)
            leaves.append(dims or None)
        else:
            leaves.append(None)
    if not dynamic:
        return None
    args, kwargs = tree_unflatten(leaves, spec)
    names = list(inspect.signature(gm.forward).parameters)
    shapes = dict(zip(names, args, strict=False))
    shapes.update(kwargs)
    return shapes


def rewrite_exported(
    program: torch.export.ExportedProgram,
    recipe: RecipeLike,
    *,
    example_inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    calibration: Sequence[tuple[tuple[Any, ...], dict[str, Any]]] = (),
) -> torch.export.ExportedProgram:
    """``program`` with ``recipe``'s matrix statements carried out, exported again.

    The program's module (``program.module()``, parameters as attributes) is rewritten
    (:func:`rewrite_graph`) and exported with the program's example inputs — or
    ``example_inputs`` ``(args, kwargs)`` — keeping its symbolic dimensions. Replaced
    layers' parameters are named as on the module path (``h.0.mlp.c_fc.first.weight``).
    ``calibration``: calls ``(args, kwargs)`` the data-aware statistics are taken on
    (default: the example inputs, as on modules). The report is
    ``result.graph_module.meta["surgery"]`` (a :class:`GraphSurgery` dict).
    """
    example = example_inputs if example_inputs is not None else program.example_inputs
    if example is None:
        raise GraphSurgeryError(
            "the program has no example inputs to export the rewritten graph with: pass "
            "`example_inputs=(args, kwargs)`"
        )
    args, kwargs = example
    gm = program.module()
    assert isinstance(gm, GraphModule)
    shapes = _dynamic_shapes(program, gm)
    try:
        report = rewrite_graph(
            gm,
            recipe,
            Inputs(tuple(args), dict(kwargs)),
            calibration=[Inputs(tuple(a), dict(k)) for a, k in calibration],
        )
    except AssertionError as exc:  # the program's module checks its inputs' shapes
        if "Guard failed" not in str(exc):
            raise
        raise GraphSurgeryError(
            f"a calibration call does not fit the program's inputs ({exc}): export the "
            "program with dynamic dimensions (`dynamic_shapes=`) to calibrate on other shapes"
        ) from None
    out = torch.export.export(gm, tuple(args), dict(kwargs), dynamic_shapes=shapes, strict=False)
    summary = report.as_dict()
    summary["params_after"] = sum(
        t.numel() for k, t in out.state_dict.items() if k in set(out.graph_signature.parameters)
    )
    out.graph_module.meta["surgery"] = summary
    return out
