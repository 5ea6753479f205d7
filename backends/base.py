"""The `Backend` protocol and what every backend shares: flat tensor calling and `Lowered`.

A backend turns a torch model plus example inputs into a *lowered* program (an ONNX Runtime
session, a TVM virtual machine, a compiled torch graph) that runs on one device. Lowering is
static-shape: the program is specialised to the example inputs' shapes and to their
non-tensor arguments (``use_cache=False``), which is what deployment and timing need.

Every lowered program is called with tensors only, in the order of
``torch.utils._pytree`` leaves of ``(args, kwargs)``; :class:`FlatModel` wraps a model so that
exporters see exactly that signature and return a flat tuple of output tensors in
:func:`surgery.inputs.flatten_outputs` order.

>>> import torch
>>> from surgery.inputs import Inputs
>>> ins = Inputs((torch.ones(2, 3),), {"scale": 2.0, "mask": torch.zeros(2, dtype=torch.long)})
>>> sig = FlatSignature.of(ins)
>>> [tuple(t.shape) for t in sig.tensors(ins)]
[(2, 3), (2,)]
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from surgery.diagnostics import first_line
from surgery.inputs import Inputs, flatten_outputs

__all__ = [
    "Backend",
    "BackendUnavailable",
    "FlatModel",
    "FlatSignature",
    "Lowered",
    "LoweringError",
    "eval_mode",
    "export_program",
    "first_line",
]


class LoweringError(Exception):
    """A model could not be lowered or run on a backend; ``str(err)`` is a user-facing sentence."""


class BackendUnavailable(LoweringError):
    """The backend's package or device is missing here; the message says which and how to add it."""


@dataclass(frozen=True)
class FlatSignature:
    """How one ``Inputs`` maps to a flat list of tensors, and back.

    ``spec`` is the pytree structure of ``(args, kwargs)``; ``constants`` holds the non-tensor
    leaves (``None`` where a tensor goes). Two calls with the same signature may share one
    lowered program.
    """

    spec: Any
    constants: tuple[Any, ...]

    @classmethod
    def of(cls, inputs: Inputs) -> FlatSignature:
        leaves, spec = pytree.tree_flatten((tuple(inputs.args), dict(inputs.kwargs)))
        return cls(spec, tuple(None if isinstance(v, Tensor) else v for v in leaves))

    def tensors(self, inputs: Inputs) -> list[Tensor]:
        """The tensor leaves of ``inputs``; ``LoweringError`` if its structure differs."""
        leaves, spec = pytree.tree_flatten((tuple(inputs.args), dict(inputs.kwargs)))
        consts = tuple(None if isinstance(v, Tensor) else v for v in leaves)
        if spec != self.spec or consts != self.constants:
            raise LoweringError(
                "inputs differ in structure or non-tensor arguments from the inputs the model "
                "was lowered with: lower it again for these inputs"
            )
        return [v for v in leaves if isinstance(v, Tensor)]

    def rebuild(self, tensors: tuple[Tensor, ...]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` with ``tensors`` put back at the tensor positions."""
        it = iter(tensors)
        leaves = [next(it) if c is None else c for c in self.constants]
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        return tuple(args), dict(kwargs)


class FlatModel(nn.Module):
    """``model`` called with tensors only, returning a flat tuple of output tensors.

    Exporters (``torch.export``, the ONNX exporter) then see one plain signature whatever
    the model's own (keyword arguments, Hugging Face ``ModelOutput``).
    """

    def __init__(self, model: nn.Module, signature: FlatSignature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        args, kwargs = self.signature.rebuild(tensors)
        return tuple(flatten_outputs(self.model(*args, **kwargs)))


class Lowered(abc.ABC):
    """A model lowered for one backend and device, specialised to one input signature.

    ``__call__`` is for numerics (outputs come back as CPU tensors); :meth:`bind` is for
    timing: it converts and transfers the inputs once, so the returned callable times the
    compute alone, and it returns only when the device has finished.
    """

    def __init__(self, backend: str, signature: FlatSignature, artifacts: list[Path]) -> None:
        self.backend = backend
        self.signature = signature
        self.artifacts = artifacts

    @abc.abstractmethod
    def run_flat(self, tensors: list[Tensor]) -> list[Tensor]:
        """Run on flat input tensors; outputs as CPU tensors."""

    @abc.abstractmethod
    def bind(self, inputs: Inputs) -> Callable[[], None]:
        """A zero-argument callable running one call to completion on prepared inputs."""

    def __call__(self, inputs: Inputs) -> list[Tensor]:
        """Outputs (CPU tensors, :func:`~surgery.inputs.flatten_outputs` order) on ``inputs``."""
        return self.run_flat(self.signature.tensors(inputs))


@runtime_checkable
class Backend(Protocol):
    """One lowering target: ``name`` such as ``"onnx-cpu"``; ``device`` such as ``"cpu"``."""

    name: str
    device: str

    @classmethod
    def for_target(cls, device: str, trials: int | None = None) -> Backend:
        """The backend for ``target BACKEND DEVICE [trials N]`` (what `get_backend` calls)."""
        ...

    def is_available(self) -> tuple[bool, str]:
        """``(True, "")`` or ``(False, reason)`` naming what is missing and how to add it."""
        ...

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> Lowered:
        """Lower ``model`` for ``example_inputs``' signature; files go under ``workdir``."""
        ...


@dataclass
class _Eval:
    """A model in eval mode for the duration of a lowering (restored afterwards)."""

    model: nn.Module
    was_training: bool = field(default=False)

    def __enter__(self) -> nn.Module:
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def eval_mode(model: nn.Module) -> _Eval:
    """``with eval_mode(model):`` lower with dropout off, then restore the training flag."""
    return _Eval(model)


def export_program(model: nn.Module, inputs: Inputs) -> tuple[Any, FlatSignature]:
    """``torch.export`` (non-strict) of ``FlatModel(model)`` on ``inputs``.

    Non-strict export is the route that works on current Hugging Face models (BACKENDS.md);
    ``symbolic_trace`` does not.
    """
    signature = FlatSignature.of(inputs)
    flat = FlatModel(model, signature).eval()
    tensors = tuple(signature.tensors(inputs))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's own pytree deprecation warnings, raised from inside export.
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.export.export(flat, tensors, strict=False)
    except Exception as exc:
        raise LoweringError(f"`torch.export` failed: {first_line(exc)}") from exc
    return program, signature
