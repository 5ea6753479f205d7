"""Rules for ops that move or pick elements without arithmetic.

Identity and casts (``contiguous``, eval-mode dropout, ``_to_copy``), reshapes (every
reshape-like op is a reshape to the recorded static shape), transposes, slices and selects,
splits, concatenation, indexing (``embedding``, ``gather``, ``index``), and in-place writes
into views: ``scores[:, 0] = inf`` (a ``fill_`` of a ``select``) rebinds the viewed tensor to a
``where`` over the positions the view covers. :func:`_is_in_place` and :func:`_view_base` are
also what :mod:`.codegen` uses to keep such writes alive.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from .state import _a, _arg, _Codegen, _rule

# --- identity, casts, shapes ------------------------------------------------------------


@_rule(
    "aten.contiguous.default",
    "aten.clone.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.lift_fresh_copy.default",
    "aten.dropout.default",
    "aten.feature_dropout.default",
    "aten._to_copy.default",
    "aten.to.dtype",
    "aten.to.dtype_layout",
    "aten.to.device",
    "aten.to.other",
    "aten.type_as.default",
)
def _identity_or_cast(g: _Codegen, n: Node) -> str:
    target = str(n.target)
    if target in ("aten.dropout.default", "aten.feature_dropout.default"):
        p, train = _arg(n, 1, "p", 0.5), _arg(n, 2, "train", False)
        if train and p > 0:
            raise g.error("dropout in training mode has no deterministic lowering")
    return g.cast_to(_a(n)[0], g.dtype(n))


@_rule(
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.reshape.default",
    "aten.flatten.using_ints",
    "aten.unflatten.int",
    "aten.unsqueeze.default",
    "aten.squeeze.dim",
    "aten.squeeze.dims",
    "aten.squeeze.default",
    "aten.view_as.default",
    "aten.reshape_as.default",
)
def _reshape(g: _Codegen, n: Node) -> str:
    # Shapes are static: every reshape-like op is a reshape to the recorded output shape.
    return f"ops.reshape({g.r(_a(n)[0])}, {g.r(g.out_shape(n))})"


@_rule("aten.expand.default", "aten.expand_as.default", "aten.broadcast_to.default")
def _expand(g: _Codegen, n: Node) -> str:
    shape = g.out_shape(n)
    if g.shape(_a(n)[0]) == shape:
        return g.r(_a(n)[0])
    return f"ops.broadcast_to({g.r(_a(n)[0])}, {g.r(shape)})"


@_rule("aten.transpose.int", "aten.swapaxes.default")
def _transpose(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    perm = list(range(g.rank(x)))
    a, b = g.dim(x, _a(n)[1]), g.dim(x, _a(n)[2])
    perm[a], perm[b] = perm[b], perm[a]
    return f"ops.transpose({g.r(x)}, {g.r(tuple(perm))})"


@_rule("aten.t.default", "aten.numpy_T.default")
def _t(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    if g.rank(x) < 2:
        return g.r(x)
    return f"ops.transpose({g.r(x)}, {g.r(tuple(reversed(range(g.rank(x)))))})"


@_rule("aten.permute.default")
def _permute(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    perm = tuple(g.dim(x, d) for d in _a(n)[1])
    return f"ops.transpose({g.r(x)}, {g.r(perm)})"


def _index_expr(g: _Codegen, x: Any, dim: int, item: str) -> str:
    return f"{g.r(x)}[{', '.join([':'] * dim + [item])}]"


@_rule("aten.slice.Tensor")
def _slice(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    dim = g.dim(x, _arg(n, 1, "dim", 0))
    size = g.shape(x)[dim]
    start, end, step = _arg(n, 2, "start"), _arg(n, 3, "end"), _arg(n, 4, "step", 1)
    lo, hi, st = slice(start, end, step).indices(size)  # clamps like torch
    if lo == 0 and hi == size and st == 1:
        return g.r(x)
    return _index_expr(g, x, dim, f"{lo}:{hi}" + (f":{st}" if st != 1 else ""))


@_rule("aten.narrow.default")
def _narrow(g: _Codegen, n: Node) -> str:
    x, dim, start, length = _a(n)[:4]
    d = g.dim(x, dim)
    lo = start + g.shape(x)[d] if start < 0 else start
    return _index_expr(g, x, d, f"{lo}:{lo + length}")


@_rule("aten.select.int")
def _select(g: _Codegen, n: Node) -> str:
    x, dim, index = _a(n)[:3]
    d = g.dim(x, dim)
    i = index + g.shape(x)[d] if index < 0 else index
    return _index_expr(g, x, d, str(i))


@_rule("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default")
def _split(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    d = g.dim(x, _arg(n, 2, "dim", 0))
    sizes = [g.shape(o)[d] for o in g.val(n)]
    return f"ops.split({g.r(x)}, {g.r(sizes)}, {d})"


@_rule("aten.unbind.int")
def _unbind(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    d = g.dim(x, _arg(n, 1, "dim", 0))
    parts = [_index_expr(g, x, d, str(i)) for i in range(g.shape(x)[d])]
    return "(" + ", ".join(parts) + ",)"


@_rule("<built-in function getitem>")
def _getitem(g: _Codegen, n: Node) -> str:
    return f"{g.r(_a(n)[0])}[{_a(n)[1]}]"


@_rule("aten.cat.default", "aten.concat.default", "aten.concatenate.default")
def _cat(g: _Codegen, n: Node) -> str:
    parts = [p for p in _a(n)[0] if g.shape(p) != (0,)]  # torch allows empty 1-d pieces
    d = g.dim(n, _arg(n, 1, "dim", 0))
    dtype = g.dtype(n)
    return f"ops.cat(({', '.join(g.cast_to(p, dtype) for p in parts)},), {d})"


@_rule("aten.stack.default")
def _stack(g: _Codegen, n: Node) -> str:
    d = g.dim(n, _arg(n, 1, "dim", 0))
    dtype = g.dtype(n)
    return f"ops.stack(({', '.join(g.cast_to(p, dtype) for p in _a(n)[0])},), {d})"


# --- indexing ---------------------------------------------------------------------------


@_rule("aten.embedding.default")
def _embedding(g: _Codegen, n: Node) -> str:
    weight, indices = _a(n)[:2]  # padding_idx and sparse only change gradients
    return f"ops.gather({g.r(weight)}, {g.r(indices)}, 0)"


@_rule("aten.index_select.default")
def _index_select(g: _Codegen, n: Node) -> str:
    x, dim, index = _a(n)[:3]
    return f"ops.gather({g.r(x)}, {g.r(index)}, {g.dim(x, dim)})"


@_rule("aten.gather.default")
def _gather(g: _Codegen, n: Node) -> str:
    x, dim, index = _a(n)[:3]
    return f"ops.gather_elements({g.r(x)}, {g.dim(x, dim)}, {g.r(index)})"


@_rule("aten.index.Tensor")
def _index(g: _Codegen, n: Node) -> str:
    x, indices = _a(n)[:2]
    used = [i for i, t in enumerate(indices) if t is not None]
    if any(g.dtype(indices[i]) == torch.bool for i in used):
        raise g.error("boolean-mask indexing gives a data-dependent shape")
    if len(used) == 1:  # x[:, idx]: one index tensor, result dims in its place
        (d,) = used
        return f"ops.gather({g.r(x)}, {g.r(indices[d])}, {d})"
    if used != list(range(len(used))):
        raise g.error("only leading, adjacent index tensors are supported")
    shape = torch.broadcast_shapes(*(g.shape(indices[i]) for i in used))
    folded = [g.folded.get(t) if isinstance(t, Node) else t for t in indices]
    if all(isinstance(t, Tensor) for t in folded):  # constant indices: stack them now
        stacked = torch.stack([t.long().expand(shape) for t in folded], -1)  # type: ignore[union-attr]
        return f"ops.gather_nd({g.r(x)}, {g.const(stacked)})"
    parts = [f"ops.broadcast_to({g.cast_to(indices[i], torch.int64)}, {g.r(shape)})" for i in used]
    return f"ops.gather_nd({g.r(x)}, ops.stack(({', '.join(parts)},), -1))"


# --- in-place writes into views -----------------------------------------------------------

# Ops whose result shares its input's storage (a write into them writes into the input).
_VIEWS = {"aten.select.int", "aten.slice.Tensor", "aten.alias.default", "aten.narrow.default"}


def _is_in_place(node: Node) -> bool:
    """``add_``, ``fill_``: an aten op that writes into its first argument."""
    packet = str(node.target).rpartition(".")[0]
    return node.op == "call_function" and packet.endswith("_") and not packet.endswith("__")


def _view_base(arg: Any) -> Any:
    """The tensor a chain of views (``x[:, 0]``) reads from, or ``arg`` itself."""
    while isinstance(arg, Node) and str(arg.target) in _VIEWS:
        arg = arg.args[0]
    return arg


@_rule("aten.fill_.Tensor", "aten.fill_.Scalar")
def _fill_(g: _Codegen, n: Node) -> str:
    """``x[:, 0] = v`` (a fill of a view): ``x`` rebound to ``where(covered, v, x)``."""
    view, value = _a(n)[:2]
    base = _view_base(view)
    if not isinstance(view, Node) or not isinstance(base, Node) or base in g.folded:
        raise g.error("fill_ of a constant with a computed value is not mapped")
    dtype = g.dtype(base)
    assert dtype is not None
    if not g.order:
        g.order.update((node, i) for i, node in enumerate(g.graph.nodes))
    here = g.order[n]
    chain: list[Node] = []
    node: Any = view
    while node is not base:
        chain.append(node)
        node = node.args[0]
    for v in chain:  # a view read after the write would have to see it: not expressible
        if any(g.order[u] > here for u in v.users if u is not n and u not in chain):
            raise g.error(f"fill_ writes through `{v.name}`, which is read afterwards")
    for u in base.users:  # so would another view of the base taken before the write
        if str(u.target) in _VIEWS and u not in chain and g.order[u] < here:
            if any(g.order[w] > here for w in u.users):
                raise g.error(f"fill_ writes into `{base.name}` while its view `{u.name}` lives")
    shape = g.shape(base)
    positions: Tensor = torch.arange(math.prod(shape)).reshape(shape)
    for v in reversed(chain):  # the positions of the base the view covers, computed in torch
        op: Any = v.target
        positions = op(positions, *v.args[1:], **v.kwargs)
    covered = torch.zeros(math.prod(shape), dtype=torch.bool)
    covered[positions.flatten()] = True
    new = g.tmp(
        f"ops.where({g.const(covered.reshape(shape))}, {g.scalar_tensor(value, dtype)}, "
        f"{g.r(base)})"
    )
    g.names[base] = new  # later readers of the base see the write
    return new
