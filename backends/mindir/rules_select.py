"""Rules for selection: top-k, sort, ``take_along_dim`` and scatter with its reductions.

``scatter(reduce=...)``, ``scatter_add`` and ``scatter_reduce`` (sum / prod / amax / amin /
mean, with or without ``include_self``) become scatters that combine duplicates; reductions on
``bool`` or complex tensors are refused with a located error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from .state import _a, _arg, _Codegen, _k, _rule


@_rule("aten.topk.default")
def _topk(g: _Codegen, n: Node) -> str:
    x, k = _a(n)[:2]
    d = g.dim(x, _arg(n, 2, "dim", -1))
    largest = bool(_arg(n, 3, "largest", True))  # sorted=False: any order, so sorted
    pair = g.tmp(f"ops.topk({g.r(x)}, {int(k)}, {d}, {largest}, True)")
    return f"({pair}[0], ops.cast({pair}[1], ms.int64))"


@_rule("aten.sort.default", "aten.sort.stable")
def _sort(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    if str(n.target) == "aten.sort.stable":
        d, descending = _k(n).get("dim", -1), bool(_k(n).get("descending", False))
    else:
        d, descending = _arg(n, 1, "dim", -1), bool(_arg(n, 2, "descending", False))
    pair = g.tmp(f"ops.sort({g.r(x)}, {g.dim(x, d)}, {descending})")
    return f"({pair}[0], ops.cast({pair}[1], ms.int64))"


@_rule("aten.take_along_dim.default")
def _take_along_dim(g: _Codegen, n: Node) -> str:
    x, index = _a(n)[:2]
    d = _arg(n, 2, "dim")
    if d is None:
        raise g.error("take_along_dim without a dim is not mapped")
    out = g.out_shape(n)
    d = g.dim(n, d)
    xs = g.r(x)
    want = (*out[:d], g.shape(x)[d], *out[d + 1 :])
    if g.shape(x) != want:
        xs = f"ops.broadcast_to({xs}, {g.r(want)})"
    idx = g.cast_to(index, torch.int64)
    if g.shape(index) != out:
        idx = f"ops.broadcast_to({idx}, {g.r(out)})"
    return f"ops.gather_elements({xs}, {d}, {idx})"


# torch's reduction names (``scatter(reduce=...)`` and ``scatter_reduce``) -> one spelling.
_SCATTER_REDUCE = {
    "add": "sum",
    "multiply": "prod",
    "sum": "sum",
    "prod": "prod",
    "amax": "amax",
    "amin": "amin",
    "mean": "mean",
}
# The MindSpore primitives that scatter by coordinates and combine duplicates (CPU kernels).
_SCATTER_ND = {"prod": "TensorScatterMul", "amax": "TensorScatterMax", "amin": "TensorScatterMin"}


@_rule(
    "aten.scatter.src",
    "aten.scatter.value",
    "aten.scatter.reduce",
    "aten.scatter.value_reduce",
    "aten.scatter_add.default",
    "aten.scatter_reduce.two",
)
def _scatter(g: _Codegen, n: Node) -> str:
    """``scatter`` as ``tensor_scatter_elements``; its reductions as scatters that combine.

    Sums (``scatter_add``, ``reduce="add"``, ``"sum"``, ``"mean"``) are
    ``tensor_scatter_elements(..., "add")``; products, maxima and minima are the coordinate
    scatters ``TensorScatterMul`` / ``Max`` / ``Min``, given each index's full coordinates.
    ``include_self=False`` first overwrites the scattered positions with the reduction's
    identity; a mean divides by the count of values at each position, as torch does
    (flooring for integers). The coordinate scatters are deprecated from MindSpore 2.10.0 but
    are its only CPU kernels for these reductions.
    """
    target = str(n.target)
    x, dim, index, src = _a(n)[:4]
    d = g.dim(x, dim)
    ishape = g.shape(index)
    dtype = g.dtype(n)
    if dtype is None:
        raise g.error("scatter of a non-tensor")
    if isinstance(src, Node | Tensor):
        upd = g.cast_to(src, dtype)
        if g.shape(src) != ishape:  # torch reads only the index's extent of src
            upd = f"{upd}[{', '.join(f':{s}' for s in ishape)}]"
    else:
        upd = g.const(torch.full(ishape, src, dtype=dtype))
    idx = g.cast_to(index, torch.int64)
    if target in ("aten.scatter.src", "aten.scatter.value"):
        return f"ops.tensor_scatter_elements({g.r(x)}, {idx}, {upd}, {d})"
    raw: Any = _k(n).get("reduce")  # scatter.reduce, scatter.value_reduce
    include_self = True
    if target == "aten.scatter_add.default":
        raw = "sum"
    elif target == "aten.scatter_reduce.two":
        raw, include_self = _arg(n, 4, "reduce"), bool(_k(n).get("include_self", True))
    if raw not in _SCATTER_REDUCE:
        raise g.error(f"scatter reduction {raw!r} is not mapped")
    reduce = _SCATTER_REDUCE[raw]
    if dtype == torch.bool or dtype.is_complex:
        raise g.error(f"scatter with reduction {reduce!r} on {dtype} is not mapped")
    if idx != g.r(index):  # a cast, read more than once below
        idx = g.tmp(idx)
    base = g.r(x)
    if not include_self:  # the scattered positions start from the reduction's identity
        if reduce in ("sum", "mean"):
            start: float = 0
        elif reduce == "prod":
            start = 1
        elif dtype.is_floating_point:
            start = -math.inf if reduce == "amax" else math.inf
        else:
            info = torch.iinfo(dtype)
            start = info.min if reduce == "amax" else info.max
        fill = g.const(torch.full(ishape, start, dtype=dtype))
        base = g.tmp(f"ops.tensor_scatter_elements({base}, {idx}, {fill}, {d})")
    if reduce in ("sum", "mean"):
        total = g.tmp(f"ops.tensor_scatter_elements({base}, {idx}, {upd}, {d}, 'add')")
        if reduce == "sum":
            return total
        count = g.const(torch.ones(g.shape(x), dtype=dtype))
        ones = g.const(torch.ones(ishape, dtype=dtype))
        if not include_self:
            zeros = g.const(torch.zeros(ishape, dtype=dtype))
            count = g.tmp(f"ops.tensor_scatter_elements({count}, {idx}, {zeros}, {d})")
        count = g.tmp(f"ops.tensor_scatter_elements({count}, {idx}, {ones}, {d}, 'add')")
        div = "ops.div" if dtype.is_floating_point else "ops.floor_divide"
        return f"{div}({total}, {count})"
    # Coordinates of every index element: its position, with ``index`` along ``d``.
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in ishape], indexing="ij"), -1)
    parts = [f"ops.expand_dims({idx}, -1)"]
    if d > 0:
        parts.insert(0, g.const(grid[..., :d].contiguous()))
    if d < len(ishape) - 1:
        parts.append(g.const(grid[..., d + 1 :].contiguous()))
    coords = parts[0] if len(parts) == 1 else g.tmp(f"ops.concat(({', '.join(parts)}), -1)")
    return f"ops.{_SCATTER_ND[reduce]}()({base}, {coords}, {upd})"
