"""surgery: a declarative model-surgery language and compiler for PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"
