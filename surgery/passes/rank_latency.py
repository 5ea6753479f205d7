"""Hardware-aware rank choice for ``decompose``: which ranks to time and which to keep.

The policy half of ``keep if faster``, ``where speedup > X`` and the tables of ``rank = auto``
(ALGORITHMS.md, "Hardware-aware rank optimization"). For each candidate layer this module builds the modules
the pass would put in its place — ``Linear(in→r) → Linear(r→out)`` for matrix layers, a
:class:`~surgery.modules.tucker_conv.TuckerConv2d` for a ``k×k`` conv, a
:class:`~surgery.modules.lowrank_conv.LowRankConv2d` at ``(rank, rank)`` for a ``1×1`` one —
at ranks from the requested one downwards in steps of the target's tile, and has the
:class:`surgery.timing.LayerTimer` of the pass context time them against the dense layer
alone at its real input shape (the timer, built by the manager from the recipe's first
target, caches the tables). The choice is then a pure function of the times
(:func:`choose_rank`, :func:`choose_tucker_ranks`, delegating to
:func:`surgery.lowrank.pick_rank_below_cliff`), so tests use fake times.

``rank = auto`` and ``budget latency`` time every candidate rank of every layer instead
(:func:`rank_tables`), and :mod:`surgery.passes.auto_rank` chooses among them.

Conv ranks: both Tucker ranks scale together, keeping their ratio: the *lead* (larger) rank
steps down by the tile and the other follows it (:func:`tucker_candidate_pairs`), so the
cliff rule of the matrix layers applies unchanged to the lead rank.

>>> from surgery.timing import LayerTimes
>>> t = LayerTimes("fake", 2.0, {"192": 1.0, "184": 0.99, "176": 0.7, "168": 0.69})
>>> choose_rank(t, requested=192, step=8)  # the cliff is between 184 and 176
176
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from surgery.facts import Analysis, ModuleInfo
from surgery.lowrank import pick_rank_below_cliff
from surgery.modules.lowrank_conv import LowRankConv2d, pair
from surgery.modules.tucker_conv import TuckerConv2d
from surgery.timing import LayerTimer, LayerTimes

__all__ = [
    "Pair",
    "candidate_ranks",
    "choose_rank",
    "choose_tucker_ranks",
    "keep_if_faster_ranks",
    "keep_if_faster_tucker_ranks",
    "layer_speedups",
    "pair_key",
    "rank_tables",
    "tucker_candidate_pairs",
    "tucker_speedups",
]

Pair = tuple[int, int]  # (r_out, r_in)


# --- matrix layers (Linear, Conv1D, 1×1 seen as a matrix) -----------------------------------


def _on_tile(rank: int, step: int) -> int:
    """``rank`` rounded down to a multiple of ``step`` (itself when below one tile)."""
    return rank - rank % step if rank >= step else rank


def candidate_ranks(requested: int, step: int, *, min_fraction: float = 0.5) -> list[int]:
    """Ranks to time: ``requested`` rounded down to the tile, then down by ``step``.

    Ranks below ``min_fraction × requested`` are not timed: they would cost more accuracy
    than the recipe asked for.

    >>> candidate_ranks(192, 8, min_fraction=0.9)
    [192, 184, 176]
    >>> candidate_ranks(100, 8, min_fraction=0.9)
    [96]
    >>> candidate_ranks(5, 8)
    [5]
    """
    top = _on_tile(requested, step)
    floor = max(1, int(requested * min_fraction))
    ranks = [r for r in range(top, 0, -step) if r >= floor]
    return ranks or [top]


def choose_rank(times: LayerTimes, requested: int, step: int) -> int | None:
    """The rank to use for one layer, or None when no factorization beats the dense layer.

    Pure function of the times (variants keyed by the rank as text): ``requested`` is
    rounded down to a multiple of ``step``, then :func:`surgery.lowrank.pick_rank_below_cliff`
    picks the rank just below the largest latency cliff among the timed candidates
    (``ValueError`` if none was timed).

    >>> choose_rank(LayerTimes("fake", 1.0, {"32": 1.2, "24": 1.1}), 32, 8) is None
    True
    """
    top = _on_tile(requested, step)
    ranks = {int(k): t for k, t in times.variants.items() if k.isdigit()}
    return pick_rank_below_cliff(ranks, times.dense, top, step if top >= step else top)


def _module_info(analysis: Analysis, path: str) -> ModuleInfo:
    """The analysis record of the layer at ``path`` (``ValueError`` if it has none)."""
    info = analysis.modules.get(path)
    if info is None:
        raise ValueError(f"`{path}` is not a module of the analysed model")
    return info


def _linear_facts(
    model: nn.Module, analysis: Analysis, path: str
) -> tuple[int, int, tuple[int, ...], torch.dtype, bool]:
    info = _module_info(analysis, path)
    if info.in_features is None or info.out_features is None or info.kernel is not None:
        raise ValueError(f"`{path}` ({info.type}) is not a Linear-like layer")
    if not info.input_shapes:
        raise ValueError(f"`{path}` was never called on the example inputs: no input shape")
    module = model.get_submodule(path)
    weight = getattr(module, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else torch.float32
    bias = getattr(module, "bias", None) is not None
    return info.in_features, info.out_features, tuple(info.input_shapes[0]), dtype, bias


def _linear_pair(in_f: int, out_f: int, rank: int, bias: bool, dtype: torch.dtype) -> nn.Module:
    """The factorized layer as timed: ``Linear(in→r, no bias) → Linear(r→out)``, the two
    GEMMs of :class:`surgery.modules.LowRankLinear` (weights random: latency does not depend
    on their values)."""
    return nn.Sequential(
        nn.Linear(in_f, rank, bias=False, dtype=dtype),
        nn.Linear(rank, out_f, bias=bias, dtype=dtype),
    )


def _time_matrix(
    timer: LayerTimer,
    facts: tuple[int, int, tuple[int, ...], torch.dtype, bool],
    ranks: Iterable[int],
) -> LayerTimes:
    """One matrix-layer shape timed against its low-rank pair at each of ``ranks``."""
    in_f, out_f, shape, dtype, bias = facts
    return timer.time_layer(
        "Linear",
        {"in_features": in_f, "out_features": out_f, "bias": bias},
        shape,
        dtype,
        lambda: nn.Linear(in_f, out_f, bias=bias, dtype=dtype),
        {str(r): partial(_linear_pair, in_f, out_f, r, bias, dtype) for r in ranks},
    )


def _matrix_times(
    model: nn.Module,
    analysis: Analysis,
    paths: Iterable[str],
    requested: Mapping[str, int],
    timer: LayerTimer,
    min_fraction: float,
) -> dict[str, LayerTimes]:
    # Layers of one shape (q/k/v/o of every block) share one measurement.
    by_shape: dict[tuple[int, int, tuple[int, ...], torch.dtype, bool], list[str]] = {}
    for path in paths:
        by_shape.setdefault(_linear_facts(model, analysis, path), []).append(path)
    times: dict[str, LayerTimes] = {}
    for facts, group in by_shape.items():
        ranks: set[int] = set()
        for path in group:
            ranks.update(candidate_ranks(requested[path], timer.tile, min_fraction=min_fraction))
        table = _time_matrix(timer, facts, sorted(ranks, reverse=True))
        for path in group:
            times[path] = table
    return times


def keep_if_faster_ranks(
    model: nn.Module,
    analysis: Analysis,
    paths: Iterable[str],
    requested: Mapping[str, int],
    timer: LayerTimer,
    *,
    min_fraction: float = 0.5,
) -> dict[str, int | None]:
    """For ``decompose … keep if faster``: the rank to use per layer, None to stay dense.

    ``paths`` are the Linear-like layers the decompose plan would factor and
    ``requested[path]`` the rank it planned. Each layer shape is timed once on ``timer``;
    the choice per layer is :func:`choose_rank` with the target's tile. Raises
    ``ValueError`` for a path that is not a Linear-like layer with a known input shape,
    :class:`surgery.timing.TimingUnavailable` when the target cannot time it.
    """
    paths = list(paths)
    times = _matrix_times(model, analysis, paths, requested, timer, min_fraction)
    return {p: choose_rank(times[p], requested[p], timer.tile) for p in paths}


def layer_speedups(
    model: nn.Module,
    analysis: Analysis,
    paths: Iterable[str],
    requested: Mapping[str, int],
    timer: LayerTimer,
) -> dict[str, float]:
    """For ``where speedup > X``: dense latency ÷ factorized latency per layer on ``timer``,
    at the requested rank rounded down to the tile (the only rank timed)."""
    paths = list(paths)
    times = _matrix_times(model, analysis, paths, requested, timer, 1.0)
    step = timer.tile
    return {
        p: times[p].speedup(str(candidate_ranks(requested[p], step, min_fraction=1.0)[0]))
        for p in paths
    }


# --- convolutions: Tucker-2 for k×k, the low-rank pair at (rank, rank) for 1×1 --------------


def pair_key(ranks: Pair) -> str:
    """A conv variant's key: ``"r_out x r_in"`` as ``"32x16"``."""
    return f"{ranks[0]}x{ranks[1]}"


def _scaled_pair(requested: Pair, lead: int) -> Pair:
    """``requested`` scaled so its larger rank is ``lead`` (the other keeps the ratio, ≥ 1)."""
    r_out, r_in = requested
    top = max(r_out, r_in)
    if lead >= top:
        return requested
    return (max(1, round(r_out * lead / top)), max(1, round(r_in * lead / top)))


def tucker_candidate_pairs(requested: Pair, step: int, *, min_fraction: float = 0.5) -> list[Pair]:
    """Rank pairs to time: the larger rank by :func:`candidate_ranks`, the other scaled with it.

    >>> tucker_candidate_pairs((32, 16), 8)
    [(32, 16), (24, 12), (16, 8)]
    >>> tucker_candidate_pairs((20, 10), 8, min_fraction=0.7)  # 20 → 16 on the tile
    [(16, 8)]
    >>> tucker_candidate_pairs((4, 6), 8)  # below one tile: only the requested pair
    [(4, 6)]
    """
    leads = candidate_ranks(max(requested), step, min_fraction=min_fraction)
    return [_scaled_pair(requested, lead) for lead in leads]


def choose_tucker_ranks(times: LayerTimes, requested: Pair, step: int) -> Pair | None:
    """The rank pair to use for one conv, or None when no factored form beats the dense conv.

    Pure function of the times (variants keyed by :func:`pair_key`): the larger requested
    rank is rounded down to the tile and stepped down by ``step``, the other rank scaled with
    it (:func:`tucker_candidate_pairs`); :func:`surgery.lowrank.pick_rank_below_cliff` picks
    on the larger rank's latency curve.

    >>> t = LayerTimes("fake", 2.0, {"32x16": 1.5, "24x12": 1.45, "16x8": 0.9, "8x4": 0.85})
    >>> choose_tucker_ranks(t, (32, 16), 8)  # the cliff is between 24×12 and 16×8
    (16, 8)
    """
    lead = max(requested)
    top = _on_tile(lead, step)
    by_lead: dict[int, float] = {}
    for r in range(top, 0, -step if top >= step else -top):
        key = pair_key(_scaled_pair(requested, r))
        if key in times.variants:
            by_lead[r] = times.variants[key]
    pick = pick_rank_below_cliff(by_lead, times.dense, top, step if top >= step else top)
    return None if pick is None else _scaled_pair(requested, pick)


def conv_layer(conv: nn.Conv2d) -> str:
    """The factored layer the pass builds for ``conv``: a low-rank pair for 1×1, else Tucker-2."""
    return "LowRankConv2d" if tuple(conv.kernel_size) == (1, 1) else "TuckerConv2d"


def factored(conv: nn.Conv2d, ranks: Pair) -> nn.Module:
    """``conv`` factored at ``ranks`` as the pass would build it (weights not fitted)."""
    r_out, r_in = ranks
    if conv_layer(conv) == "LowRankConv2d":
        return LowRankConv2d.like(conv, r_out)
    return TuckerConv2d.like(conv, rank_out=r_out, rank_in=r_in)


def conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """What a conv's latency depends on besides input shape and dtype (JSON-serialisable):
    the arguments of ``nn.Conv2d`` that rebuild it, sizes as int pairs, ``bias`` a bool."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": list(pair(conv.kernel_size)),
        "stride": list(pair(conv.stride)),
        "padding": conv.padding if isinstance(conv.padding, str) else list(pair(conv.padding)),
        "dilation": list(pair(conv.dilation)),
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _conv_times(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    requested: Mapping[str, Pair],
    timer: LayerTimer,
    min_fraction: float,
) -> dict[str, LayerTimes]:
    """Each conv timed alone at its analysed input shape against its candidate pairs."""
    return _conv_pair_times(
        convs,
        analysis,
        {
            path: tucker_candidate_pairs(requested[path], timer.tile, min_fraction=min_fraction)
            for path in convs
        },
        timer,
    )


def _conv_pair_times(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    candidates: Mapping[str, Iterable[Pair]],
    timer: LayerTimer,
) -> dict[str, LayerTimes]:
    """Each conv timed alone at its analysed input shape against the given rank pairs."""
    times: dict[str, LayerTimes] = {}
    for path, conv in convs.items():
        info = _module_info(analysis, path)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"`{path}` ({type(conv).__name__}) is not an ungrouped Conv2d")
        if not info.input_shapes:
            raise ValueError(f"`{path}` was never called on the example inputs: no input shape")
        pairs = list(candidates[path])
        geometry = conv_geometry(conv)
        times[path] = timer.time_layer(
            conv_layer(conv),
            geometry,
            tuple(info.input_shapes[0]),
            conv.weight.dtype,
            partial(nn.Conv2d, **geometry, dtype=conv.weight.dtype),
            {pair_key(p): partial(factored, conv, p) for p in pairs},
        )
    return times


def keep_if_faster_tucker_ranks(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    requested: Mapping[str, Pair],
    timer: LayerTimer,
    *,
    min_fraction: float = 0.5,
) -> dict[str, Pair | None]:
    """For ``decompose … keep if faster`` on convs: the ``(r_out, r_in)`` per conv, None to
    stay dense (a ``1×1`` conv's pair is ``(rank, rank)``: its low-rank pair).

    ``convs`` maps each path to its ``Conv2d`` and ``requested[path]`` is the pair the plan
    chose; the choice is :func:`choose_tucker_ranks` with the target's tile. Raises
    ``ValueError`` for a path that is not an ungrouped Conv2d with a known input shape,
    :class:`surgery.timing.TimingUnavailable` when the target cannot time it.
    """
    times = _conv_times(convs, analysis, requested, timer, min_fraction)
    return {path: choose_tucker_ranks(times[path], requested[path], timer.tile) for path in convs}


def tucker_speedups(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    requested: Mapping[str, Pair],
    timer: LayerTimer,
) -> dict[str, float]:
    """For ``where speedup > X`` on convs: dense latency ÷ factored latency per conv, at the
    requested pair with its larger rank rounded down to the tile (the only pair timed), as
    :func:`layer_speedups` does for matrix layers. Same errors as
    :func:`keep_if_faster_tucker_ranks`."""
    times = _conv_times(convs, analysis, requested, timer, 1.0)
    step = timer.tile
    return {
        path: times[path].speedup(
            pair_key(tucker_candidate_pairs(requested[path], step, min_fraction=1.0)[0])
        )
        for path in convs
    }


# --- `rank = auto` and `budget latency`: every candidate rank of every layer ------------------


def rank_tables(
    model: nn.Module,
    analysis: Analysis,
    candidates: Mapping[str, Iterable[int]],
    timer: LayerTimer,
) -> dict[str, dict[int | None, float]]:
    """Median seconds per layer: ``None`` for the dense layer, each candidate rank for its
    factored form, each layer timed alone at its real input shape on ``timer``.

    Matrix layers (Linear, Conv1D) are timed against their low-rank pair, layers of one shape
    once for the union of their candidates; an ungrouped 1×1 ``Conv2d`` against its
    :class:`~surgery.modules.lowrank_conv.LowRankConv2d` pair at ``(r, r)``. Same errors as
    :func:`keep_if_faster_ranks`.
    """
    convs: dict[str, nn.Module] = {}
    matrices: dict[str, list[int]] = {}
    for path, ranks in candidates.items():
        module = model.get_submodule(path)
        if isinstance(module, nn.Conv2d):
            convs[path] = module
        else:
            matrices[path] = sorted(set(ranks), reverse=True)
    tables: dict[str, dict[int | None, float]] = {}
    by_shape: dict[tuple[int, int, tuple[int, ...], torch.dtype, bool], list[str]] = {}
    for path in matrices:
        by_shape.setdefault(_linear_facts(model, analysis, path), []).append(path)
    for facts, group in by_shape.items():
        union = sorted({r for p in group for r in matrices[p]}, reverse=True)
        times = _time_matrix(timer, facts, union)
        for path in group:
            tables[path] = {None: times.dense} | {r: times.variants[str(r)] for r in matrices[path]}
    if convs:
        wanted = {p: [(r, r) for r in candidates[p]] for p in convs}
        conv_times = _conv_pair_times(convs, analysis, wanted, timer)
        for path, times in conv_times.items():
            tables[path] = {None: times.dense} | {
                pair[0]: times.variants[pair_key(pair)] for pair in wanted[path]
            }
    return tables
