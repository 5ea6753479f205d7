"""Rules for elementwise ops, reductions and normalisation.

Arithmetic runs in the dtype torch promotes to (operands are cast to the output's dtype),
comparisons and masks keep ``bool``, GELU is exact unless the node says ``tanh``; reductions
(``mean``, ``sum``, ``var``, ``any``, ``all``), softmax, layer norm (epsilon from the node,
never MindSpore's default) and eval-mode batch norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.fx import Node

from .state import _a, _arg, _Codegen, _k, _op_name, _rule

# --- elementwise ------------------------------------------------------------------------

_BINARY = {
    "add": "ops.add",
    "sub": "ops.sub",
    "mul": "ops.mul",
    "div": "ops.div",
    "pow": "ops.pow",
    "maximum": "ops.maximum",
    "minimum": "ops.minimum",
    "atan2": "ops.atan2",
    "remainder": "ops.remainder",  # floor modulo, the sign of the divisor, like torch
}


def _promoted(g: _Codegen, n: Node, a: Any) -> str:
    """An operand of an arithmetic op in the dtype torch computed it in (the output's)."""
    return g.cast_to(a, g.dtype(n)) if isinstance(a, Node | Tensor) else g.r(a)


@_rule(
    "aten.add.Tensor",
    "aten.add.Scalar",
    "aten.sub.Tensor",
    "aten.sub.Scalar",
    "aten.mul.Tensor",
    "aten.mul.Scalar",
    "aten.div.Tensor",
    "aten.div.Scalar",
    "aten.pow.Tensor_Scalar",
    "aten.pow.Tensor_Tensor",
    "aten.maximum.default",
    "aten.minimum.default",
    "aten.atan2.default",
    "aten.remainder.Scalar",
    "aten.remainder.Tensor",
)
def _binary(g: _Codegen, n: Node) -> str:
    op = _op_name(n)
    a, b = _promoted(g, n, _a(n)[0]), _promoted(g, n, _a(n)[1])
    alpha = _k(n).get("alpha", 1)
    if alpha != 1:
        b = f"ops.mul({b}, {g.r(alpha)})"
    return f"{_BINARY[op]}({a}, {b})"


@_rule("aten.pow.Scalar")
def _pow_scalar(g: _Codegen, n: Node) -> str:
    dtype = g.dtype(n)
    assert dtype is not None
    return f"ops.pow({g.scalar_tensor(_a(n)[0], dtype)}, {_promoted(g, n, _a(n)[1])})"


@_rule("aten.rsub.Scalar", "aten.rsub.Tensor")
def _rsub(g: _Codegen, n: Node) -> str:
    a, b = _promoted(g, n, _a(n)[0]), _promoted(g, n, _a(n)[1])
    alpha = _k(n).get("alpha", 1)
    if alpha != 1:
        a = f"ops.mul({a}, {g.r(alpha)})"
    return f"ops.sub({b}, {a})"


@_rule("aten.div.Tensor_mode", "aten.div.Scalar_mode", "aten.floor_divide.default")
def _div_mode(g: _Codegen, n: Node) -> str:
    mode = _k(n).get("rounding_mode", "floor")
    a, b = _promoted(g, n, _a(n)[0]), _promoted(g, n, _a(n)[1])
    if mode is None:
        return f"ops.div({a}, {b})"
    return f"ops.div({a}, {b}, rounding_mode={mode!r})"


_COMPARE = {"eq": "ops.equal", "ne": "ops.not_equal", "lt": "ops.less", "le": "ops.less_equal"}
_COMPARE |= {"gt": "ops.greater", "ge": "ops.greater_equal"}


@_rule(*(f"aten.{c}.{k}" for c in _COMPARE for k in ("Tensor", "Scalar")))
def _compare(g: _Codegen, n: Node) -> str:
    a, b = _a(n)[:2]
    dtypes = [d for d in (g.dtype(a), g.dtype(b)) if d is not None]
    common = dtypes[0] if len(dtypes) == 1 else torch.promote_types(*dtypes)
    if not isinstance(b, Node | Tensor) and common != torch.bool:
        # a Python scalar compared with an int tensor: torch compares in float if it is one
        common = torch.result_type(torch.empty(0, dtype=common), b)
    op = _COMPARE[_op_name(n)]
    rb = g.cast_to(b, common) if isinstance(b, Node | Tensor) else g.r(b)
    return f"{op}({g.cast_to(a, common)}, {rb})"


@_rule(
    "aten.__and__.Tensor",
    "aten.bitwise_and.Tensor",
    "aten.logical_and.default",
    "aten.__or__.Tensor",
    "aten.bitwise_or.Tensor",
    "aten.logical_or.default",
    "aten.logical_xor.default",
)
def _logical(g: _Codegen, n: Node) -> str:
    target = str(n.target)
    logical = target.startswith("aten.logical")
    if not logical and g.dtype(n) != torch.bool:
        raise g.error("bitwise ops on integers are not mapped (only on bool)")
    op = "and" if "and" in target else ("xor" if "xor" in target else "or")
    a, b = (g.cast_to(v, torch.bool) for v in _a(n)[:2])
    return f"ops.logical_{op}({a}, {b})"


@_rule("aten.logical_not.default", "aten.bitwise_not.default")
def _not(g: _Codegen, n: Node) -> str:
    if str(n.target) == "aten.bitwise_not.default" and g.dtype(n) != torch.bool:
        raise g.error("bitwise not on integers is not mapped (only on bool)")
    return f"ops.logical_not({g.cast_to(_a(n)[0], torch.bool)})"


_UNARY = {
    "neg": "ops.neg",
    "abs": "ops.abs",
    "exp": "ops.exp",
    "log": "ops.log",
    "sqrt": "ops.sqrt",
    "rsqrt": "ops.rsqrt",
    "sin": "ops.sin",
    "cos": "ops.cos",
    "tanh": "ops.tanh",
    "sigmoid": "ops.sigmoid",
    "relu": "ops.relu",
    "erf": "ops.erf",
    "reciprocal": "ops.reciprocal",
    "floor": "ops.floor",
    "ceil": "ops.ceil",
    "sign": "ops.sign",
}


@_rule(*(f"aten.{op}.default" for op in _UNARY))
def _unary(g: _Codegen, n: Node) -> str:
    op = _op_name(n)
    return f"{_UNARY[op]}({_promoted(g, n, _a(n)[0])})"


@_rule("aten.silu.default")
def _silu(g: _Codegen, n: Node) -> str:
    x = g.tmp(g.r(_a(n)[0]))
    return f"ops.mul({x}, ops.sigmoid({x}))"


@_rule("aten.gelu.default")
def _gelu(g: _Codegen, n: Node) -> str:
    # torch's default is exact (erf); MindSpore's nn.GELU defaults to tanh (BACKENDS.md).
    approximate = _k(n).get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise g.error(f"gelu approximate={approximate!r} is not a torch mode")
    return f"ops.gelu({g.r(_a(n)[0])}, approximate={approximate!r})"


@_rule("aten.hardtanh.default", "aten.clamp.default", "aten.clamp_min.default")
def _clamp(g: _Codegen, n: Node) -> str:
    target = str(n.target)
    low = _arg(n, 1, "min", -1.0 if "hardtanh" in target else None)
    high = (
        None if "clamp_min" in target else _arg(n, 2, "max", 1.0 if "hardtanh" in target else None)
    )
    return f"ops.clamp({g.r(_a(n)[0])}, {g.r(low)}, {g.r(high)})"


def _where_of(g: _Codegen, n: Node, cond: Any, a: Any, b: Any) -> str:
    """``a`` where ``cond`` else ``b``, each (tensor or scalar) in the node's dtype."""
    dtype = g.dtype(n)
    assert dtype is not None
    return (
        f"ops.where({g.cast_to(cond, torch.bool)}, "
        f"{g.scalar_tensor(a, dtype)}, {g.scalar_tensor(b, dtype)})"
    )


@_rule("aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf", "aten.where.Scalar")
def _where(g: _Codegen, n: Node) -> str:
    cond, a, b = _a(n)[:3]
    return _where_of(g, n, cond, a, b)


@_rule("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(g: _Codegen, n: Node) -> str:
    x, mask, value = _a(n)[:3]
    return _where_of(g, n, mask, value, x)


@_rule("aten.tril.default", "aten.triu.default")
def _tri(g: _Codegen, n: Node) -> str:
    op = _op_name(n)
    return f"ops.{op}({g.r(_a(n)[0])}, {_arg(n, 1, 'diagonal', 0)})"


@_rule("aten.cumsum.default")
def _cumsum(g: _Codegen, n: Node) -> str:
    x, dim = _a(n)[:2]
    return f"ops.cumsum({g.cast_to(x, g.dtype(n))}, {g.dim(x, dim)})"


# --- reductions and normalisation ---------------------------------------------------------


def _dims(g: _Codegen, x: Any, dims: Any) -> tuple[int, ...]:
    if dims is None or dims == []:
        return tuple(range(g.rank(x)))
    if isinstance(dims, int):
        dims = [dims]
    return tuple(g.dim(x, d) for d in dims)


@_rule("aten.mean.dim", "aten.sum.dim_IntList", "aten.amax.default", "aten.amin.default")
def _reduce(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    op = {"mean": "ops.mean", "sum": "ops.sum", "amax": "ops.amax", "amin": "ops.amin"}[_op_name(n)]
    dims = _dims(g, x, _arg(n, 1, "dim"))
    keep = bool(_arg(n, 2, "keepdim", False))
    return f"{op}({g.cast_to(x, g.dtype(n))}, {g.r(dims)}, {keep})"


@_rule("aten.mean.default", "aten.sum.default")
def _reduce_all(g: _Codegen, n: Node) -> str:
    op = "ops.mean" if "mean" in str(n.target) else "ops.sum"
    x = _a(n)[0]
    return f"{op}({g.cast_to(x, g.dtype(n))}, {g.r(_dims(g, x, None))}, False)"


@_rule("aten.var.correction", "aten.var.dim")
def _var(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    dims = _dims(g, x, _arg(n, 1, "dim"))
    if str(n.target) == "aten.var.dim":
        correction = 1 if _arg(n, 2, "unbiased", True) else 0
        keep = bool(_arg(n, 3, "keepdim", False))
    else:
        correction = _k(n).get("correction", 1)
        correction = 1 if correction is None else correction
        keep = bool(_k(n).get("keepdim", False))
    count = math.prod(g.shape(x)[d] for d in dims)
    xs = g.tmp(g.r(x))
    centred = g.tmp(f"ops.sub({xs}, ops.mean({xs}, {g.r(dims)}, True))")
    total = f"ops.sum(ops.mul({centred}, {centred}), {g.r(dims)}, {keep})"
    return f"ops.div({total}, {float(max(count - correction, 0))})"


@_rule("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int")
def _softmax(g: _Codegen, n: Node) -> str:
    x, dim = _a(n)[:2]
    op = "ops.log_softmax" if "log" in str(n.target) else "ops.softmax"
    return f"{op}({g.cast_to(x, g.dtype(n))}, {g.dim(x, dim)})"


@_rule("aten.layer_norm.default")
def _layer_norm(g: _Codegen, n: Node) -> str:
    x, shape = _a(n)[:2]
    weight, bias = _arg(n, 2, "weight"), _arg(n, 3, "bias")
    eps = float(_arg(n, 4, "eps", 1e-5))  # MindSpore's default differs: always explicit
    dtype = g.dtype(x) or torch.float32
    normalized = tuple(int(s) for s in shape)
    w = g.r(weight) if weight is not None else g.const(torch.ones(normalized, dtype=dtype))
    b = g.r(bias) if bias is not None else g.const(torch.zeros(normalized, dtype=dtype))
    axis = g.rank(x) - len(normalized)
    return f"_layer_norm({g.r(x)}, {w}, {b}, {axis}, {eps!r})"


@_rule("aten._native_batch_norm_legit_no_training.default", "aten.batch_norm.default")
def _batch_norm(g: _Codegen, n: Node) -> str:
    x, weight, bias, mean, var = _a(n)[:5]
    if str(n.target) == "aten.batch_norm.default":
        if _a(n)[5]:
            raise g.error("batch norm in training mode has no deterministic lowering")
        eps = float(_a(n)[7])
    else:
        eps = float(_a(n)[6])
    shape = g.r((1, -1) + (1,) * (g.rank(x) - 2))  # (C,) statistics against (N, C, ...)
    scale = g.tmp(f"ops.rsqrt(ops.add({g.r(var)}, {eps!r}))")
    if weight is not None:
        scale = g.tmp(f"ops.mul({scale}, {g.r(weight)})")
    shift = g.tmp(f"ops.neg(ops.mul({g.r(mean)}, {scale}))")
    if bias is not None:
        shift = g.tmp(f"ops.add({shift}, {g.r(bias)})")
    y = f"ops.add(ops.mul({g.r(x)}, ops.reshape({scale}, {shape})), ops.reshape({shift}, {shape}))"
    if str(n.target) == "aten.batch_norm.default":
        return y
    return f"({y}, {g.r(mean)}, {g.r(var)})"  # the same triple torch returns (stats unused)


@_rule("aten.any.dim", "aten.any.dims", "aten.any.default", "aten.all.dim", "aten.all.default")
def _any_all(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    op = "ops.any" if "any" in str(n.target) else "ops.all"
    dims = _dims(g, x, None if str(n.target).endswith("default") else _arg(n, 1, "dim"))
    keep = False if str(n.target).endswith("default") else bool(_arg(n, 2, "keepdim", False))
    return f"{op}({g.cast_to(x, torch.bool)}, {g.r(dims)}, {keep})"
