"""Input statistics of the layers ``decompose`` factors, from the calibration batches.

The data-aware methods truncate in a metric of each layer's inputs: ASVD (arXiv 2312.05821)
scales input channel ``i`` by ``s_i = mean|x_i|^α`` (:data:`ASVD_ALPHA`), SVD-LLM
(arXiv 2403.07378) whitens by ``XᵀX``. :func:`collect_input_stats` gathers both for all
selected layers in *one* pass over the calibration batches, with forward pre-hooks, in
float64. Rows at padded positions (``attention_mask == 0`` of a batch whose hooked input is
``[B, T, in]``) are left out: the model's outputs there mean nothing. A 1×1 convolution
contributes one row per output pixel (the input pixels its stride reads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from surgery.modules.lowrank_conv import LowRankConv2d

__all__ = ["ASVD_ALPHA", "LayerStats", "collect_input_stats"]

#: ASVD exponent: ``s = mean|x|^α`` (the paper's best α on LLaMA is 0.5).
ASVD_ALPHA = 0.5


@dataclass
class LayerStats:
    """Input statistics of one layer over the calibration rows (float64).

    ``abs_sum`` is ``Σ|x|`` per input channel (``[in]``), ``xtx`` is ``Σ xᵀx`` (``[in, in]``),
    ``rows`` the number of input rows (tokens, or pixels of a 1×1 convolution) seen.
    """

    rows: int = 0
    abs_sum: Tensor | None = None  # [in], float64
    xtx: Tensor | None = None  # [in, in], float64

    @property
    def abs_mean(self) -> Tensor:
        """Mean ``|x|`` per input channel (``[in]``)."""
        assert self.abs_sum is not None, "collected without abs_mean"
        return self.abs_sum / max(self.rows, 1)

    @property
    def asvd_scale(self) -> Tensor:
        """ASVD's per-channel scale ``s = mean|x|^α`` (``[in]``), at least ``1e-6`` so that a
        dead channel does not blow up ``1/s`` (as in :func:`~surgery.lowrank.asvd_factors`)."""
        return self.abs_mean.abs().pow(ASVD_ALPHA).clamp_min(1e-6)


def _rows(module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    """The input rows ``[N, in]`` a layer multiplies by its weight."""
    if isinstance(module, nn.Conv2d | LowRankConv2d):  # (B, C, H, W): one row per output pixel
        sh, sw = module.stride
        x = x[:, :, ::sh, ::sw]  # a 1×1 conv reads every stride-th pixel; padding adds zeros
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask]  # (B, T, in) -> (tokens, in): real tokens only
    return x.reshape(-1, x.shape[-1])


def _attention_mask(batch: Any) -> Tensor | None:
    mask = getattr(batch, "kwargs", {}).get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask.bool()
    return None


def collect_input_stats(
    model: nn.Module,
    modules: dict[str, nn.Module],
    batches: list[Any],
    *,
    abs_mean: bool = False,
    gram: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, LayerStats]:
    """Input statistics of several layers in one pass over ``batches`` (``Inputs`` objects).

    Forward pre-hooks on every module of ``modules`` (path → module) accumulate, in float64,
    ``Σ|x|`` per channel (``abs_mean``) and ``XᵀX`` (``gram``). A module called several
    times per forward accumulates every call.

    >>> from surgery.inputs import Inputs
    >>> lin = nn.Linear(3, 2)
    >>> x = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 0.0]])
    >>> stats = collect_input_stats(lin, {"": lin}, [Inputs((x,), {})], abs_mean=True, gram=True)
    >>> stats[""].rows, stats[""].abs_mean.tolist(), stats[""].xtx[0].tolist()
    (2, [2.0, 1.0, 0.0], [10.0, -2.0, 0.0])
    """
    stats = {path: LayerStats() for path in modules}
    current: dict[str, Tensor | None] = {"mask": None}
    handles = []

    def hook_for(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            rows = _rows(module, args[0].detach(), current["mask"]).to(torch.float64)  # [N, in]
            s = stats[path]
            s.rows += int(rows.shape[0])
            if abs_mean:
                a = rows.abs().sum(0)
                s.abs_sum = a if s.abs_sum is None else s.abs_sum + a
            if gram:
                g = rows.T @ rows  # [in, in]
                s.xtx = g if s.xtx is None else s.xtx + g

        return hook

    for path, module in modules.items():
        handles.append(module.register_forward_pre_hook(hook_for(path)))
    try:
        for i, batch in enumerate(batches):
            current["mask"] = _attention_mask(batch)
            batch.call(model)
            if progress is not None:
                progress("calibrating", i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
    return stats
