"""`factorize Linear dense-sparse basis B nonzeros K` (DSFormer)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.modules.registry import build
from surgery.modules.sparse import DenseSparseLinear, dense_sparse_fit
from surgery.parse import parse
from surgery.passes.factorize import FactorizePass, RefreshMasks

F64 = torch.float64


@settings(max_examples=25, deadline=None)
@given(
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 12),
    full_in=st.booleans(),
    seed=st.integers(0, 999),
)
def test_full_basis_with_k_equal_basis_is_exact(
    out_f: int, in_f: int, full_in: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, dtype=F64)
    basis = in_f if full_in else min(in_f, out_f)  # B = in (over-complete when in > out) or min
    module = DenseSparseLinear.from_linear(lin, basis=basis, nonzeros=basis)
    x = torch.randn(4, in_f, dtype=F64)
    # Exact up to the fit's ridge (1e-12·σ₁²), which an ill-conditioned weight amplifies by
    # σ₁²/σ_min² (seed 450 at 6×6 gives 1.7e-9): 1e-7 still tells exact from approximate.
    torch.testing.assert_close(module(x), lin(x), rtol=1e-7, atol=1e-7)
    assert module.fit_error < 1e-7


def test_sparsity_is_k_per_column_of_c() -> None:
    torch.manual_seed(0)
    module = DenseSparseLinear.from_linear(nn.Linear(40, 24, dtype=F64), basis=12, nonzeros=3)
    assert module.mask.shape == (12, 40)  # C is [B, in]
    assert bool((module.mask.sum(0) == 3).all())  # exactly K per column (per input feature)
    assert bool((module.coef[~module.mask] == 0).all())
    torch.testing.assert_close(module.weight, module.dense @ module.coef)


def test_fit_beats_truncated_svd_of_the_same_sparsity() -> None:
    """The alternating fit is never worse than its SVD start with top-K codes."""
    torch.manual_seed(0)
    w = torch.randn(32, 48, dtype=F64)
    _, _, err1 = dense_sparse_fit(w, basis=16, nonzeros=4, iterations=1)
    d, c, err8 = dense_sparse_fit(w, basis=16, nonzeros=4, iterations=8)
    assert err8 <= err1 < 1.0
    assert float((w - d @ c).norm() / w.norm()) == pytest.approx(err8)


def test_straight_through_top_k_training() -> None:
    torch.manual_seed(0)
    teacher = nn.Linear(16, 8, dtype=F64)
    student = DenseSparseLinear.from_linear(nn.Linear(16, 8, dtype=F64), basis=8, nonzeros=2)
    student.train()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    hook = RefreshMasks()
    model = nn.Sequential(student)
    x = torch.randn(64, 16, dtype=F64)
    losses = []
    for step in range(30):
        loss = (model(x) - teacher(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        # straight-through: pruned coefficients get a gradient and may come back
        assert student.coef.grad is not None and bool(student.coef.grad[~student.mask].ne(0).any())
        opt.step()
        hook.after_step(model, step)
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert bool((student.mask.sum(0) == 2).all())
    student.eval()
    torch.testing.assert_close(
        student(x), x @ (student.dense @ (student.coef * student.mask)).T + student.bias
    )


def test_pass_end_to_end() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 2))
    x = torch.randn(5, 64)
    stmt = parse("factorize Linear dense-sparse basis 16 nonzeros 4").statements[0]
    p = FactorizePass(stmt)
    p.ensure_context(model)
    plan = p.plan(model)
    rows = {r.path: r for r in plan.rows}
    assert rows["0"].action == "factorize"
    assert rows["0"].params_after == 64 * 16 + 4 * 64 + 64
    assert rows["2"].action == "skip" and "saves no parameters" in rows["2"].note
    changes = p.apply(model, plan)
    assert [c.path for c in changes] == ["0"] and 0 < changes[0].detail["fit_error"] < 1
    assert isinstance(model[0], DenseSparseLinear) and model(x).shape == (5, 2)
    assert isinstance(p.training_hooks(model)[0], RefreshMasks)


@pytest.mark.parametrize(
    ("source", "code"),
    [
        ("factorize Linear dense-sparse basis 4 nonzeros 8", "S0203"),
        ("factorize Linear dense-sparse basis 4 nonzeros 0", "S0203"),
        ("factorize Linear dense-sprase basis 4 nonzeros 2", "S0201"),
    ],
)
def test_check_rejects_what_factorize_does_not_revalidate(source: str, code: str) -> None:
    from surgery.check import check

    assert [d.code for d in check(parse(source))] == [code]


@pytest.mark.parametrize(("basis", "k", "bias"), [(4, 2, True), (6, 6, False)])
def test_save_reload(basis: int, k: int, bias: bool) -> None:
    module = DenseSparseLinear.from_linear(nn.Linear(10, 6, bias=bias, dtype=F64), basis, k).eval()
    rebuilt = build(module.registry_name(), module.spec()).eval()
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(3, 10, dtype=F64)
    assert torch.equal(rebuilt(x), module(x))


def test_linear_selector_factorizes_hf_conv1d_as_its_linear() -> None:
    """GPT-2's projections are HF ``Conv1D`` (``x @ W + b``, weight ``[in, out]``):
    ``factorize Linear`` takes them too and gives exactly what the same map as an
    ``nn.Linear`` gets."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(12, 16)).double()  # 16 inputs → 12 outputs
    linear = nn.Sequential(nn.Linear(16, 12)).double()
    with torch.no_grad():
        linear[0].weight.copy_(conv[0].weight.t())
        linear[0].bias.copy_(conv[0].bias)
    stmt = parse("factorize Linear dense-sparse basis 4 nonzeros 2").statements[0]
    plans = []
    for model in (conv, linear):
        p = FactorizePass(stmt)
        plan = p.plan(model)
        plans.append([(r.path, r.shape, r.action, r.params_after) for r in plan.rows])
        p.apply(model, plan)
        assert isinstance(model[0], DenseSparseLinear)
    assert plans[0] == plans[1] == [("0", "16→12", "factorize", 12 * 4 + 2 * 16 + 12)]
    x = torch.randn(5, 16, dtype=F64)
    assert torch.equal(conv(x), linear(x))
