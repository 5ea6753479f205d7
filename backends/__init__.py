"""Backends: lower the original and the surgered model to a target, check numerics, time both.

One :class:`Backend` protocol (``name``, ``device``, ``is_available()``, ``lower()``) with one
file per target, and one shared :func:`verify`. The manager and the CLI call
:func:`run_targets` for a recipe's ``target`` statements and :func:`contract_value` for
``expect speedup … on B``; the checker reads :data:`TARGET_SUPPORT` and :data:`EXPECT_ON`.

=================  ===================  ============================================
recipe             backend name         lowering
=================  ===================  ============================================
``torch cpu``      ``torch-cpu``        the model itself (eager)
``torch cuda``     ``torch-cuda``       eager on CUDA, synchronised timing
``torch inductor`` ``torch-inductor``   ``torch.compile`` (inductor) on CPU
``onnx cpu|cuda``  ``onnx-cpu|cuda``    ``torch.onnx.export(dynamo=True)`` + onnxruntime
``tvm llvm|cuda``  ``tvm-llvm|cuda``    ``torch.export`` → Relax → MetaSchedule → VM
``mindir cpu``     ``mindir-cpu``       ``torch.export`` → generated MindSpore cell →
                                        ``model.mindir`` → ``GraphCell`` on CPU
=================  ===================  ============================================

>>> import torch
>>> from surgery.inputs import Inputs
>>> b = get_backend("torch", "cpu")
>>> b.name, b.is_available()
('torch-cpu', (True, ''))
>>> sorted(TARGET_SUPPORT["device"])[:3]
['mindir cpu', 'onnx cpu', 'onnx cuda']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from surgery.targets import DEFAULT_DEVICE, EXPECT_ON, TARGET_SUPPORT

from .base import (
    Backend,
    BackendUnavailable,
    FlatModel,
    FlatSignature,
    Lowered,
    LoweringError,
    first_line,
)
from .verify import Verification, relative_error, verify

if TYPE_CHECKING:
    from surgery.inputs import Inputs

__all__ = [
    "DEFAULT_DEVICE",
    "EXPECT_ON",
    "TARGET_SUPPORT",
    "Backend",
    "BackendUnavailable",
    "FlatModel",
    "FlatSignature",
    "Lowered",
    "LoweringError",
    "Verification",
    "contract_value",
    "get_backend",
    "relative_error",
    "run_targets",
    "verify",
]

Progress = Callable[[str, int, int], None]
TargetSpec = tuple[str, "str | None", "int | None"]  # (backend, device, trials) of `target`


def get_backend(backend: str, device: str | None = None, trials: int | None = None) -> Backend:
    """The backend object for a recipe's ``target BACKEND [DEVICE] [trials N]``.

    ``ValueError`` for a pair that is not implemented (the checker rejects those first).

    >>> get_backend("tvm", trials=4).name, get_backend("torch", "inductor").name
    ('tvm-llvm', 'torch-inductor')
    >>> get_backend("mindir").name
    'mindir-cpu'
    """
    device = device or DEFAULT_DEVICE.get(backend)
    if f"{backend} {device}" not in (TARGET_SUPPORT["device"] or set()):
        raise ValueError(f"target `{backend} {device}` is not implemented")
    if backend == "torch":
        from .torch_backend import TorchBackend

        if device == "inductor":
            return TorchBackend("cpu", compiled=True)
        assert device is not None
        return TorchBackend(device)
    if backend == "onnx":
        from .onnx_backend import OnnxBackend

        assert device is not None
        return OnnxBackend(device)
    if backend == "mindir":
        from .mindir import MindirBackend

        assert device is not None
        return MindirBackend(device)
    from .tvm_backend import TvmBackend

    assert device is not None
    return TvmBackend(device, trials=trials)


def run_targets(
    original: nn.Module,
    model: nn.Module,
    inputs: Inputs,
    targets: Sequence[TargetSpec],
    workdir: Path,
    *,
    warmup: int = 3,
    repeats: int = 20,
    tolerance: float = 1e-4,
    progress: Progress | None = None,
) -> list[Verification]:
    """Verify ``model`` (surgered) against ``original`` on each target, in order.

    A ``mindir`` target also gets an Ascend roofline estimate (``Verification.estimate``,
    :mod:`surgery.backends.ascend_estimate`), since no Ascend device can be timed here.

    ``targets`` are ``(backend, device or None, trials or None)`` from the recipe's
    ``target`` statements (or the CLI); ``inputs`` are what both are timed on (the manager
    passes its first calibration batch, else the example inputs). Artifacts of the surgered model land in
    ``workdir / <backend name>`` (e.g. ``OUT/lowered/onnx-cpu/model.onnx``). Duplicate
    targets are verified once. Never raises for a backend problem: each result says
    ``ok``, ``numerics failed``, ``unavailable`` or ``failed`` with the reason.
    """
    results: list[Verification] = []
    seen: set[tuple[str, str | None, int | None]] = set()
    for backend_name, device, trials in targets:
        device = device or DEFAULT_DEVICE.get(backend_name)
        if (backend_name, device, trials) in seen:
            continue
        seen.add((backend_name, device, trials))
        try:
            backend = get_backend(backend_name, device, trials)
        except ValueError as exc:
            results.append(
                Verification(f"{backend_name}-{device}", "unavailable", tolerance, reason=str(exc))
            )
            continue
        result = verify(
            original,
            model,
            backend,
            inputs,
            tolerance=tolerance,
            warmup=warmup,
            repeats=repeats,
            workdir=Path(workdir) / backend.name,
            progress=progress,
        )
        if backend_name == "mindir":  # MindIR is the Ascend path: estimate what no one timed
            from .ascend_estimate import estimate_speedup

            if progress is not None:
                progress(f"{backend.name}: estimating Ascend latency", 0, 1)
            try:
                result.estimate = estimate_speedup(original, model, inputs)
            except Exception as exc:  # an estimate is extra: its failure must not end the run
                if progress is not None:
                    progress(f"{backend.name}: no Ascend estimate ({first_line(exc)})", 0, 1)
        results.append(result)
    return results


def contract_value(
    verifications: Sequence[Verification], backend: str
) -> tuple[float, tuple[float, float]] | None:
    """``(speedup, (ci_low, ci_high))`` for ``expect speedup … on BACKEND``, or None.

    ``backend`` is the recipe's name (``onnx``) or a full backend name (``onnx-cpu``). With
    several measured targets of one backend (``onnx cpu`` and ``onnx cuda``) the contract
    reads the slowest, so that it holds on every target it names. None when no target of
    that backend was timed (unavailable, failed, or numerics failed): the contract is then
    "not measured", never "met".

    >>> from surgery.timing import Speedup
    >>> v = Verification("onnx-cpu", "ok", 1e-4, speed=Speedup("onnx-cpu", 2.0, 1.0, 2.0, 1.9, 2.1, 5, 1))
    >>> contract_value([v], "onnx"), contract_value([v], "tvm")
    ((2.0, (1.9, 2.1)), None)
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
