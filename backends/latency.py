"""Per-layer latency tables measured on a target and cached on disk: the timing mechanism.

A factorized layer is not automatically faster: two thin GEMMs can lose to one wide one, and
latency falls in cliffs at the target's tile multiples (ALGORITHMS.md, "Hardware-aware rank
optimization"). Passes that choose ranks by speed (``decompose … keep if faster`` and
``where speedup > X``) get a :class:`surgery.timing.LayerTimer` in their context; this module
implements it for a backend (:class:`BackendTimer`). What to time and how to choose from the
times is the pass's business (``surgery.passes.rank_latency``); here a layer is a *dense*
module and a set of *variants* (its candidate replacements, by key), each lowered alone on
the backend and timed at the layer's real input shape, interleaved.

One generic table serves matrices and convolutions: :class:`LatencyTable` is keyed by the
backend, what the variants are (``layer``: ``Linear``, ``TuckerConv2d``, ``LowRankConv2d``),
the layer's geometry (whatever its latency depends on besides input shape and dtype), the
input shape, dtype and torch version. Tables are cached as JSON under ``<cache>/latency/``: a
second run does not time again; a table lacking some variant is measured again as a whole
(entries timed minutes apart under different load are not comparable).

>>> t = LatencyTable("torch-cpu", "Linear", {"in_features": 8, "out_features": 8}, (2, 8),
...                  "float32", "x", dense=2.0, variants={"4": 1.0})
>>> t.key() == LatencyTable.from_json(t.to_json()).key(), t.times().speedup("4")
(True, 2.0)
"""

from __future__ import annotations

import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.inputs import Inputs
from surgery.targets import tile_for
from surgery.timing import LayerTimes, TimingUnavailable

from .base import Backend, LoweringError
from .cache import cache_dir

__all__ = [
    "BackendTimer",
    "LatencyTable",
    "latency_table",
    "load_table",
    "measure",
    "save_table",
    "table_key",
]

Builder = Callable[[], nn.Module]


@dataclass
class LatencyTable:
    """Median seconds of one layer on one target: the dense layer and each variant by key."""

    backend: str  # backend name, e.g. "onnx-cpu"
    layer: str  # what the variants are: "Linear", "TuckerConv2d", "LowRankConv2d"
    geometry: dict[str, Any]  # what latency depends on besides input shape and dtype
    input_shape: tuple[int, ...]  # the layer's real input, e.g. (8, 128, 768)
    dtype: str  # "float32"
    torch_version: str
    dense: float  # median seconds of the dense layer
    variants: dict[str, float] = field(default_factory=dict)  # variant key -> median seconds
    repeats: int = 0
    # torch's intra-op threads when measured: a table timed with 2 threads says nothing of 1
    # (0: unknown, a table cached before this was recorded, never reused)
    threads: int = 0

    def key(self) -> str:
        """Cache key: everything the latency depends on except the weights' values."""
        return table_key(
            self.backend,
            self.layer,
            self.geometry,
            self.input_shape,
            self.dtype,
            self.torch_version,
            self.threads,
        )

    def times(self) -> LayerTimes:
        """The table as the pass-facing :class:`surgery.timing.LayerTimes`."""
        return LayerTimes(self.backend, self.dense, dict(self.variants))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LatencyTable:
        fields = dict(data)
        fields["geometry"] = dict(fields["geometry"])
        fields["input_shape"] = tuple(int(d) for d in fields["input_shape"])
        fields["variants"] = {str(k): float(t) for k, t in fields["variants"].items()}
        fields["dense"] = float(fields["dense"])
        return cls(**fields)


def table_key(
    backend: str,
    layer: str,
    geometry: Mapping[str, Any],
    input_shape: tuple[int, ...] | list[int],
    dtype: str,
    torch_version: str,
    threads: int,
) -> str:
    """The cache key of a table (``ValueError`` if ``geometry`` is not JSON-serialisable)."""
    text = json.dumps(
        [backend, layer, dict(geometry), list(input_shape), dtype, torch_version, threads],
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _table_path(key: str, directory: Path | None) -> Path:
    return (directory or cache_dir("latency")) / f"{key}.json"


def save_table(table: LatencyTable, directory: Path | None = None) -> Path:
    """Write ``table`` to the cache (``directory`` overrides its location)."""
    path = _table_path(table.key(), directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1))
    tmp.replace(path)  # atomic: a concurrent reader never sees half a table
    return path


def load_table(key: str, directory: Path | None = None) -> LatencyTable | None:
    """The cached table for ``key``, or None (missing or unreadable: it is measured again)."""
    path = _table_path(key, directory)
    try:
        return LatencyTable.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure(
    backend: Backend,
    layer: str,
    geometry: Mapping[str, Any],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    dense: Builder,
    variants: Mapping[str, Builder],
    *,
    warmup: int = 3,
    repeats: int = 15,
) -> LatencyTable:
    """Time the dense layer and every variant on ``backend`` (no cache).

    Each module is lowered alone at ``input_shape`` (random inputs: latency does not depend on
    the values); all run in interleaved rounds (dense, v₁, v₂, … per round), so a change in
    machine load hits every one alike; each entry is a median over ``repeats`` rounds.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*input_shape, generator=gen).to(dtype)
    inputs = Inputs((x,), {})
    builders: dict[str | None, Builder] = {None: dense}
    builders.update(variants)
    runners: dict[str | None, Callable[[], None]] = {}
    with tempfile.TemporaryDirectory(prefix="surgery-latency-") as tmp:
        for i, (key, build) in enumerate(builders.items()):
            lowered = backend.lower(build().eval(), inputs, Path(tmp) / f"v{i}")
            runners[key] = lowered.bind(inputs)
        samples: dict[str | None, list[float]] = {k: [] for k in runners}
        for _ in range(warmup):
            for run in runners.values():
                run()
        for _ in range(repeats):
            for key, run in runners.items():
                start = time.perf_counter()
                run()
                samples[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(s) for k, s in samples.items()}
    return LatencyTable(
        backend=backend.name,
        layer=layer,
        geometry=dict(geometry),
        input_shape=tuple(input_shape),
        dtype=_dtype_name(dtype),
        torch_version=torch.__version__,
        dense=medians.pop(None),
        variants={str(k): t for k, t in medians.items()},
        repeats=repeats,
        threads=torch.get_num_threads(),
    )


def latency_table(
    backend: Backend,
    layer: str,
    geometry: Mapping[str, Any],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    dense: Builder,
    variants: Mapping[str, Builder],
    *,
    warmup: int = 3,
    repeats: int = 15,
    directory: Path | None = None,
    refresh: bool = False,
) -> LatencyTable:
    """The cached table when it covers ``variants``, else a fresh measurement (then cached).

    A cached table that lacks some variant is measured again as a whole, with the union of
    its variants and the new ones (variants it only knows by key cannot be rebuilt, so those
    are dropped from the new table).
    """
    key = table_key(
        backend.name,
        layer,
        geometry,
        input_shape,
        _dtype_name(dtype),
        torch.__version__,
        torch.get_num_threads(),
    )
    cached = None if refresh else load_table(key, directory)
    if cached is not None and set(variants) <= set(cached.variants):
        return cached
    table = measure(
        backend,
        layer,
        geometry,
        input_shape,
        dtype,
        dense,
        variants,
        warmup=warmup,
        repeats=repeats,
    )
    save_table(table, directory)
    return table


class BackendTimer:
    """:class:`surgery.timing.LayerTimer` on one backend, through the on-disk table cache.

    >>> from surgery.backends import get_backend
    >>> timer = BackendTimer(get_backend("onnx", "cuda"))
    >>> timer.name, timer.tile
    ('onnx-cuda', 16)
    """

    def __init__(
        self,
        backend: Backend,
        *,
        warmup: int = 3,
        repeats: int = 15,
        directory: Path | None = None,
    ) -> None:
        self.backend = backend
        self.warmup = warmup
        self.repeats = repeats
        self.directory = directory
        self._available: tuple[bool, str] | None = None

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def tile(self) -> int:
        return tile_for(self.backend.name)

    def time_layer(
        self,
        layer: str,
        geometry: Mapping[str, Any],
        input_shape: tuple[int, ...],
        dtype: torch.dtype,
        dense: Builder,
        variants: Mapping[str, Builder],
    ) -> LayerTimes:
        if self._available is None:
            self._available = self.backend.is_available()
        available, why = self._available
        if not available:
            raise TimingUnavailable(f"cannot time layers on {self.name}: {why}")
        try:
            table = latency_table(
                self.backend,
                layer,
                geometry,
                input_shape,
                dtype,
                dense,
                variants,
                warmup=self.warmup,
                repeats=self.repeats,
                directory=self.directory,
            )
        except LoweringError as exc:
            raise TimingUnavailable(str(exc)) from exc
        return table.times()
