"""3D convolution computed with 4D tensors only (2407.16514).

Two replacements for ``nn.Conv3d(C→S, (kT, kH, kW))``; both take and return 5D tensors
``(B, C, T, H, W) → (B, S, T_out, H_out, W_out)`` exactly like the ``Conv3d`` they replace, but
every tensor inside ``forward`` (and every parameter) is at most 4D, for backends and kernels
that have no 5D convolution:

* :class:`Conv3dAs2d` — the *exact* rewrite. A Conv3d is a sum over its temporal taps of 2D
  convolutions of shifted frames::

      y[:, :, t] = b + Σ_i conv2d(x[:, :, t·sT + i·dT − pT], W[:, :, i])

  Time is folded into the batch, so each tap is one ``conv2d`` over ``B·T_out`` frames. With
  ``taps="stack"`` (the default for ``groups = 1``) the ``kT`` shifted frame sets are stacked
  along channels and one ``conv2d`` with ``kT·C`` input channels does the sum inside its GEMM.

* :class:`Conv2Plus1d` — the factorised *(2+1)D* rewrite, a spatial 2D conv shared by a
  spatial and a temporal branch, initialised from the best rank-``R`` separable
  approximation of the kernel (see the class docstring for the derivation).

Temporal zero padding is reproduced by zero frames; any ``padding_mode`` other than
``"zeros"`` is refused, since reflect/replicate/circular padding of the time axis would need
frames that a per-frame conv does not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from surgery.modules.registry import SurgeryModule, register_module

__all__ = [
    "Conv2Plus1d",
    "Conv3dAs2d",
    "conv3d_output_size",
    "separable_factors",
    "triple",
]

IntOr3 = int | Sequence[int]
Combine = Literal["add", "cat"]
Taps = Literal["stack", "sum"]


def triple(v: IntOr3) -> tuple[int, int, int]:
    """``3 → (3, 3, 3)``; a sequence of three ints is returned as a tuple."""
    if isinstance(v, int):
        return (v, v, v)
    a, b, c = v
    return (int(a), int(b), int(c))


def conv3d_output_size(
    size: Sequence[int],
    kernel_size: IntOr3,
    stride: IntOr3 = 1,
    padding: IntOr3 = 0,
    dilation: IntOr3 = 1,
) -> tuple[int, int, int]:
    """``(T_out, H_out, W_out)`` of a Conv3d on frames of ``size = (T, H, W)``.

    >>> conv3d_output_size((16, 56, 56), 3, stride=(1, 2, 2), padding=1)
    (16, 28, 28)
    """
    k, s, p, d = triple(kernel_size), triple(stride), triple(padding), triple(dilation)
    out = tuple((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate(size))
    return (out[0], out[1], out[2])


def _torch_dtype(dtype: str | None) -> torch.dtype | None:
    return getattr(torch, dtype) if dtype else None


def _fold_time(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, T, H, W) → (B, T, C, H·W)`` through 4D views only (one copy at the end)."""
    b, c, t, h, w = x.shape
    x4 = x.reshape(b, c, t, h * w)  # (B, C, T, HW)
    return x4.permute(0, 2, 1, 3)  # (B, T, C, HW), a strided view


def _unfold_time(y: torch.Tensor, b: int, t: int, h: int, w: int) -> torch.Tensor:
    """``(B·T, S, H, W) → (B, S, T, H, W)``: the only 5D tensor is the returned one."""
    s = y.shape[1]
    y4 = y.reshape(b, t, s, h * w).permute(0, 2, 1, 3)  # (B, S, T, HW)
    return y4.reshape(b, s, t, h, w)


def _check_geometry(
    kernel_size: tuple[int, int, int],
    stride: tuple[int, int, int],
    padding: tuple[int, int, int],
    dilation: tuple[int, int, int],
) -> None:
    if min(kernel_size) < 1 or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"invalid conv geometry: kernel {kernel_size}, stride {stride}, "
            f"padding {padding}, dilation {dilation}"
        )


def explicit_padding(conv: nn.Conv3d) -> tuple[int, int, int]:
    """The symmetric integer padding of ``conv``; ``'same'``/``'valid'`` resolved.

    Raises ``ValueError`` when the padding is not expressible symmetrically (``'same'`` with
    an even effective kernel side), or the padding mode is not zeros.
    """
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"padding_mode `{conv.padding_mode}` cannot be split: only zero padding of the time "
            "axis is reproduced by zero frames"
        )
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0, 0)
        k, d = triple(conv.kernel_size), triple(conv.dilation)
        totals = [d[i] * (k[i] - 1) for i in range(3)]
        if any(t % 2 for t in totals):
            raise ValueError("padding='same' with an even effective kernel pads asymmetrically")
        return (totals[0] // 2, totals[1] // 2, totals[2] // 2)
    return triple(pad)


# --- the exact rewrite ------------------------------------------------------------------------


@register_module
class Conv3dAs2d(SurgeryModule):
    """A ``Conv3d`` computed exactly as a sum over temporal taps of ``Conv2d`` on frames.

    ``weight`` is 4D, ``[S, kT·C/groups, kH, kW]``, tap-major: ``weight[:, i·C/g + c]`` is
    ``conv3d.weight[:, c, i]``. Parameter count and FLOPs equal the original's.

    >>> conv = nn.Conv3d(4, 6, 3, stride=(2, 1, 1), padding=1, dtype=torch.float64)
    >>> m = Conv3dAs2d.from_conv(conv)
    >>> x = torch.randn(2, 4, 5, 7, 7, dtype=torch.float64)
    >>> m(x).shape
    torch.Size([2, 6, 3, 7, 7])
    >>> bool(torch.allclose(m(x), conv(x)))
    True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOr3,
        stride: IntOr3 = 1,
        padding: IntOr3 = 0,
        dilation: IntOr3 = 1,
        groups: int = 1,
        bias: bool = True,
        taps: Taps | None = None,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"channels {in_channels}→{out_channels} not divisible by groups {groups}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = triple(kernel_size)
        self.stride = triple(stride)
        self.padding = triple(padding)
        self.dilation = triple(dilation)
        _check_geometry(self.kernel_size, self.stride, self.padding, self.dilation)
        self.groups = groups
        # Stacking taps along channels needs them group-major for grouped convs, which would
        # take a 5D view; grouped convs therefore sum one conv2d per tap.
        chosen: Taps = taps or ("stack" if groups == 1 else "sum")
        if chosen == "stack" and groups != 1:
            raise ValueError("taps='stack' needs groups=1; use taps='sum'")
        if chosen not in ("stack", "sum"):
            raise ValueError(f"unknown taps mode `{chosen}`")
        self.taps: Taps = chosen
        kt, kh, kw = self.kernel_size
        cg = in_channels // groups
        torch_dtype = _torch_dtype(dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, kt * cg, kh, kw, dtype=torch_dtype))
        self.bias = nn.Parameter(torch.zeros(out_channels, dtype=torch_dtype)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "bias": self.bias is not None,
            "taps": self.taps,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_conv(cls, conv: nn.Conv3d, taps: Taps | None = None) -> Conv3dAs2d:
        """The exact rewrite of ``conv`` (same dtype and device; its weights copied)."""
        padding = explicit_padding(conv)
        module = cls(
            conv.in_channels,
            conv.out_channels,
            triple(conv.kernel_size),
            triple(conv.stride),
            padding,
            triple(conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            taps=taps,
            dtype=str(conv.weight.dtype).removeprefix("torch."),
        ).to(conv.weight.device)
        with torch.no_grad():
            w = conv.weight  # [S, C/g, kT, kH, kW]
            s, cg, kt, kh, kw = w.shape
            module.weight.copy_(w.permute(0, 2, 1, 3, 4).reshape(s, kt * cg, kh, kw))
            if conv.bias is not None and module.bias is not None:
                module.bias.copy_(conv.bias)
        module.train(conv.training)
        return module

    def conv3d_weight(self) -> torch.Tensor:
        """The equivalent 5D ``Conv3d`` weight ``[S, C/g, kT, kH, kW]`` (for inspection)."""
        kt, kh, kw = self.kernel_size
        s = self.out_channels
        cg = self.in_channels // self.groups
        return self.weight.reshape(s, kt, cg, kh, kw).permute(0, 2, 1, 3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, S, T', H', W')
        b, c, t, h, w = x.shape
        kt = self.kernel_size[0]
        st, sh, sw = self.stride
        pt, ph, pw = self.padding
        dt, dh, dw = self.dilation
        t_out = (t + 2 * pt - dt * (kt - 1) - 1) // st + 1
        if t_out < 1:
            raise ValueError(f"input of {t} frames is shorter than the temporal kernel")
        frames = _fold_time(x)  # (B, T, C, HW)
        if pt:
            frames = F.pad(frames, (0, 0, 0, 0, pt, pt))  # zero frames: (B, T+2pT, C, HW)
        span = (t_out - 1) * st + 1

        def tap(i: int) -> torch.Tensor:  # frames feeding tap i of every output: (B, T', C, HW)
            start = i * dt
            return frames[:, start : start + span : st]

        cg = c // self.groups
        if self.taps == "stack":
            stacked = torch.cat([tap(i) for i in range(kt)], dim=2)  # (B, T', kT·C, HW)
            y = F.conv2d(
                stacked.reshape(b * t_out, kt * c, h, w),
                self.weight,
                self.bias,
                (sh, sw),
                (ph, pw),
                (dh, dw),
            )  # (B·T', S, H', W')
        else:
            y = torch.zeros(())
            for i in range(kt):
                part = F.conv2d(
                    tap(i).reshape(b * t_out, c, h, w),
                    self.weight[:, i * cg : (i + 1) * cg],
                    self.bias if i == 0 else None,  # the bias is added once, not once per tap
                    (sh, sw),
                    (ph, pw),
                    (dh, dw),
                    self.groups,
                )  # (B·T', S, H', W')
                y = part if i == 0 else y + part
        ho, wo = y.shape[-2:]
        return _unfold_time(y, b, t_out, ho, wo)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, taps={self.taps}"
        )


# --- the (2+1)D rewrite -----------------------------------------------------------------------


def separable_factors(
    weight: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` time×space separable approximation of a Conv3d kernel.

    ``weight`` is ``[S, C, kT, kH, kW]``. Unfolded as ``M[(s, i), (c, h, w)]`` (rows: output
    channel and temporal tap; columns: input channel and spatial tap), a kernel
    ``W[s, c, i, h, w] = Σ_r G[s, i, r] · P[r, c, h, w]`` is exactly a rank-``R`` matrix
    ``M = G·P``; by Eckart–Young the truncated SVD ``M ≈ U_R Σ_R V_Rᵀ`` is the best such
    kernel in Frobenius norm. Returns ``(spatial [R, C, kH, kW], temporal [S, kT, R], energy)``
    with ``spatial = √Σ V_Rᵀ``, ``temporal = U_R √Σ`` and ``energy`` the kept share of ``Σσ²``.

    >>> g, p = torch.randn(4, 3, 1, dtype=torch.float64), torch.randn(1, 2, 3, 3, dtype=torch.float64)
    >>> w = torch.einsum("sir,rchw->scihw", g, p)  # a rank-1 separable kernel
    >>> sp, tm, energy = separable_factors(w, 1)
    >>> bool(torch.allclose(torch.einsum("sir,rchw->scihw", tm, sp), w)), round(float(energy), 6)
    (True, 1.0)
    """
    s, c, kt, kh, kw = weight.shape
    m = weight.detach().to(torch.float64).permute(0, 2, 1, 3, 4).reshape(s * kt, c * kh * kw)
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    full = sv.numel()
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}], got {rank}")
    root = sv[:rank].sqrt()
    spatial = (root[:, None] * vh[:rank]).reshape(rank, c, kh, kw)  # [R, C, kH, kW]
    temporal = (u[:, :rank] * root[None, :]).reshape(s, kt, rank)  # [S, kT, R]
    total = sv.square().sum()
    energy = sv[:rank].square().sum() / total if total > 0 else torch.ones((), dtype=torch.float64)
    return spatial.to(weight.dtype), temporal.to(weight.dtype), energy


@register_module
class Conv2Plus1d(SurgeryModule):
    """A ``Conv3d(C→S, (kT, kH, kW))`` as a shared spatial conv, a spatial and a temporal branch.

    Structure (``R`` = ``rank``; every tensor 4D)::

        z = spatial(x folded to (B·T, C, H, W))      Conv2d C→R, kH×kW, spatial stride/pad/dil
          → (B, R, T, H'·W')                         spatial positions flattened
        spatial branch  y_s = center(z at the centre-tap frames)   Conv2d 1×1, stride (sT, 1)
        temporal branch y_t = temporal(z)           Conv2d (kT, 1), temporal stride/pad/dil

    The spatial branch is the paper's "fold time into batch, ``Conv2d d×d``, then a strided
    ``1×1`` along time": for output frame ``t`` it reads the frame under the centre tap,
    ``t·sT + i_c·dT − pT`` with ``i_c = ⌊(kT−1)/2⌋`` (a zero frame inside the padding). The
    temporal branch is the ``Conv2d (d, 1)`` over time with spatial positions flattened. The
    ``d×d`` conv is computed once and shared.

    **Combining** the branches:

    * ``add`` — both branches produce all ``S`` channels and are summed. Both are linear in
      ``z`` and read the same frames at tap ``i_c``, so ``forward`` folds the 1×1 into the
      centre tap of the ``(kT, 1)`` kernel and runs one temporal conv (same result, one conv
      fewer); the two parameters stay separate, as the paper trains them.
    * ``cat`` — each branch produces a share of the output channels: ``spatial_channels``
      channels (default ``S // 2``) come from the spatial branch (they see only the centre
      frame), the other ``S − spatial_channels`` from the temporal branch; the concatenation
      is put back in the original channel order (``order`` buffer). Cheaper than ``add``
      (``R·S_s`` instead of ``R·S_s·kT`` temporal weights) but less expressive. At
      initialisation the channels whose kernels lose the least energy outside the centre
      temporal tap go to the spatial branch.

    **Initialisation** (:meth:`from_conv`): with ``add`` this module computes the kernel
    ``W̃[s, c, i, h, w] = Σ_r G[s, i, r] · P[r, c, h, w]`` (``P`` spatial weights, ``G`` the
    temporal taps with the 1×1 added at ``i_c``), a rank-``R`` time×space separable kernel.
    The best one in Frobenius norm is the truncated SVD of the unfolding ``M[(s, i), (c, h, w)]``
    (:func:`separable_factors`, Eckart–Young): ``P = √Σ V_Rᵀ``, ``G = U_R √Σ``; ``G[:, i_c]``
    initialises the 1×1 and the other taps the temporal conv. Exact when the kernel is
    separable with rank ≤ ``R``, and at full rank ``R = min(S·kT, C·kH·kW)``. ``cat`` keeps
    the same factors, dropping the off-centre taps of the spatial-branch channels. Grouped
    convs are not supported (the SVD mixes all channels).

    >>> conv = nn.Conv3d(3, 8, 3, padding=1, dtype=torch.float64)
    >>> m = Conv2Plus1d.from_conv(conv, rank=Conv2Plus1d.full_rank(conv))
    >>> x = torch.randn(2, 3, 4, 6, 6, dtype=torch.float64)
    >>> m(x).shape == conv(x).shape, bool(torch.allclose(m(x), conv(x)))
    (True, True)
    >>> Conv2Plus1d.from_conv(conv, rank=4, combine="cat")(x).shape
    torch.Size([2, 8, 4, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: IntOr3,
        stride: IntOr3 = 1,
        padding: IntOr3 = 0,
        dilation: IntOr3 = 1,
        combine: Combine = "add",
        spatial_channels: int | None = None,
        bias: bool = True,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if combine not in ("add", "cat"):
            raise ValueError(f"combine must be `add` or `cat`, got `{combine}`")
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        s_sp = self.spatial_share(out_channels, combine, spatial_channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.kernel_size = triple(kernel_size)
        self.stride = triple(stride)
        self.padding = triple(padding)
        self.dilation = triple(dilation)
        _check_geometry(self.kernel_size, self.stride, self.padding, self.dilation)
        self.combine: Combine = combine
        self.spatial_channels = s_sp
        self.has_bias = bias
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.stride
        pt, ph, pw = self.padding
        dt, dh, dw = self.dilation
        dd = _torch_dtype(dtype)
        s_tm = out_channels - s_sp if combine == "cat" else out_channels
        self.spatial = nn.Conv2d(
            in_channels, rank, (kh, kw), (sh, sw), (ph, pw), (dh, dw), bias=False, dtype=dd
        )
        self.center = nn.Conv2d(
            rank, s_sp, 1, stride=(st, 1), bias=bias and combine == "cat", dtype=dd
        )
        self.temporal = nn.Conv2d(
            rank, s_tm, (kt, 1), (st, 1), (pt, 0), (dt, 1), bias=bias, dtype=dd
        )
        # cat: output channel s is channel order[s] of [spatial branch ; temporal branch]
        self.register_buffer("order", torch.arange(out_channels))
        self.order: torch.Tensor

    @staticmethod
    def spatial_share(out_channels: int, combine: str, spatial_channels: int | None) -> int:
        """Channels the spatial branch produces: ``S`` for add, ``S_s`` (default ``S//2``) for cat."""
        if combine == "add":
            return out_channels
        if out_channels < 2:
            raise ValueError("combine `cat` needs at least 2 output channels to share")
        s_sp = out_channels // 2 if spatial_channels is None else spatial_channels
        if not 1 <= s_sp < out_channels:
            raise ValueError(f"spatial_channels must be in [1, {out_channels - 1}], got {s_sp}")
        return s_sp

    @staticmethod
    def full_rank(conv: nn.Conv3d) -> int:
        """``min(S·kT, C·kH·kW)``: the rank at which the ``add`` rewrite is exact."""
        kt, kh, kw = triple(conv.kernel_size)
        return min(conv.out_channels * kt, conv.in_channels * kh * kw)

    @staticmethod
    def param_count(
        in_channels: int,
        out_channels: int,
        rank: int,
        kernel_size: IntOr3,
        combine: str = "add",
        bias: bool = True,
        spatial_channels: int | None = None,
    ) -> int:
        """``R·C·kH·kW + R·S·(kT + 1)`` for add, ``R·C·kH·kW + R·(S_s + (S − S_s)·kT)`` for cat."""
        kt, kh, kw = triple(kernel_size)
        c, s = in_channels, out_channels
        s_sp = Conv2Plus1d.spatial_share(s, combine, spatial_channels)
        n = rank * c * kh * kw
        n += rank * s * (kt + 1) if combine == "add" else rank * (s_sp + (s - s_sp) * kt)
        return n + (s if bias else 0)

    def spec(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "rank": self.rank,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "combine": self.combine,
            "spatial_channels": self.spatial_channels if self.combine == "cat" else None,
            "bias": self.has_bias,
            "dtype": str(self.spatial.weight.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv3d,
        rank: int,
        combine: Combine = "add",
        spatial_channels: int | None = None,
    ) -> Conv2Plus1d:
        """The rank-``rank`` separable rewrite of ``conv``, initialised by truncated SVD."""
        if conv.groups != 1:
            raise ValueError(
                f"grouped Conv3d (groups={conv.groups}) cannot be split (2+1)d: the separable "
                "fit mixes all input channels; use `split Conv3d exact`"
            )
        padding = explicit_padding(conv)
        module = cls(
            conv.in_channels,
            conv.out_channels,
            rank,
            triple(conv.kernel_size),
            triple(conv.stride),
            padding,
            triple(conv.dilation),
            combine=combine,
            spatial_channels=spatial_channels,
            bias=conv.bias is not None,
            dtype=str(conv.weight.dtype).removeprefix("torch."),
        ).to(conv.weight.device)
        spatial, temporal, _ = separable_factors(conv.weight, rank)  # [R,C,kH,kW], [S,kT,R]
        kt = module.kernel_size[0]
        ic = (kt - 1) // 2
        taps = temporal.permute(0, 2, 1).clone()  # [S, R, kT]
        centre = taps[:, :, ic].clone()  # [S, R]
        off = taps.clone()
        off[:, :, ic] = 0  # the centre tap lives in the spatial branch
        with torch.no_grad():
            module.spatial.weight.copy_(spatial)
            if combine == "add":
                module.center.weight.copy_(centre[:, :, None, None])  # [S, R, 1, 1]
                module.temporal.weight.copy_(off[..., None])  # [S, R, kT, 1]
                if module.temporal.bias is not None and conv.bias is not None:
                    module.temporal.bias.copy_(conv.bias)
            else:
                # Energy each channel loses when it keeps only its centre tap: ‖Σ_r off·P‖².
                flat = spatial.reshape(rank, -1)  # [R, C·kH·kW]
                loss = torch.einsum("sri,rk->sik", off, flat).square().sum(dim=(1, 2))  # [S]
                s_sp = module.spatial_channels
                ranked = torch.argsort(loss, stable=True)
                sp_idx, tm_idx = ranked[:s_sp].sort().values, ranked[s_sp:].sort().values
                module.center.weight.copy_(centre[sp_idx][:, :, None, None])
                module.temporal.weight.copy_(taps[tm_idx][..., None])
                if conv.bias is not None:
                    if module.center.bias is not None:
                        module.center.bias.copy_(conv.bias[sp_idx])
                    if module.temporal.bias is not None:
                        module.temporal.bias.copy_(conv.bias[tm_idx])
                # concatenated channel j is original channel cat_idx[j]; invert for the output
                cat_idx = torch.cat([sp_idx, tm_idx])
                module.order.copy_(torch.argsort(cat_idx))
        module.train(conv.training)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, S, T', H', W')
        b, c, t, h, w = x.shape
        kt = self.kernel_size[0]
        st, pt, dt = self.stride[0], self.padding[0], self.dilation[0]
        ic = (kt - 1) // 2
        frames = _fold_time(x).reshape(b * t, c, h, w)  # (B·T, C, H, W)
        z = self.spatial(frames)  # (B·T, R, H', W')
        ho, wo = z.shape[-2:]
        # contiguous: a permuted view makes conv2d pick slow, layout-guessing paths
        z = z.reshape(b, t, self.rank, ho * wo).permute(0, 2, 1, 3).contiguous()  # (B, R, T, H'W')
        tm = self.temporal
        if self.combine == "add":
            # y_s + y_t == one (kT, 1) conv whose centre tap also holds the 1×1 (both linear,
            # same frames), so the spatial branch costs no separate conv.
            weight = tm.weight + F.pad(self.center.weight, (0, 0, ic, kt - 1 - ic))  # [S, R, kT, 1]
            y = F.conv2d(z, weight, tm.bias, tm.stride, tm.padding, tm.dilation)  # (B, S, T', H'W')
            t_out = y.shape[2]
        else:
            y_t = tm(z)  # (B, S − S_s, T', H'W')
            t_out = (t + 2 * pt - dt * (kt - 1) - 1) // st + 1
            zp = F.pad(z, (0, 0, pt, pt)) if pt else z  # (B, R, T+2pT, H'W') zero frames
            start = ic * dt
            y_s = self.center(zp[:, :, start : start + (t_out - 1) * st + 1])  # (B, S_s, T', H'W')
            y = torch.cat([y_s, y_t], dim=1).index_select(1, self.order)  # (B, S, T', H'W')
        return y.reshape(b, self.out_channels, t_out, ho, wo)

    def extra_repr(self) -> str:
        share = f", spatial_channels={self.spatial_channels}" if self.combine == "cat" else ""
        return (
            f"{self.in_channels}, {self.out_channels}, rank={self.rank}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, combine={self.combine}{share}"
        )
