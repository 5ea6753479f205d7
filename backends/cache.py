"""The on-disk cache of slow measurements: TVM tuning databases and layer latency tables.

``$SURGERY_CACHE_DIR`` overrides the location (tests point it at a temporary directory);
otherwise ``$XDG_CACHE_HOME/surgery`` or ``~/.cache/surgery``.

>>> import os
>>> os.environ["SURGERY_CACHE_DIR"] = "/tmp/surgery-doctest-cache"
>>> str(cache_dir("latency"))
'/tmp/surgery-doctest-cache/latency'
>>> del os.environ["SURGERY_CACHE_DIR"]
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """``<cache root>/<parts…>``, created if missing."""
    root = os.environ.get("SURGERY_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "surgery"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
