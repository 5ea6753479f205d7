"""Low-rank tensor math: SVD splits, data-aware factorizations, rank rules and budgets.

Pure functions on tensors and numbers; nothing here touches an ``nn.Module``. The passes
call these to decide ranks and to initialise the replacement modules.

Conventions: a ``Linear(in→out)`` weight ``W`` is ``[out, in]`` and is approximated as
``W ≈ left @ right`` with ``left [out, r]`` (the second layer) and ``right [r, in]`` (the
first layer). Decompositions run in float64 (float32 for the Gram of 16-bit weights, see
below) and return in the dtype of the input.

How the SVD is computed (:func:`truncated_svd`): every caller needs *all* singular values
(energy thresholds, budgets, the reported ``energy``) but only the leading ``k`` singular
vectors. The fast path takes the eigendecomposition of the Gram matrix of the shorter side
(``MᵀM`` or ``MMᵀ``): one GEMM plus ``eigh``, 4–7× faster than a float64 ``gesdd`` on a
``[5632, 2048]`` weight on 2 CPU cores. The Gram squares the condition number, so the fast
path is *checked*: the squared error its rank-``k`` projection actually achieves,
``‖M‖² − ‖M V_k‖²``, must equal the discarded eigenvalues ``Σ_{i>k} λ_i`` within a tolerance,
and ``λ_k`` must be clearly positive; otherwise the full float64 SVD runs (a full-rank or
rank-deficient request always takes it, so the exactness invariants are those of
``gesdd``). The tolerance is ``1e-8`` relative in float64; for bfloat16/float16 weights the
Gram is formed in float32 and the tolerance is the weight format's own squared rounding
error ``u²·‖M‖²``, which the factors incur anyway when they are stored in that format.
``torch.svd_lowrank`` is not used: its error depends on oversampling and spectral decay, and
it returns no tail spectrum to check against.

>>> W = torch.randn(6, 4, dtype=torch.float64)
>>> f = svd_factors(W, rank=4)
>>> bool(torch.allclose(f.left @ f.right, W))
True
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Factors",
    "LayerSpectrum",
    "allocate_budget",
    "asvd_factors",
    "break_even_rank",
    "compute_dtype",
    "dense_flops",
    "dense_params",
    "layer_cost",
    "lowrank_flops",
    "lowrank_params",
    "pick_rank_below_cliff",
    "rank_for_energy",
    "rank_from_fraction",
    "refactor_pair",
    "round_rank",
    "svd_factors",
    "svd_llm_factors",
    "truncated_svd",
    "tucker2_factors",
]

BudgetKind = Literal["params", "flops"]

#: Relative jitter first added to ``XᵀX`` when its Cholesky factorization fails.
CHOLESKY_JITTER = 1e-10
#: Number of Cholesky attempts; the jitter grows ×10 after each failure.
CHOLESKY_TRIES = 8


@dataclass(frozen=True)
class Factors:
    """A rank-``r`` factorization ``W ≈ left @ right``.

    ``singular_values`` are *all* singular values (descending, float64) of the matrix that
    was truncated: ``W`` for plain SVD, ``W·diag(s)`` for ASVD, ``W·S`` for SVD-LLM.
    ``energy`` is the fraction of ``Σσ²`` of that matrix kept by the top ``rank`` values.
    """

    left: Tensor  # [out, r]
    right: Tensor  # [r, in]
    singular_values: Tensor  # [min(out, in)], float64, descending
    rank: int
    energy: float


@dataclass(frozen=True)
class LayerSpectrum:
    """What :func:`allocate_budget` needs to know about one ``Linear(in→out)`` layer.

    ``tokens`` is the number of input rows per forward pass (batch × sequence), used only for
    ``kind="flops"``; ``singular_values`` are the layer's (possibly data-aware) singular
    values, descending.
    """

    name: str
    in_f: int
    out_f: int
    tokens: int
    singular_values: Tensor  # [min(out, in)]


# ---------------------------------------------------------------------------------------------
# decompositions


def _check_rank(rank: int, out_f: int, in_f: int) -> None:
    full = min(out_f, in_f)
    if not 1 <= rank <= full:
        raise ValueError(f"rank must be in [1, {full}] for a [{out_f}, {in_f}] matrix, got {rank}")


def _energy(sv: Tensor, rank: int) -> float:
    sq = sv.square()
    total = float(sq.sum())
    return 1.0 if total == 0.0 else float(sq[:rank].sum()) / total


#: Relative tolerance of the fast path's a-posteriori check in float64.
FAST_SVD_RTOL = 1e-8
#: The fast path needs ``λ_k ≥ FAST_SVD_MIN_RATIO·ε·λ_1`` (``ε`` of the compute dtype) so that
#: dividing by ``σ_k`` is well defined.
FAST_SVD_MIN_RATIO = 16.0


def compute_dtype(w: Tensor) -> torch.dtype:
    """float32 for 16-bit weights (their own rounding dwarfs float32's), else float64.

    >>> compute_dtype(torch.zeros(1, dtype=torch.bfloat16)), compute_dtype(torch.zeros(1))
    (torch.float32, torch.float64)
    """
    return torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else torch.float64


def truncated_svd(
    m: Tensor,
    keep: int,
    *,
    compute: torch.dtype | None = None,
    weight_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(U_k, S, Vh_k)``: the leading ``keep`` singular vectors and *all* singular values.

    The work runs in ``compute`` (default :func:`compute_dtype` of ``m``), converting ``m`` a
    block at a time, so a 16-bit weight never exists as a whole float32 copy. ``U_k`` and
    ``Vh_k`` come back in ``compute``; ``S`` is float64, descending. The fast Gram path
    (module doc) is used when its check passes, else ``torch.linalg.svd`` in float64.
    ``weight_dtype`` (default ``m.dtype``) is the dtype the factors will be stored in: for
    16-bit formats the check's tolerance is that format's squared unit roundoff times ``‖m‖²``.

    >>> m = torch.randn(40, 12, dtype=torch.float64)
    >>> U, S, Vh = truncated_svd(m, 3)
    >>> U.shape, S.shape, Vh.shape
    (torch.Size([40, 3]), torch.Size([12]), torch.Size([3, 12]))
    >>> bool(torch.allclose(S, torch.linalg.svdvals(m)))
    True
    """
    rows, cols = m.shape
    k = min(rows, cols)
    if not 1 <= keep <= k:
        raise ValueError(f"keep must be in [1, {k}], got {keep}")
    cd = compute or compute_dtype(m)
    fast = _gram_svd(m, keep, cd, weight_dtype or m.dtype) if keep < k else None
    if fast is not None:
        return fast
    U, S, Vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    return U[:, :keep].to(cd), S, Vh[:keep].to(cd)


#: Rows (or columns) of the long side converted and multiplied at a time.
_BLOCK = 1024


def _blocks(m: Tensor, tall: bool, dtype: torch.dtype) -> Iterator[Tensor]:
    """``m`` in ``dtype``, a block of the long side (rows if ``tall``) at a time."""
    for block in m.split(_BLOCK, dim=0 if tall else 1):
        yield block.to(dtype)


def _gram_svd(
    m: Tensor, keep: int, cd: torch.dtype, weight_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The Gram-eigh path of :func:`truncated_svd` in ``cd``, or None when its check fails."""
    tall = m.shape[0] >= m.shape[1]
    short = min(m.shape)
    gram = torch.zeros(short, short, dtype=cd, device=m.device)
    total = 0.0  # ‖M‖², accumulated in float64
    for b in _blocks(m, tall, cd):
        gram.addmm_(b.T, b) if tall else gram.addmm_(b, b.T)  # eigh reads the lower triangle
        total += float(b.to(torch.float64).square().sum())
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    del gram
    lam = evals.flip(0).to(torch.float64).clamp_min(0.0)  # [short], descending
    vecs = evecs[:, -keep:].flip(1)  # [short, keep], leading first (a copy)
    del evecs
    eps = torch.finfo(cd).eps
    top = float(lam[0])
    if top <= 0.0 or float(lam[keep - 1]) < FAST_SVD_MIN_RATIO * eps * top:
        return None
    # M V_k [rows, keep] (tall) or U_kᵀ M [keep, cols], block by block
    parts = [b @ vecs if tall else vecs.T @ b for b in _blocks(m, tall, cd)]
    projected = torch.cat(parts, dim=0 if tall else 1)
    del parts
    achieved = total - _squared_norm(projected)
    discarded = float(lam[keep:].sum())
    if weight_dtype in (torch.bfloat16, torch.float16):
        tolerance = (torch.finfo(weight_dtype).eps / 2) ** 2 * total
    else:
        tolerance = FAST_SVD_RTOL * max(achieved, discarded)
    if abs(achieved - discarded) > tolerance:
        return None
    S = lam.sqrt()
    sk = S[:keep].to(cd)
    if tall:
        return projected.div_(sk), S, vecs.T  # U_k = M V_k / σ
    return vecs, S, projected.div_(sk[:, None])  # V_kᵀ = U_kᵀ M / σ


def _squared_norm(t: Tensor) -> float:
    """``‖t‖_F²`` accumulated in float64, a row block at a time (no full float64 copy)."""
    return sum(float(block.to(torch.float64).square().sum()) for block in t.split(256))


def svd_factors(W: Tensor, rank: int) -> Factors:
    """Truncated SVD with the √Σ split: ``left = U_r √Σ_r``, ``right = √Σ_r V_rᵀ``.

    Splitting √Σ to both sides balances the factors' norms, which keeps fine-tuning of
    either factor well conditioned.

    >>> W = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    >>> f = svd_factors(W, rank=1)
    >>> f.left.shape, f.right.shape, round(f.energy, 4)
    (torch.Size([3, 1]), torch.Size([1, 3]), 0.9412)
    >>> (f.left @ f.right).diagonal().tolist()
    [4.0, 0.0, 0.0]
    """
    out_f, in_f = W.shape
    _check_rank(rank, out_f, in_f)
    U, S, Vh = truncated_svd(W.detach(), rank)  # [out, r], [k], [r, in] in the compute dtype
    root = S[:rank].sqrt().to(U.dtype)  # [r]
    left = U.mul_(root)  # [out, r]; U and Vh are this call's own tensors
    right = Vh.mul_(root[:, None])  # [r, in]
    return Factors(
        left=left.to(W.dtype),
        right=right.to(W.dtype),
        singular_values=S,
        rank=rank,
        energy=_energy(S, rank),
    )


def asvd_factors(W: Tensor, act_abs_mean: Tensor, rank: int, alpha: float = 0.5) -> Factors:
    """ASVD (arXiv 2312.05821): SVD of ``W·diag(s)`` with ``s = mean|x|^α``, then fold ``1/s``.

    ``act_abs_mean`` is ``[in]``: the mean absolute activation of each input channel over a
    calibration set. Channels that carry large activations get a larger share of the kept
    energy. ``s`` is clamped to at least ``1e-6`` so that dead channels do not blow up
    ``1/s``. With ``s ≡ 1`` the result is exactly :func:`svd_factors`.

    >>> W = torch.randn(5, 3, dtype=torch.float64)
    >>> a = asvd_factors(W, torch.ones(3), rank=2)
    >>> b = svd_factors(W, rank=2)
    >>> bool(torch.equal(a.left, b.left) and torch.equal(a.right, b.right))
    True
    """
    out_f, in_f = W.shape
    _check_rank(rank, out_f, in_f)
    if act_abs_mean.shape != (in_f,):
        raise ValueError(
            f"act_abs_mean must have shape [{in_f}] (one value per input channel), "
            f"got {list(act_abs_mean.shape)}"
        )
    cd = compute_dtype(W)
    s = act_abs_mean.detach().to(torch.float64).abs().pow(alpha).clamp_min(1e-6).to(cd)  # [in]
    U, S, Vh = truncated_svd(W.detach().to(cd) * s, rank, compute=cd, weight_dtype=W.dtype)
    root = S[:rank].sqrt().to(cd)  # [r]
    left = U * root  # [out, r]
    right = root[:, None] * Vh / s  # [r, in]: √Σ_r V_rᵀ diag(1/s)
    return Factors(
        left=left.to(W.dtype),
        right=right.to(W.dtype),
        singular_values=S,
        rank=rank,
        energy=_energy(S, rank),
    )


def _cholesky_with_jitter(xtx: Tensor) -> Tensor:
    """Lower Cholesky factor of ``xtx``, adding ``eps·mean(diag)·I`` until it is PD.

    ``eps`` starts at :data:`CHOLESKY_JITTER` and grows ×10 for up to
    :data:`CHOLESKY_TRIES` tries (1e-10 … 1e-3 relative); the first try adds nothing. A
    calibration set with fewer distinct rows than input features (or dead channels) makes
    ``XᵀX`` singular; the jitter then acts as a ridge term and the SVD-LLM error identity
    holds only approximately.
    """
    L, info = torch.linalg.cholesky_ex(xtx)
    if int(info) == 0:
        return L
    scale = float(xtx.diagonal().mean().abs())
    scale = scale if scale > 0.0 else 1.0
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    eps = CHOLESKY_JITTER
    for _ in range(CHOLESKY_TRIES):
        L, info = torch.linalg.cholesky_ex(xtx + (eps * scale) * eye)
        if int(info) == 0:
            return L
        eps *= 10.0
    raise ValueError(
        f"XᵀX is not positive definite even with jitter {eps / 10.0:g}·mean(diag)·I; "
        "the calibration statistics are probably corrupt (NaN/inf or negative variance)"
    )


def svd_llm_factors(W: Tensor, xtx: Tensor, rank: int) -> Factors:
    """SVD-LLM (arXiv 2403.07378): truncation-aware whitening by ``S = cholesky(XᵀX)``.

    ``xtx`` is ``[in, in]``, the sum of ``xᵀx`` over the calibration rows. With
    ``W·S = U Σ Vᵀ`` the factors are ``left = U_r`` and ``right = Σ_r V_rᵀ S⁻¹`` (a
    triangular solve, never an explicit inverse). Dropping singular value ``i`` then costs
    exactly ``σ_i²`` of squared output error on the calibration rows:
    ``‖(W − left·right)·Xᵀ‖_F² = Σ_{i>r} σ_i²``. If ``XᵀX`` is singular, jitter is added
    (see :func:`_cholesky_with_jitter`) and the identity holds only up to that jitter.

    >>> W = torch.randn(4, 3, dtype=torch.float64)
    >>> X = torch.randn(10, 3, dtype=torch.float64)
    >>> f = svd_llm_factors(W, X.T @ X, rank=2)
    >>> err = ((W - f.left @ f.right) @ X.T).square().sum()
    >>> bool(torch.isclose(err, f.singular_values[2:].square().sum()))
    True
    """
    out_f, in_f = W.shape
    _check_rank(rank, out_f, in_f)
    if xtx.shape != (in_f, in_f):
        raise ValueError(f"xtx must have shape [{in_f}, {in_f}], got {list(xtx.shape)}")
    xtx64 = xtx.detach().to(torch.float64)
    xtx64 = (xtx64 + xtx64.T) / 2  # accumulated sums drift from symmetric in low precision
    L = _cholesky_with_jitter(xtx64)  # [in, in], lower, XᵀX ≈ L Lᵀ
    cd = compute_dtype(W)
    ws = (W.detach().to(torch.float64) @ L).to(cd)  # W·S
    U, S, Vh = truncated_svd(ws, rank, compute=cd, weight_dtype=W.dtype)
    del ws
    left = U  # [out, r]
    sv_r = S[:rank, None] * Vh.to(torch.float64)  # [r, in]: Σ_r V_rᵀ
    right = torch.linalg.solve_triangular(L, sv_r, upper=False, left=False)  # right·L = Σ_r V_rᵀ
    return Factors(
        left=left.to(W.dtype),
        right=right.to(W.dtype),
        singular_values=S,
        rank=rank,
        energy=_energy(S, rank),
    )


def refactor_pair(
    first: Tensor, second: Tensor, rank: int, input_gram: Tensor | None = None
) -> Factors:
    """Re-factor the product ``second @ first`` at a lower ``rank`` (one PLRD step).

    ``first`` is ``[r, in]`` and ``second`` is ``[out, r]`` (a ``LowRankLinear``). The
    second factor is re-factored, ``second ≈ A·B`` with ``A [out, rank]``, ``B [rank, r]``,
    and ``B`` is folded into the first factor, so the pair stays two layers:
    ``left = A`` and ``right = B @ first`` (``[rank, in]``).

    ``A·B`` is chosen to minimise ``‖(second − A·B)·first·S‖_F`` where ``S Sᵀ = M`` is the
    metric on the layer's *input* space given by ``input_gram``:

    * ``None``: ``M = I``, so the new product is exactly the best rank-``rank`` approximation
      of ``second @ first`` (plain SVD of the product; the PLRD truncation identity);
    * a vector ``[in]``: ``M = diag(v)`` (ASVD: pass ``s²`` with ``s = mean|x|^α``);
    * a matrix ``[in, in]``: ``M = XᵀX`` (SVD-LLM: minimises the output error on the
      calibration rows, where dropping singular value ``i`` costs ``σ_i²``).

    It is a whitened SVD of ``second`` with the Gram ``G = first·M·firstᵀ`` (``[r, r]``) of
    the second factor's inputs, ``G = L Lᵀ``: ``second·L = U Σ Vᵀ``, ``left = U_k √Σ_k``,
    ``right = √Σ_k V_kᵀ L⁻¹ first``. Because ``L⁻¹·first`` has orthonormal rows under ``M``,
    ``singular_values`` are those of ``second·first·S``. Costs ``O(r·in²)`` for a Gram
    matrix and ``O(out·r²)`` for the SVD, never an ``[out, in]`` SVD.

    >>> W = torch.randn(6, 5, dtype=torch.float64)
    >>> full = svd_factors(W, rank=5)
    >>> f = refactor_pair(full.right, full.left, rank=2)
    >>> best = svd_factors(W, rank=2)
    >>> bool(torch.allclose(f.left @ f.right, best.left @ best.right))
    True
    """
    r = first.shape[0]
    out_f, r2 = second.shape
    if r != r2:
        raise ValueError(
            f"factor shapes do not chain: first {list(first.shape)}, second {list(second.shape)}"
        )
    _check_rank(rank, out_f, r)
    w0 = first.detach().to(torch.float64)  # [r, in]
    w1 = second.detach().to(torch.float64)  # [out, r]
    if input_gram is None:
        gram = w0 @ w0.T  # [r, r]
    elif input_gram.dim() == 1:
        gram = (w0 * input_gram.detach().to(torch.float64)) @ w0.T  # [r, r]
    else:
        gram = w0 @ input_gram.detach().to(torch.float64) @ w0.T  # [r, r]
    gram = (gram + gram.T) / 2
    L = _cholesky_with_jitter(gram)  # [r, r], lower
    U, S, Vh = truncated_svd(w1 @ L, rank, weight_dtype=second.dtype)  # [out, rank], [k], [rank, r]
    root = S[:rank].sqrt()  # [rank]
    left = U * root  # [out, rank]
    b = torch.linalg.solve_triangular(L, root[:, None] * Vh, upper=False, left=False)
    right = b @ w0  # [rank, in]
    return Factors(
        left=left.to(second.dtype),
        right=right.to(first.dtype),
        singular_values=S,
        rank=rank,
        energy=_energy(S, rank),
    )


def _leading_left_vectors(m: Tensor, rank: int) -> Tensor:
    """The first ``rank`` left singular vectors of ``m`` (``[rows, rank]``), even if ``rank``
    exceeds ``min(m.shape)`` (then the full orthogonal basis is needed)."""
    full = rank > min(m.shape)
    U = torch.linalg.svd(m, full_matrices=full)[0]
    return U[:, :rank]


def tucker2_factors(weight4d: Tensor, rank_out: int, rank_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """Tucker-2 of a Conv2d weight by HOSVD: ``W ≈ core ×₀ U_out ×₁ U_in``.

    ``weight4d`` is ``[S, C, kh, kw]``. Returns ``(first, core, last)`` as conv weights:
    ``first [r_in, C, 1, 1]`` (``U_inᵀ``), ``core [r_out, r_in, kh, kw]`` and
    ``last [S, r_out, 1, 1]`` (``U_out``), where ``U_out``/``U_in`` are the leading left
    singular vectors of the mode-0 (``[S, C·kh·kw]``) and mode-1 (``[C, S·kh·kw]``)
    unfoldings. Exact at full ranks (``rank_out = S``, ``rank_in = C``).

    >>> w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    >>> first, core, last = tucker2_factors(w, rank_out=6, rank_in=4)
    >>> first.shape, core.shape, last.shape
    (torch.Size([4, 4, 1, 1]), torch.Size([6, 4, 3, 3]), torch.Size([6, 6, 1, 1]))
    >>> bool(torch.allclose(torch.einsum("oikl,so,ic->sckl", core, last[:, :, 0, 0],
    ...                                  first[:, :, 0, 0]), w))
    True
    """
    if weight4d.ndim != 4:
        raise ValueError(f"expected a 4-d conv weight [S, C, kh, kw], got {list(weight4d.shape)}")
    S, C, kh, kw = weight4d.shape
    if not 1 <= rank_out <= S:
        raise ValueError(f"rank_out must be in [1, {S}] (output channels), got {rank_out}")
    if not 1 <= rank_in <= C:
        raise ValueError(f"rank_in must be in [1, {C}] (input channels), got {rank_in}")
    w = weight4d.detach().to(torch.float64)  # [S, C, kh, kw]
    u_out = _leading_left_vectors(w.reshape(S, C * kh * kw), rank_out)  # [S, r_out]
    u_in = _leading_left_vectors(w.transpose(0, 1).reshape(C, S * kh * kw), rank_in)  # [C, r_in]
    core = torch.einsum("sckl,so,ci->oikl", w, u_out, u_in)  # [r_out, r_in, kh, kw]
    first = u_in.T[:, :, None, None]  # [r_in, C, 1, 1]
    last = u_out[:, :, None, None]  # [S, r_out, 1, 1]
    dt = weight4d.dtype
    return first.contiguous().to(dt), core.contiguous().to(dt), last.contiguous().to(dt)


# ---------------------------------------------------------------------------------------------
# rank rules


def rank_from_fraction(in_f: int, out_f: int, fraction: float) -> int:
    """``round(fraction · min(in, out))`` (halves round up), clamped to ``[1, min(in, out)]``.

    >>> rank_from_fraction(768, 3072, 0.25)
    192
    >>> rank_from_fraction(10, 10, 0.01)
    1
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"rank fraction must be in (0, 1], got {fraction}")
    full = min(in_f, out_f)
    return max(1, min(full, math.floor(fraction * full + 0.5)))


def rank_for_energy(singular_values: Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i<r} σ_i² / Σ σ_i² ≥ energy``.

    ``energy`` is in ``(0, 1]``; ``1.0`` gives the numerical rank (the full length when no
    singular value is negligible), and an all-zero spectrum gives 1.

    >>> sv = torch.tensor([3.0, 2.0, 1.0])  # energies 9/14, 4/14, 1/14
    >>> rank_for_energy(sv, 0.6), rank_for_energy(sv, 0.9), rank_for_energy(sv, 1.0)
    (1, 2, 3)
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy threshold must be in (0, 1], got {energy}")
    n = int(singular_values.numel())
    if n == 0:
        raise ValueError("empty spectrum")
    cum = singular_values.detach().to(torch.float64).square().cumsum(0)  # [n]
    total = float(cum[-1])
    if total == 0.0:
        return 1
    # cum[-1] / total is exactly 1.0, so the search always succeeds for energy ≤ 1
    r = int(torch.searchsorted(cum / total, torch.tensor([energy], dtype=torch.float64))[0]) + 1
    return min(r, n)


def break_even_rank(in_f: int, out_f: int) -> int:
    """Largest ``r`` with ``r·(in + out) < in·out`` (strictly fewer weights); 0 if none.

    >>> break_even_rank(768, 768), break_even_rank(2, 2), break_even_rank(4, 4)
    (383, 0, 1)
    """
    return max(0, (in_f * out_f - 1) // (in_f + out_f))


def round_rank(r: int, multiple: int, *, max_rank: int) -> int:
    """Round a rank to a hardware tile multiple without exceeding ``max_rank``.

    The rule, in order:

    1. ``multiple == 1``, or no multiple fits (``max_rank < multiple``): return ``r``
       clamped to ``[1, max_rank]`` (unrounded; a tile-aligned rank does not exist).
    2. Otherwise round ``r`` to the nearest multiple of ``multiple`` (ties go *down*, to the
       cheaper rank), at least ``multiple`` itself, at most the largest multiple
       ``≤ max_rank``.

    The result is never 0 and never above ``max_rank``. To guarantee a compressing rank,
    pass ``max_rank=break_even_rank(in, out)``.

    >>> round_rank(100, 64, max_rank=1000), round_rank(96, 64, max_rank=1000)
    (128, 64)
    >>> round_rank(300, 64, max_rank=255), round_rank(5, 16, max_rank=9), round_rank(0, 8, max_rank=64)
    (192, 5, 8)
    """
    if multiple < 1:
        raise ValueError(f"rank multiple must be ≥ 1, got {multiple}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be ≥ 1, got {max_rank}")
    if multiple == 1 or max_rank < multiple:
        return max(1, min(r, max_rank))
    q, rem = divmod(max(r, 0), multiple)
    nearest = (q + (1 if 2 * rem > multiple else 0)) * multiple
    cap = (max_rank // multiple) * multiple
    return min(max(nearest, multiple), cap)


# ---------------------------------------------------------------------------------------------
# costs


def dense_params(in_f: int, out_f: int, bias: bool = True) -> int:
    """Parameters of ``Linear(in→out)``: ``in·out (+ out)``.

    >>> dense_params(16, 32)
    544
    """
    return in_f * out_f + (out_f if bias else 0)


def lowrank_params(in_f: int, out_f: int, r: int, bias: bool = True) -> int:
    """Parameters of a :class:`~surgery.modules.LowRankLinear`: ``r·(in+out) (+ out)``.

    >>> lowrank_params(16, 32, 4)
    224
    """
    return r * (in_f + out_f) + (out_f if bias else 0)


def dense_flops(tokens: int, in_f: int, out_f: int) -> int:
    """FLOPs of ``Linear(in→out)`` on ``tokens`` rows: ``2·tokens·in·out`` (2 per MAC; the
    bias add is ignored, it is the same before and after decomposition).

    >>> dense_flops(1, 16, 32)
    1024
    """
    return 2 * tokens * in_f * out_f


def lowrank_flops(tokens: int, in_f: int, out_f: int, r: int) -> int:
    """FLOPs of the two factors on ``tokens`` rows: ``2·tokens·r·(in+out)``.

    >>> lowrank_flops(1, 16, 32, 4)
    384
    """
    return 2 * tokens * r * (in_f + out_f)


def layer_cost(layer: LayerSpectrum, rank: int, kind: BudgetKind) -> int:
    """The cost :func:`allocate_budget` counts for ``layer`` at ``rank``.

    ``rank ≥ min(in, out)`` means "not decomposed" (dense cost). Parameters exclude the bias,
    which is the same before and after.

    >>> L = LayerSpectrum("fc", 16, 32, tokens=10, singular_values=torch.ones(16))
    >>> layer_cost(L, 4, "params"), layer_cost(L, 16, "params"), layer_cost(L, 4, "flops")
    (192, 512, 3840)
    """
    dense = rank >= min(layer.in_f, layer.out_f)
    if kind == "params":
        if dense:
            return dense_params(layer.in_f, layer.out_f, bias=False)
        return lowrank_params(layer.in_f, layer.out_f, rank, bias=False)
    if kind == "flops":
        if dense:
            return dense_flops(layer.tokens, layer.in_f, layer.out_f)
        return lowrank_flops(layer.tokens, layer.in_f, layer.out_f, rank)
    raise ValueError(f"budget kind must be `params` or `flops`, got `{kind}`")


# ---------------------------------------------------------------------------------------------
# global budget


def allocate_budget(
    layers: list[LayerSpectrum],
    budget_fraction: float,
    kind: BudgetKind,
    *,
    multiple: int = 1,
    weights: dict[str, float] | None = None,
) -> dict[str, int]:
    """Per-layer ranks that fit a global cost budget while keeping the most spectral energy.

    The budget is ``budget_fraction × Σ dense cost`` of ``layers`` (cost per
    :func:`layer_cost`: weights for ``"params"``, ``2·tokens·in·out`` for ``"flops"``). The
    objective is the sum over layers of the kept fraction of each layer's ``Σσ²``, each
    layer's term multiplied by ``weights[name]`` when given (measured sensitivities,
    :mod:`surgery.sensitivity`; a missing name weighs 1).

    Algorithm (greedy on marginal gain per unit cost, with a heap):

    * Every layer starts at its smallest rank, ``multiple`` (or 1 if the layer's break-even
      rank is below ``multiple``, then its ranks step by 1). A layer with break-even rank 0
      (no rank compresses it) stays dense.
    * A layer's next move is one rank step (``+multiple``): gain = the normalised ``σ²`` of
      the added singular values, cost = the added params/FLOPs. Once a layer reaches its cap
      (the largest step multiple ``≤`` :func:`break_even_rank`), its next move is "go dense":
      gain = the energy still missing, cost = dense cost − current cost.
    * Repeatedly take the move with the best gain/cost. A move that does not fit in the
      remaining budget retires its layer (its moves only get more expensive while the
      remaining budget only shrinks); the loop ends when no layer can move.

    Guarantees: the total cost is ``≤`` the budget, and no layer left below dense could take
    one more step without exceeding it ("met within one rank step"). Returned ranks are
    multiples of ``multiple`` where the layer allows; a rank equal to ``min(in, out)`` means
    "keep dense, do not decompose". If even the smallest ranks exceed the budget, raise
    ``ValueError`` naming the smallest achievable fraction.

    >>> sv_fast = torch.tensor([10.0, 1.0, 0.1, 0.01])   # one dominant direction
    >>> sv_flat = torch.ones(4)                           # no direction matters more
    >>> layers = [LayerSpectrum("a", 16, 4, 1, sv_fast), LayerSpectrum("b", 16, 4, 1, sv_flat)]
    >>> allocate_budget(layers, 0.5, "params")
    {'a': 1, 'b': 2}
    """
    if budget_fraction <= 0.0:
        raise ValueError(f"budget fraction must be positive, got {budget_fraction}")
    if multiple < 1:
        raise ValueError(f"rank multiple must be ≥ 1, got {multiple}")
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names must be unique")

    ranks: dict[str, int] = {}
    dense_total = 0
    used = 0
    # per movable layer: (layer, normalised cumulative energy [n+1], step, cap)
    state: list[tuple[LayerSpectrum, list[float], int, int]] = []
    heap: list[tuple[float, int, int]] = []  # (-gain/cost, layer index, cost)

    def push(i: int) -> None:
        layer, cum, step, cap = state[i]
        r = ranks[layer.name]
        full = min(layer.in_f, layer.out_f)
        if r >= full:
            return
        nxt = full if r >= cap else r + step
        gain = cum[min(nxt, len(cum) - 1)] - cum[min(r, len(cum) - 1)]
        if weights is not None:
            gain *= weights.get(layer.name, 1.0)
        cost = layer_cost(layer, nxt, kind) - layer_cost(layer, r, kind)
        heapq.heappush(heap, (-gain / cost, i, cost))

    for layer in layers:
        full = min(layer.in_f, layer.out_f)
        dense_total += layer_cost(layer, full, kind)
        be = break_even_rank(layer.in_f, layer.out_f)
        if be == 0:
            ranks[layer.name] = full
            used += layer_cost(layer, full, kind)
            continue
        step = multiple if be >= multiple else 1
        cap = (be // step) * step
        sq = layer.singular_values.detach().to(torch.float64).square()
        total = float(sq.sum())
        cum = [0.0, *(sq.cumsum(0) / total if total > 0 else torch.zeros_like(sq)).tolist()]
        ranks[layer.name] = step
        used += layer_cost(layer, step, kind)
        state.append((layer, cum, step, cap))

    budget = budget_fraction * dense_total
    if used > budget:
        raise ValueError(
            f"budget {budget_fraction:.4g} of {kind} is infeasible: the smallest ranks already "
            f"cost {used / dense_total:.4g} of the dense total"
        )
    for i in range(len(state)):
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if used + cost > budget:
            continue  # retire this layer: later moves cost at least as much
        layer, _, step, cap = state[i]
        r = ranks[layer.name]
        ranks[layer.name] = min(layer.in_f, layer.out_f) if r >= cap else r + step
        used += cost
        push(i)
    return ranks


# ---------------------------------------------------------------------------------------------
# hardware-aware rank choice


def pick_rank_below_cliff(
    latency: dict[int, float],
    dense_latency: float,
    requested: int,
    step: int,
    *,
    cliff_ratio: float = 2.0,
) -> int | None:
    """Choose a rank from a measured latency table: the rank just below the largest cliff.

    A pure function of the table (``{rank: seconds}``), so tests can pass fake tables.

    Rule:

    1. Candidates are ``requested, requested − step, requested − 2·step, …`` down to
       ``≥ step``, keeping those present in ``latency`` (descending). None present:
       ``ValueError``.
    2. If no candidate is faster than ``dense_latency`` (strictly), return ``None``: the
       layer should stay dense.
    3. Drops between consecutive candidates: ``d_j = latency[c_j] − latency[c_{j+1}]``.
       The largest drop (ties: the higher rank) is a *cliff* when it is positive and larger
       than ``cliff_ratio ×`` the median of the other drops (negatives counted as 0; no
       other drops → median 0). The pick is ``c_{j+1}``, the rank just below the cliff. With
       no cliff (e.g. latency linear in rank, or flat) the pick is ``requested`` (the
       highest candidate): lowering the rank would cost accuracy for a proportional gain.
    4. If the pick is not faster than dense, return the highest candidate below it that is,
       or else the highest candidate that is.

    Worked example: step 1, requested 258; latency ``1.00 + 0.001·r`` except that ranks
    above 256 pay a 15% penalty (an extra tile). Drops are 0.001 everywhere except
    ``latency[257] − latency[256] ≈ 0.188``, far above 2 × 0.001, so the cliff is between
    257 and 256 and the pick is 256.

    >>> lat = {r: 1.0 + 0.001 * r + (0.15 if r > 256 else 0.0) for r in range(1, 259)}
    >>> pick_rank_below_cliff(lat, dense_latency=2.0, requested=258, step=1)
    256
    >>> pick_rank_below_cliff({r: 0.01 * r for r in range(1, 9)}, 1.0, 8, 1)  # linear: no cliff
    8
    >>> pick_rank_below_cliff({8: 3.0, 4: 2.5}, dense_latency=2.0, requested=8, step=4) is None
    True
    """
    if step < 1:
        raise ValueError(f"rank step must be ≥ 1, got {step}")
    cands = [c for c in range(requested, step - 1, -step) if c in latency]  # descending
    if not cands:
        raise ValueError(
            f"latency table has none of the candidate ranks {requested}, {requested - step}, …"
        )
    faster = [c for c in cands if latency[c] < dense_latency]
    if not faster:
        return None
    pick = cands[0]
    drops = [latency[a] - latency[b] for a, b in itertools.pairwise(cands)]
    if drops:
        j = max(range(len(drops)), key=lambda k: (drops[k], -k))  # ties → higher rank
        others = sorted(max(d, 0.0) for k, d in enumerate(drops) if k != j)
        median = 0.0
        if others:
            mid = len(others) // 2
            median = others[mid] if len(others) % 2 else (others[mid - 1] + others[mid]) / 2
        if drops[j] > 0.0 and drops[j] > cliff_ratio * median:
            pick = cands[j + 1]
    if latency[pick] < dense_latency:
        return pick
    below = [c for c in faster if c < pick]
    return below[0] if below else faster[0]
