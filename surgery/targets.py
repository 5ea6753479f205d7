"""The one table of backends: what a `target` line and `expect ... on` may name.

A leaf module (no torch): the checker, the command line, the manager and `surgery.backends`
all read it, so a backend or a device is added here once.

* :data:`BACKENDS` — the language: every backend and its devices a recipe may write;
* :data:`TARGET_SUPPORT` — what this build implements of those (``target mindir ascend`` is
  in the language, but nothing here can run or time an Ascend NPU);
* :data:`DEFAULT_DEVICE` — the device a bare ``target B`` means;
* :data:`EXPECT_ON` — the backends ``expect speedup ... on B`` can name;
* :data:`TILE` — per backend name, the rank step at which its latency moves (:func:`tile_for`);
* :data:`LOADERS` — the class that lowers to each backend (``module:Class``, built by
  ``surgery.backends.get_backend`` with ``Class.for_target(device, trials)``).

>>> DEFAULT_DEVICE["tvm"], "mindir ascend" in (TARGET_SUPPORT["device"] or ())
('llvm', False)
>>> EXPECT_ON <= set(BACKENDS)
True
>>> tile_for("torch-cpu"), tile_for("torch-cuda"), tile_for("unknown")
(8, 16, 8)
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "DEFAULT_DEVICE",
    "EXPECT_ON",
    "LOADERS",
    "TARGET_SUPPORT",
    "TILE",
    "tile_for",
]

BACKENDS: dict[str, tuple[str, ...]] = {
    "torch": ("cpu", "cuda", "inductor"),
    "onnx": ("cpu", "cuda"),
    "tvm": ("llvm", "cuda"),
    "mindir": ("cpu", "ascend"),
}

DEFAULT_DEVICE: dict[str, str] = {"torch": "cpu", "onnx": "cpu", "tvm": "llvm", "mindir": "cpu"}

LOADERS: dict[str, str] = {
    "torch": "surgery.backends.torch_backend:TorchBackend",
    "onnx": "surgery.backends.onnx_backend:OnnxBackend",
    "tvm": "surgery.backends.tvm_backend:TvmBackend",
    "mindir": "surgery.backends.mindir:MindirBackend",
}

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

# Rank step per backend name. On this machine's CPU (AVX-512, MKL) a 768→r→768 pair at 1024
# tokens was ~7% faster at multiples of 8 than at the ranks just above them, with no extra gain
# at multiples of 16, so CPU targets step by 8. CUDA tensor cores want multiples of 8 (TF32) or
# 16 (fp16/bf16 MMA k-depth); 16 is the default. The Ascend cube unit works on 16×16 fractals.
TILE: dict[str, int] = {
    "torch-cpu": 8,
    "torch-inductor": 8,
    "onnx-cpu": 8,
    "tvm-llvm": 8,
    "torch-cuda": 16,
    "torch-inductor-cuda": 16,
    "onnx-cuda": 16,
    "tvm-cuda": 16,
    "mindir-ascend": 16,
    "mindir-cpu": 8,
}


def tile_for(backend: str) -> int:
    """The rank step of a backend name (8 when unknown: every SIMD width here divides it)."""
    return TILE.get(backend, 8)
