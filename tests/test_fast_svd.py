"""The checked Gram-eigh fast path of `truncated_svd`, and streaming plan+apply of `decompose`.

The fast path must give the error of the full SVD: in float64 to 1e-8 relative, and for
16-bit weights within the rounding the factors get when stored in that format. Requests it
cannot serve (full rank, rank-deficient matrices) go to `torch.linalg.svd`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery import lowrank
from surgery.lowrank import svd_factors, svd_llm_factors, truncated_svd
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.decompose import DecomposePass

F64 = torch.float64


def spectrum_matrix(out_f: int, in_f: int, decay: float, seed: int) -> torch.Tensor:
    """A float64 ``[out, in]`` matrix with singular values ``i^-decay``."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=F64))[0]
    s = torch.arange(1, k + 1, dtype=F64).pow(-decay)
    return (U * s) @ V.T


def squared_error(W: torch.Tensor, f: lowrank.Factors) -> float:
    return float((W.to(F64) - f.left.to(F64) @ f.right.to(F64)).square().sum())


class NoFullSvd:
    """Make `torch.linalg.svd` fail, to prove a call took the fast path."""

    def __enter__(self) -> None:
        self.saved = torch.linalg.svd

        def refuse(*args: object, **kwargs: object) -> None:
            raise AssertionError("the full SVD ran")

        torch.linalg.svd = refuse  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        torch.linalg.svd = self.saved


@settings(max_examples=30, deadline=None)
@given(
    out_f=st.integers(8, 60),
    in_f=st.integers(8, 60),
    frac=st.floats(0.05, 0.9),
    decay=st.floats(0.0, 1.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_path_error_equals_the_full_svd(
    out_f: int, in_f: int, frac: float, decay: float, seed: int
) -> None:
    W = spectrum_matrix(out_f, in_f, decay, seed)
    k = min(out_f, in_f)
    r = max(1, min(k - 1, round(frac * k)))
    with NoFullSvd():
        U, S, Vh = truncated_svd(W, r)
    best = float(torch.linalg.svdvals(W)[r:].square().sum())
    got = float((W - U @ torch.diag(S[:r]) @ Vh).square().sum())
    assert got == pytest.approx(best, rel=1e-7, abs=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(W), atol=1e-7)


def test_full_rank_and_rank_deficient_requests_take_the_full_svd() -> None:
    W = spectrum_matrix(20, 12, 0.5, 0)
    with NoFullSvd(), pytest.raises(AssertionError, match="full SVD ran"):
        truncated_svd(W, 12)
    low = spectrum_matrix(20, 3, 0.0, 1) @ spectrum_matrix(3, 12, 0.0, 2)  # rank 3
    with NoFullSvd(), pytest.raises(AssertionError, match="full SVD ran"):
        truncated_svd(low, 5)  # λ_5 is rounding noise: the Gram cannot divide by it
    f = svd_factors(low, 5)
    assert torch.allclose(f.left @ f.right, low, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(300, 120), (120, 300)])
def test_16bit_weights_use_a_float32_gram_with_the_same_error(
    dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    W = spectrum_matrix(*shape, 0.5, 3).mul(0.05).to(dtype)
    assert lowrank.compute_dtype(W) == torch.float32
    u2 = (torch.finfo(dtype).eps / 2) ** 2
    total = float(W.to(F64).square().sum())
    for r in (10, 60):
        with NoFullSvd():
            fast = svd_factors(W, r)
        U, S, Vh = torch.linalg.svd(W.to(F64), full_matrices=False)
        root = S[:r].sqrt()
        ref = lowrank.Factors(
            (U[:, :r] * root).to(dtype), (root[:, None] * Vh[:r]).to(dtype), S, r, 0.0
        )
        assert fast.left.dtype == dtype
        assert abs(squared_error(W, fast) - squared_error(W, ref)) <= 2 * u2 * total


def test_svd_llm_identity_holds_on_the_fast_path() -> None:
    g = torch.Generator().manual_seed(5)
    W = spectrum_matrix(40, 24, 0.7, 4)
    X = torch.randn(200, 24, generator=g, dtype=F64)
    with NoFullSvd():
        f = svd_llm_factors(W, X.T @ X, 9)
    err = float(((W - f.left @ f.right) @ X.T).square().sum())
    assert err == pytest.approx(float(f.singular_values[9:].square().sum()), rel=1e-8)


# ---------------------------------------------------------------------------------------------
# streaming plan+apply


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(48, 96)
        self.b = nn.Linear(96, 48)
        self.c = nn.Linear(48, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.mark.parametrize(
    "recipe",
    [
        "decompose Linear rank = 0.25",
        "decompose Linear rank = 12 round 8",
        "decompose Linear rank = energy 0.8 method svd-llm",
        "decompose Linear rank = 0.5 method asvd",
    ],
)
def test_streaming_run_equals_plan_then_apply(recipe: str) -> None:
    from surgery.graph import analyze
    from surgery.inputs import Inputs

    torch.manual_seed(0)
    model = Mlp().eval()
    example = Inputs((torch.randn(64, 48),), {})
    stmt = parse(recipe).statements[0]

    def context() -> PassContext:
        return PassContext(analysis=analyze(model, example), example=example)

    streamed_model = copy.deepcopy(model)
    p = DecomposePass(stmt, context())
    plan_s, changes_s = p.run(streamed_model)
    assert p._streamed is None
    two_step_model = copy.deepcopy(model)
    q = DecomposePass(stmt, context())
    plan_t = q.plan(two_step_model)
    changes_t = q.apply(two_step_model, plan_t)
    assert plan_s.as_dict() == plan_t.as_dict()
    assert [c.as_dict() for c in changes_s] == [c.as_dict() for c in changes_t]
    assert changes_s, "the recipe decomposed nothing"
    state_s, state_t = streamed_model.state_dict(), two_step_model.state_dict()
    assert state_s.keys() == state_t.keys()
    assert all(torch.equal(state_s[k], state_t[k]) for k in state_s)
