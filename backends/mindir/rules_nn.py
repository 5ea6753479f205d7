"""Rules for linear algebra, convolution, pooling and attention.

``linear``, ``matmul`` and ``addmm``; convolutions of 1, 2 and 3 dimensions (``padding="same"``
too), on ``cpu`` mostly as ``Im2Col`` and a 1×1 convolution or a batched matmul
(:func:`_im2col_conv` says when and why); transposed convolutions as MindSpore's
``Conv2DTranspose`` / ``Conv3DTranspose`` primitives; max, average and adaptive pooling; and
``scaled_dot_product_attention`` written out as matmuls and a softmax.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import Node

from .state import _a, _arg, _Codegen, _k, _rule


@_rule("aten.linear.default")
def _linear(g: _Codegen, n: Node) -> str:
    x, w = _a(n)[:2]
    b = _arg(n, 2, "bias")
    return f"ops.dense({g.r(x)}, {g.r(w)}, {g.r(b)})"


@_rule("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(g: _Codegen, n: Node) -> str:
    return f"ops.matmul({g.r(_a(n)[0])}, {g.r(_a(n)[1])})"


@_rule("aten.addmm.default", "aten.baddbmm.default")
def _addmm(g: _Codegen, n: Node) -> str:
    bias, a, b = _a(n)[:3]
    beta, alpha = _k(n).get("beta", 1), _k(n).get("alpha", 1)
    prod = f"ops.matmul({g.r(a)}, {g.r(b)})"
    if alpha != 1:
        prod = f"ops.mul({prod}, {g.r(alpha)})"
    base = g.r(bias) if beta == 1 else f"ops.mul({g.r(bias)}, {g.r(beta)})"
    return f"ops.add({prod}, {base})" if beta != 0 else prod


def _tuple(v: Any, k: int) -> tuple[int, ...]:
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(int(i) for i in (items * k if len(items) == 1 else items))


@_rule(
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.conv3d.default",
    "aten.convolution.default",
    "aten.conv1d.padding",
    "aten.conv2d.padding",
    "aten.conv3d.padding",
)
def _conv(g: _Codegen, n: Node) -> str:
    x, w = _a(n)[:2]
    b = _arg(n, 2, "bias")
    k = g.rank(x) - 2
    stride = _tuple(_arg(n, 3, "stride", 1), k)
    padding = _arg(n, 4, "padding", 0)
    dilation = _tuple(_arg(n, 5, "dilation", 1), k)
    if str(n.target) == "aten.convolution.default":
        if _a(n)[6]:
            return _conv_transpose(g, n)
        groups = int(_a(n)[8])
    else:
        groups = int(_arg(n, 6, "groups", 1))
    xs = g.r(x)
    if padding == "valid":
        pads = (0,) * k
    elif padding == "same":  # stride 1: torch pads the odd element at the end
        total = [d * (s - 1) for d, s in zip(dilation, g.shape(w)[2:])]
        pads = tuple(t // 2 for t in total)
        if any(t % 2 for t in total):  # uneven: pad the input explicitly, the conv pads none
            flat = [p for t in reversed(total) for p in (t // 2, t - t // 2)]
            xs, pads = g.tmp(f"ops.pad({xs}, {g.r(tuple(flat))})"), (0,) * k
    else:
        pads = _tuple(padding, k)
    if k == 1:  # MindSpore's conv1d is NCW-only on some devices: run it as a 1×W conv2d
        x2 = f"ops.expand_dims({xs}, 2)"
        w2 = f"ops.expand_dims({g.r(w)}, 2)"
        if _im2col_conv(g, x, w, groups, stride, pads):
            y = _conv2d_as_im2col(
                g, x2, w, b, (1, stride[0]), (0, pads[0]), (1, dilation[0]), groups
            )
        else:
            y = (
                f"ops.conv2d({x2}, {w2}, {g.r(b)}, {g.r((1, stride[0]))}, 'pad', "
                f"{g.r((0, pads[0]))}, {g.r((1, dilation[0]))}, {groups})"
            )
        return f"ops.squeeze({y}, 2)"
    if k not in (2, 3):
        raise g.error(f"{k}-d convolution is not mapped")
    if k == 2 and _im2col_conv(g, x, w, groups, stride, pads):
        return _conv2d_as_im2col(g, xs, w, b, stride, pads, dilation, groups)
    return (
        f"ops.conv{k}d({xs}, {g.r(w)}, {g.r(b)}, {g.r(stride)}, 'pad', {g.r(pads)}, "
        f"{g.r(dilation)}, {groups})"
    )


def _im2col_conv(
    g: _Codegen, x: Any, w: Any, groups: int, stride: Sequence[int], pads: Sequence[int]
) -> bool:
    """Whether a 2-d convolution runs as :func:`_conv2d_as_im2col` (on CPU only).

    MindSpore 2.10's CPU ``Conv2D`` kernel is fast only for an ungrouped 1×1 conv at stride 1
    without padding. Anything else is about 100–300× slower than torch: a 3×3 64-channel conv
    at 56², batch 2, 500 ms against 2.3 ms; a ViT-B patch embedding 0.7–1.2 s against 3 ms; a
    1×1 stride-2 ResNet shortcut 430 ms against 3.6 ms as ``Im2Col`` + 1×1 conv; a 3×3
    4-group 128-channel conv 560 ms against 17 ms as ``Im2Col`` + batched matmul. Ascend has
    a native convolution unit, so there the conv stays one ``Conv2D``.
    """
    pointwise = max(g.shape(w)[2:]) == 1 and max(stride) == 1 and max(pads) == 0
    return (
        g.device == "cpu"
        and not (pointwise and groups == 1)
        and g.dtype(x) in (torch.float32, torch.float16)
    )


def _conv2d_as_im2col(
    g: _Codegen,
    xs: str,
    w: Any,
    b: Any,
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> str:
    """A 2-d convolution as ``Im2Col``, then one 1×1 convolution (ungrouped) or one batched
    matmul over the groups: the same sums as the convolution.

    ``Im2Col`` lays each window out as (C, kh·kw) per output position, the order of a torch
    weight's (C/G, kh, kw) axes, and a group's channels are contiguous in both, so the weight
    is only reshaped: to (O, C·kh·kw, 1, 1), or to (1, G, O/G, C/G·kh·kw) against columns
    reshaped to (N, G, C/G·kh·kw, Ho·Wo).
    """
    n = g.node
    assert n is not None
    out = g.out_shape(n)
    o, c, *kernel = g.shape(w)
    if len(kernel) == 1:  # a 1-d conv, run as a 1×W 2-d one (``xs`` is already 4-d)
        kernel, out = [1, *kernel], (*out[:2], 1, out[2])
    kh, kw = kernel
    prim = (
        f"ops.Im2Col(ksizes={g.r((kh, kw))}, strides={g.r(stride)}, "
        f"dilations={g.r(dilation)}, pads={g.r(pads)})"
    )
    if groups == 1:
        cols = g.tmp(f"ops.reshape({prim}({xs}), {g.r((out[0], c * kh * kw, out[2], out[3]))})")
        w2 = f"ops.reshape({g.r(w)}, {g.r((o, c * kh * kw, 1, 1))})"
        return f"ops.conv2d({cols}, {w2}, {g.r(b)}, 1, 'valid', 0, 1, 1)"
    per_group = c * kh * kw  # the weight's C is already C/G
    cols = g.tmp(f"ops.reshape({prim}({xs}), {g.r((out[0], groups, per_group, -1))})")
    w2 = f"ops.reshape({g.r(w)}, {g.r((1, groups, o // groups, per_group))})"
    y = f"ops.reshape(ops.matmul({w2}, {cols}), {g.r(out)})"
    return y if b is None else f"ops.add({y}, ops.reshape({g.r(b)}, {g.r((1, -1, 1, 1))}))"


@_rule(
    "aten.conv_transpose1d.default",
    "aten.conv_transpose2d.input",
    "aten.conv_transpose3d.input",
)
def _conv_transpose(g: _Codegen, n: Node) -> str:
    """A transposed convolution as MindSpore's ``Conv2DTranspose`` primitive (its CPU kernel).

    ``ops.conv_transpose2d`` has no CPU kernel; the primitive takes the output size, which
    carries ``output_padding``. 1-d runs as a 1×W 2-d one; 3-d is :func:`_conv_transpose3d`.
    """
    x, w = _a(n)[:2]
    b = _arg(n, 2, "bias")
    k = g.rank(x) - 2
    if str(n.target) == "aten.convolution.default":
        stride, padding, dilation, groups = _a(n)[3], _a(n)[4], _a(n)[5], int(_a(n)[8])
    else:
        stride, padding = _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0)
        groups, dilation = int(_arg(n, 6, "groups", 1)), _arg(n, 7, "dilation", 1)
    if k not in (1, 2, 3):
        raise g.error(f"{k}-d transposed convolution is not mapped")
    stride, pads, dilation = _tuple(stride, k), _tuple(padding, k), _tuple(dilation, k)
    out = g.out_shape(n)
    if k == 3:
        return _conv_transpose3d(g, x, w, b, stride, pads, dilation, groups, out)
    xs, ws, kernel = g.r(x), g.r(w), tuple(g.shape(w)[2:])
    if k == 1:
        xs, ws = f"ops.expand_dims({xs}, 2)", f"ops.expand_dims({ws}, 2)"
        stride, pads, dilation, kernel = (1, *stride), (0, *pads), (1, *dilation), (1, *kernel)
        out = (out[0], out[1], 1, out[2])
    prim = (
        f"ops.Conv2DTranspose({out[1]}, {g.r(kernel)}, pad_mode='pad', "
        f"pad={g.r((pads[0], pads[0], pads[1], pads[1]))}, stride={g.r(stride)}, "
        f"dilation={g.r(dilation)}, group={groups})"
    )
    y = f"{prim}({xs}, {ws}, {g.r(out)})"
    if b is not None:
        y = f"ops.add({y}, ops.reshape({g.r(b)}, {g.r((1, -1, 1, 1))}))"
    return f"ops.squeeze({y}, 2)" if k == 1 else y


def _conv_transpose3d(
    g: _Codegen,
    x: Any,
    w: Any,
    b: Any,
    stride: tuple[int, ...],
    pads: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    out: tuple[int, ...],
) -> str:
    """A 3-d transposed convolution as MindSpore's ``Conv3DTranspose`` primitive (CPU kernel).

    The primitive takes no depth dilation and rejects some ``output_padding`` torch accepts,
    so it computes the full, unpadded result: a depth dilation is spread into the kernel
    (zeros between its taps, exact), ``padding`` is cropped from the result, and
    ``output_padding`` is the crop's end moved outwards, zeros where it passes the full size.
    """
    if g.dtype(w) not in (torch.float32, torch.float16):
        raise g.error(f"3-d transposed convolution in {g.dtype(w)} has no MindSpore CPU kernel")
    ws = g.r(w)
    ci, co, *kernel = g.shape(w)
    if dilation[0] > 1:
        dd, (kd, kh, kw) = dilation[0], kernel
        gaps = g.const(torch.zeros(ci, co, kd, dd - 1, kh, kw, dtype=g.dtype(w)))
        spread = g.tmp(f"ops.concat((ops.expand_dims({ws}, 3), {gaps}), 3)")
        kernel[0] = (kd - 1) * dd + 1
        spread = g.tmp(f"ops.reshape({spread}, {g.r((ci, co, kd * dd, kh, kw))})")
        ws, dilation = f"{spread}[:, :, :{kernel[0]}]", (1, *dilation[1:])
    prim = (
        f"ops.Conv3DTranspose({g.shape(x)[1]}, {out[1]}, {g.r(tuple(kernel))}, "
        f"pad_mode='pad', pad=0, stride={g.r(stride)}, dilation={g.r(dilation)}, "
        f"group={groups})"
    )
    y = g.tmp(f"{prim}({g.r(x)}, {ws})")
    full = [
        (i - 1) * s + d * (k - 1) + 1
        for i, s, d, k in zip(g.shape(x)[2:], stride, dilation, kernel)
    ]
    sizes = out[2:]
    if list(pads) != [0, 0, 0] or list(sizes) != full:
        crop = ", ".join(f"{p}:{min(p + o, f)}" for p, o, f in zip(pads, sizes, full))
        y = g.tmp(f"{y}[:, :, {crop}]")
    extra = [max(0, p + o - f) for p, o, f in zip(pads, sizes, full)]
    if any(extra):
        y = g.tmp(f"ops.pad({y}, {g.r(tuple(p for e in reversed(extra) for p in (0, e)))})")
    if b is not None:
        y = f"ops.add({y}, ops.reshape({g.r(b)}, {g.r((1, -1, 1, 1, 1))}))"
    return y


@_rule("aten.max_pool2d.default", "aten.avg_pool2d.default")
def _pool2d(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    kernel = _tuple(_a(n)[1], 2)
    stride = _tuple(_arg(n, 2, "stride", None) or kernel, 2)
    padding = _tuple(_arg(n, 3, "padding", 0), 2)
    if "max" in str(n.target):
        if _tuple(_arg(n, 4, "dilation", 1), 2) != (1, 1) or _arg(n, 5, "ceil_mode", False):
            raise g.error("max pooling with dilation or ceil_mode is not mapped")
        return f"ops.max_pool2d({g.r(x)}, {g.r(kernel)}, {g.r(stride)}, {g.r(padding)})"
    ceil_mode = bool(_arg(n, 4, "ceil_mode", False))
    include_pad = bool(_arg(n, 5, "count_include_pad", True))
    if _arg(n, 6, "divisor_override") is not None:
        raise g.error("avg pooling with divisor_override is not mapped")
    return (
        f"ops.avg_pool2d({g.r(x)}, {g.r(kernel)}, {g.r(stride)}, {g.r(padding)}, "
        f"{ceil_mode}, {include_pad})"
    )


@_rule("aten.adaptive_avg_pool2d.default", "aten.adaptive_avg_pool1d.default")
def _adaptive_avg(g: _Codegen, n: Node) -> str:
    x = _a(n)[0]
    k = 2 if "pool2d" in str(n.target) else 1
    size_in, size_out = g.shape(x)[-k:], g.out_shape(n)[-k:]
    if any(i % o for i, o in zip(size_in, size_out)):
        raise g.error(f"adaptive pooling {size_in} → {size_out} with uneven windows")
    if all(o == 1 for o in size_out):
        return f"ops.mean({g.r(x)}, {g.r(tuple(range(g.rank(x) - k, g.rank(x))))}, True)"
    if k == 1:
        raise g.error("adaptive 1-d pooling to more than one output is not mapped")
    kernel = tuple(i // o for i, o in zip(size_in, size_out))
    return f"ops.avg_pool2d({g.r(x)}, {g.r(kernel)}, {g.r(kernel)})"


@_rule("aten.scaled_dot_product_attention.default")
def _sdpa(g: _Codegen, n: Node) -> str:
    q, k, v = _a(n)[:3]
    mask = _arg(n, 3, "attn_mask")
    dropout = _arg(n, 4, "dropout_p", 0.0)
    causal = bool(_arg(n, 5, "is_causal", False))
    scale = _k(n).get("scale")
    if dropout:
        raise g.error("attention dropout has no deterministic lowering")
    qs, ks = g.shape(q), g.shape(k)
    if scale is None:
        scale = 1.0 / math.sqrt(qs[-1])
    kk, vv = g.r(k), g.r(v)
    if _k(n).get("enable_gqa", False) and qs[-3] != ks[-3]:
        rep = qs[-3] // ks[-3]
        kk = g.tmp(f"ops.repeat_interleave({kk}, {rep}, {len(ks) - 3})")
        vv = g.tmp(f"ops.repeat_interleave({vv}, {rep}, {len(ks) - 3})")
    scores = g.tmp(f"ops.mul(ops.matmul({g.r(q)}, ops.swapaxes({kk}, -2, -1)), {scale!r})")
    dtype = g.dtype(q) or torch.float32
    neg_inf = g.scalar_tensor(-math.inf, dtype)
    if causal:
        tril = torch.ones(qs[-2], ks[-2], dtype=torch.bool).tril()
        scores = g.tmp(f"ops.where({g.const(tril)}, {scores}, {neg_inf})")
    if mask is not None:
        if g.dtype(mask) == torch.bool:
            scores = g.tmp(f"ops.where({g.r(mask)}, {scores}, {neg_inf})")
        else:
            scores = g.tmp(f"ops.add({scores}, {g.cast_to(mask, dtype)})")
    return f"ops.matmul(ops.softmax({scores}, -1), {vv})"
