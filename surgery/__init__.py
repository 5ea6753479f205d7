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

from surgery.check import check
from surgery.diagnostics import Diagnostic, DiagnosticError
from surgery.fmt import format_recipe, format_source
from surgery.load import LoadedModel, ModelLoadError, load_model
from surgery.manager import Manager, Run
from surgery.parse import parse
from surgery.save import load, write_model

__all__ = [
    "Diagnostic",
    "DiagnosticError",
    "LoadedModel",
    "Manager",
    "ModelLoadError",
    "Run",
    "__version__",
    "check",
    "format_recipe",
    "format_source",
    "load",
    "load_model",
    "parse",
    "write_model",
]
