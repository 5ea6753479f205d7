"""Sparse replacements for ``Linear``: N:M semi-structured masks and DSFormer's dense × sparse.

* :class:`SparseLinear` — ``y = x (W ⊙ M)ᵀ + b`` with an N:M mask ``M`` (N kept weights in each
  group of M consecutive *input* weights of a row; 2:4 is what sparse tensor cores run).
  On CPU it runs dense (``W ⊙ M`` then a dense GEMM): it is smaller to store compressed, but
  it is not faster here, and nothing assumes it is.
* :class:`DenseSparseLinear` — DSFormer (2312.13211): ``W ≈ D·C`` with a small dense basis
  ``D`` and a sparse coefficient matrix ``C`` (K non-zeros per input feature), trained with a
  straight-through top-K mask.

Both keep the mask as a buffer, so a saved model reloads with the same sparsity pattern.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgery.modules.registry import SurgeryModule, register_module

__all__ = [
    "DenseSparseLinear",
    "SparseLinear",
    "dense_sparse_fit",
    "nm_mask",
    "semi_structured_available",
    "topk_mask",
]


def _torch_dtype(dtype: str | None) -> torch.dtype | None:
    return getattr(torch, dtype) if dtype else None


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean N:M mask of ``scores`` ``[out, in]``: the N largest of each M consecutive inputs.

    ``in`` must be a multiple of ``m``. Ties are broken by position (lowest index first), so
    every group keeps exactly ``n``.

    >>> nm_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]]), 2, 4).int().tolist()
    [[1, 0, 1, 0, 0, 1, 1, 0]]
    """
    out_f, in_f = scores.shape
    if not 0 < n <= m:
        raise ValueError(f"need 0 < N ≤ M, got {n}:{m}")
    if in_f % m:
        raise ValueError(f"input width {in_f} is not a multiple of M = {m}")
    groups = scores.detach().reshape(out_f, in_f // m, m)  # [out, in/M, M]
    keep = groups.topk(n, dim=-1).indices  # [out, in/M, N]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, keep, True)
    return mask.reshape(out_f, in_f)


def topk_mask(values: torch.Tensor, k: int, dim: int = 0) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|values|`` along ``dim``.

    >>> topk_mask(torch.tensor([[1.0, -5.0], [-3.0, 2.0], [2.0, 1.0]]), 1).int().tolist()
    [[0, 1], [1, 0], [0, 0]]
    """
    keep = values.detach().abs().topk(k, dim=dim).indices
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask.scatter_(dim, keep, True)
    return mask


def semi_structured_available() -> bool:
    """Whether ``torch.sparse.to_sparse_semi_structured`` can run here (CUDA, sm ≥ 8.0)."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured") or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


@register_module
class SparseLinear(SurgeryModule):
    """A ``Linear`` whose weight is multiplied by a fixed N:M mask buffer.

    ``weight`` ``[out, in]`` stays dense (so an optimiser can update it during healing); the
    bool ``mask`` ``[out, in]`` has exactly ``n`` ones per group of ``m`` consecutive inputs.
    :class:`~surgery.passes.sparsify.KeepMasks` re-applies the mask to the weight after each
    optimiser step, so pruned weights stay zero in the saved model too.

    >>> lin = nn.Linear(8, 2)
    >>> sp = SparseLinear.from_linear(lin, 2, 4)
    >>> int(sp.mask.sum()), int((sp.weight != 0).sum())
    (8, 8)
    >>> sp(torch.zeros(3, 8)).shape
    torch.Size([3, 2])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        n: int = 2,
        m: int = 4,
        bias: bool = True,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < n <= m:
            raise ValueError(f"need 0 < N ≤ M, got {n}:{m}")
        if in_features % m:
            raise ValueError(f"in_features {in_features} is not a multiple of M = {m}")
        dd = _torch_dtype(dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.n = n
        self.m = m
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dd))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dd)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        self.register_buffer("mask", nm_mask(self.weight, n, m))
        self.mask: torch.Tensor
        self.apply_mask_()

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "n": self.n,
            "m": self.m,
            "bias": self.bias is not None,
            "dtype": str(self.weight.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        n: int,
        m: int,
        input_norm: torch.Tensor | None = None,
    ) -> SparseLinear:
        """Prune ``linear`` to N:M by magnitude, or by ``|W|·‖x_j‖`` when ``input_norm`` is given.

        ``input_norm`` ``[in]`` holds the L2 norm of each input feature over calibration
        tokens (Wanda, 2306.11695): a small weight on a large activation matters more than
        its magnitude says.
        """
        return cls._from_matrix(linear.weight, linear.bias, n, m, input_norm, linear.training)

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        n: int,
        m: int,
        input_norm: torch.Tensor | None = None,
    ) -> SparseLinear:
        """Like :meth:`from_linear` for a Hugging Face ``Conv1D`` (GPT-2's ``x @ W + b``, weight
        stored ``[in, out]``): the result is a plain N:M ``Linear`` computing the same map.

        >>> from transformers.pytorch_utils import Conv1D
        >>> conv = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs
        >>> sp = SparseLinear.from_conv1d(conv, 4, 4)  # 4:4 keeps every weight
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(sp(x), conv(x), atol=1e-6)
        True
        """
        weight = conv.weight
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"`{type(conv).__name__}` has no 2-D weight")
        found = getattr(conv, "bias", None)
        bias = found if isinstance(found, torch.Tensor) else None
        return cls._from_matrix(weight.t(), bias, n, m, input_norm, conv.training)

    @classmethod
    def _from_matrix(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        n: int,
        m: int,
        input_norm: torch.Tensor | None,
        training: bool,
    ) -> SparseLinear:
        """The N:M layer for ``y = x @ weight.T + bias`` (``weight`` ``[out, in]``)."""
        out_f, in_f = weight.shape
        module = cls(
            in_f,
            out_f,
            n,
            m,
            bias=bias is not None,
            dtype=str(weight.dtype).removeprefix("torch."),
        ).to(weight.device)
        scores = weight.detach().abs()  # [out, in]
        if input_norm is not None:
            scores = scores * input_norm.to(scores)[None, :]
        mask = nm_mask(scores, n, m)
        with torch.no_grad():
            module.mask.copy_(mask)
            module.weight.copy_(weight * mask)
            if bias is not None and module.bias is not None:
                module.bias.copy_(bias)
        module.train(training)
        return module

    @torch.no_grad()
    def apply_mask_(self) -> None:
        """Zero the pruned weights in place (after an optimiser step moved them)."""
        self.weight.mul_(self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        # Dense on every device: masking here (not only after steps) keeps the gradient of
        # pruned weights from mattering between mask re-applications.
        return F.linear(x, self.weight * self.mask, self.bias)

    def to_semi_structured(self) -> nn.Linear:
        """An inference ``nn.Linear`` with a compressed 2:4 weight (CUDA sparse kernels).

        Needs CUDA with ``torch.sparse.to_sparse_semi_structured`` (sm ≥ 8.0), a 2:4 mask and
        a half/bfloat16/int8 weight on that device. The result is for measuring and serving,
        not for training or saving (it is a plain ``Linear``, not a registered module).
        Not exercised by the CPU test suite.
        """
        if (self.n, self.m) != (2, 4):
            raise RuntimeError(f"semi-structured kernels need 2:4 sparsity, not {self.n}:{self.m}")
        if not semi_structured_available():
            raise RuntimeError("semi-structured sparsity needs CUDA (sm ≥ 8.0) and torch.sparse")
        if self.weight.device.type != "cuda":
            raise RuntimeError("move the module to CUDA before converting")
        from torch.sparse import to_sparse_semi_structured

        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            if self.bias is not None and dense.bias is not None:
                dense.bias.copy_(self.bias)
        compressed = to_sparse_semi_structured((self.weight * self.mask).detach())
        dense.weight = nn.Parameter(compressed, requires_grad=False)
        return dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}"
        )


# --- DSFormer ---------------------------------------------------------------------------------


def _sparse_codes(d: torch.Tensor, w: torch.Tensor, k: int, ridge: float) -> torch.Tensor:
    """K-sparse ``C`` ``[B, in]`` with ``D·C ≈ W``: support by top-K, then least squares on it.

    The support of column ``j`` is the K largest ``|c_j|`` of the unconstrained least-squares
    codes; the kept coefficients are then refit by least squares on that support (one
    ``K×K`` normal-equation solve per column, batched), as in OMP's final step.
    """
    basis = d.shape[1]
    gram = d.T @ d + ridge * torch.eye(basis, dtype=d.dtype)  # [B, B]
    rhs = d.T @ w  # [B, in]
    dense = torch.linalg.solve(gram, rhs)  # [B, in], unconstrained codes
    if k >= basis:
        return dense
    support = dense.abs().topk(k, dim=0).indices.T  # [in, K]
    g_sub = gram[support[:, :, None], support[:, None, :]]  # [in, K, K]
    r_sub = rhs.T.gather(1, support)  # [in, K]
    coef = torch.linalg.solve(g_sub, r_sub[..., None])[..., 0]  # [in, K]
    codes = torch.zeros_like(dense)
    codes.T.scatter_(1, support, coef)
    return codes


def dense_sparse_fit(
    weight: torch.Tensor,
    basis: int,
    nonzeros: int,
    iterations: int = 8,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit ``W ≈ D·C`` (``W`` ``[out, in]``, ``D`` ``[out, B]``, ``C`` ``[B, in]``, K per column).

    Alternating minimisation in float64, started from the truncated SVD
    (``D = U_B Σ_B``): a sparse-coding step (:func:`_sparse_codes`) then a least-squares
    dictionary step ``D = W Cᵀ (C Cᵀ)⁻¹``; the best iterate is returned, with its relative
    error ``‖W − DC‖_F / ‖W‖_F``. Basis atoms beyond ``min(out, in)`` start as random unit
    vectors so that healing can use them. With ``K = B ≥ rank(W)`` the fit is exact.

    >>> w = torch.randn(6, 10, dtype=torch.float64)
    >>> d, c, err = dense_sparse_fit(w, basis=6, nonzeros=6)
    >>> bool(torch.allclose(d @ c, w)), err < 1e-10
    (True, True)
    """
    out_f = weight.shape[0]
    if not 1 <= nonzeros <= basis:
        raise ValueError(f"need 1 ≤ nonzeros ≤ basis, got nonzeros={nonzeros}, basis={basis}")
    w = weight.detach().to(torch.float64)
    u, sv, _ = torch.linalg.svd(w, full_matrices=False)
    r = min(basis, sv.numel())
    d = torch.zeros(out_f, basis, dtype=torch.float64)
    d[:, :r] = u[:, :r] * sv[:r]
    if basis > r:
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(out_f, basis - r, generator=gen, dtype=torch.float64)
        d[:, r:] = extra / extra.norm(dim=0, keepdim=True) * (sv[r - 1] if r else 1.0)
    norm = w.norm().clamp_min(1e-300)
    ridge = 1e-12 * float(sv[0] ** 2) if sv.numel() else 1e-12
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for it in range(max(1, iterations)):
        c = _sparse_codes(d, w, nonzeros, ridge)
        err = float((w - d @ c).norm() / norm)
        if best is None or err < best[2]:
            best = (d.clone(), c.clone(), err)
        if err < 1e-12 or it == iterations - 1:
            break
        cct = c @ c.T + ridge * torch.eye(basis, dtype=torch.float64)  # [B, B]
        d = torch.linalg.solve(cct, c @ w.T).T  # [out, B]
    assert best is not None
    d_best, c_best, err_best = best
    return d_best.to(weight.dtype), c_best.to(weight.dtype), err_best


@register_module
class DenseSparseLinear(SurgeryModule):
    """``y = x (D·C)ᵀ + b``: DSFormer's dense basis ``D`` times sparse coefficients ``C``.

    ``W ≈ D·C`` with ``W`` ``[out, in]``, ``dense`` = ``D`` ``[out, B]`` and ``coef`` = ``C``
    ``[B, in]``. **Sparsity axis**: every *column* of ``C`` (one input feature) has exactly
    ``K = nonzeros`` non-zeros, i.e. each column of ``W`` is a combination of K basis atoms
    (sparse coding of the weight columns). In the paper's ``x·W`` layout (``W`` ``[in, out]``)
    these are the "K non-zeros per row of C".

    Forward computes ``(x · (C⊙mask)ᵀ) · Dᵀ`` with ``C`` stored dense: ``B·(in+out)`` MACs per
    token on CPU; a sparse kernel would need ``K·in + B·out``. While training, the mask is
    recomputed every forward as the top-K ``|C|`` of each column and applied with a
    straight-through estimator (forward ``C⊙mask``, gradient to every entry of ``C``), so a
    pruned coefficient can grow back; in eval the ``mask`` buffer is used as is.

    >>> lin = nn.Linear(12, 8, dtype=torch.float64)
    >>> ds = DenseSparseLinear.from_linear(lin, basis=8, nonzeros=8)  # full basis, K = B
    >>> x = torch.randn(5, 12, dtype=torch.float64)
    >>> bool(torch.allclose(ds(x), lin(x)))
    True
    >>> int(DenseSparseLinear.from_linear(lin, basis=4, nonzeros=2).mask.sum(0).max())
    2
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        basis: int,
        nonzeros: int,
        bias: bool = True,
        dtype: str | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= nonzeros <= basis:
            raise ValueError(f"need 1 ≤ nonzeros ≤ basis, got nonzeros={nonzeros}, basis={basis}")
        dd = _torch_dtype(dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.basis = basis
        self.nonzeros = nonzeros
        self.dense = nn.Parameter(torch.empty(out_features, basis, dtype=dd))  # D [out, B]
        self.coef = nn.Parameter(torch.empty(basis, in_features, dtype=dd))  # C [B, in]
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dd)) if bias else None
        nn.init.kaiming_uniform_(self.dense, a=5**0.5)
        nn.init.kaiming_uniform_(self.coef, a=5**0.5)
        self.register_buffer("mask", topk_mask(self.coef, nonzeros, dim=0))
        self.mask: torch.Tensor
        self.fit_error = float("nan")  # relative Frobenius error of the initial fit

    def spec(self) -> dict[str, Any]:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "basis": self.basis,
            "nonzeros": self.nonzeros,
            "bias": self.bias is not None,
            "dtype": str(self.dense.dtype).removeprefix("torch."),
        }

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, basis: int, nonzeros: int, iterations: int = 8
    ) -> DenseSparseLinear:
        """Fit ``linear.weight ≈ D·C`` by :func:`dense_sparse_fit`; the bias is copied."""
        out_f, in_f = linear.weight.shape
        module = cls(
            in_f,
            out_f,
            basis,
            nonzeros,
            bias=linear.bias is not None,
            dtype=str(linear.weight.dtype).removeprefix("torch."),
        ).to(linear.weight.device)
        d, c, err = dense_sparse_fit(linear.weight, basis, nonzeros, iterations)
        with torch.no_grad():
            module.dense.copy_(d)
            # The fitted C has ≤ K non-zeros per column; its support becomes the mask (ties
            # among zeros when a column needs fewer than K atoms are harmless: they are 0).
            module.mask.copy_(topk_mask(c, nonzeros, dim=0))
            module.coef.copy_(c * module.mask)
            if linear.bias is not None and module.bias is not None:
                module.bias.copy_(linear.bias)
        module.fit_error = err
        module.train(linear.training)
        return module

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Recompute the top-K mask from the current ``C`` (after an optimiser step)."""
        self.mask.copy_(topk_mask(self.coef, self.nonzeros, dim=0))

    def sparse_coef(self) -> torch.Tensor:
        """``C`` as the forward sees it: masked, with a straight-through gradient in training."""
        if self.training:
            mask = topk_mask(self.coef, self.nonzeros, dim=0)
            self.mask.copy_(mask)
            masked = self.coef * mask
            # Straight-through: forward value C⊙mask, gradient as if no mask were there.
            return self.coef + (masked - self.coef).detach()
        return self.coef * self.mask

    @property
    def weight(self) -> torch.Tensor:
        """The dense product ``D·(C⊙mask)`` (``[out, in]``), for inspection."""
        return self.dense @ (self.coef * self.mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        codes = F.linear(x, self.sparse_coef())  # (..., B)
        return F.linear(codes, self.dense, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"basis={self.basis}, nonzeros={self.nonzeros}"
        )
