"""Measured speed: interleaved A/B timing with warm-up, medians and a bootstrap interval.

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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Speedup", "bootstrap_ratio_ci", "measure_speedup", "measure_speedup_fn"]


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
