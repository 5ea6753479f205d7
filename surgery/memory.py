"""Give freed heap memory back to the operating system.

A pass that replaces layers one at a time (streaming ``decompose``) frees each old weight as
it goes, but glibc keeps freed blocks below its dynamic mmap threshold (up to 32 MiB, the
size of a typical weight) in the heap, so the process's resident size would not fall.
:func:`release_free_memory` asks glibc to return free heap pages (``malloc_trim(0)``); on
other C libraries it does nothing.

>>> release_free_memory() in (True, False)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim() -> ctypes._NamedFuncPointer | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and friends have no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True if the C library could be asked to."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
