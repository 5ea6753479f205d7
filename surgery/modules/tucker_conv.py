"""`TuckerConv2d`: a `Conv2d(C→S, k×k)` factored into `1×1 C→r_in`, `k×k r_in→r_out`, `1×1 r_out→S`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from surgery.lowrank import tucker2_factors
from surgery.modules.lowrank_conv import PaddingMode, pair
from surgery.modules.registry import SurgeryModule, register_module

__all__ = ["TuckerConv2d"]

IntOr2 = int | tuple[int, int] | list[int]


@register_module
class TuckerConv2d(SurgeryModule):
    """``y = last(core(first(x)))``: the Tucker-2 factorization of a ``Conv2d``.

    ``first`` is a 1×1 conv ``C→rank_in`` (no bias), ``core`` a ``kernel_size`` conv
    ``rank_in→rank_out`` with the original stride, padding, dilation and padding mode (no
    bias), ``last`` a 1×1 conv ``rank_out→S`` that carries the original bias. The 1×1
    ``first`` commutes with any padding (it is pointwise and bias-free), so the padding can
    stay on the core. Grouped convolutions are not supported.

    >>> m = TuckerConv2d(8, 16, rank_in=4, rank_out=6, kernel_size=3, padding=1)
    >>> m(torch.zeros(2, 8, 10, 10)).shape
    torch.Size([2, 16, 10, 10])
    >>> conv = nn.Conv2d(3, 5, 3, stride=2, dtype=torch.float64)
    >>> t = TuckerConv2d.from_conv(conv, rank_out=5, rank_in=3)
    >>> x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    >>> bool(torch.allclose(t(x), conv(x)))
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank_in: int,
        rank_out: int,
        kernel_size: IntOr2,
        stride: IntOr2 = 1,
        padding: IntOr2 | str = 0,
        dilation: IntOr2 = 1,
        bias: bool = True,
        dtype: str | None = None,
        padding_mode: PaddingMode = "zeros",
    ) -> None:
        super().__init__()
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown padding_mode `{padding_mode}`")
        if not 1 <= rank_in <= in_channels:
            raise ValueError(f"rank_in must be in [1, {in_channels}], got {rank_in}")
        if not 1 <= rank_out <= out_channels:
            raise ValueError(f"rank_out must be in [1, {out_channels}], got {rank_out}")
        torch_dtype = getattr(torch, dtype) if dtype else None
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank_in = rank_in
        self.rank_out = rank_out
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.padding: tuple[int, int] | str = padding if isinstance(padding, str) else pair(padding)
        self.dilation = pair(dilation)
        self.padding_mode = padding_mode
        self.first = nn.Conv2d(in_channels, rank_in, 1, bias=False, dtype=torch_dtype)
        self.core = nn.Conv2d(
            rank_in,
            rank_out,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=False,
            padding_mode=padding_mode,
            dtype=torch_dtype,
        )
        self.last = nn.Conv2d(rank_out, out_channels, 1, bias=bias, dtype=torch_dtype)

    @classmethod
    def like(cls, conv: nn.Conv2d, rank_out: int, rank_in: int) -> TuckerConv2d:
        """A Tucker-2 layer with ``conv``'s geometry, dtype and device (weights not fitted:
        what latency tables time)."""
        if conv.groups != 1:
            raise ValueError(
                f"cannot Tucker-decompose a grouped convolution (groups={conv.groups}): "
                "the factors would mix channels across groups; decompose per group or skip it"
            )
        dtype = str(conv.weight.dtype).removeprefix("torch.")
        return cls(
            conv.in_channels,
            conv.out_channels,
            rank_in=rank_in,
            rank_out=rank_out,
            kernel_size=pair(conv.kernel_size),
            stride=pair(conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else pair(conv.padding),
            dilation=pair(conv.dilation),
            bias=conv.bias is not None,
            dtype=dtype,
            padding_mode=conv.padding_mode,
        ).to(conv.weight.device)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank_out: int, rank_in: int) -> TuckerConv2d:
        """Build from ``conv`` with HOSVD-initialised factors (exact at full ranks)."""
        m = cls.like(conv, rank_out, rank_in)
        first, core, last = tucker2_factors(conv.weight, rank_out=rank_out, rank_in=rank_in)
        with torch.no_grad():
            m.first.weight.copy_(first)  # [r_in, C, 1, 1]
            m.core.weight.copy_(core)  # [r_out, r_in, kh, kw]
            m.last.weight.copy_(last)  # [S, r_out, 1, 1]
            if conv.bias is not None and m.last.bias is not None:
                m.last.bias.copy_(conv.bias)
        return m

    def spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank_in": self.rank_in,
            "rank_out": self.rank_out,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.last.bias is not None,
            "dtype": str(self.core.weight.dtype).removeprefix("torch."),
            "padding_mode": self.padding_mode,
        }

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent kernel ``[S, C, kh, kw]``, for inspection."""
        return torch.einsum(
            "oikl,so,ic->sckl",
            self.core.weight,
            self.last.weight[:, :, 0, 0],
            self.first.weight[:, :, 0, 0],
        )

    @property
    def bias(self) -> torch.Tensor | None:
        return self.last.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, S, H', W')
        return self.last(self.core(self.first(x)))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"rank_in={self.rank_in}, rank_out={self.rank_out}, kernel_size={self.kernel_size}"
        )
