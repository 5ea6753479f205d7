"""The backend: the generated cell exported to ``model.mindir``, reloaded and run.

:class:`MindirBackend` writes the cell's source to ``model_cell.py`` in the work directory
(MindSpore's graph mode compiles ``construct`` from its Python source), exports the cell
with ``mindspore.export(..., file_format="MINDIR")``, and loads the file back as an
``nn.GraphCell``: :class:`MindirLowered` runs and times that deployable file, not the Python
cell. MindSpore is imported only when a model is lowered or run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from surgery.inputs import Inputs

from ..base import (
    FlatSignature,
    Lowered,
    LoweringError,
    eval_mode,
    export_program,
    first_line,
)
from .codegen import generate_cell_source

__all__ = ["MindirBackend", "MindirLowered"]

INSTALL = "`pip install mindspore==2.10.0` (wheels for CPython 3.10–3.12)"


def _ms_tensor(t: Tensor) -> Any:
    import mindspore as ms

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return ms.Tensor(t.float().numpy()).astype(ms.bfloat16)
    return ms.Tensor(t.numpy())


def _load_module(path: Path) -> Any:
    """Import the generated file under a unique name (MindSpore reads ``construct`` from it)."""
    name = "surgery_mindir_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    name += f"_{path.stat().st_mtime_ns}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise LoweringError(f"mindir: cannot import the generated cell {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # MindSpore's parser resolves globals through sys.modules
    spec.loader.exec_module(module)
    return module


class MindirLowered(Lowered):
    """The reloaded ``model.mindir`` as an ``nn.GraphCell``."""

    def __init__(
        self, name: str, signature: FlatSignature, graph_cell: Any, artifacts: list[Path]
    ) -> None:
        super().__init__(name, signature, artifacts)
        self.graph_cell = graph_cell

    def _outputs(self, out: Any) -> list[Tensor]:
        items = out if isinstance(out, (tuple, list)) else (out,)
        return [torch.from_numpy(np.array(o.asnumpy())) for o in items]

    def run_flat(self, tensors: list[Tensor]) -> list[Tensor]:
        return self._outputs(self.graph_cell(*(_ms_tensor(t) for t in tensors)))

    def bind(self, inputs: Inputs) -> Callable[[], None]:
        args = [_ms_tensor(t) for t in self.signature.tensors(inputs)]
        cell = self.graph_cell

        def once() -> None:
            out = cell(*args)
            # Reading an output waits for the graph to finish (`ms.runtime.synchronize` is
            # not supported on CPU); on CPU the array is a view, not a copy.
            (out[0] if isinstance(out, (tuple, list)) else out).asnumpy()

        return once


class MindirBackend:
    """``mindir-cpu`` (MindSpore CPU runtime) or ``mindir-ascend`` (needs an Ascend NPU).

    >>> b = MindirBackend("ascend")
    >>> b.name, b.is_available()[0]
    ('mindir-ascend', False)
    """

    def __init__(self, device: str = "cpu") -> None:
        if device not in ("cpu", "ascend"):
            raise ValueError(f"mindir backend device must be `cpu` or `ascend`, got `{device}`")
        self.device = device
        self.name = f"mindir-{device}"

    @classmethod
    def for_target(cls, device: str, trials: int | None = None) -> MindirBackend:
        """``target mindir cpu|ascend`` (``trials`` is not used)."""
        return cls(device)

    def is_available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("mindspore") is None:
            return False, f"MindSpore is not installed: {INSTALL}"
        if self.device == "ascend":
            # Checking for the NPU through MindSpore needs the CANN toolkit; without its
            # driver directory there is no NPU to ask about.
            if not Path("/usr/local/Ascend").is_dir():
                return False, (
                    "no Ascend NPU here (no CANN toolkit under /usr/local/Ascend); "
                    "Ascend timings cannot be measured on this machine"
                )
            try:
                import mindspore as ms

                if not ms.hal.is_available("Ascend"):
                    return False, "MindSpore sees no Ascend NPU on this machine"
            except Exception as exc:
                return False, f"MindSpore cannot use Ascend here: {first_line(exc)}"
        return True, ""

    def lower(self, model: nn.Module, example_inputs: Inputs, workdir: Path) -> MindirLowered:
        available, why = self.is_available()
        if not available:
            raise LoweringError(why)
        import mindspore as ms

        with eval_mode(model):
            program, signature = export_program(model, example_inputs)
        source, state = generate_cell_source(program, device=self.device)
        workdir.mkdir(parents=True, exist_ok=True)
        source_path = workdir / "model_cell.py"
        source_path.write_text(source)
        mindir = workdir / "model.mindir"
        # Process-wide MindSpore state: graph mode (export needs it) on this device.
        ms.set_context(mode=ms.GRAPH_MODE)
        ms.set_device("Ascend" if self.device == "ascend" else "CPU")
        try:
            module = _load_module(source_path)
            cell = module.LoweredCell(
                [_ms_tensor(t) for _, t in state.params], [_ms_tensor(t) for _, t in state.consts]
            )
            cell.set_train(False)
            example = [_ms_tensor(t) for t in signature.tensors(example_inputs)]
            ms.export(cell, *example, file_name=str(workdir / "model"), file_format="MINDIR")
            graph_cell = ms.nn.GraphCell(ms.load(str(mindir)))
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(
                f"MindSpore could not compile or export the cell ({source_path}): {_ms_error(exc)}"
            ) from exc
        return MindirLowered(self.name, signature, graph_cell, [mindir, source_path])


def _ms_error(exc: BaseException) -> str:
    """The first meaningful line of a MindSpore error (they open with a dashed banner)."""
    for line in str(exc).splitlines():
        text = line.strip(" -")
        if text and not text.startswith("- ") and "Error Message" not in text:
            return f"{type(exc).__name__}: {text}"
    return first_line(exc)
