"""surgery: a declarative model-surgery language and compiler for PyTorch.

A recipe says what to do (``decompose Linear where params > 100K rank = 0.25``); the
compiler resolves it against a model, runs one pass per statement, checks the model still
works, and measures what it gained.

>>> import surgery
>>> recipe = surgery.parse("decompose Linear rank = 0.5")
>>> surgery.check(recipe)
[]
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

# The language half imports no torch and is loaded now; the model half (load, manager, save)
# on first use (PEP 562), so `surgery check` and `surgery fmt` can back an editor.
from surgery.check import check
from surgery.diagnostics import Diagnostic, DiagnosticError
from surgery.fmt import format_recipe, format_source
from surgery.parse import parse

if TYPE_CHECKING:
    from surgery.fx_surgery import (
        GraphSurgery,
        GraphSurgeryError,
        SurgeryBackend,
        compile_backend,
        rewrite_exported,
        rewrite_graph,
    )
    from surgery.load import LoadedModel, ModelLoadError, load_model
    from surgery.manager import Manager, Run
    from surgery.save import load, save_run, write_model

_LAZY = {
    "GraphSurgery": "surgery.fx_surgery",
    "GraphSurgeryError": "surgery.fx_surgery",
    "SurgeryBackend": "surgery.fx_surgery",
    "compile_backend": "surgery.fx_surgery",
    "rewrite_exported": "surgery.fx_surgery",
    "rewrite_graph": "surgery.fx_surgery",
    "LoadedModel": "surgery.load",
    "Manager": "surgery.manager",
    "ModelLoadError": "surgery.load",
    "Run": "surgery.manager",
    "load": "surgery.save",
    "load_model": "surgery.load",
    "save_run": "surgery.save",
    "write_model": "surgery.save",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


class _Package(ModuleType):
    """Keeps ``surgery.load`` the function: importing the submodule ``surgery.load`` (which
    the function's own module does) would otherwise rebind the package attribute to it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "Diagnostic",
    "DiagnosticError",
    "GraphSurgery",
    "GraphSurgeryError",
    "LoadedModel",
    "Manager",
    "ModelLoadError",
    "Run",
    "SurgeryBackend",
    "__version__",
    "check",
    "compile_backend",
    "format_recipe",
    "format_source",
    "load",
    "load_model",
    "parse",
    "rewrite_exported",
    "rewrite_graph",
    "save_run",
    "write_model",
]
