"""ONNX Runtime: ``torch.onnx.export(..., dynamo=True)`` then an ``InferenceSession``.

The dynamo exporter is the route that works on current Hugging Face models; the legacy
TorchScript exporter fails on GPT-2 (``aten::diff``, BACKENDS.md). The ``.onnx`` file is
written to the work directory: it is the deployable artifact of the surgered model.

Install: ``pip install onnx onnxscript onnxruntime`` (CUDA: ``onnxruntime-gpu`` instead of
``onnxruntime``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from surgery.inputs import Inputs

from .base import (
    FlatModel,
    FlatSignature,
    Lowered,
    LoweringError,
    eval_mode,
    first_line,
)

__all__ = ["OnnxBackend", "OnnxLowered"]

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs a warning per missing torchvision op on every export; not ours to show."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class OnnxLowered(Lowered):
    """An ONNX Runtime session over the exported file."""

    def __init__(
        self,
        name: str,
        signature: FlatSignature,
        session: Any,
        path: Path,
        device: str,
        flat_names: list[str],
    ) -> None:
        super().__init__(name, signature, [path])
        self.session = session
        self.flat_names = flat_names  # export-time name of each flat input tensor, in order
        self.device = device
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def _feed(self, tensors: list[Tensor]) -> dict[str, np.ndarray]:
        # The exporter drops inputs the graph does not read (e.g. a mask folded away), so the
        # feed keeps the exported names in order; they are the flat tensors' positions.
        if len(tensors) != len(self.flat_names):
            raise LoweringError(
                f"the model was exported for {len(self.flat_names)} input tensors, "
                f"got {len(tensors)}"
            )
        position = {n: i for i, n in enumerate(self.flat_names)}
        return {n: _numpy(tensors[position[n]]) for n in self.input_names}

    def run_flat(self, tensors: list[Tensor]) -> list[Tensor]:
        outs = self.session.run(self.output_names, self._feed(tensors))
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    def bind(self, inputs: Inputs) -> Callable[[], None]:
        feed = self._feed(self.signature.tensors(inputs))
        if self.device == "cuda":
            # Bind inputs on the device once, so timing measures the graph, not host copies;
            # `run_with_iobinding` returns after the device finished.
            import onnxruntime as ort

            binding = self.session.io_binding()
            for name, array in feed.items():
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)
                )
            for name in self.output_names:
                binding.bind_output(name, "cuda")

            def once_cuda() -> None:
                self.session.run_with_iobinding(binding)

            return once_cuda

        def once() -> None:
            self.session.run(self.output_names, feed)

        return once


class OnnxBackend:
    """``onnx-cpu`` or ``onnx-cuda``: the exported graph run by ONNX Runtime."""

    def __init__(self, device: str = "cpu", *, opset: int | None = None) -> None:
        if device not in _PROVIDERS:
            raise ValueError(f"onnx backend device must be `cpu` or `cuda`, got `{device}`")
        self.device = device
        self.name = f"onnx-{device}"
        self.opset = opset

    @classmethod
    def for_target(cls, device: str, trials: int | None = None) -> OnnxBackend:
        """``target onnx cpu|cuda`` (``trials`` is not used: ONNX Runtime is not tuned)."""
        return cls(device)

    def is_available(self) -> tuple[bool, str]:
        missing = [
            m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None
        ]
        if missing:
            return False, (
                f"{', '.join(missing)} not installed: `pip install onnx onnxscript onnxruntime`"
            )
        import onnxruntime as ort

        provider = _PROVIDERS[self.device]
        if provider not in ort.get_available_providers():
            return False, (
                f"onnxruntime has no {provider} here (providers: "
                f"{', '.join(ort.get_available_providers())}); for CUDA install `onnxruntime-gpu`"
            )
        return True, ""

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> OnnxLowered:
        import onnxruntime as ort

        signature = FlatSignature.of(example_inputs)
        tensors = tuple(signature.tensors(example_inputs))
        workdir.mkdir(parents=True, exist_ok=True)
        path = workdir / "model.onnx"
        with eval_mode(model), warnings.catch_warnings(), _quiet_exporter():
            # The exporter warns at length about things that do not affect a static graph.
            warnings.simplefilter("ignore")
            flat = FlatModel(model, signature).eval()
            names = [f"input_{i}" for i in range(len(tensors))]
            try:
                program = torch.onnx.export(
                    flat,
                    tensors,
                    dynamo=True,
                    input_names=names,
                    opset_version=self.opset,
                    verbose=False,
                    # The exporter's own report files would land in the cwd.
                    report=False,
                )
                if program is None:  # only the legacy exporter returns None
                    raise LoweringError("the ONNX exporter returned no program")
                program.save(str(path))
            except LoweringError:
                raise
            except Exception as exc:
                raise LoweringError(f"ONNX export failed: {first_line(exc)}") from exc
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: ORT logs every fused node otherwise
        try:
            session = ort.InferenceSession(str(path), options, providers=[_PROVIDERS[self.device]])
        except Exception as exc:
            raise LoweringError(
                f"onnxruntime could not load the export: {first_line(exc)}"
            ) from exc
        return OnnxLowered(self.name, signature, session, path, self.device, names)
