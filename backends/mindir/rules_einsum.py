"""The ``einsum`` rule: MindSpore's ``Einsum`` has no CPU kernel, so an einsum is rewritten.

Operands are contracted pairwise, left to right, as batched matmuls between transposes and
reshapes; a subscript repeated in one operand (``ii->i``) first becomes a strided slice taking
its diagonal.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

from torch.fx import Node

from ..base import LoweringError
from .state import _a, _Codegen, _rule


def _einsum_terms(equation: str, shapes: Sequence[tuple[int, ...]]) -> tuple[list[str], str]:
    """The operand and output subscripts of ``equation`` with ``...`` spelled out as letters.

    >>> _einsum_terms("bhd,bhtd->bht", [(2, 3, 4), (2, 3, 5, 4)])
    (['bhd', 'bhtd'], 'bht')
    >>> _einsum_terms("...ij,jk", [(5, 2, 3), (3, 4)])
    (['Aij', 'jk'], 'Aik')
    """
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise LoweringError(f"mindir: einsum `{equation}` has {len(shapes)} operands")
    used = {c for c in eq if c.isalpha()}
    spare = [c for c in string.ascii_uppercase + string.ascii_lowercase if c not in used]
    ranks = [len(s) - (len(t) - 3) for t, s in zip(terms, shapes) if "..." in t]
    ell = "".join(spare[: max(ranks, default=0)])
    out = []
    for t, s in zip(terms, shapes):
        if "..." in t:
            k = len(s) - (len(t) - 3)
            t = t.replace("...", ell[len(ell) - k :])
        if len(t) != len(s) or not t.isalpha():
            raise LoweringError(f"mindir: einsum `{equation}` does not match shapes {shapes}")
        out.append(t)
    if arrow:
        rhs = rhs.replace("...", ell)
    else:  # implicit output: the ellipsis, then the letters seen once, in alphabetical order
        counts = {c: "".join(out).count(c) for c in "".join(out)}
        rhs = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    return out, rhs


def _einsum_diagonal(
    g: _Codegen, x: str, term: str, shape: tuple[int, ...], c: str
) -> tuple[str, str, tuple[int, ...]]:
    """Operand ``x`` (subscripts ``term``) reduced to its diagonal over subscript ``c``.

    The repeated axes move last and flatten to ``s**m`` elements; the diagonal is every
    ``(s**m - 1) / (s - 1)``-th of them, a strided slice (exact, unlike a mask and a sum).
    The result's subscripts are ``term`` without ``c``, then ``c`` once.
    """
    axes = [i for i, t in enumerate(term) if t == c]
    rest = [i for i, t in enumerate(term) if t != c]
    sizes = {shape[i] for i in axes}
    if len(sizes) != 1:
        raise g.error(f"einsum subscript `{c}` repeats over sizes {sorted(sizes)}")
    s, m = sizes.pop(), len(axes)
    if rest + axes != list(range(len(term))):
        x = g.tmp(f"ops.transpose({x}, {g.r(tuple(rest + axes))})")
    kept = tuple(shape[i] for i in rest)
    x = g.tmp(f"ops.reshape({x}, {g.r((*kept, s**m))})")
    step = sum(s**j for j in range(m))
    x = g.tmp(f"{x}[{', '.join([':'] * len(kept) + [f'::{step}'])}]")
    return x, "".join(term[i] for i in rest) + c, (*kept, s)


@_rule("aten.einsum.default")
def _einsum(g: _Codegen, n: Node) -> str:
    # MindSpore's Einsum has no CPU kernel: contract pairwise, left to right, as a batched
    # matmul between transposes and reshapes (sums for letters only one operand has).
    equation, operands = _a(n)[:2]
    dtype = g.dtype(n)
    shapes = [g.shape(x) for x in operands]
    try:
        terms, output = _einsum_terms(equation, shapes)
    except LoweringError as exc:
        raise g.error(str(exc).removeprefix("mindir: ")) from exc
    if len(set(output)) != len(output):
        raise g.error(f"einsum `{equation}` repeats an output subscript")
    srcs = [g.cast_to(x, dtype) for x in operands]
    for i, t in enumerate(terms):  # a repeated subscript: the diagonal, subscripted once
        for c in [c for c in dict.fromkeys(t) if t.count(c) > 1]:
            srcs[i], terms[i], shapes[i] = _einsum_diagonal(g, srcs[i], terms[i], shapes[i], c)
    size: dict[str, int] = {}
    for t, s in zip(terms, shapes):
        for c, d in zip(t, s):
            size[c] = d if size.get(c, 1) == 1 else size[c]
    if any(c not in size for c in output):
        raise g.error(f"einsum `{equation}`: an output subscript is on no operand")

    def arrange(x: str, have: str, want: str) -> str:
        """``x`` with subscripts ``have`` reordered as ``want``."""
        if have != want:
            x = g.tmp(f"ops.transpose({x}, {g.r(tuple(have.index(c) for c in want))})")
        return x

    def reduce(x: str, have: str, keep: str) -> tuple[str, str]:
        """Sum ``x`` over the subscripts of ``have`` that are not in ``keep``."""
        gone = tuple(i for i, c in enumerate(have) if c not in keep)
        if not gone:
            return x, have
        return g.tmp(f"ops.sum({x}, {g.r(gone)}, False)"), "".join(c for c in have if c in keep)

    def prepared(i: int, keep: str) -> tuple[str, str]:
        """Operand ``i`` summed over the subscripts not in ``keep``, broadcast to full size."""
        x, term = srcs[i], terms[i]
        x, kept = reduce(x, term, keep)
        have = tuple(d for c, d in zip(term, shapes[i]) if c in kept)
        want = tuple(size[c] for c in kept)
        return (x if have == want else g.tmp(f"ops.broadcast_to({x}, {g.r(want)})")), kept

    cur, cur_term = prepared(0, "".join(terms[1:]) + output)
    for i in range(1, len(terms)):
        later = "".join(terms[i + 1 :]) + output
        other, other_term = prepared(i, cur_term + later)
        batch = "".join(c for c in cur_term if c in other_term and c in later)
        contract = "".join(c for c in cur_term if c in other_term and c not in later)
        left = "".join(c for c in cur_term if c not in other_term)
        right = "".join(c for c in other_term if c not in cur_term)
        nb, nl, nk, nr = (math.prod(size[c] for c in s) for s in (batch, left, contract, right))
        a = arrange(cur, cur_term, batch + left + contract)
        b = arrange(other, other_term, batch + contract + right)
        a = g.tmp(f"ops.reshape({a}, {g.r((nb, nl, nk))})")
        b = g.tmp(f"ops.reshape({b}, {g.r((nb, nk, nr))})")
        prod = g.tmp(f"ops.matmul({a}, {b})")
        cur_term = batch + left + right
        cur = g.tmp(f"ops.reshape({prod}, {g.r(tuple(size[c] for c in cur_term))})")
    cur, cur_term = reduce(cur, cur_term, output)
    return arrange(cur, cur_term, output)
