"""PyTorch itself as a backend: eager, or ``torch.compile`` (inductor), on CPU or CUDA.

Eager is the reference every other backend is checked against; as a *target* it measures
what the surgered model gains without any compiler. Inductor fuses elementwise work around
the GEMMs; it gave no gain on matmul-bound graphs here (BACKENDS.md) and a cold compile can
take many seconds, which is lowering time, not timed.

>>> import torch
>>> from surgery.inputs import Inputs
>>> low = TorchBackend().lower(torch.nn.Linear(4, 2), Inputs((torch.ones(3, 4),), {}), Path("."))
>>> [tuple(t.shape) for t in low(Inputs((torch.ones(3, 4),), {}))]
[(3, 2)]
"""

from __future__ import annotations

import copy
import importlib
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from surgery.inputs import Inputs

from .base import FlatModel, FlatSignature, Lowered, LoweringError, first_line

__all__ = ["TorchBackend", "TorchLowered"]


class TorchLowered(Lowered):
    """A (possibly compiled) copy of the model on its device."""

    def __init__(
        self, name: str, signature: FlatSignature, fn: Callable[..., Any], device: torch.device
    ) -> None:
        super().__init__(name, signature, [])
        self.fn = fn
        self.device = device

    def _sync(self) -> None:
        # CUDA launches are asynchronous: without a sync only the launch would be timed.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run_flat(self, tensors: list[Tensor]) -> list[Tensor]:
        with torch.inference_mode():
            outs = self.fn(*(t.to(self.device) for t in tensors))
            self._sync()
        return [o.detach().cpu() for o in outs]

    def bind(self, inputs: Inputs) -> Callable[[], None]:
        tensors = [t.to(self.device) for t in self.signature.tensors(inputs)]

        def once() -> None:
            with torch.inference_mode():
                self.fn(*tensors)
            self._sync()

        return once


def _own_code(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` rebound to a copy of its function with a code object of its own.

    Dynamo keeps compiled programs per code object, at most ``recompile_limit`` (8) of them:
    every model lowered through :meth:`FlatModel.forward` would share one cache, and from
    the ninth model on (a bench over several models; the latency table of ``keep if
    faster``, which lowers every candidate layer) Dynamo silently runs the model eagerly
    instead of compiling it. With its own code object each lowering is one cache entry.
    """
    bound = method.__self__  # type: ignore[attr-defined]
    fn = method.__func__  # type: ignore[attr-defined]
    copied = types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )
    return types.MethodType(copied, bound)


class TorchBackend:
    """``TorchBackend("cpu")`` eager; ``TorchBackend("cuda", compiled=True)`` inductor on CUDA.

    Names: ``torch-cpu``, ``torch-cuda``, ``torch-inductor`` (CPU), ``torch-inductor-cuda``.
    The model is deep-copied before it is moved or compiled, so the caller's model stays as
    it was (on its device, uncompiled).
    """

    def __init__(self, device: str = "cpu", *, compiled: bool = False) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"torch backend device must be `cpu` or `cuda`, got `{device}`")
        self.device = device
        self.compiled = compiled
        if compiled:
            self.name = "torch-inductor" + ("-cuda" if device == "cuda" else "")
        else:
            self.name = f"torch-{device}"

    @classmethod
    def for_target(cls, device: str, trials: int | None = None) -> TorchBackend:
        """``target torch cpu|cuda|inductor`` (``inductor``: compiled, on the CPU)."""
        if device == "inductor":
            return cls("cpu", compiled=True)
        return cls(device)

    def is_available(self) -> tuple[bool, str]:
        if self.device == "cuda" and not torch.cuda.is_available():
            return (
                False,
                "no CUDA device is visible to torch (`torch.cuda.is_available()` is False)",
            )
        if self.compiled:
            try:  # builds without inductor (or without a C compiler for it) fail here
                importlib.import_module("torch._inductor")
            except Exception as exc:
                return False, f"torch.compile (inductor) cannot be imported: {first_line(exc)}"
        return True, ""

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> TorchLowered:
        signature = FlatSignature.of(example_inputs)
        device = torch.device(self.device)
        flat = FlatModel(copy.deepcopy(model), signature).eval().to(device)
        fn: Callable[..., Any] = flat
        if self.compiled:
            flat.forward = _own_code(flat.forward)  # type: ignore[method-assign]
            # Compile now, on the example inputs, so the cold compile is lowering time and
            # never lands in the timed loop (warm-up alone may not cover recompiles).
            fn = torch.compile(flat, backend="inductor", dynamic=False)
            try:
                with torch.inference_mode():
                    fn(*(t.to(device) for t in signature.tensors(example_inputs)))
            except Exception as exc:
                raise LoweringError(f"torch.compile failed: {first_line(exc)}") from exc
        return TorchLowered(self.name, signature, fn, device)
