"""Contracts: an ``expect`` statement measured against what a run produced.

``expect params|flops|drift|speedup OP VALUE [on BACKEND]``. Parameters and FLOPs are counted
(``50%`` is relative to the original), drift is the run's relative output error, and a speedup
is *measured*: on the named backend's targets (the slowest of them, so the contract holds on
every target it names), or torch's own interleaved timing when no torch target ran. A contract
whose quantity was not measured is "not measured" (``held`` None), never "met".

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
from typing import Any, NamedTuple

from surgery import ast
from surgery.fmt import format_statement
from surgery.select import compare
from surgery.timing import Speedup

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
    elif metric == "drift":
        measured = float(run.drift) if run.drift is not None else float("nan")
        shown = f"{measured:.4g}"
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
    return Contract(stmt, text, measured, interval, compare(measured, stmt.op, target), shown)
