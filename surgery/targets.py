"""The one table of backends: what a `target` line and `expect ... on` may name.

A leaf module (no torch): the checker, the command line, the manager and `surgery.backends`
all read it, so a backend or a device is added here once.

* :data:`BACKENDS` — the language: every backend and its devices a recipe may write;
* :data:`TARGET_SUPPORT` — what this build implements of those (``target mindir ascend`` is
  in the language, but nothing here can run or time an Ascend NPU);
* :data:`DEFAULT_DEVICE` — the device a bare ``target B`` means;
* :data:`EXPECT_ON` — the backends ``expect speedup ... on B`` can name.

>>> DEFAULT_DEVICE["tvm"], "mindir ascend" in (TARGET_SUPPORT["device"] or ())
('llvm', False)
>>> EXPECT_ON <= set(BACKENDS)
True
"""

from __future__ import annotations

__all__ = ["BACKENDS", "DEFAULT_DEVICE", "EXPECT_ON", "TARGET_SUPPORT"]

BACKENDS: dict[str, tuple[str, ...]] = {
    "torch": ("cpu", "cuda", "inductor"),
    "onnx": ("cpu", "cuda"),
    "tvm": ("llvm", "cuda"),
    "mindir": ("cpu", "ascend"),
}

DEFAULT_DEVICE: dict[str, str] = {"torch": "cpu", "onnx": "cpu", "tvm": "llvm", "mindir": "cpu"}

# What the code implements, not what this machine has (an unavailable device is skipped with
# a reason at run time). `trials` is accepted for every backend and used by `tvm` only.
TARGET_SUPPORT: dict[str, set[str] | None] = {
    "backend": set(BACKENDS),
    "device": {
        f"{backend} {device}"
        for backend, devices in BACKENDS.items()
        for device in devices
        if (backend, device) != ("mindir", "ascend")
    },
    "trials": None,
}

EXPECT_ON: set[str] = set(BACKENDS)
