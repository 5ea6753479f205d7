"""Backends: lower the original and the surgered model to a target, check numerics, time both.

One :class:`Backend` protocol (``name``, ``device``, ``is_available()``, ``lower()``) with one
file per target, and one shared :func:`verify`. The manager and the CLI call
:func:`run_targets` for a recipe's ``target`` statements (``surgery.contracts`` reads
their speedups for ``expect speedup … on B``); the checker reads :data:`TARGET_SUPPORT` and
:data:`EXPECT_ON` (from :mod:`surgery.targets`).

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

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from surgery.targets import DEFAULT_DEVICE, EXPECT_ON, LOADERS, TARGET_SUPPORT

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
    module, _, name = LOADERS[backend].partition(":")
    cls = getattr(importlib.import_module(module), name)
    assert device is not None
    return cls.for_target(device, trials)  # type: ignore[no-any-return]


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
