"""Measured speed: interleaved A/B timing with warm-up, medians and a bootstrap interval.

Also the interface through which a pass times single layers on a target without knowing the
backends: :class:`LayerTimer` (implemented by ``surgery.backends.latency.BackendTimer``, handed
to the pass by the manager in its ``PassContext``) returning :class:`LayerTimes`.

The contract of this tool is *measured* speed, so timing is careful: both models run on the
same inputs, alternating A and B in every repeat (so drift in machine load hits both), after
warm-up runs; the speedup is the ratio of medians with a bootstrap 95% confidence interval.

>>> import torch
>>> from surgery.inputs import Inputs
>>> a = torch.nn.Linear(64, 64); b = torch.nn.Identity()
>>> s = measure_speedup(a, b, Inputs(args=(torch.randn(8, 64),), kwargs={}), warmup=1, repeats=5)
>>> s.repeats, s.speedup > 0
(5, True)
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

__all__ = [
    "LayerTimer",
    "LayerTimes",
    "Speedup",
    "TimingUnavailable",
    "bootstrap_ratio_ci",
    "measure_speedup",
    "measure_speedup_fn",
]


@dataclass
class Speedup:
    """Timing of a baseline (A) against a candidate (B) on one device."""

    device: str
    baseline_ms: float  # median
    candidate_ms: float  # median
    speedup: float  # baseline / candidate (ratio of medians)
    ci_low: float
    ci_high: float
    repeats: int
    warmup: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"speedup {self.speedup:.2f}× [{self.ci_low:.2f}, {self.ci_high:.2f}] on {self.device} "
            f"({self.baseline_ms:.2f} ms → {self.candidate_ms:.2f} ms, median of {self.repeats})"
        )


def bootstrap_ratio_ci(
    a: list[float], b: list[float], *, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``median(a) / median(b)``."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(samples):
        ra = [a[rng.randrange(len(a))] for _ in a]
        rb = [b[rng.randrange(len(b))] for _ in b]
        ratios.append(statistics.median(ra) / max(statistics.median(rb), 1e-12))
    ratios.sort()
    lo = ratios[int((1 - level) / 2 * (samples - 1))]
    hi = ratios[int((1 + level) / 2 * (samples - 1))]
    return lo, hi


def measure_speedup(
    baseline: nn.Module,
    candidate: nn.Module,
    inputs: Any,
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: str = "torch-cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> Speedup:
    """Time ``baseline`` and ``candidate`` on ``inputs`` (an ``Inputs``), interleaved."""

    def run(model: nn.Module) -> Any:
        with torch.inference_mode():
            return inputs.call(model)

    return measure_speedup_fn(
        lambda: run(baseline),
        lambda: run(candidate),
        warmup=warmup,
        repeats=repeats,
        device=device,
        progress=progress,
    )


def measure_speedup_fn(
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    *,
    warmup: int = 3,
    repeats: int = 20,
    device: str = "torch-cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> Speedup:
    """Time two zero-argument callables, interleaved: the core of :func:`measure_speedup`.

    Backends (ONNX Runtime sessions, TVM virtual machines, CUDA graphs) are not torch
    modules, so they are timed through callables that run one call to completion
    (a CUDA runner must synchronise inside the callable, or only the launch is timed).

    >>> s = measure_speedup_fn(lambda: sum(range(2000)), lambda: None, warmup=1, repeats=5)
    >>> s.repeats, s.speedup > 1
    (5, True)
    """

    def timer(fn: Callable[[], Any]) -> Callable[[], float]:
        def once() -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        return once

    time_a, time_b = timer(baseline), timer(candidate)
    for _ in range(warmup):
        time_a()
        time_b()
    a: list[float] = []
    b: list[float] = []
    for i in range(repeats):
        # Alternate who goes first so cache warmth does not favour one side.
        if i % 2 == 0:
            a.append(time_a())
            b.append(time_b())
        else:
            b.append(time_b())
            a.append(time_a())
        if progress:
            progress("timing", i + 1, repeats)
    med_a, med_b = statistics.median(a), statistics.median(b)
    lo, hi = bootstrap_ratio_ci(a, b)
    return Speedup(
        device=device,
        baseline_ms=med_a * 1e3,
        candidate_ms=med_b * 1e3,
        speedup=med_a / max(med_b, 1e-12),
        ci_low=lo,
        ci_high=hi,
        repeats=repeats,
        warmup=warmup,
    )


# --- single layers on a target: the interface passes see -----------------------------------


@dataclass(frozen=True)
class LayerTimes:
    """Median seconds of one layer (``dense``) and of each candidate replacement, each timed
    alone on ``target`` at the layer's real input shape.

    >>> t = LayerTimes("torch-cpu", dense=2.0, variants={"8": 0.5})
    >>> t.speedup("8")
    4.0
    """

    target: str
    dense: float
    variants: Mapping[str, float] = field(default_factory=dict)

    def speedup(self, variant: str) -> float:
        """Dense latency over the variant's latency (> 1: the replacement pays)."""
        return self.dense / max(self.variants[variant], 1e-12)


class TimingUnavailable(Exception):
    """Layers cannot be timed on this target (it is unavailable, or cannot lower a layer)."""


class LayerTimer(Protocol):
    """Times a layer against candidate replacements on one target; may cache by ``geometry``.

    ``layer`` names what the variants are (``"Linear"``, ``"TuckerConv2d"``, …) and
    ``geometry`` everything besides input shape and dtype that their latency depends on (it
    must be JSON-serialisable): together they key a cache, so ``dense`` and ``variants`` (keys
    to module builders) are only called when the table is measured. Raises
    :class:`TimingUnavailable`.
    """

    @property
    def name(self) -> str:
        """The target's name, e.g. ``onnx-cpu``."""
        ...

    @property
    def tile(self) -> int:
        """The rank step at which this target's latency moves (its GEMM tile)."""
        ...

    def time_layer(
        self,
        layer: str,
        geometry: Mapping[str, Any],
        input_shape: tuple[int, ...],
        dtype: torch.dtype,
        dense: Callable[[], nn.Module],
        variants: Mapping[str, Callable[[], nn.Module]],
    ) -> LayerTimes: ...
