"""An Ascend latency **estimate** (a roofline over the model's aten ops), never a measurement.

No Ascend NPU is on this machine, so ``target mindir`` can only time MindSpore's CPU runtime.
This module estimates what the surgered model gains on an Ascend device from the device's
published peak figures, and every place that shows the result labels it an estimate.

The model runs once in torch on the example inputs under a dispatch mode that sees each aten
op after ``linear``, ``matmul`` and friends decompose into ``mm`` / ``addmm`` / ``bmm``:

- **matrix ops** (``mm``, ``addmm``, ``bmm``, ``baddbmm``, ``convolution`` as its im2col GEMM,
  fused attention as its two GEMMs) run on the cube unit, which works on ``tile``-sized blocks
  (16 × 16 × 16 on Ascend's cube), so each GEMM dimension is padded up to the tile: a rank-12
  factor costs what a rank-16 one does. Time = max(padded FLOPs / peak, bytes / bandwidth);
- **every other op** that moves data (norms, activations, softmax, adds, copies) is bound by
  memory: bytes / bandwidth. Views, reshapes of contiguous tensors and other metadata-only ops
  cost nothing;
- bytes are the op's tensor inputs and outputs at the device's activation width (2 bytes,
  float16) for floating tensors and at their own width otherwise; weights count each time
  an op reads them.

What it leaves out, so the real speedup can differ either way: kernel launch and scheduling
overhead, operator fusion by the graph compiler (which removes memory traffic between fused
elementwise ops), caches, and the cube's efficiency on small GEMMs.

>>> import torch
>>> from surgery.inputs import Inputs
>>> spec = DeviceSpec("toy", peak_flops=1e12, bandwidth=1e12, tile=16, source="a test")
>>> est = estimate(torch.nn.Linear(64, 48), Inputs((torch.randn(10, 64),), {}), spec)
>>> est.matrix_flops  # 10 rows padded to 16: 2·16·64·48
98304
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from surgery.inputs import Inputs

from .base import eval_mode

__all__ = [
    "ASCEND_910",
    "DeviceSpec",
    "Estimate",
    "SpeedupEstimate",
    "estimate",
    "estimate_speedup",
]


@dataclass(frozen=True)
class DeviceSpec:
    """The published peak figures an estimate is computed from."""

    name: str
    peak_flops: float  # float16 FLOP/s of the matrix (cube) units
    bandwidth: float  # bytes/s of device memory
    tile: int  # GEMM block edge of the matrix unit
    source: str  # where the figures come from (shown with every estimate)
    activation_bytes: int = 2  # float16


#: Ascend 910: 32 Da Vinci cores whose cube units do 16×16×16 multiply-adds per cycle,
#: 256 TFLOPS float16 (Huawei's announced peak), HBM2 at 1.2 TB/s.
ASCEND_910 = DeviceSpec(
    name="Ascend 910",
    peak_flops=256e12,
    bandwidth=1.2e12,
    tile=16,
    source="published peak: 256 TFLOPS float16 on 16×16×16 cube units, HBM2 at 1.2 TB/s",
)


@dataclass(frozen=True)
class Estimate:
    """Estimated latency of one forward: matrix (cube) time and memory-bound time."""

    device: str
    matrix_ms: float
    other_ms: float
    matrix_flops: int  # padded to the tile
    bytes_moved: int
    ops: int  # aten ops counted (metadata-only ops excluded)

    @property
    def ms(self) -> float:
        return self.matrix_ms + self.other_ms


# Ops that only reinterpret metadata (or are free on any device): no time.
_FREE = {
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "alias",
    "detach",
    "as_strided",
    "split",
    "split_with_sizes",
    "unbind",
    "chunk",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "size",
    "stride",
    "dim",
    "is_contiguous",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
}


def _pad(n: int, tile: int) -> int:
    return max(tile, math.ceil(n / tile) * tile)


def _gemm(m: int, k: int, n: int, tile: int, batch: int = 1) -> int:
    """FLOPs of ``batch`` (m×k)·(k×n) products with every dimension padded to the tile."""
    return 2 * batch * _pad(m, tile) * _pad(k, tile) * _pad(n, tile)


def _matrix_flops(name: str, args: Sequence[Any], out: Any, tile: int) -> int | None:
    """Padded FLOPs of a matrix op, or None when ``name`` is not one."""
    if name == "mm":
        (m, k), n = args[0].shape, args[1].shape[1]
        return _gemm(m, k, n, tile)
    if name == "addmm":
        (m, k), n = args[1].shape, args[2].shape[1]
        return _gemm(m, k, n, tile)
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        bsz, m, k = a.shape
        return _gemm(m, k, b.shape[2], tile, bsz)
    if name == "convolution":
        w, transposed, groups = args[1], args[6], int(args[8])
        # A transposed conv is the GEMM of its matching forward conv: input ↔ output.
        grid = args[0] if transposed else out  # the positions the GEMM's rows run over
        rows = grid.shape[0] * math.prod(grid.shape[2:])
        g_in, g_out = (
            (w.shape[0] // groups, w.shape[1]) if transposed else (w.shape[1], w.shape[0] // groups)
        )
        return _gemm(rows, g_in * math.prod(w.shape[2:]), g_out, tile, groups)
    if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
        q, key, v = args[0], args[1], args[2]
        batch = math.prod(q.shape[:-2])
        lq, e, s, ev = q.shape[-2], q.shape[-1], key.shape[-2], v.shape[-1]
        return _gemm(lq, e, s, tile, batch) + _gemm(lq, s, ev, tile, batch)
    return None


def _bytes(values: Sequence[Any], activation_bytes: int) -> int:
    total = 0
    for v in values:
        if isinstance(v, Tensor):
            width = activation_bytes if v.is_floating_point() else v.element_size()
            total += v.numel() * width
    return total


class _Roofline(TorchDispatchMode):
    def __init__(self, spec: DeviceSpec) -> None:
        super().__init__()
        self.spec = spec
        self.matrix_s = 0.0
        self.other_s = 0.0
        self.flops = 0
        self.bytes = 0
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in _FREE:
            return out
        spec = self.spec
        flat_in, _ = tree_flatten((args, kwargs or {}))
        flat_out, _ = tree_flatten(out)
        moved = _bytes(flat_in, spec.activation_bytes) + _bytes(flat_out, spec.activation_bytes)
        self.ops += 1
        self.bytes += moved
        memory_s = moved / spec.bandwidth
        flops = _matrix_flops(name, args, out, spec.tile)
        if flops is None:
            self.other_s += memory_s
        else:
            self.flops += flops
            self.matrix_s += max(flops / spec.peak_flops, memory_s)
        return out


def estimate(model: nn.Module, inputs: Inputs, spec: DeviceSpec = ASCEND_910) -> Estimate:
    """The roofline estimate of one forward of ``model`` on ``inputs`` (see the module text).

    The model runs once in eval mode and without gradients; its training flag is restored.
    """
    mode = _Roofline(spec)
    with eval_mode(model), torch.no_grad(), mode:
        inputs.call(model)
    return Estimate(
        device=spec.name,
        matrix_ms=mode.matrix_s * 1e3,
        other_ms=mode.other_s * 1e3,
        matrix_flops=mode.flops,
        bytes_moved=mode.bytes,
        ops=mode.ops,
    )


@dataclass(frozen=True)
class SpeedupEstimate:
    """Original against surgered, both estimated on one device. ``str()`` labels it."""

    spec: DeviceSpec
    original: Estimate
    surgered: Estimate

    @property
    def speedup(self) -> float:
        return self.original.ms / max(self.surgered.ms, 1e-12)

    def __str__(self) -> str:
        o, s = self.original, self.surgered
        return (
            f"{self.spec.name} estimate {self.speedup:.2f}× ({o.ms:.3g} ms → {s.ms:.3g} ms: "
            f"matrix work {o.matrix_ms:.3g} → {s.matrix_ms:.3g} ms, other ops "
            f"{o.other_ms:.3g} → {s.other_ms:.3g} ms unfused; a roofline from the "
            f"{self.spec.source}; not a measurement)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "device": self.spec.name,
            "kind": "estimate (roofline), not a measurement",
            "source": self.spec.source,
            "speedup": self.speedup,
            "ms": [self.original.ms, self.surgered.ms],
            "matrix_ms": [self.original.matrix_ms, self.surgered.matrix_ms],
            "other_ms": [self.original.other_ms, self.surgered.other_ms],
        }


def estimate_speedup(
    original: nn.Module, surgered: nn.Module, inputs: Inputs, spec: DeviceSpec = ASCEND_910
) -> SpeedupEstimate:
    """Estimate both models on ``spec`` (see :func:`estimate`)."""
    return SpeedupEstimate(spec, estimate(original, inputs, spec), estimate(surgered, inputs, spec))
