"""`decompose ... progressive K steps` (PLRD): schedule, truncation identity, manager family."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from surgery.graph import analyze
from surgery.inputs import Inputs
from surgery.lowrank import refactor_pair, svd_factors
from surgery.manager import Manager
from surgery.modules import LowRankLinear
from surgery.parse import parse
from surgery.passes.base import PassContext
from surgery.passes.decompose import DecomposePass
from surgery.passes.progressive import progressive_schedule
from tests.helpers_models import tiny_bert

F64 = torch.float64


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(1, 600),
    frac=st.floats(0.01, 1.0),
    steps=st.integers(1, 6),
    multiple=st.sampled_from([1, 8]),
)
def test_schedule_is_non_increasing_and_ends_at_the_target(
    start: int, frac: float, steps: int, multiple: int
) -> None:
    target = max(1, min(start, int(start * frac)))
    ranks = progressive_schedule(start, target, steps, multiple)
    assert len(ranks) == steps and ranks[-1] == target
    assert all(a >= b for a, b in itertools.pairwise(ranks))
    assert all(target <= r <= start for r in ranks)


def _truncation(W: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def _count_linears(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def test_layer_count_constant_and_truncation_identity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 48, dtype=F64), nn.Tanh(), nn.Linear(48, 40, dtype=F64))
    x = torch.randn(5, 40, dtype=F64)
    ex = Inputs((x,), {})
    stmt = parse("decompose Linear rank = 0.25 progressive 3 steps").statements[0]
    assert DecomposePass(stmt).family_steps() == 3
    previous = {
        p: m.weight.detach().clone() for p, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    counts, ranks = [], []
    for k in (1, 2, 3):
        ctx = PassContext(analysis=analyze(model, ex), example=ex, original=None)
        p = DecomposePass(stmt, ctx, member=k)
        plan = p.plan(model)
        p.apply(model, plan)
        counts.append(_count_linears(model))
        ranks.append([model.get_submodule(path).rank for path in previous])
        for path, before in previous.items():
            pair = model.get_submodule(path)
            assert isinstance(pair, LowRankLinear)
            # the product is the rank-r truncation of the previous product (no healing between)
            torch.testing.assert_close(
                pair.weight, _truncation(before, pair.rank), rtol=1e-9, atol=1e-9
            )
            previous[path] = pair.weight.detach().clone()
        assert all(r.detail["step"] == f"{k}/3" for r in plan.changed_rows)
    assert counts == [4, 4, 4]  # two Linear factors per original Linear at every step
    assert ranks[-1] == [10, 10]  # 0.25 of min(40, 48)
    assert ranks[0][0] > ranks[1][0] > ranks[2][0]


def test_refactor_pair_svd_llm_identity() -> None:
    """Re-factoring in the calibration metric: output error = discarded σ² of the product."""
    torch.manual_seed(0)
    W = torch.randn(12, 10, dtype=F64)
    X = torch.randn(60, 10, dtype=F64) @ torch.randn(10, 10, dtype=F64)
    f0 = svd_factors(W, 8)
    P = f0.left @ f0.right
    f = refactor_pair(f0.right, f0.left, 3, X.T @ X)
    err = float(((P - f.left @ f.right) @ X.T).square().sum())
    sv = torch.linalg.svdvals(P @ torch.linalg.cholesky(X.T @ X))
    assert err == pytest.approx(float(sv[3:].square().sum()), rel=1e-7)
    assert f.right.shape == (3, 10) and f.left.shape == (12, 3)


def test_asvd_refactor_with_unit_scales_equals_plain() -> None:
    torch.manual_seed(0)
    f0 = svd_factors(torch.randn(9, 7, dtype=F64), 6)
    a = refactor_pair(f0.right, f0.left, 2, torch.ones(7, dtype=F64))
    b = refactor_pair(f0.right, f0.left, 2, None)
    torch.testing.assert_close(a.left @ a.right, b.left @ b.right)


@pytest.mark.parametrize("method", ["svd", "svd-llm"])
def test_manager_progressive_family_with_heal(method: str) -> None:
    recipe = parse(
        f"decompose Linear rank = 0.25 method {method} progressive 3 steps\nheal steps 5"
    )
    run = Manager(recipe, tiny_bert()).run(measure=False)
    assert [m.step for m in run.family] == [1, 2, 3]
    assert len(run.heals) == 3  # between members 1→2, 2→3, then the statement itself
    assert all(len(h.losses) == 5 for h in run.heals)
    sizes = [
        sum(p.numel() for p in member.parameters()) for member in (m.model for m in run.family)
    ]
    assert sizes[0] > sizes[1] > sizes[2]
    counts = [_count_linears(member) for member in (m.model for m in run.family)]
    assert counts[0] == counts[1] == counts[2]
    last = run.steps[-1].plan
    for row in last.changed_rows:
        assert row.detail["step"] == "3/3" and row.detail["rank"] == row.detail["target"] == 8
        assert row.detail["member_params"] == sizes[2]
        assert "member_drift" in row.detail
    assert [s.family_member for s in run.steps] == [1, 2, 3]


def test_refactor_step_without_step_one_plans_nothing() -> None:
    model = nn.Sequential(nn.Linear(16, 16))
    stmt = parse("decompose Linear rank = 0.25 progressive 2 steps").statements[0]
    p = DecomposePass(stmt, member=2)
    p.ensure_context(model)
    plan = p.plan(model)
    assert plan.rows == [] and "no pair" in plan.notes[0]
