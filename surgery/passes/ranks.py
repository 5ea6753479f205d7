"""A recipe's ``rank = …`` as an integer rank: one rule for every pass that takes a rank.

``rank = 0.25`` is a fraction of the full rank, ``rank = 128`` an absolute rank and
``rank = energy 0.9`` the smallest rank keeping 90% of a spectrum's ``Σσ²``
(:func:`resolve_rank`). ``decompose`` applies it to a layer's matrix (the spectrum is the
data-aware one of its method) and, for a ``k×k`` convolution, to each Tucker mode separately
(:func:`resolve_tucker_ranks`); ``split … (2+1)d`` applies it to the time×space unfolding of
a ``Conv3d`` kernel. What a pass does with a rank that saves nothing (skips the layer and says
why) is the pass's own business, so an absolute rank is not clamped unless asked.

>>> from surgery.parse import parse
>>> rank = parse("decompose Linear rank = 0.25").statements[0].rank
>>> resolve_rank(rank, full=768), resolve_rank(rank, full=768, multiple=64, max_rank=383)
(192, 192)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from surgery import ast
from surgery.lowrank import rank_for_energy, rank_from_fraction, round_rank

__all__ = ["resolve_rank", "resolve_tucker_ranks"]


def resolve_rank(
    rank: ast.Rank,
    full: int,
    spectrum: Callable[[], Tensor] | None = None,
    *,
    clamp: bool = False,
    multiple: int = 1,
    max_rank: int | None = None,
) -> int:
    """The integer rank ``rank`` asks of a matrix whose full rank is ``full``.

    1. A fraction ``f``: ``round(f·full)`` (halves up) in ``[1, full]``
       (:func:`~surgery.lowrank.rank_from_fraction`).
    2. An absolute rank: itself, even above ``full`` (the caller reports that it exceeds the
       full rank); with ``clamp``, limited to ``[1, full]``.
    3. An energy threshold ``e``: the smallest rank keeping ``e`` of ``Σσ²`` of
       ``spectrum()`` (:func:`~surgery.lowrank.rank_for_energy`). ``spectrum`` is called only
       here, so a caller whose spectrum costs an SVD passes it unevaluated.
    4. ``multiple > 1`` (``round N``): rounded to a multiple of ``N`` no larger than
       ``max_rank`` (default ``full``; pass the break-even rank to keep a compressing rank),
       :func:`~surgery.lowrank.round_rank`.

    >>> from surgery.parse import parse
    >>> def rank_of(text):
    ...     return parse(f"decompose Linear {text}").statements[0].rank
    >>> big = rank_of("rank = 500")
    >>> resolve_rank(big, 384), resolve_rank(big, 384, clamp=True)
    (500, 384)
    >>> sv = lambda: torch.tensor([3.0, 2.0, 1.0])  # energies 9/14, 4/14, 1/14
    >>> resolve_rank(rank_of("rank = energy 0.9"), 3, sv)
    2
    >>> resolve_rank(rank_of("rank = 100"), 768, multiple=64, max_rank=383)
    128
    """
    value = rank.value.magnitude
    if rank.kind == "fraction":
        r = rank_from_fraction(full, full, value)
    elif rank.kind == "absolute":
        r = int(value)
        if clamp:
            r = max(1, min(r, full))
    else:
        if spectrum is None:
            raise ValueError("an energy threshold needs the matrix's singular values")
        r = rank_for_energy(spectrum(), value)
    if multiple > 1:
        r = round_rank(r, multiple, max_rank=full if max_rank is None else max_rank)
    return r


def resolve_tucker_ranks(rank: ast.Rank, weight: Tensor, *, multiple: int = 1) -> tuple[int, int]:
    """``(r_out, r_in)`` that ``rank`` asks of a ``k×k`` convolution's Tucker-2 form.

    :func:`resolve_rank` on each mode separately: the output channels (full rank ``S``,
    spectrum of the mode-0 unfolding ``[S, C·kh·kw]``) and the input channels (``C``,
    mode-1 unfolding ``[C, S·kh·kw]``); absolute ranks are clamped to each mode, and
    ``round N`` never rounds above it.

    >>> from surgery.parse import parse
    >>> rank = parse("decompose Conv2d rank = 0.5").statements[0].rank
    >>> resolve_tucker_ranks(rank, torch.zeros(16, 8, 3, 3))
    (8, 4)
    """
    S, C = weight.shape[:2]  # [S, C, kh, kw]

    def mode_out() -> Tensor:
        w = weight.detach().to(torch.float64)
        return torch.linalg.svdvals(w.reshape(S, -1))  # mode-0 unfolding [S, C·kh·kw]

    def mode_in() -> Tensor:
        w = weight.detach().to(torch.float64)
        return torch.linalg.svdvals(w.transpose(0, 1).reshape(C, -1))  # mode-1 [C, S·kh·kw]

    r_out = resolve_rank(rank, S, mode_out, clamp=True, multiple=multiple)
    r_in = resolve_rank(rank, C, mode_in, clamp=True, multiple=multiple)
    return r_out, r_in
