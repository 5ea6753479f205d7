"""`LowRankConv2d`: a 1×1 `Conv2d(C→S)` factored into 1×1 `C→r` then 1×1 `r→S` (SVD split)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from surgery.lowrank import Factors
from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["LowRankConv2d", "PaddingMode", "pair"]

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """A conv's 2-D size argument as ``(h, w)`` ints (``3`` → ``(3, 3)``)."""
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


@register_module
class LowRankConv2d(SurgeryModule):
    """``y = second(first(x))``: a 1×1 convolution ``C→S`` as two 1×1 convolutions.

    A 1×1 convolution is a ``Linear`` applied at every pixel, so it takes the same SVD
    split as :class:`~surgery.modules.LowRankLinear`: ``first`` is ``C→rank`` (no bias) and
    carries the original stride and padding, ``second`` is ``rank→S`` with the original bias.
    Padding stays on ``first``: a bias-free pointwise map sends padded zeros (or copied edge
    pixels) to what the original saw there, so the output equals the original's at every
    position. It costs ``rank·(C+S)`` weights instead of ``C·S``.

    >>> m = LowRankConv2d(8, 16, rank=4)
    >>> m(torch.zeros(2, 8, 5, 5)).shape
    torch.Size([2, 16, 5, 5])
    >>> sum(p.numel() for p in m.parameters()) == 4 * (8 + 16) + 16
    True

    Built from the factors of a 1×1 convolution's ``[S, C]`` matrix (:meth:`from_factors`),
    it is that convolution when the rank is full, stride and padding included:

    >>> from surgery.lowrank import svd_factors
    >>> conv = nn.Conv2d(6, 5, 1, stride=2, padding=1, dtype=torch.float64)
    >>> pair = LowRankConv2d.from_factors(conv, svd_factors(conv.weight[:, :, 0, 0], rank=5))
    >>> x = torch.randn(1, 6, 7, 7, dtype=torch.float64)
    >>> bool(torch.allclose(pair(x), conv(x)))
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        stride: int | tuple[int, int] | list[int] = 1,
        padding: int | tuple[int, int] | list[int] | str = 0,
        bias: bool = True,
        dtype: str | None = None,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be positive, got {rank}")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.stride = pair(stride)
        self.padding: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode = padding_mode
        self.first = nn.Conv2d(
            in_channels,
            rank,
            1,
            stride=self.stride,
            padding=self.padding,
            bias=False,
            padding_mode=padding_mode,
            dtype=torch_dtype,
        )
        self.second = nn.Conv2d(rank, out_channels, 1, bias=bias, dtype=torch_dtype)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank: int) -> LowRankConv2d:
        """A rank-``rank`` pair with the 1×1 ``conv``'s geometry, dtype and device (weights not
        fitted: what latency tables time)."""
        if tuple(conv.kernel_size) != (1, 1) or conv.groups != 1:
            raise ValueError(
                f"a low-rank pair replaces an ungrouped 1×1 convolution, not "
                f"kernel {tuple(conv.kernel_size)} with groups={conv.groups}"
            )
        return cls(
            conv.in_channels,
            conv.out_channels,
            rank,
            stride=pair(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else pair(conv.padding),
            bias=conv.bias is not None,
            dtype=str(conv.weight.dtype).removeprefix("torch."),
            padding_mode=conv.padding_mode,
        ).to(conv.weight.device)

    @classmethod
    def from_factors(cls, conv: nn.Module, factors: Factors) -> LowRankConv2d:
        """A pair holding ``factors`` of the ``[S, C]`` matrix and the bias of ``conv``.

        ``conv`` is the layer the pair replaces: a 1×1 ``nn.Conv2d`` or a ``LowRankConv2d``
        being re-factored (its ``first`` carries the geometry). The pair takes its stride,
        padding, dtype, device and training mode.
        """
        src = conv.first if isinstance(conv, LowRankConv2d) else conv
        assert isinstance(src, nn.Conv2d)
        out_c, in_c = factors.left.shape[0], factors.right.shape[1]
        b = getattr(conv, "bias", None)
        bias = b if isinstance(b, torch.Tensor) else None
        m = cls(
            in_c,
            out_c,
            factors.rank,
            stride=pair(src.stride),
            padding=src.padding if isinstance(src.padding, str) else pair(src.padding),
            bias=bias is not None,
            dtype=str(src.weight.dtype).removeprefix("torch."),
            padding_mode=src.padding_mode,
        ).to(src.weight.device)
        with torch.no_grad():
            m.first.weight.copy_(factors.right[:, :, None, None])  # [r, C, 1, 1]
            m.second.weight.copy_(factors.left[:, :, None, None])  # [S, r, 1, 1]
            if bias is not None and m.second.bias is not None:
                m.second.bias.copy_(bias)
        m.train(conv.training)
        return m

    def spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank": self.rank,
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "bias": self.second.bias is not None,
            "dtype": str(self.first.weight.dtype).removeprefix("torch."),
            "padding_mode": self.padding_mode,
        }

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent kernel ``[S, C, 1, 1]``, for inspection."""
        w = self.second.weight[:, :, 0, 0] @ self.first.weight[:, :, 0, 0]  # [S, C]
        return w[:, :, None, None]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.second.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, S, H', W')
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"
