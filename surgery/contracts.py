"""Contracts: an ``expect`` statement measured against what a run produced.

``expect METRIC OP VALUE [on BACKEND | on "DATA"]``. Parameters and FLOPs are counted (``50%``
is relative to the original), a speedup is *measured*: on the named backend's targets (the
slowest of them, so the contract holds on every target it names), or torch's own interleaved
timing when no torch target ran. Drift and the task-quality metrics (``perplexity``,
``accuracy``, ``agreement``, ``similarity``, ``neighbours``, a user ``metric``) are measured on
data by :mod:`surgery.quality`, each with its bootstrap interval, and handed over in
``Measured.quality``. A contract holds when its point value does; when its interval reaches
across the bound the detail says so. A contract whose quantity was not measured is "not
measured" (``held`` None), never "met".

>>> from surgery.parse import parse
>>> from surgery.timing import Speedup
>>> stmt = parse("expect speedup >= 1.5").statements[0]
>>> c = evaluate(stmt, Measured(100, 50, 10, 5, 0.01, Speedup("torch-cpu", 2, 1, 2.0, 1.9, 2.1, 5, 1), []))
>>> c.held, c.detail
(True, '2.00× [1.90, 2.10] on torch')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from surgery import ast
from surgery.fmt import format_statement
from surgery.select import compare
from surgery.timing import Speedup

if TYPE_CHECKING:
    from surgery.quality import QualityReport

__all__ = ["Contract", "Measured", "contract_value", "evaluate"]


@dataclass
class Contract:
    """An ``expect`` statement and how the result measured against it."""

    statement: ast.Expect
    text: str
    measured: float | None
    interval: tuple[float, float] | None
    held: bool | None  # None: could not be measured
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "contract": self.text,
            "line": self.statement.span.line,
            "measured": self.measured,
            "interval": list(self.interval) if self.interval else None,
            "held": self.held,
            "detail": self.detail,
        }


class Measured(NamedTuple):
    """What a run measured, as contracts read it."""

    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    drift: float | None
    speed: Speedup | None  # torch's own interleaved timing
    verifications: Sequence[Any]  # surgery.backends.Verification of each target
    quality: QualityReport | None = None  # drift's interval and every metric measured on data


def contract_value(
    verifications: Sequence[Any], backend: str
) -> tuple[float, tuple[float, float]] | None:
    """``(speedup, (ci_low, ci_high))`` for ``expect speedup … on BACKEND``, or None.

    ``backend`` is the recipe's name (``onnx``) or a full backend name (``onnx-cpu``). With
    several measured targets of one backend (``onnx cpu`` and ``onnx cuda``) the contract
    reads the slowest, so that it holds on every target it names. None when no target of
    that backend was timed (unavailable, failed, or numerics failed).
    """
    measured = [
        v.speed
        for v in verifications
        if v.speed is not None
        and v.ok
        and (v.backend == backend or v.backend.split("-", 1)[0] == backend)
    ]
    if not measured:
        return None
    slowest = min(measured, key=lambda s: s.speedup)
    return slowest.speedup, (slowest.ci_low, slowest.ci_high)


def evaluate(stmt: ast.Expect, run: Measured) -> Contract:
    """How ``run`` measured against the contract ``stmt``."""
    text = format_statement(stmt)
    metric = stmt.metric.value
    target = stmt.value.magnitude
    interval: tuple[float, float] | None = None
    if metric in ("params", "flops"):
        before = run.params_before if metric == "params" else run.flops_before
        after = run.params_after if metric == "params" else run.flops_after
        if stmt.value.unit == "%":
            measured = after / before if before else 0.0
            shown = f"{measured:.1%} of the original ({after:,} of {before:,})"
        else:
            measured = float(after)
            shown = f"{after:,}"
    elif metric == "drift" and (run.quality is None or run.quality.get(stmt) is None):
        if run.drift is None or stmt.data is not None:
            return Contract(stmt, text, None, None, None, "drift was not measured")
        measured = float(run.drift)
        shown = f"{measured:.4g}"
        if run.quality is not None and run.quality.drift_interval is not None:
            interval = run.quality.drift_interval
            shown += f" [{interval[0]:.4g}, {interval[1]:.4g}]"
    elif metric != "speedup":
        result = run.quality.get(stmt) if run.quality is not None else None
        if result is None:
            return Contract(stmt, text, None, None, None, f"{metric} was not measured")
        measured, interval, shown = result.value, result.interval, result.detail
    else:
        backend = stmt.on.value if stmt.on is not None else "torch"
        value = contract_value(run.verifications, backend)
        torch_targets = [v for v in run.verifications if v.backend.startswith("torch-")]
        if value is None and backend == "torch" and not torch_targets and run.speed:
            value = (run.speed.speedup, (run.speed.ci_low, run.speed.ci_high))
        if value is None:
            return Contract(stmt, text, None, None, None, f"speed was not measured on {backend}")
        measured, interval = value
        shown = f"{measured:.2f}× [{interval[0]:.2f}, {interval[1]:.2f}] on {backend}"
    held = compare(measured, stmt.op, target)
    if interval is not None and stmt.op not in ("==", "!=") and interval[0] < target < interval[1]:
        shown += "; the interval reaches across the bound"
    return Contract(stmt, text, measured, interval, held, shown)
