"""`LowRankLinear`: a `Linear(in→out)` factored into `Linear(in→r)` then `Linear(r→out)`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.lowrank import Factors
from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["LowRankLinear"]


@register_module
class LowRankLinear(SurgeryModule):
    """``y = second(first(x))`` with ``first: in→rank`` (no bias) and ``second: rank→out``.

    It replaces ``Linear(in, out)`` whose weight ``W`` (``[out, in]``) is approximated by
    ``W ≈ second.weight @ first.weight``; the original bias lives in ``second``. It costs
    ``rank·(in+out)`` weights instead of ``in·out``, so it only pays for
    ``rank < in·out/(in+out)``.

    >>> m = LowRankLinear(16, 32, rank=4)
    >>> m(torch.zeros(2, 16)).shape
    torch.Size([2, 32])
    >>> sum(p.numel() for p in m.parameters()) == 4 * (16 + 32) + 32
    True

    Built from the factors of a layer's weight (:meth:`from_factors`), it is that layer when
    the rank is full:

    >>> from surgery.lowrank import svd_factors
    >>> lin = nn.Linear(6, 4, dtype=torch.float64)
    >>> pair = LowRankLinear.from_factors(lin, svd_factors(lin.weight, rank=4))
    >>> x = torch.randn(3, 6, dtype=torch.float64)
    >>> bool(torch.allclose(pair(x), lin(x)))
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False, dtype=torch_dtype)
        self.second = nn.Linear(rank, out_features, bias=bias, dtype=torch_dtype)

    @classmethod
    def from_factors(cls, layer: nn.Module, factors: Factors) -> LowRankLinear:
        """A pair holding ``factors`` (``W ≈ left @ right``) and the bias of ``layer``.

        ``layer`` is the layer the pair replaces: an ``nn.Linear``, a Hugging Face ``Conv1D``
        (``factors`` are then those of its transposed weight) or a ``LowRankLinear`` being
        re-factored. The pair takes its dtype, device and training mode.
        """
        weight = layer.first.weight if isinstance(layer, LowRankLinear) else _weight(layer)
        bias = _bias(layer)
        out_f, in_f = factors.left.shape[0], factors.right.shape[1]
        dtype = str(weight.dtype).removeprefix("torch.")
        module = cls(in_f, out_f, factors.rank, bias=bias is not None, dtype=dtype)
        module.to(weight.device)
        with torch.no_grad():
            module.first.weight.copy_(factors.right)  # [r, in]
            module.second.weight.copy_(factors.left)  # [out, r]
            if bias is not None:
                module.second.bias.copy_(bias)
        module.train(layer.training)
        return module

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
            "dtype": str(self.first.weight.dtype).removeprefix("torch."),
        }

    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``second.weight @ first.weight`` (``[out, in]``), for inspection."""
        return self.second.weight @ self.first.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _weight(module: nn.Module) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"`{type(module).__name__}` has no weight tensor")
    return w


def _bias(module: nn.Module) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) else None
