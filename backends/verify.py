"""One shared verification for every backend: numerics first, then timed A/B.

:func:`verify` lowers the original and the surgered model on one backend and

1. checks **numerics**: the lowered surgered model must reproduce the eager surgered model
   (``lowering_error ≤ tolerance``), and the drift it shows against the original must be the
   eager drift (``|drift_lowered − drift_eager| ≤ tolerance``): the backend runs the surgery
   that was measured, not something else;
2. only then **times** lowered original against lowered surgered, interleaved, with warm-up,
   medians and a bootstrap interval (:func:`surgery.timing.measure_speedup_fn`), so the
   speedup is the one a deployment on that backend would see.

Timing a program whose numerics are wrong would report the speed of the wrong program, so a
numerics failure stops before timing and says so.

>>> import torch
>>> from surgery.inputs import Inputs
>>> from surgery.backends.torch_backend import TorchBackend
>>> a = torch.nn.Linear(32, 32); b = torch.nn.Sequential(torch.nn.Linear(32, 4), torch.nn.Linear(4, 32))
>>> v = verify(a, b, TorchBackend(), Inputs((torch.randn(8, 32),), {}), warmup=1, repeats=3)
>>> v.status, v.lowering_error == 0.0, str(v).startswith("torch-cpu: numerics ok")
('ok', True, True)
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.inputs import Inputs, flatten_outputs
from surgery.timing import Speedup, measure_speedup_fn

from .ascend_estimate import SpeedupEstimate
from .base import Backend, LoweringError, first_line

__all__ = ["Verification", "relative_error", "verify"]

Progress = Callable[[str, int, int], None]


def relative_error(reference: list[Any], candidate: list[Any]) -> float:
    """``‖y − y₀‖ / ‖y₀‖`` over the floating tensors of two output lists (float64).

    >>> relative_error([torch.ones(4)], [torch.ones(4) * 1.5])
    0.5
    """
    num = den = 0.0
    refs, cands = flatten_outputs(reference), flatten_outputs(candidate)
    if len(refs) != len(cands):
        return math.inf
    for r, c in zip(refs, cands):
        if not r.is_floating_point():
            continue
        if r.shape != c.shape:
            return math.inf
        r64, c64 = r.detach().cpu().double(), c.detach().cpu().double()
        num += float((c64 - r64).square().sum())
        den += float(r64.square().sum())
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


@dataclass
class Verification:
    """What :func:`verify` found for one backend. ``str()`` is the line a report shows."""

    backend: str  # e.g. "onnx-cpu"
    status: str  # "ok" | "numerics failed" | "unavailable" | "failed"
    tolerance: float
    reason: str = ""  # why unavailable / failed / numerics failed
    lowering_error: float | None = None  # lowered surgered vs eager surgered
    baseline_error: float | None = None  # lowered original vs eager original
    drift_lowered: float | None = None  # lowered surgered vs eager original
    drift_eager: float | None = None  # eager surgered vs eager original
    speed: Speedup | None = None  # lowered original (A) vs lowered surgered (B)
    artifacts: list[Path] = field(default_factory=list)
    lower_seconds: float = 0.0  # lowering both models (tuning and compilation included)
    # For a target whose device cannot run here (Ascend behind `mindir`): an estimate,
    # labelled as one wherever it is shown.
    estimate: SpeedupEstimate | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def numerics_ok(self) -> bool | None:
        """None when the numerics were never checked (backend unavailable, lowering failed)."""
        if self.lowering_error is None:
            return None
        return self.status != "numerics failed"

    def numerics_text(self) -> str:
        if self.lowering_error is None:
            return ""
        verdict = "ok" if self.numerics_ok else "FAILED"
        text = f"numerics {verdict} (lowering error {self.lowering_error:.2g}"
        text += " ≤ " if self.lowering_error <= self.tolerance else " > "
        text += f"{self.tolerance:.2g}"
        if self.drift_lowered is not None and self.drift_eager is not None:
            text += f"; drift {self.drift_lowered:.4g} vs eager {self.drift_eager:.4g}"
        return text + ")"

    def __str__(self) -> str:
        if self.status in ("unavailable", "failed"):
            return f"{self.backend}: {self.status}: {self.reason}"
        parts = [f"{self.backend}: {self.numerics_text()}"]
        if self.speed is not None:
            parts.append(str(self.speed))
        elif self.reason:
            parts.append(self.reason)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "status": self.status,
            "reason": self.reason,
            "tolerance": self.tolerance,
            "lowering_error": self.lowering_error,
            "baseline_error": self.baseline_error,
            "drift_lowered": self.drift_lowered,
            "drift_eager": self.drift_eager,
            "speed": self.speed.as_dict() if self.speed is not None else None,
            "artifacts": [str(p) for p in self.artifacts],
            "lower_seconds": self.lower_seconds,
            "estimate": self.estimate.as_dict() if self.estimate is not None else None,
        }


def verify(
    original: nn.Module,
    surgered: nn.Module,
    backend: Backend,
    inputs: Inputs,
    *,
    tolerance: float = 1e-4,
    warmup: int = 3,
    repeats: int = 20,
    workdir: Path | None = None,
    progress: Progress | None = None,
) -> Verification:
    """Lower both models on ``backend``, check numerics, then time them against each other.

    The surgered model's artifacts land in ``workdir`` (a temporary directory when None);
    the original's go to a temporary directory that is removed afterwards, since a report
    needs the deployable artifact, not a second copy of the model it replaces.

    Never raises for a backend problem: an unavailable backend or a failed lowering is a
    :class:`Verification` with that status and the reason.
    """
    name = backend.name
    available, why = backend.is_available()
    if not available:
        return Verification(name, "unavailable", tolerance, reason=why)

    def emit(what: str) -> None:
        if progress is not None:
            progress(f"{name}: {what}", 0, 1)

    with torch.no_grad():
        ref_original = flatten_outputs(inputs.call(original))
        ref_surgered = flatten_outputs(inputs.call(surgered))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="surgery-lower-") as tmp:
        out_dir = Path(workdir) if workdir is not None else Path(tmp) / "surgered"
        try:
            emit("lowering the surgered model")
            low_surgered = backend.lower(surgered, inputs, out_dir)
            emit("lowering the original model")
            low_original = backend.lower(original, inputs, Path(tmp) / "original")
        except LoweringError as exc:
            return Verification(name, "failed", tolerance, reason=str(exc))
        except Exception as exc:  # an exporter bug must not take the whole report down
            return Verification(
                name, "failed", tolerance, reason=f"lowering raised {first_line(exc)}"
            )
        lower_seconds = time.perf_counter() - started
        artifacts = list(low_surgered.artifacts) if workdir is not None else []

        try:
            out_surgered = low_surgered(inputs)
            out_original = low_original(inputs)
        except Exception as exc:
            return Verification(
                name,
                "failed",
                tolerance,
                reason=f"the lowered model failed to run: {first_line(exc)}",
                artifacts=artifacts,
                lower_seconds=lower_seconds,
            )
        result = Verification(
            name,
            "ok",
            tolerance,
            lowering_error=relative_error(ref_surgered, out_surgered),
            baseline_error=relative_error(ref_original, out_original),
            drift_lowered=relative_error(ref_original, out_surgered),
            drift_eager=relative_error(ref_original, ref_surgered),
            artifacts=artifacts,
            lower_seconds=lower_seconds,
        )
        assert result.lowering_error is not None and result.baseline_error is not None
        assert result.drift_lowered is not None and result.drift_eager is not None
        faithful = result.lowering_error <= tolerance and result.baseline_error <= tolerance
        same_drift = abs(result.drift_lowered - result.drift_eager) <= tolerance
        if not (faithful and same_drift):
            result.status = "numerics failed"
            result.reason = (
                f"not timed: the lowered program does not compute the eager model "
                f"(original lowering error {result.baseline_error:.2g})"
            )
            return result

        emit("timing")
        result.speed = measure_speedup_fn(
            low_original.bind(inputs),
            low_surgered.bind(inputs),
            warmup=warmup,
            repeats=repeats,
            device=name,
            progress=progress,
        )
        return result
