"""Hardware-aware rank choice: per-layer latency tables measured on a target, cached on disk.

A factorized layer is not automatically faster: two thin GEMMs can lose to one wide one, and
latency falls in cliffs at the target's tile multiples (ALGORITHMS.md, "Hardware-aware rank
optimization"). For each candidate ``Linear(in→out)`` this module times, alone and at its
real input shape (``ModuleInfo.input_shapes``), the dense layer and the factorized pair
``Linear(in→r) → Linear(r→out)`` for ranks from the requested one downwards in steps of the
target's tile. The rank choice is then a pure function of the table (:func:`choose_rank`,
delegating to :func:`surgery.lowrank.pick_rank_below_cliff`), so tests use fake tables.

A ``k×k`` ``Conv2d`` planned for Tucker-2 at ``(r_out, r_in)`` is timed the same way against
its :class:`~surgery.modules.tucker_conv.TuckerConv2d`, both ranks scaled together in tile steps
of the larger one (:class:`ConvLatencyTable`, :func:`keep_if_faster_tucker_ranks`,
:func:`choose_tucker_ranks`).

Tables are cached as JSON under ``<cache>/latency/`` keyed by backend, device, layer shape,
input shape, dtype and torch version: a second run does not time again. Conv tables' keys
start with ``conv-`` and also cover kernel, stride, padding and dilation.

Tiles (:data:`TILE`): on this machine's CPU (AVX-512, MKL) a 768→r→768 pair at 1024 tokens
was ~7% faster at multiples of 8 than at the ranks just above them, with no extra gain at
multiples of 16, so CPU targets step by 8. CUDA tensor cores want multiples of 8 (TF32) or
16 (fp16/bf16 MMA k-depth); 16 is the default. The Ascend cube unit works on 16×16 fractals.

>>> table = LatencyTable("torch-cpu", "Linear", 768, 768, (8, 128, 768), "float32", "x",
...                      dense=2.0, ranks={192: 1.0, 184: 0.99, 176: 0.7, 168: 0.69})
>>> choose_rank(table, requested=192, step=8)  # the cliff is between 184 and 176
176
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import torch
from torch import nn

from surgery.facts import Analysis, ModuleInfo
from surgery.inputs import Inputs
from surgery.lowrank import pick_rank_below_cliff
from surgery.modules.lowrank_conv import pair

from .base import Backend, LoweringError
from .cache import cache_dir

__all__ = [
    "TILE",
    "ConvLatencyTable",
    "LatencyTable",
    "candidate_ranks",
    "choose_rank",
    "choose_tucker_ranks",
    "keep_if_faster_ranks",
    "keep_if_faster_tucker_ranks",
    "latency_table",
    "layer_speedups",
    "load_table",
    "measure_linear",
    "measure_tucker_conv",
    "save_table",
    "tile_for",
    "tucker_candidate_pairs",
    "tucker_latency_table",
]

_K = TypeVar("_K")

# Rank step per backend name (see the module docstring for why these values).
TILE: dict[str, int] = {
    "torch-cpu": 8,
    "torch-inductor": 8,
    "onnx-cpu": 8,
    "tvm-llvm": 8,
    "torch-cuda": 16,
    "torch-inductor-cuda": 16,
    "onnx-cuda": 16,
    "tvm-cuda": 16,
    "mindir-ascend": 16,
    "mindir-cpu": 8,
}


def tile_for(backend: str) -> int:
    """The rank step of a backend name (8 when unknown: every SIMD width here divides it)."""
    return TILE.get(backend, 8)


@dataclass
class LatencyTable:
    """Median seconds of one layer shape on one target: dense, and factorized per rank."""

    backend: str  # backend name, e.g. "onnx-cpu"
    layer: str  # "Linear"
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]  # the layer's real input, e.g. (8, 128, 768)
    dtype: str  # "float32"
    torch_version: str
    dense: float  # median seconds of the dense layer
    ranks: dict[int, float] = field(default_factory=dict)  # rank -> median seconds
    bias: bool = True
    repeats: int = 0

    def key(self) -> str:
        """Cache key: everything the latency depends on except the weights' values."""
        return table_key(
            self.backend,
            self.layer,
            self.in_features,
            self.out_features,
            self.input_shape,
            self.dtype,
            self.bias,
            self.torch_version,
        )

    def speedup(self, rank: int) -> float:
        """Dense latency over factorized latency at ``rank`` (> 1: the factorization pays)."""
        return self.dense / max(self.ranks[rank], 1e-12)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        data["ranks"] = {str(r): t for r, t in sorted(self.ranks.items())}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyTable:
        fields = dict(data)
        fields["input_shape"] = tuple(int(d) for d in fields["input_shape"])
        fields["ranks"] = {int(r): float(t) for r, t in fields["ranks"].items()}
        return cls(**fields)


def table_key(
    backend: str,
    layer: str,
    in_features: int,
    out_features: int,
    input_shape: Iterable[int],
    dtype: str,
    bias: bool,
    torch_version: str,
) -> str:
    text = json.dumps(
        [backend, layer, in_features, out_features, list(input_shape), dtype, bias, torch_version]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _table_path(key: str, directory: Path | None) -> Path:
    return (directory or cache_dir("latency")) / f"{key}.json"


def save_table(table: LatencyTable | ConvLatencyTable, directory: Path | None = None) -> Path:
    """Write ``table`` (matrix or conv) to the cache (``directory`` overrides its location)."""
    path = _table_path(table.key(), directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a table
    return path


@overload
def load_table(key: str, directory: Path | None = None) -> LatencyTable | None: ...


@overload
def load_table(
    key: str, directory: Path | None, kind: type[ConvLatencyTable]
) -> ConvLatencyTable | None: ...


def load_table(
    key: str,
    directory: Path | None = None,
    kind: type[LatencyTable] | type[ConvLatencyTable] = LatencyTable,
) -> LatencyTable | ConvLatencyTable | None:
    """The cached table of type ``kind`` (:class:`LatencyTable` or :class:`ConvLatencyTable`)
    for ``key``, or None (missing or unreadable: it is measured again)."""
    path = _table_path(key, directory)
    try:
        return kind.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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
    top = requested - requested % step if requested >= step else requested
    floor = max(1, int(requested * min_fraction))
    ranks = [r for r in range(top, 0, -step) if r >= floor]
    return ranks or [top]


def choose_rank(table: LatencyTable, requested: int, step: int) -> int | None:
    """The rank to use for one layer, or None when no factorization beats the dense layer.

    Pure function of the table: ``requested`` is rounded down to a multiple of ``step``, then
    :func:`surgery.lowrank.pick_rank_below_cliff` picks the rank just below the largest
    latency cliff among the timed candidates (``ValueError`` if none was timed).

    >>> t = LatencyTable("fake", "Linear", 64, 64, (4, 64), "float32", "x", dense=1.0,
    ...                  ranks={32: 1.2, 24: 1.1})
    >>> choose_rank(t, 32, 8) is None  # every factorization is slower: stay dense
    True
    """
    top = requested - requested % step if requested >= step else requested
    return pick_rank_below_cliff(table.ranks, table.dense, top, step if top >= step else top)


class _Pair(nn.Sequential):
    """The factorized layer as timed: ``Linear(in→r, no bias) → Linear(r→out)``.

    Same two GEMMs as :class:`surgery.modules.LowRankLinear`; weights are random since
    latency does not depend on their values.
    """

    def __init__(self, in_f: int, out_f: int, rank: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__(
            nn.Linear(in_f, rank, bias=False, dtype=dtype),
            nn.Linear(rank, out_f, bias=bias, dtype=dtype),
        )


def _time_variants(
    backend: Backend,
    variants: Mapping[_K, nn.Module],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    warmup: int,
    repeats: int,
) -> dict[_K, float]:
    """Median seconds per variant, each lowered alone on ``backend`` at ``input_shape``.

    All variants run in interleaved rounds (one call of each per round), so a change in
    machine load hits every variant alike.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*input_shape, generator=gen).to(dtype)
    inputs = Inputs((x,), {})
    runners: dict[_K, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        for i, (k, layer) in enumerate(variants.items()):
            lowered = backend.lower(layer.eval(), inputs, Path(tmp) / f"v{i}")
            runners[k] = lowered.bind(inputs)
        samples: dict[_K, list[float]] = {k: [] for k in runners}
        for _ in range(warmup):
            for run in runners.values():
                run()
        for _ in range(repeats):
            for k, run in runners.items():
                start = time.perf_counter()
                run()
                samples[k].append(time.perf_counter() - start)
    return {k: statistics.median(s) for k, s in samples.items()}


def measure_linear(
    backend: Backend,
    in_features: int,
    out_features: int,
    input_shape: tuple[int, ...],
    ranks: Iterable[int],
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    warmup: int = 3,
    repeats: int = 15,
) -> LatencyTable:
    """Time the dense layer and each factorization on ``backend`` (no cache).

    All variants run in interleaved rounds (dense, r₁, r₂, … per round), so a change in
    machine load hits every variant alike; each entry is a median over ``repeats`` rounds.
    """
    variants: dict[int, nn.Module] = {
        0: nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    }
    for r in ranks:
        variants[int(r)] = _Pair(in_features, out_features, int(r), bias, dtype)
    medians = _time_variants(backend, variants, input_shape, dtype, warmup, repeats)
    return LatencyTable(
        backend=backend.name,
        layer="Linear",
        in_features=in_features,
        out_features=out_features,
        input_shape=tuple(input_shape),
        dtype=str(dtype).removeprefix("torch."),
        torch_version=torch.__version__,
        dense=medians.pop(0),
        ranks=medians,
        bias=bias,
        repeats=repeats,
    )


def latency_table(
    backend: Backend,
    in_features: int,
    out_features: int,
    input_shape: tuple[int, ...],
    ranks: Iterable[int],
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    warmup: int = 3,
    repeats: int = 15,
    directory: Path | None = None,
    refresh: bool = False,
) -> LatencyTable:
    """The cached table when it covers ``ranks``, else a fresh measurement (then cached).

    A table that lacks some ranks is measured again as a whole rather than patched: entries
    timed minutes apart under different load are not comparable.
    """
    wanted = sorted({int(r) for r in ranks}, reverse=True)
    key = table_key(
        backend.name,
        "Linear",
        in_features,
        out_features,
        input_shape,
        str(dtype).removeprefix("torch."),
        bias,
        torch.__version__,
    )
    cached = None if refresh else load_table(key, directory)
    if cached is not None and all(r in cached.ranks for r in wanted):
        return cached
    if cached is not None:
        wanted = sorted(set(wanted) | set(cached.ranks), reverse=True)
    table = measure_linear(
        backend,
        in_features,
        out_features,
        input_shape,
        wanted,
        dtype=dtype,
        bias=bias,
        warmup=warmup,
        repeats=repeats,
    )
    save_table(table, directory)
    return table


def _require_available(backend: Backend) -> None:
    """``LoweringError`` when ``backend`` cannot run here (nothing can be timed on it)."""
    available, why = backend.is_available()
    if not available:
        raise LoweringError(f"cannot time layers on {backend.name}: {why}")


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


def _tables(
    model: nn.Module,
    analysis: Analysis,
    paths: Iterable[str],
    requested_ranks: Mapping[str, int],
    backend: Backend,
    step: int,
    min_fraction: float,
    repeats: int,
    directory: Path | None,
) -> dict[str, LatencyTable]:
    _require_available(backend)
    # Layers of one shape (q/k/v/o of every block) share one measurement.
    by_shape: dict[tuple[Any, ...], list[str]] = {}
    for path in paths:
        in_f, out_f, shape, dtype, bias = _linear_facts(model, analysis, path)
        by_shape.setdefault((in_f, out_f, shape, dtype, bias), []).append(path)
    tables: dict[str, LatencyTable] = {}
    for (in_f, out_f, shape, dtype, bias), group in by_shape.items():
        ranks: set[int] = set()
        for path in group:
            ranks.update(candidate_ranks(requested_ranks[path], step, min_fraction=min_fraction))
        table = latency_table(
            backend,
            in_f,
            out_f,
            shape,
            ranks,
            dtype=dtype,
            bias=bias,
            repeats=repeats,
            directory=directory,
        )
        for path in group:
            tables[path] = table
    return tables


def keep_if_faster_ranks(
    model: nn.Module,
    analysis: Analysis,
    paths: Iterable[str],
    requested_ranks: Mapping[str, int],
    backend: Backend,
    *,
    step: int | None = None,
    min_fraction: float = 0.5,
    repeats: int = 15,
    directory: Path | None = None,
) -> dict[str, int | None]:
    """For ``decompose … keep if faster``: the rank to use per layer, None to stay dense.

    ``paths`` are the Linear-like layers the decompose plan would factor and
    ``requested_ranks[path]`` the rank it planned; ``backend`` is the recipe's first target
    (e.g. ``surgery.backends.get_backend("onnx", "cpu")``). Each layer shape is timed once
    (cached on disk); the choice per layer is :func:`choose_rank` with the target's tile
    (``step``, default :func:`tile_for`). Raises ``ValueError`` for a path that is not a
    Linear-like layer with a known input shape, ``LoweringError`` if the backend is
    unavailable or cannot lower a layer.
    """
    step = step or tile_for(backend.name)
    paths = list(paths)
    tables = _tables(
        model, analysis, paths, requested_ranks, backend, step, min_fraction, repeats, directory
    )
    return {p: choose_rank(tables[p], requested_ranks[p], step) for p in paths}


def layer_speedups(
    model: nn.Module,
    analysis: Analysis,
    paths: Iterable[str],
    requested_ranks: Mapping[str, int],
    backend: Backend,
    *,
    step: int | None = None,
    repeats: int = 15,
    directory: Path | None = None,
) -> dict[str, float]:
    """For ``where speedup > X``: dense latency ÷ factorized latency per layer, on ``backend``.

    Measured at the requested rank rounded down to the tile (only that rank is timed).
    """
    step = step or tile_for(backend.name)
    paths = list(paths)
    # min_fraction=1 → only the top candidate (the rounded requested rank) is timed.
    tables = _tables(
        model, analysis, paths, requested_ranks, backend, step, 1.0, repeats, directory
    )
    return {
        p: tables[p].speedup(candidate_ranks(requested_ranks[p], step, min_fraction=1.0)[0])
        for p in paths
    }


# --- Tucker-2 convolutions ------------------------------------------------------------------
#
# A ``k×k`` ``Conv2d(C→S)`` planned for Tucker-2 at ranks ``(r_out, r_in)`` is timed against
# :class:`surgery.modules.tucker_conv.TuckerConv2d` (``1×1 C→r_in``, ``k×k r_in→r_out``,
# ``1×1 r_out→S``, same stride, padding and dilation). Both ranks scale together, keeping their
# ratio: the *lead* (larger) rank steps down by the tile and the other follows it
# (:func:`tucker_candidate_pairs`), so the cliff rule of the matrix layers applies unchanged to
# the lead rank (:func:`choose_tucker_ranks`).
#
# A ``1×1`` ``Conv2d`` is decomposed by SVD into :class:`surgery.modules.LowRankConv2d` (two
# ``1×1`` convs through ``rank`` channels); its tables use the same machinery with the pair
# ``(rank, rank)`` and ``layer = "LowRankConv2d"``, so they are timed as the convs they are
# (not as a Linear over pixels).

Pair = tuple[int, int]  # (r_out, r_in)


@dataclass
class ConvLatencyTable:
    """Median seconds of one Conv2d on one target: dense, and factored per rank pair.

    ``ranks`` maps ``(r_out, r_in)`` to seconds: Tucker-2 for a ``k×k`` conv, the low-rank
    pair at ``(rank, rank)`` for a ``1×1`` one (``layer`` says which). Its cache key starts
    with ``conv-``, so it never shares a file with a :class:`LatencyTable`.
    """

    backend: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    input_shape: tuple[int, ...]  # the conv's real input, (B, C, H, W)
    dtype: str
    torch_version: str
    dense: float
    ranks: dict[Pair, float] = field(default_factory=dict)
    bias: bool = True
    padding_mode: str = "zeros"
    repeats: int = 0
    layer: str = "TuckerConv2d"

    def key(self) -> str:
        """Cache key: the conv's geometry, input shape, dtype, backend and torch version."""
        geometry = _geometry(**{name: getattr(self, name) for name in _GEOMETRY})
        return conv_table_key(
            self.backend, geometry, self.input_shape, self.dtype, self.torch_version, self.layer
        )

    def speedup(self, pair: Pair) -> float:
        """Dense latency over Tucker latency at ``pair`` (> 1: the factorization pays)."""
        return self.dense / max(self.ranks[pair], 1e-12)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("kernel_size", "stride", "dilation", "input_shape"):
            data[name] = list(data[name])
        if not isinstance(self.padding, str):
            data["padding"] = list(self.padding)
        data["ranks"] = {f"{o}x{i}": t for (o, i), t in sorted(self.ranks.items())}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConvLatencyTable:
        fields = dict(data)
        for name in ("kernel_size", "stride", "dilation"):
            a, b = fields[name]
            fields[name] = (int(a), int(b))
        if not isinstance(fields["padding"], str):
            a, b = fields["padding"]
            fields["padding"] = (int(a), int(b))
        fields["input_shape"] = tuple(int(d) for d in fields["input_shape"])
        ranks: dict[Pair, float] = {}
        for text, t in fields["ranks"].items():
            o, i = text.split("x")
            ranks[(int(o), int(i))] = float(t)
        fields["ranks"] = ranks
        return cls(**fields)


#: What a conv's latency depends on besides input shape and dtype: the fields shared by
#: :class:`ConvLatencyTable`, ``nn.Conv2d``'s constructor and :func:`_conv_geometry`.
_GEOMETRY = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "bias",
    "padding_mode",
)


def _conv_geometry(conv: nn.Conv2d) -> dict[str, Any]:
    """``conv``'s :data:`_GEOMETRY`, normalised (sizes as int pairs, ``bias`` a bool)."""
    return {
        "in_channels": conv.in_channels,
        "out_channels": conv.out_channels,
        "kernel_size": pair(conv.kernel_size),
        "stride": pair(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else pair(conv.padding),
        "dilation": pair(conv.dilation),
        "bias": conv.bias is not None,
        "padding_mode": conv.padding_mode,
    }


def _geometry(
    in_channels: int,
    out_channels: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
    bias: bool,
    padding_mode: str,
) -> list[Any]:
    pad: Any = padding if isinstance(padding, str) else list(padding)
    return [
        in_channels,
        out_channels,
        list(kernel_size),
        list(stride),
        pad,
        list(dilation),
        bias,
        padding_mode,
    ]


def conv_table_key(
    backend: str,
    geometry: list[Any],
    input_shape: Iterable[int],
    dtype: str,
    torch_version: str,
    layer: str = "TuckerConv2d",
) -> str:
    """Cache key of a :class:`ConvLatencyTable` (prefixed ``conv-``: disjoint from matrix keys)."""
    text = json.dumps([layer, backend, geometry, list(input_shape), dtype, torch_version])
    return "conv-" + hashlib.sha256(text.encode()).hexdigest()[:24]


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


def choose_tucker_ranks(table: ConvLatencyTable, requested: Pair, step: int) -> Pair | None:
    """The rank pair to use for one conv, or None when no Tucker pair beats the dense conv.

    Pure function of the table: the larger requested rank is rounded down to the tile and
    stepped down by ``step``, the other rank scaled with it (:func:`tucker_candidate_pairs`);
    :func:`surgery.lowrank.pick_rank_below_cliff` picks on the larger rank's latency curve.

    >>> t = ConvLatencyTable("fake", 64, 64, (3, 3), (1, 1), (1, 1), (1, 1), (1, 64, 8, 8),
    ...                      "float32", "x", dense=2.0,
    ...                      ranks={(32, 16): 1.5, (24, 12): 1.45, (16, 8): 0.9, (8, 4): 0.85})
    >>> choose_tucker_ranks(t, (32, 16), 8)  # the cliff is between 24×12 and 16×8
    (16, 8)
    """
    lead = max(requested)
    top = lead - lead % step if lead >= step else lead
    by_lead: dict[int, float] = {}
    for r in range(top, 0, -step if top >= step else -top):
        pair = _scaled_pair(requested, r)
        if pair in table.ranks:
            by_lead[r] = table.ranks[pair]
    pick = pick_rank_below_cliff(by_lead, table.dense, top, step if top >= step else top)
    return None if pick is None else _scaled_pair(requested, pick)


def _conv_layer(conv: nn.Conv2d) -> str:
    """The factored layer the pass builds for ``conv``: a low-rank pair for 1×1, else Tucker-2."""
    return "LowRankConv2d" if tuple(conv.kernel_size) == (1, 1) else "TuckerConv2d"


def _factored(conv: nn.Conv2d, ranks: Pair) -> nn.Module:
    """``conv`` factored at ``ranks`` as the pass would build it (weights not fitted)."""
    from surgery.modules.lowrank_conv import LowRankConv2d
    from surgery.modules.tucker_conv import TuckerConv2d

    r_out, r_in = ranks
    if _conv_layer(conv) == "LowRankConv2d":
        return LowRankConv2d.like(conv, r_out)
    return TuckerConv2d.like(conv, rank_out=r_out, rank_in=r_in)


def measure_tucker_conv(
    backend: Backend,
    conv: nn.Conv2d,
    input_shape: tuple[int, ...],
    pairs: Iterable[Pair],
    *,
    warmup: int = 3,
    repeats: int = 15,
) -> ConvLatencyTable:
    """Time a dense conv of ``conv``'s geometry and its factored form per rank pair (no cache):
    a TuckerConv2d for ``k×k``, a LowRankConv2d at ``(rank, rank)`` for ``1×1``.

    Weights are random (latency does not depend on their values); variants run in
    interleaved rounds like :func:`measure_linear`.
    """
    dtype = conv.weight.dtype
    geometry = _conv_geometry(conv)
    dense = nn.Conv2d(**geometry, dtype=dtype)
    variants: dict[Pair | None, nn.Module] = {None: dense}
    for ranks in pairs:
        variants[(int(ranks[0]), int(ranks[1]))] = _factored(conv, ranks)
    medians = _time_variants(backend, variants, input_shape, dtype, warmup, repeats)
    dense_s = medians.pop(None)
    return ConvLatencyTable(
        backend=backend.name,
        **geometry,
        input_shape=tuple(input_shape),
        dtype=str(dtype).removeprefix("torch."),
        torch_version=torch.__version__,
        dense=dense_s,
        ranks={p: t for p, t in medians.items() if p is not None},
        repeats=repeats,
        layer=_conv_layer(conv),
    )


def tucker_latency_table(
    backend: Backend,
    conv: nn.Conv2d,
    input_shape: tuple[int, ...],
    pairs: Iterable[Pair],
    *,
    warmup: int = 3,
    repeats: int = 15,
    directory: Path | None = None,
    refresh: bool = False,
) -> ConvLatencyTable:
    """The cached conv table when it covers ``pairs``, else a fresh measurement (then cached).

    Like :func:`latency_table`, a table lacking some pairs is measured again as a whole.
    """
    wanted = {(int(o), int(i)) for o, i in pairs}
    key = conv_table_key(
        backend.name,
        _geometry(**_conv_geometry(conv)),
        input_shape,
        str(conv.weight.dtype).removeprefix("torch."),
        torch.__version__,
        _conv_layer(conv),
    )
    cached = None if refresh else load_table(key, directory, ConvLatencyTable)
    if cached is not None and wanted <= set(cached.ranks):
        return cached
    if cached is not None:
        wanted |= set(cached.ranks)
    table = measure_tucker_conv(
        backend,
        conv,
        input_shape,
        sorted(wanted, reverse=True),
        warmup=warmup,
        repeats=repeats,
    )
    save_table(table, directory)
    return table


def keep_if_faster_tucker_ranks(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    requested: Mapping[str, Pair],
    backend: Backend,
    *,
    step: int | None = None,
    min_fraction: float = 0.5,
    repeats: int = 15,
    directory: Path | None = None,
) -> dict[str, Pair | None]:
    """For ``decompose … keep if faster`` on convs: the ``(r_out, r_in)`` per conv, None to
    stay dense (a ``1×1`` conv's pair is ``(rank, rank)``: its low-rank pair).

    ``convs`` maps each path to its ``Conv2d`` and ``requested[path]`` is the pair the plan
    chose. Each conv is timed alone at its analysed input shape on ``backend`` (cached on disk
    per geometry); the choice is :func:`choose_tucker_ranks` with the target's tile. Raises
    ``ValueError`` for a path that is not an ungrouped Conv2d with a known input shape,
    ``LoweringError`` if the backend is unavailable or cannot lower a layer.
    """
    step = step or tile_for(backend.name)
    tables = _conv_tables(
        convs, analysis, requested, backend, step, min_fraction, repeats, directory
    )
    return {path: choose_tucker_ranks(tables[path], requested[path], step) for path in convs}


def tucker_speedups(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    requested: Mapping[str, Pair],
    backend: Backend,
    *,
    step: int | None = None,
    repeats: int = 15,
    directory: Path | None = None,
) -> dict[str, float]:
    """For ``where speedup > X`` on convs: dense latency ÷ factored latency per conv (Tucker-2
    for ``k×k``, the low-rank pair at ``(rank, rank)`` for ``1×1``).

    Measured at the requested pair with its larger rank rounded down to the tile (the other
    scaled with it), the only pair timed — as :func:`layer_speedups` does for matrix layers.
    Same errors as :func:`keep_if_faster_tucker_ranks`.
    """
    step = step or tile_for(backend.name)
    tables = _conv_tables(convs, analysis, requested, backend, step, 1.0, repeats, directory)
    return {
        path: tables[path].speedup(
            tucker_candidate_pairs(requested[path], step, min_fraction=1.0)[0]
        )
        for path in convs
    }


def _conv_tables(
    convs: Mapping[str, nn.Module],
    analysis: Analysis,
    requested: Mapping[str, Pair],
    backend: Backend,
    step: int,
    min_fraction: float,
    repeats: int,
    directory: Path | None,
) -> dict[str, ConvLatencyTable]:
    """Each conv's latency table (cached) covering the candidate pairs of its requested pair."""
    _require_available(backend)
    tables: dict[str, ConvLatencyTable] = {}
    for path, conv in convs.items():
        info = _module_info(analysis, path)
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ValueError(f"`{path}` ({type(conv).__name__}) is not an ungrouped Conv2d")
        if not info.input_shapes:
            raise ValueError(f"`{path}` was never called on the example inputs: no input shape")
        pairs = tucker_candidate_pairs(requested[path], step, min_fraction=min_fraction)
        tables[path] = tucker_latency_table(
            backend,
            conv,
            tuple(info.input_shapes[0]),
            pairs,
            repeats=repeats,
            directory=directory,
        )
    return tables
